#include "forest.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <new>
#include <string>
#include <thread>
#include <utility>

namespace rstar {

namespace {

using detail::ROOT_BIT;
using detail::TERMINAL_FLAG;
using detail::VALUED_FLAG;

constexpr std::uint64_t kMaxTreeIds = std::uint64_t{1} << 31;  // ids must fit beside ROOT_BIT
constexpr std::uint32_t kMaxChildrenLimit = 0xFFFF;              // n_children is 16-bit
// Below these sizes a batch runs on the calling thread: waking workers costs more.
constexpr std::size_t kParallelDescents = 512;
constexpr std::size_t kParallelItems = 2048;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

void* map_region(std::size_t bytes) {
  // Reserved, not committed: pages are faulted in as the arena's high water grows.
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw CapacityError("cannot reserve " + std::to_string(bytes) + " bytes for the node arena");
  return p;
}

// The fixed-point increment of W for value v (contract: floor(v * 2^32 + 0.5)).
inline std::int64_t to_fixed(double v) { return static_cast<std::int64_t>(std::floor(v * VALUE_SCALE + 0.5)); }

void check_values(std::span<const double> values, const char* what) {
  for (double v : values) {
    if (!std::isfinite(v)) throw InvalidArgument(std::string(what) + " must be finite (NaN or infinite value given)");
    if (std::fabs(v) > MAX_ABS_VALUE) throw InvalidArgument(std::string(what) + " must satisfy abs(v) <= 2**20");
  }
}

void check_length(std::size_t got, std::size_t want, const char* what) {
  if (got != want)
    throw InvalidArgument(std::string(what) + " has length " + std::to_string(got) + ", expected " + std::to_string(want));
}

// noinline: GCC 12 -O3 reports a bogus -Wfree-nonheap-object on the inlined vector.
template <class T>
[[gnu::noinline]] bool has_duplicates(std::span<const T> ids) {
  bool increasing = true;  // the common case (children blocks, fresh tree ids) needs no sort
  for (std::size_t i = 1; i < ids.size() && increasing; ++i) increasing = ids[i - 1] < ids[i];
  if (increasing) return false;
  std::vector<T> v(ids.size());
  std::copy(ids.begin(), ids.end(), v.begin());
  std::sort(v.begin(), v.end());
  return std::adjacent_find(v.begin(), v.end()) != v.end();
}

template <class T>
void check_no_duplicates(std::span<const T> ids, const char* what) {
  if (has_duplicates(ids)) throw InvalidArgument(std::string("duplicate ") + what + " in one call");
}

std::uint32_t owner_bits(std::uint64_t tag) { return static_cast<std::uint32_t>(tag >> 8) & 0xFFFFFFu; }
std::uint32_t status_bits(std::uint64_t tag) { return static_cast<std::uint32_t>(tag) & 0xFFu; }
std::uint32_t gen_bits(std::uint64_t tag) { return static_cast<std::uint32_t>(tag >> 32); }
std::uint64_t make_tag(std::uint32_t gen, std::uint32_t status, std::uint32_t owner = 0) {
  return (std::uint64_t{gen} << 32) | (std::uint64_t{owner} << 8) | status;
}

}  // namespace

// ---- tree guard ------------------------------------------------------------------------------

// Marks this call as a user of each tree it touches; release_trees refuses trees with users.
// The handshake (users++ then read status; status = RELEASING then read users, all seq_cst)
// guarantees that either the caller sees the release or the release sees the caller.
class Forest::TreeGuard {
 public:
  TreeGuard() = default;
  TreeGuard(const TreeGuard&) = delete;
  TreeGuard& operator=(const TreeGuard&) = delete;
  ~TreeGuard() {
    for (auto* t : entered_) t->users.fetch_sub(1, std::memory_order_seq_cst);
  }
  bool enter(TreeRec* t) {
    for (;;) {
      t->users.fetch_add(1, std::memory_order_seq_cst);
      const auto s = t->status.load(std::memory_order_seq_cst);
      if (s == detail::TREE_LIVE) {
        entered_.push_back(t);
        return true;
      }
      t->users.fetch_sub(1, std::memory_order_seq_cst);
      if (s != detail::TREE_RELEASING) return false;
      std::this_thread::yield();  // a release is deciding; its outcome comes within microseconds
    }
  }
  void reserve(std::size_t n) { entered_.reserve(n); }

 private:
  std::vector<TreeRec*> entered_;
};

// ---- construction ----------------------------------------------------------------------------

Forest::Forest(const Options& options) : opt_(options), pool_(options.num_threads) {
  if (opt_.max_nodes < 1 || opt_.max_nodes > NONE)
    throw InvalidArgument("max_nodes must be in [1, 2**32 - 1], got " + std::to_string(opt_.max_nodes));
  if (!std::isfinite(opt_.c) || opt_.c < 0.0) throw InvalidArgument("c must be finite and >= 0");
  if (!std::isfinite(opt_.fpu_value)) throw InvalidArgument("fpu_value must be finite");
  if (!std::isfinite(opt_.virtual_loss) || opt_.virtual_loss < 0.0)
    throw InvalidArgument("virtual_loss must be finite and >= 0");
  if (opt_.max_children < 1 || opt_.max_children > kMaxChildrenLimit)
    throw InvalidArgument("max_children must be in [1, 65535], got " + std::to_string(opt_.max_children));
  nodes_map_bytes_ = static_cast<std::size_t>(opt_.max_nodes) * sizeof(Node);
  cold_map_bytes_ = static_cast<std::size_t>(opt_.max_nodes) * sizeof(Cold);
  nodes_ = static_cast<Node*>(map_region(nodes_map_bytes_));
  try {
    cold_ = static_cast<Cold*>(map_region(cold_map_bytes_));
  } catch (...) {
    ::munmap(nodes_, nodes_map_bytes_);
    throw;
  }
  const std::size_t classes = std::size_t{opt_.max_children} + 1;
  free_heads_.reset(new std::atomic<std::uint64_t>[classes]);
  free_counts_.reset(new std::atomic<std::int64_t>[classes]);
  for (std::size_t i = 0; i < classes; ++i) {
    free_heads_[i].store(NONE, std::memory_order_relaxed);
    free_counts_[i].store(0, std::memory_order_relaxed);
  }
  ticket_free_head_.store(NONE, std::memory_order_relaxed);
}

Forest::~Forest() {
  ::munmap(nodes_, nodes_map_bytes_);
  ::munmap(cold_, cold_map_bytes_);
}

// ---- arena -----------------------------------------------------------------------------------

// Treiber stack per block size. head = tag << 32 | first id; the tag changes on every push and
// pop, so a stale head (ABA) fails the CAS. The next link lives in the first node's
// first_child, which is atomic, so reading it from a block another thread just popped is benign.
void Forest::push_block(std::uint32_t start, std::uint32_t n) {
  auto& head = free_heads_[n];
  std::uint64_t old = head.load(std::memory_order_relaxed);
  std::uint64_t next;
  do {
    node(start).first_child.store(static_cast<std::uint32_t>(old), std::memory_order_relaxed);
    next = (((old >> 32) + 1) << 32) | start;
  } while (!head.compare_exchange_weak(old, next, std::memory_order_release, std::memory_order_relaxed));
  free_counts_[n].fetch_add(1, std::memory_order_relaxed);
  nodes_free_.fetch_add(n, std::memory_order_relaxed);
}

std::uint32_t Forest::pop_block(std::uint32_t n) {
  auto& head = free_heads_[n];
  std::uint64_t old = head.load(std::memory_order_acquire);
  while (static_cast<std::uint32_t>(old) != NONE) {
    const auto first = static_cast<std::uint32_t>(old);
    const std::uint32_t link = node(first).first_child.load(std::memory_order_relaxed);
    const std::uint64_t next = (((old >> 32) + 1) << 32) | link;
    if (head.compare_exchange_weak(old, next, std::memory_order_acquire, std::memory_order_acquire)) {
      free_counts_[n].fetch_sub(1, std::memory_order_relaxed);
      nodes_free_.fetch_sub(n, std::memory_order_relaxed);
      return first;
    }
  }
  return NONE;
}

// Exact size class, else the top of the arena, else split the smallest larger free block.
std::uint32_t Forest::alloc_block(std::uint32_t n) {
  std::uint32_t s = pop_block(n);
  if (s != NONE) return s;
  std::uint64_t hw = high_water_.load(std::memory_order_relaxed);
  while (hw + n <= opt_.max_nodes) {
    if (high_water_.compare_exchange_weak(hw, hw + n, std::memory_order_relaxed)) {
      for (std::uint64_t i = hw; i < hw + n; ++i) {  // first use of these slots: construct
        new (&nodes_[i]) Node{};
        new (&cold_[i]) Cold{};
      }
      return static_cast<std::uint32_t>(hw);
    }
  }
  for (std::uint32_t m = n + 1; m <= opt_.max_children; ++m) {
    if (free_counts_[m].load(std::memory_order_relaxed) <= 0) continue;
    s = pop_block(m);
    if (s != NONE) {
      push_block(s + n, m - n);
      return s;
    }
  }
  return NONE;
}

// Replays alloc_block's policy on counts only, so a batch that cannot be served fails before
// it changes anything.
void Forest::plan_blocks(std::span<const std::uint32_t> sizes) const {
  std::uint64_t total = 0;
  for (auto n : sizes) total += n;
  const std::uint64_t hw = high_water_.load(std::memory_order_relaxed);
  if (hw + total <= opt_.max_nodes) return;  // the top alone can serve everything
  std::vector<std::int64_t> avail(std::size_t{opt_.max_children} + 1);
  for (std::size_t m = 1; m < avail.size(); ++m) avail[m] = free_counts_[m].load(std::memory_order_relaxed);
  std::uint64_t top = hw;
  for (auto n : sizes) {
    if (n == 0) continue;
    if (avail[n] > 0) {
      --avail[n];
    } else if (top + n <= opt_.max_nodes) {
      top += n;
    } else {
      std::uint32_t m = n + 1;
      while (m <= opt_.max_children && avail[m] <= 0) ++m;
      if (m > opt_.max_children)
        throw CapacityError("node arena full: no block of " + std::to_string(n) + " nodes (max_nodes " +
                            std::to_string(opt_.max_nodes) + ", high water " + std::to_string(top) + ")");
      --avail[m];
      ++avail[m - n];
    }
  }
}

void Forest::init_node(std::uint32_t i, std::uint32_t parent, float prior, std::uint64_t payload) {
  Node& nd = node(i);
  nd.W.store(0, std::memory_order_relaxed);
  nd.N.store(0, std::memory_order_relaxed);
  nd.O.store(0, std::memory_order_relaxed);
  nd.first_child.store(NONE, std::memory_order_relaxed);
  nd.parent.store(parent, std::memory_order_relaxed);
  nd.prior = prior;
  nd.n_children = 0;
  nd.flags.store(0, std::memory_order_relaxed);
  nd.state.store(UNEXPANDED, std::memory_order_relaxed);
  Cold& cd = cold(i);
  cd.payload = payload;
  cd.init_value.store(kNaN, std::memory_order_relaxed);
  cd.reward = 0.0;
}

// ---- trees and nodes -------------------------------------------------------------------------

Forest::TreeRec* Forest::find_tree(std::int64_t id) const {
  if (id < 0 || static_cast<std::uint64_t>(id) >= trees_created_.load(std::memory_order_acquire)) return nullptr;
  return trees_.find(static_cast<std::uint64_t>(id));
}

bool Forest::node_known(std::int64_t id) const {
  if (id < 0 || static_cast<std::uint64_t>(id) >= high_water_.load(std::memory_order_acquire)) return false;
  return node(static_cast<std::uint32_t>(id)).state.load(std::memory_order_acquire) != FREE_STATE;
}

std::uint32_t Forest::tree_of(std::uint32_t i) const {
  // Bounded walk: a stale id racing with reuse must not loop forever.
  const std::uint64_t limit = high_water_.load(std::memory_order_acquire);
  for (std::uint64_t steps = 0; steps <= limit; ++steps) {
    if (i >= limit) return NONE;
    const std::uint32_t p = node(i).parent.load(std::memory_order_relaxed);
    if (p & ROOT_BIT) return p & ~ROOT_BIT;
    i = p;
  }
  return NONE;
}

std::int32_t Forest::depth_of(std::uint32_t i) const {
  std::int32_t d = 0;
  for (;;) {
    const std::uint32_t p = node(i).parent.load(std::memory_order_relaxed);
    if (p & ROOT_BIT) return d;
    i = p;
    ++d;
  }
}

void Forest::check_trees(std::span<const std::int64_t> ids, TreeGuard& guard) {
  guard.reserve(ids.size());
  for (auto id : ids) {
    TreeRec* t = find_tree(id);
    if (!t || !guard.enter(t)) throw UnknownIdError("unknown tree id " + std::to_string(id));
  }
}

void Forest::check_nodes(std::span<const std::int64_t> ids, TreeGuard& guard) {
  guard.reserve(ids.size());
  for (auto id : ids) {
    bool ok = node_known(id);
    if (ok) {
      const std::uint32_t t = tree_of(static_cast<std::uint32_t>(id));
      TreeRec* tr = t == NONE ? nullptr : find_tree(t);
      // Re-check after entering: the node cannot be freed while its tree has a user.
      ok = tr && guard.enter(tr) && node_known(id);
    }
    if (!ok) throw UnknownIdError("unknown node id " + std::to_string(id));
  }
}

std::vector<std::uint32_t> Forest::add_trees(std::span<const std::uint64_t> root_payloads) {
  const std::size_t n = root_payloads.size();
  if (n == 0) return {};
  if (trees_created_.load(std::memory_order_relaxed) + n > kMaxTreeIds)
    throw CapacityError("tree ids exhausted (at most 2**31 trees per forest)");
  std::vector<std::uint32_t> ones(n, 1);
  plan_blocks(ones);
  std::vector<std::uint32_t> roots(n);
  for (std::size_t j = 0; j < n; ++j) {
    roots[j] = alloc_block(1);
    if (roots[j] == NONE) {  // only when another thread took the space since plan_blocks
      for (std::size_t i = 0; i < j; ++i) push_block(roots[i], 1);
      throw CapacityError("node arena full (max_nodes " + std::to_string(opt_.max_nodes) + ")");
    }
  }
  const std::uint32_t first = trees_created_.load(std::memory_order_relaxed);
  std::uint32_t base = first;
  // Reserve n consecutive ids; publish trees_created_ only after the records exist.
  static_assert(sizeof(std::uint32_t) == 4);
  for (;;) {
    for (std::size_t j = 0; j < n; ++j) trees_.ensure(base + j);
    if (trees_created_.compare_exchange_weak(base, static_cast<std::uint32_t>(base + n), std::memory_order_acq_rel))
      break;
  }
  std::vector<std::uint32_t> ids(n);
  for (std::size_t j = 0; j < n; ++j) {
    const auto id = static_cast<std::uint32_t>(base + j);
    init_node(roots[j], ROOT_BIT | id, 1.0f, root_payloads[j]);
    TreeRec& t = trees_.at(id);
    t.root.store(roots[j], std::memory_order_relaxed);
    t.n_nodes.store(1, std::memory_order_relaxed);
    t.open_tickets.store(0, std::memory_order_relaxed);
    t.status.store(detail::TREE_LIVE, std::memory_order_seq_cst);
    ids[j] = id;
  }
  trees_live_.fetch_add(static_cast<std::int64_t>(n), std::memory_order_relaxed);
  return ids;
}

std::vector<std::uint32_t> Forest::roots(std::span<const std::int64_t> tree_ids) {
  TreeGuard guard;
  check_trees(tree_ids, guard);
  std::vector<std::uint32_t> out(tree_ids.size());
  for (std::size_t j = 0; j < out.size(); ++j)
    out[j] = trees_.at(static_cast<std::uint64_t>(tree_ids[j])).root.load(std::memory_order_relaxed);
  return out;
}

std::vector<std::uint32_t> Forest::live_trees() const {
  std::vector<std::uint32_t> out;
  const std::uint32_t n = trees_created_.load(std::memory_order_acquire);
  for (std::uint32_t i = 0; i < n; ++i) {
    const auto s = trees_.at(i).status.load(std::memory_order_acquire);
    if (s == detail::TREE_LIVE || s == detail::TREE_RELEASING) out.push_back(i);
  }
  return out;
}

std::uint64_t Forest::release_trees(std::span<const std::int64_t> tree_ids) {
  check_no_duplicates(tree_ids, "tree ids");
  std::vector<TreeRec*> recs(tree_ids.size());
  for (std::size_t j = 0; j < recs.size(); ++j) {
    recs[j] = find_tree(tree_ids[j]);
    if (!recs[j] || recs[j]->status.load(std::memory_order_acquire) != detail::TREE_LIVE)
      throw UnknownIdError("unknown tree id " + std::to_string(tree_ids[j]));
  }
  // Claim every tree (LIVE -> RELEASING), then check it is idle; undo all on any failure.
  std::size_t claimed = 0;
  auto undo = [&] {
    for (std::size_t i = 0; i < claimed; ++i) recs[i]->status.store(detail::TREE_LIVE, std::memory_order_seq_cst);
  };
  for (; claimed < recs.size(); ++claimed) {
    std::uint8_t live = detail::TREE_LIVE;
    if (!recs[claimed]->status.compare_exchange_strong(live, detail::TREE_RELEASING, std::memory_order_seq_cst)) {
      undo();
      throw UnknownIdError("unknown tree id " + std::to_string(tree_ids[claimed]));
    }
  }
  claimed = recs.size();
  for (std::size_t j = 0; j < recs.size(); ++j) {
    const auto open = recs[j]->open_tickets.load(std::memory_order_seq_cst);
    if (open != 0) {
      undo();
      throw ForestStateError("tree " + std::to_string(tree_ids[j]) + " has " + std::to_string(open) +
                             " open tickets; resolve them first");
    }
    if (recs[j]->users.load(std::memory_order_seq_cst) != 0) {
      undo();
      throw ForestStateError("tree " + std::to_string(tree_ids[j]) + " is in use by a concurrent call");
    }
  }
  std::uint64_t freed = 0;
  std::vector<std::pair<std::uint32_t, std::uint32_t>> blocks;  // (start, size), breadth-first
  for (std::size_t j = 0; j < recs.size(); ++j) {
    blocks.clear();
    blocks.emplace_back(recs[j]->root.load(std::memory_order_relaxed), 1u);
    // Collect first: pushing a block overwrites its first node's first_child (the link).
    for (std::size_t b = 0; b < blocks.size(); ++b) {
      const auto [s, n] = blocks[b];
      for (std::uint32_t i = s; i < s + n; ++i) {
        const Node& nd = node(i);
        if (nd.state.load(std::memory_order_acquire) == EXPANDED && nd.n_children > 0)
          blocks.emplace_back(nd.first_child.load(std::memory_order_relaxed), nd.n_children);
      }
    }
    for (const auto& [s, n] : blocks) {
      for (std::uint32_t i = s; i < s + n; ++i) node(i).state.store(FREE_STATE, std::memory_order_relaxed);
      push_block(s, n);
      freed += n;
    }
    recs[j]->status.store(detail::TREE_RELEASED, std::memory_order_seq_cst);
  }
  trees_live_.fetch_sub(static_cast<std::int64_t>(recs.size()), std::memory_order_relaxed);
  return freed;
}

// ---- tickets ---------------------------------------------------------------------------------

Forest::TicketRec* Forest::ticket_slot(std::uint64_t ticket) const {
  const std::uint64_t slot = ticket & 0xFFFFFFFFu;
  if (slot >= ticket_slots_.load(std::memory_order_acquire)) return nullptr;
  return tickets_.find(slot);
}

std::uint64_t Forest::new_ticket(std::uint32_t tree, std::uint32_t start, std::uint32_t leaf) {
  // Pop a freed slot (Treiber stack, ABA tag in the high half) or take a new one.
  std::uint64_t old = ticket_free_head_.load(std::memory_order_acquire);
  std::uint32_t slot = NONE;
  while (static_cast<std::uint32_t>(old) != NONE) {
    const auto s = static_cast<std::uint32_t>(old);
    const std::uint32_t link = tickets_.at(s).next_free.load(std::memory_order_relaxed);
    if (ticket_free_head_.compare_exchange_weak(old, (((old >> 32) + 1) << 32) | link, std::memory_order_acquire,
                                                std::memory_order_acquire)) {
      slot = s;
      break;
    }
  }
  std::uint32_t gen;
  if (slot == NONE) {
    // A fresh slot: its tag is 0 until now, and generation 0 never matches a ticket id.
    const std::uint64_t s = ticket_slots_.fetch_add(1, std::memory_order_acq_rel);
    if (s >= decltype(tickets_)::kCapacity) throw CapacityError("ticket table full");
    tickets_.ensure(s);
    slot = static_cast<std::uint32_t>(s);
    gen = 1;
  } else {
    gen = gen_bits(tickets_.at(slot).tag.load(std::memory_order_relaxed));
  }
  TicketRec& rec = tickets_.at(slot);
  rec.tree = tree;
  rec.start = start;
  rec.leaf = leaf;
  rec.tag.store(make_tag(gen, detail::TK_OPEN), std::memory_order_release);
  return (std::uint64_t{gen} << 32) | slot;
}

std::vector<std::uint32_t> Forest::claim_tickets(std::span<const std::uint64_t> tickets, std::uint32_t& owner) {
  owner = (owner_tokens_.fetch_add(1, std::memory_order_relaxed) & 0xFFFFFFu) | 0x1u;
  std::vector<std::uint32_t> status(tickets.size(), detail::TK_FREE);
  std::size_t first_unknown = tickets.size();
  bool duplicate = false;
  std::vector<std::uint64_t> unknown;
  std::size_t j = 0;
  for (; j < tickets.size(); ++j) {
    const std::uint64_t tk = tickets[j];
    const auto gen = static_cast<std::uint32_t>(tk >> 32);
    TicketRec* rec = ticket_slot(tk);
    bool ok = false;
    if (rec) {
      std::uint64_t cur = rec->tag.load(std::memory_order_acquire);
      for (;;) {
        if (gen_bits(cur) != gen) break;
        const std::uint32_t st = status_bits(cur);
        if (st == detail::TK_BUSY) {
          duplicate = duplicate || owner_bits(cur) == owner;
          break;
        }
        if (st != detail::TK_OPEN && st != detail::TK_EXPANDED) break;
        if (rec->tag.compare_exchange_weak(cur, make_tag(gen, detail::TK_BUSY, owner), std::memory_order_acquire,
                                           std::memory_order_acquire)) {
          status[j] = st;
          ok = true;
          break;
        }
      }
    }
    if (!ok && !(rec && gen_bits(rec->tag.load(std::memory_order_relaxed)) == gen && duplicate)) {
      if (first_unknown == tickets.size()) first_unknown = j;
      unknown.push_back(tk);
    }
  }
  if (!duplicate && unknown.size() > 1) duplicate = has_duplicates(std::span<const std::uint64_t>(unknown));
  if (duplicate || first_unknown < tickets.size()) {
    unclaim_tickets(tickets, status, tickets.size());
    if (duplicate) throw InvalidArgument("duplicate tickets in one call");
    throw UnknownIdError("unknown or resolved ticket " + std::to_string(tickets[first_unknown]));
  }
  return status;
}

void Forest::unclaim_tickets(std::span<const std::uint64_t> tickets, std::span<const std::uint32_t> status,
                             std::size_t n) {
  for (std::size_t j = 0; j < n; ++j) {
    if (status[j] == detail::TK_FREE) continue;  // not claimed by us
    TicketRec& rec = *ticket_slot(tickets[j]);
    rec.tag.store(make_tag(static_cast<std::uint32_t>(tickets[j] >> 32), status[j]), std::memory_order_release);
  }
}

void Forest::resolve_ticket(std::uint64_t ticket) {
  const auto slot = static_cast<std::uint32_t>(ticket);
  TicketRec& rec = tickets_.at(slot);
  const std::uint32_t tree = rec.tree;
  std::uint32_t gen = static_cast<std::uint32_t>(ticket >> 32) + 1;
  if (gen == 0) gen = 1;
  rec.tag.store(make_tag(gen, detail::TK_FREE), std::memory_order_release);
  std::uint64_t old = ticket_free_head_.load(std::memory_order_relaxed);
  do {
    rec.next_free.store(static_cast<std::uint32_t>(old), std::memory_order_relaxed);
  } while (!ticket_free_head_.compare_exchange_weak(old, (((old >> 32) + 1) << 32) | slot, std::memory_order_release,
                                                    std::memory_order_relaxed));
  // Last: once open_tickets reaches 0 the tree may be released.
  trees_.at(tree).open_tickets.fetch_sub(1, std::memory_order_seq_cst);
}

// ---- statistics --------------------------------------------------------------------------------

double Forest::q_of(const Node& n) const {
  const std::uint32_t N = n.N.load(std::memory_order_relaxed);
  if (N == 0) return 0.0;
  return static_cast<double>(n.W.load(std::memory_order_relaxed)) / VALUE_SCALE / static_cast<double>(N);
}

void Forest::add_to_root(std::uint32_t i, std::int64_t fx) {
  for (;;) {
    Node& nd = node(i);
    nd.N.fetch_add(1, std::memory_order_relaxed);
    nd.W.fetch_add(fx, std::memory_order_relaxed);
    const std::uint32_t p = nd.parent.load(std::memory_order_relaxed);
    if (p & ROOT_BIT) return;
    i = p;
  }
}

void Forest::remove_pending(std::uint32_t leaf, std::uint32_t start) {
  for (std::uint32_t i = leaf;; i = node(i).parent.load(std::memory_order_relaxed)) {
    node(i).O.fetch_sub(1, std::memory_order_relaxed);
    if (i == start) return;
  }
}

template <class F>
void Forest::for_chunks(std::size_t n, std::size_t min_per_thread, F&& f) {
  const std::size_t threads = pool_.size();
  if (threads <= 1 || n < 2 * min_per_thread) {
    f(std::size_t{0}, n);
    return;
  }
  const std::size_t chunks = std::min(threads, n / min_per_thread);
  pool_.parallel_for(chunks, [&](std::size_t c) { f(n * c / chunks, n * (c + 1) / chunks); });
}

// ---- selection ---------------------------------------------------------------------------------

Forest::SelectParams Forest::select_params(std::int64_t k, std::optional<Rule> rule, std::optional<double> c) const {
  if (k < 0 || k > 65536) throw InvalidArgument("k must be in [0, 65536], got " + std::to_string(k));
  if (c && (!std::isfinite(*c) || *c < 0.0)) throw InvalidArgument("c must be finite and >= 0");
  return SelectParams{rule.value_or(opt_.rule) == Rule::Puct, c.value_or(opt_.c)};
}

// Same operations in the same order as the Python reference (see the .pyi), so decisions
// agree bit for bit. Built with -ffp-contract=off.
double Forest::child_score(const Node& ch, std::uint64_t npe, double log_npe, double parent_q,
                           const SelectParams& p) const {
  const std::uint64_t n = ch.N.load(std::memory_order_relaxed);
  const std::uint64_t o = ch.O.load(std::memory_order_relaxed);
  const std::uint64_t ne = n + o;
  double q;
  if (opt_.virtual_loss > 0.0 && o > 0) {
    const double w = static_cast<double>(ch.W.load(std::memory_order_relaxed)) / VALUE_SCALE;
    q = (w - opt_.virtual_loss * static_cast<double>(o)) / static_cast<double>(ne);
  } else if (n > 0) {
    q = static_cast<double>(ch.W.load(std::memory_order_relaxed)) / VALUE_SCALE / static_cast<double>(n);
  } else if (p.puct) {
    q = opt_.fpu_mode == FpuMode::Value ? opt_.fpu_value : parent_q - opt_.fpu_value;
  } else {
    q = 0.0;
  }
  double u;
  if (p.puct) {
    u = p.c * static_cast<double>(ch.prior) * std::sqrt(static_cast<double>(npe)) / (1.0 + static_cast<double>(ne));
  } else if (ne == 0 || npe <= 1) {
    u = 0.0;
  } else {
    u = p.c * std::sqrt(log_npe / static_cast<double>(ne));
  }
  return q + u;
}

// One descent. Read-only except for the claim (CAS) of the leaf and the lazy closing of a node
// whose children are all terminal; pending visits are added by the caller after a claim.
std::uint32_t Forest::descend(std::uint32_t start, const SelectParams& p, bool& collided, bool& dead) const {
  collided = dead = false;
  if (node(start).flags.load(std::memory_order_acquire) & TERMINAL_FLAG) {
    dead = true;
    return NONE;
  }
  std::uint32_t cur = start;
  for (;;) {
    Node& nd = node(cur);
    std::uint8_t st = nd.state.load(std::memory_order_acquire);
    if (st == UNEXPANDED) {
      if (nd.state.compare_exchange_strong(st, EXPANDING, std::memory_order_acq_rel, std::memory_order_acquire))
        return cur;
      continue;  // lost the claim to another thread: look again
    }
    if (st == EXPANDING) {
      collided = true;
      return NONE;
    }
    if (st != EXPANDED || (nd.flags.load(std::memory_order_acquire) & TERMINAL_FLAG)) {
      dead = true;  // closed or invalidated by another thread since we chose it
      return NONE;
    }
    const std::uint32_t first = nd.first_child.load(std::memory_order_acquire);
    const std::uint32_t nch = nd.n_children;
    const std::uint64_t npe =
        std::uint64_t{nd.N.load(std::memory_order_relaxed)} + nd.O.load(std::memory_order_relaxed);
    const double parent_q = (p.puct && opt_.fpu_mode == FpuMode::Parent) ? q_of(nd) : 0.0;
    const double log_npe = (!p.puct && npe > 1) ? std::log(static_cast<double>(npe)) : 0.0;
    std::uint32_t best_any = NONE, best = NONE;
    bool best_any_expanding = false;
    double best_any_s = 0.0, best_s = 0.0;
    for (std::uint32_t i = first; i < first + nch; ++i) {
      const Node& ch = node(i);
      if (ch.flags.load(std::memory_order_relaxed) & TERMINAL_FLAG) continue;
      const double s = child_score(ch, npe, log_npe, parent_q, p);
      const bool expanding = ch.state.load(std::memory_order_relaxed) == EXPANDING;
      if (best_any == NONE || s > best_any_s) {
        best_any = i;
        best_any_s = s;
        best_any_expanding = expanding;
      }
      if (!expanding && (best == NONE || s > best_s)) {
        best = i;
        best_s = s;
      }
    }
    if (best_any == NONE) {  // every child is terminal: close this node (official rStar rule)
      nd.flags.fetch_or(TERMINAL_FLAG, std::memory_order_acq_rel);
      dead = true;
      return NONE;
    }
    if (best_any_expanding) collided = true;
    if (best == NONE) return NONE;
    cur = best;
  }
}

Selection Forest::run_select(std::span<const std::uint32_t> starts, std::span<const std::uint32_t> start_trees,
                             std::uint32_t k, const SelectParams& p) {
  const std::size_t n = starts.size();
  Selection out;
  if (n == 0 || k == 0) return out;
  {
    const std::uint64_t most = std::min<std::uint64_t>(std::uint64_t{n} * k, high_water_.load());
    if (static_cast<std::uint64_t>(tickets_open_.load()) + most > decltype(tickets_)::kCapacity)
      throw CapacityError("too many open tickets");
  }
  struct Leaf {
    std::uint32_t leaf, start, path_begin, path_len;
  };
  struct Shard {
    std::vector<std::uint32_t> items;
    std::vector<Leaf> leaves;
    std::vector<std::uint32_t> path;
    std::uint64_t selects = 0, collisions = 0, dead_ends = 0;
  };
  std::vector<std::uint32_t> item_begin(n), item_count(n), item_shard(n);
  const std::size_t n_shards =
      (pool_.size() > 1 && n >= 2 && std::uint64_t{n} * k >= kParallelDescents) ? std::min<std::size_t>(pool_.size(), n)
                                                                               : 1;
  std::vector<Shard> shards(n_shards);
  // Each tree goes to one shard, in input order: results do not depend on the thread count.
  for (std::size_t i = 0; i < n; ++i) {
    item_shard[i] = static_cast<std::uint32_t>(n_shards == 1 ? 0 : start_trees[i] % n_shards);
    shards[item_shard[i]].items.push_back(static_cast<std::uint32_t>(i));
  }
  auto work = [&](std::size_t s) {
    Shard& sh = shards[s];
    sh.leaves.reserve(sh.items.size());
    for (std::uint32_t i : sh.items) {
      item_begin[i] = static_cast<std::uint32_t>(sh.leaves.size());
      const std::uint32_t start = starts[i];
      for (std::uint32_t j = 0; j < k; ++j) {
        bool collided, dead;
        const std::uint32_t leaf = descend(start, p, collided, dead);
        ++sh.selects;
        sh.collisions += collided;
        sh.dead_ends += dead;
        if (leaf == NONE) {
          // A failed descent changes nothing unless it closed a node below the start, so when
          // it collided, or the start itself is terminal, the remaining descents of this item
          // would repeat it exactly: count them without walking.
          const std::uint64_t rest = k - 1 - j;
          if (!dead) {
            sh.selects += rest;
            sh.collisions += rest;
            break;
          }
          if (node(start).flags.load(std::memory_order_acquire) & TERMINAL_FLAG) {
            sh.selects += rest;
            sh.dead_ends += rest;
            break;
          }
          continue;
        }
        for (std::uint32_t v = leaf;; v = node(v).parent.load(std::memory_order_relaxed)) {
          node(v).O.fetch_add(1, std::memory_order_relaxed);
          if (v == start) break;
        }
        const auto begin = static_cast<std::uint32_t>(sh.path.size());
        for (std::uint32_t v = leaf;;) {
          sh.path.push_back(v);
          const std::uint32_t par = node(v).parent.load(std::memory_order_relaxed);
          if (par & ROOT_BIT) break;
          v = par;
        }
        std::reverse(sh.path.begin() + begin, sh.path.end());
        sh.leaves.push_back(Leaf{leaf, start, begin, static_cast<std::uint32_t>(sh.path.size() - begin)});
      }
      item_count[i] = static_cast<std::uint32_t>(sh.leaves.size() - item_begin[i]);
    }
  };
  if (n_shards == 1)
    work(0);
  else
    pool_.parallel_for(n_shards, work);

  // Assemble in input order and open the tickets (serially: ticket ids are deterministic).
  std::size_t L = 0, P = 0;
  for (const auto& sh : shards) {
    L += sh.leaves.size();
    P += sh.path.size();
    out.collisions += sh.collisions;
    out.dead_ends += sh.dead_ends;
  }
  out.tickets.resize(L);
  out.trees.resize(L);
  out.nodes.resize(L);
  out.depths.resize(L);
  out.path_offsets.resize(L + 1);
  out.path_nodes.resize(P);
  out.path_payloads.resize(P);
  std::size_t li = 0, pi = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (item_count[i] == 0) continue;
    const Shard& sh = shards[item_shard[i]];
    const std::uint32_t tree = start_trees[i];
    for (std::uint32_t j = item_begin[i]; j < item_begin[i] + item_count[i]; ++j, ++li) {
      const Leaf& lf = sh.leaves[j];
      out.tickets[li] = new_ticket(tree, lf.start, lf.leaf);
      out.trees[li] = tree;
      out.nodes[li] = lf.leaf;
      out.depths[li] = static_cast<std::int32_t>(lf.path_len) - 1;
      for (std::uint32_t q = 0; q < lf.path_len; ++q, ++pi) {
        const std::uint32_t v = sh.path[lf.path_begin + q];
        out.path_nodes[pi] = v;
        out.path_payloads[pi] = cold(v).payload;
      }
      out.path_offsets[li + 1] = static_cast<std::int64_t>(pi);
    }
    trees_.at(tree).open_tickets.fetch_add(item_count[i], std::memory_order_seq_cst);
  }
  tickets_open_.fetch_add(static_cast<std::int64_t>(L), std::memory_order_relaxed);
  std::uint64_t selects = 0;
  for (const auto& sh : shards) selects += sh.selects;
  counters_.selects.fetch_add(selects, std::memory_order_relaxed);
  counters_.leaves.fetch_add(L, std::memory_order_relaxed);
  counters_.collisions.fetch_add(out.collisions, std::memory_order_relaxed);
  counters_.dead_ends.fetch_add(out.dead_ends, std::memory_order_relaxed);
  return out;
}

Selection Forest::select(std::span<const std::int64_t> tree_ids, std::int64_t k, std::optional<Rule> rule,
                         std::optional<double> c) {
  const SelectParams p = select_params(k, rule, c);
  TreeGuard guard;  // held until the tickets exist: the trees cannot be released meanwhile
  check_trees(tree_ids, guard);
  std::vector<std::uint32_t> starts(tree_ids.size()), trees(tree_ids.size());
  for (std::size_t i = 0; i < starts.size(); ++i) {
    trees[i] = static_cast<std::uint32_t>(tree_ids[i]);
    starts[i] = trees_.at(trees[i]).root.load(std::memory_order_relaxed);
  }
  const auto kk = static_cast<std::uint32_t>(std::min<std::int64_t>(k, 0xFFFFFFFF));
  return run_select(starts, trees, kk, p);
}

Selection Forest::select_from(std::span<const std::int64_t> nodes, std::int64_t k, std::optional<Rule> rule,
                              std::optional<double> c) {
  const SelectParams p = select_params(k, rule, c);
  TreeGuard guard;
  check_nodes(nodes, guard);
  std::vector<std::uint32_t> starts(nodes.size()), trees(nodes.size());
  for (std::size_t i = 0; i < starts.size(); ++i) {
    starts[i] = static_cast<std::uint32_t>(nodes[i]);
    trees[i] = tree_of(starts[i]);
  }
  const auto kk = static_cast<std::uint32_t>(std::min<std::int64_t>(k, 0xFFFFFFFF));
  return run_select(starts, trees, kk, p);
}

// ---- expansion and values ----------------------------------------------------------------------

std::vector<std::uint32_t> Forest::expand(const ExpandArgs& a) {
  const std::size_t n = a.tickets.size();
  check_length(a.n_children.size(), n, "n_children");
  std::uint64_t total = 0;
  for (auto c : a.n_children) {
    if (c < 0 || c > static_cast<std::int64_t>(opt_.max_children))
      throw InvalidArgument("n_children " + std::to_string(c) + " is outside [0, max_children=" +
                            std::to_string(opt_.max_children) + "]");
    total += static_cast<std::uint64_t>(c);
  }
  std::vector<float> priors32;
  if (a.priors) {
    check_length(a.priors->size(), total, "priors");
    priors32.resize(total);
    for (std::size_t i = 0; i < total; ++i) {
      priors32[i] = static_cast<float>((*a.priors)[i]);
      if (!std::isfinite(priors32[i]) || priors32[i] < 0.0f) throw InvalidArgument("priors must be finite and >= 0");
    }
  }
  if (a.payloads) check_length(a.payloads->size(), total, "payloads");
  if (a.terminal) check_length(a.terminal->size(), total, "terminal");
  if (a.rewards) {
    check_length(a.rewards->size(), total, "rewards");
    for (double r : *a.rewards)
      if (!std::isfinite(r)) throw InvalidArgument("rewards must be finite");
  }
  if (n == 0) return {};

  std::uint32_t owner = 0;
  const std::vector<std::uint32_t> pre = claim_tickets(a.tickets, owner);  // ValueError / UnknownIdError
  std::vector<TicketRec*> recs(n);
  for (std::size_t j = 0; j < n; ++j) {
    recs[j] = &tickets_.at(static_cast<std::uint32_t>(a.tickets[j]));
    if (pre[j] == detail::TK_EXPANDED ||
        node(recs[j]->leaf).state.load(std::memory_order_acquire) != EXPANDING) {
      unclaim_tickets(a.tickets, pre, n);
      throw ForestStateError("ticket " + std::to_string(a.tickets[j]) + ": leaf " + std::to_string(recs[j]->leaf) +
                             " was already expanded");
    }
  }
  std::vector<std::uint32_t> sizes(n), firsts(n, NONE), offsets(n);
  std::uint64_t off = 0;
  for (std::size_t j = 0; j < n; ++j) {
    sizes[j] = static_cast<std::uint32_t>(a.n_children[j]);
    offsets[j] = static_cast<std::uint32_t>(off);
    off += sizes[j];
  }
  try {
    plan_blocks(sizes);
  } catch (...) {
    unclaim_tickets(a.tickets, pre, n);
    throw;
  }
  for (std::size_t j = 0; j < n; ++j) {
    if (sizes[j] == 0) continue;
    firsts[j] = alloc_block(sizes[j]);
    if (firsts[j] == NONE) {  // another thread took the space since plan_blocks
      for (std::size_t i = 0; i < j; ++i)
        if (firsts[i] != NONE) push_block(firsts[i], sizes[i]);
      unclaim_tickets(a.tickets, pre, n);
      throw CapacityError("node arena full (max_nodes " + std::to_string(opt_.max_nodes) + ")");
    }
  }
  // Initialise children, then publish: first_child and n_children before the release store of
  // EXPANDED, which a descent acquires before it reads them.
  for_chunks(n, kParallelItems / 4, [&](std::size_t lo, std::size_t hi) {
    for (std::size_t j = lo; j < hi; ++j) {
      const TicketRec& rec = *recs[j];
      Node& leaf = node(rec.leaf);
      const std::uint32_t m = sizes[j];
      if (m == 0) {
        leaf.flags.fetch_or(TERMINAL_FLAG, std::memory_order_relaxed);
        leaf.state.store(INVALID, std::memory_order_release);
        continue;
      }
      const float uniform = static_cast<float>(1.0 / static_cast<double>(m));
      for (std::uint32_t c = 0; c < m; ++c) {
        const std::size_t src = offsets[j] + c;
        const std::uint32_t ch = firsts[j] + c;
        init_node(ch, rec.leaf, a.priors ? priors32[src] : uniform, a.payloads ? (*a.payloads)[src] : 0);
        cold(ch).reward = a.rewards ? (*a.rewards)[src] : 0.0;
        if (a.terminal && (*a.terminal)[src]) {
          node(ch).flags.store(TERMINAL_FLAG, std::memory_order_relaxed);
          node(ch).state.store(TERMINAL, std::memory_order_relaxed);
        }
      }
      leaf.first_child.store(firsts[j], std::memory_order_release);
      leaf.n_children = static_cast<std::uint16_t>(m);
      leaf.state.store(EXPANDED, std::memory_order_release);
      trees_.at(rec.tree).n_nodes.fetch_add(m, std::memory_order_relaxed);
    }
  });
  for (std::size_t j = 0; j < n; ++j)
    recs[j]->tag.store(make_tag(static_cast<std::uint32_t>(a.tickets[j] >> 32), detail::TK_EXPANDED),
                       std::memory_order_release);
  counters_.expansions.fetch_add(n, std::memory_order_relaxed);
  return firsts;
}

void Forest::set_values(std::span<const std::int64_t> nodes, std::span<const double> values) {
  check_length(values.size(), nodes.size(), "values");
  check_values(values, "values");
  check_no_duplicates(nodes, "nodes");
  TreeGuard guard;
  check_nodes(nodes, guard);
  // Claim each node's VALUED flag; a node that already has one fails the whole call.
  for (std::size_t j = 0; j < nodes.size(); ++j) {
    Node& nd = node(static_cast<std::uint32_t>(nodes[j]));
    if (nd.flags.fetch_or(VALUED_FLAG, std::memory_order_acq_rel) & VALUED_FLAG) {
      for (std::size_t i = 0; i < j; ++i)
        node(static_cast<std::uint32_t>(nodes[i])).flags.fetch_and(static_cast<std::uint8_t>(~VALUED_FLAG),
                                                                  std::memory_order_acq_rel);
      throw ForestStateError("node " + std::to_string(nodes[j]) + " already has an init value");
    }
  }
  for (std::size_t j = 0; j < nodes.size(); ++j) {
    const auto i = static_cast<std::uint32_t>(nodes[j]);
    cold(i).init_value.store(values[j], std::memory_order_relaxed);
    node(i).N.fetch_add(1, std::memory_order_relaxed);
    node(i).W.fetch_add(to_fixed(values[j]), std::memory_order_relaxed);
  }
}

void Forest::backup(std::span<const std::uint64_t> tickets, std::span<const double> values) {
  check_length(values.size(), tickets.size(), "values");
  check_values(values, "values");
  if (tickets.empty()) return;
  std::uint32_t owner = 0;
  claim_tickets(tickets, owner);
  for_chunks(tickets.size(), kParallelItems, [&](std::size_t lo, std::size_t hi) {
    for (std::size_t j = lo; j < hi; ++j) {
      const TicketRec& rec = tickets_.at(static_cast<std::uint32_t>(tickets[j]));
      remove_pending(rec.leaf, rec.start);
      std::uint8_t expanding = EXPANDING;  // never expanded: give the claim back
      node(rec.leaf).state.compare_exchange_strong(expanding, UNEXPANDED, std::memory_order_release,
                                                    std::memory_order_relaxed);
      add_to_root(rec.leaf, to_fixed(values[j]));
    }
  });
  for (auto tk : tickets) resolve_ticket(tk);
  tickets_open_.fetch_sub(static_cast<std::int64_t>(tickets.size()), std::memory_order_relaxed);
  counters_.backups.fetch_add(tickets.size(), std::memory_order_relaxed);
}

void Forest::cancel(std::span<const std::uint64_t> tickets) {
  if (tickets.empty()) return;
  std::uint32_t owner = 0;
  claim_tickets(tickets, owner);
  for_chunks(tickets.size(), kParallelItems, [&](std::size_t lo, std::size_t hi) {
    for (std::size_t j = lo; j < hi; ++j) {
      const TicketRec& rec = tickets_.at(static_cast<std::uint32_t>(tickets[j]));
      remove_pending(rec.leaf, rec.start);
      std::uint8_t expanding = EXPANDING;
      node(rec.leaf).state.compare_exchange_strong(expanding, UNEXPANDED, std::memory_order_release,
                                                    std::memory_order_relaxed);
    }
  });
  for (auto tk : tickets) resolve_ticket(tk);
  tickets_open_.fetch_sub(static_cast<std::int64_t>(tickets.size()), std::memory_order_relaxed);
  counters_.cancels.fetch_add(tickets.size(), std::memory_order_relaxed);
}

void Forest::backup_nodes(std::span<const std::int64_t> nodes, std::span<const double> values) {
  check_length(values.size(), nodes.size(), "values");
  check_values(values, "values");
  TreeGuard guard;
  check_nodes(nodes, guard);
  for_chunks(nodes.size(), kParallelItems, [&](std::size_t lo, std::size_t hi) {
    for (std::size_t j = lo; j < hi; ++j) add_to_root(static_cast<std::uint32_t>(nodes[j]), to_fixed(values[j]));
  });
  counters_.backups.fetch_add(nodes.size(), std::memory_order_relaxed);
}

void Forest::mark_invalid(std::span<const std::int64_t> nodes, double value) {
  const double v[1] = {value};
  check_values(v, "value");
  check_no_duplicates(nodes, "nodes");
  TreeGuard guard;
  check_nodes(nodes, guard);
  std::vector<std::uint8_t> before(nodes.size());
  for (std::size_t j = 0; j < nodes.size(); ++j) {
    Node& nd = node(static_cast<std::uint32_t>(nodes[j]));
    std::uint8_t st = nd.state.load(std::memory_order_acquire);
    bool ok = false;
    while (st == UNEXPANDED || st == TERMINAL) {
      if (nd.state.compare_exchange_weak(st, INVALID, std::memory_order_acq_rel, std::memory_order_acquire)) {
        ok = true;
        break;
      }
    }
    if (!ok) {
      for (std::size_t i = 0; i < j; ++i)
        node(static_cast<std::uint32_t>(nodes[i])).state.store(before[i], std::memory_order_release);
      static const char* names[] = {"UNEXPANDED", "EXPANDING", "EXPANDED", "TERMINAL", "INVALID"};
      throw ForestStateError("node " + std::to_string(nodes[j]) + " is in state " +
                             (st <= INVALID ? names[st] : "FREE") +
                             "; only UNEXPANDED or TERMINAL nodes can be marked invalid");
    }
    before[j] = st;
  }
  const std::int64_t fx = to_fixed(value);
  for (auto id : nodes) {
    Node& nd = node(static_cast<std::uint32_t>(id));
    nd.flags.fetch_or(TERMINAL_FLAG, std::memory_order_release);
    nd.N.fetch_add(1, std::memory_order_relaxed);
    nd.W.fetch_add(fx, std::memory_order_relaxed);
  }
}

// ---- reading -----------------------------------------------------------------------------------

namespace {
// Number of children, read safely: n_children is only published with state EXPANDED.
inline std::uint32_t published_children(const detail::Node& nd) {
  return nd.state.load(std::memory_order_acquire) == EXPANDED ? nd.n_children : 0u;
}
}  // namespace

NodeStats Forest::node_stats(std::span<const std::int64_t> ids) {
  TreeGuard guard;
  check_nodes(ids, guard);
  const std::size_t n = ids.size();
  NodeStats s;
  s.visits.resize(n), s.pending.resize(n), s.value_sum.resize(n), s.q.resize(n), s.init_value.resize(n);
  s.prior.resize(n), s.reward.resize(n), s.state.resize(n), s.terminal.resize(n), s.payload.resize(n);
  s.parent.resize(n), s.first_child.resize(n), s.n_children.resize(n), s.depth.resize(n), s.tree.resize(n);
  for (std::size_t j = 0; j < n; ++j) {
    const auto i = static_cast<std::uint32_t>(ids[j]);
    const Node& nd = node(i);
    const std::uint32_t nch = published_children(nd);
    s.visits[j] = nd.N.load(std::memory_order_relaxed);
    s.pending[j] = nd.O.load(std::memory_order_relaxed);
    s.value_sum[j] = static_cast<double>(nd.W.load(std::memory_order_relaxed)) / VALUE_SCALE;
    s.q[j] = q_of(nd);
    s.init_value[j] = cold(i).init_value.load(std::memory_order_relaxed);
    s.prior[j] = nd.prior;
    s.reward[j] = cold(i).reward;
    s.state[j] = nd.state.load(std::memory_order_relaxed);
    s.terminal[j] = (nd.flags.load(std::memory_order_relaxed) & TERMINAL_FLAG) ? 1 : 0;
    s.payload[j] = cold(i).payload;
    const std::uint32_t p = nd.parent.load(std::memory_order_relaxed);
    s.parent[j] = (p & ROOT_BIT) ? NONE : p;
    s.first_child[j] = nch ? nd.first_child.load(std::memory_order_relaxed) : NONE;
    s.n_children[j] = nch;
    s.depth[j] = depth_of(i);
    s.tree[j] = tree_of(i);
  }
  return s;
}

std::vector<std::uint32_t> Forest::children(std::int64_t id) {
  TreeGuard guard;
  const std::int64_t ids[1] = {id};
  check_nodes(ids, guard);
  const Node& nd = node(static_cast<std::uint32_t>(id));
  const std::uint32_t nch = published_children(nd);
  std::vector<std::uint32_t> out(nch);
  const std::uint32_t first = nch ? nd.first_child.load(std::memory_order_relaxed) : 0;
  for (std::uint32_t c = 0; c < nch; ++c) out[c] = first + c;
  return out;
}

TreeStats Forest::tree_stats(std::span<const std::int64_t> tree_ids) {
  TreeGuard guard;
  check_trees(tree_ids, guard);
  const std::size_t n = tree_ids.size();
  TreeStats s;
  s.root.resize(n), s.visits.resize(n), s.q.resize(n), s.pending.resize(n), s.n_nodes.resize(n);
  s.open_tickets.resize(n), s.terminal.resize(n);
  for (std::size_t j = 0; j < n; ++j) {
    const TreeRec& t = trees_.at(static_cast<std::uint64_t>(tree_ids[j]));
    const std::uint32_t r = t.root.load(std::memory_order_relaxed);
    const Node& nd = node(r);
    s.root[j] = r;
    s.visits[j] = nd.N.load(std::memory_order_relaxed);
    s.q[j] = q_of(nd);
    s.pending[j] = nd.O.load(std::memory_order_relaxed);
    s.n_nodes[j] = t.n_nodes.load(std::memory_order_relaxed);
    s.open_tickets[j] = t.open_tickets.load(std::memory_order_relaxed);
    s.terminal[j] = (nd.flags.load(std::memory_order_relaxed) & TERMINAL_FLAG) ? 1 : 0;
  }
  return s;
}

RootChildStats Forest::root_child_stats(std::span<const std::int64_t> tree_ids) {
  TreeGuard guard;
  check_trees(tree_ids, guard);
  RootChildStats s;
  s.offsets.reserve(tree_ids.size() + 1);
  for (auto id : tree_ids) {
    const Node& root = node(trees_.at(static_cast<std::uint64_t>(id)).root.load(std::memory_order_relaxed));
    const std::uint32_t nch = published_children(root);
    const std::uint32_t first = nch ? root.first_child.load(std::memory_order_relaxed) : 0;
    for (std::uint32_t i = first; i < first + nch; ++i) {
      const Node& nd = node(i);
      s.node.push_back(i);
      s.visits.push_back(nd.N.load(std::memory_order_relaxed));
      s.pending.push_back(nd.O.load(std::memory_order_relaxed));
      s.q.push_back(q_of(nd));
      s.prior.push_back(nd.prior);
      s.init_value.push_back(cold(i).init_value.load(std::memory_order_relaxed));
      s.state.push_back(nd.state.load(std::memory_order_relaxed));
      s.terminal.push_back((nd.flags.load(std::memory_order_relaxed) & TERMINAL_FLAG) ? 1 : 0);
      s.payload.push_back(cold(i).payload);
    }
    s.offsets.push_back(static_cast<std::int64_t>(s.node.size()));
  }
  return s;
}

TreeExport Forest::export_tree(std::int64_t tree_id) {
  TreeGuard guard;
  const std::int64_t ids[1] = {tree_id};
  check_trees(ids, guard);
  TreeExport e;
  e.node.push_back(trees_.at(static_cast<std::uint64_t>(tree_id)).root.load(std::memory_order_relaxed));
  e.parent_index.push_back(-1);
  e.depth.push_back(0);
  for (std::size_t pos = 0; pos < e.node.size(); ++pos) {  // the vector grows: breadth-first
    const Node& nd = node(e.node[pos]);
    const std::uint32_t nch = published_children(nd);
    const std::uint32_t first = nch ? nd.first_child.load(std::memory_order_relaxed) : 0;
    for (std::uint32_t c = 0; c < nch; ++c) {
      e.node.push_back(first + c);
      e.parent_index.push_back(static_cast<std::int64_t>(pos));
      e.depth.push_back(e.depth[pos] + 1);
    }
  }
  const std::size_t n = e.node.size();
  e.visits.resize(n), e.pending.resize(n), e.value_sum.resize(n), e.q.resize(n), e.init_value.resize(n);
  e.prior.resize(n), e.reward.resize(n), e.state.resize(n), e.terminal.resize(n), e.payload.resize(n);
  for (std::size_t j = 0; j < n; ++j) {
    const std::uint32_t i = e.node[j];
    const Node& nd = node(i);
    e.visits[j] = nd.N.load(std::memory_order_relaxed);
    e.pending[j] = nd.O.load(std::memory_order_relaxed);
    e.value_sum[j] = static_cast<double>(nd.W.load(std::memory_order_relaxed)) / VALUE_SCALE;
    e.q[j] = q_of(nd);
    e.init_value[j] = cold(i).init_value.load(std::memory_order_relaxed);
    e.prior[j] = nd.prior;
    e.reward[j] = cold(i).reward;
    e.state[j] = nd.state.load(std::memory_order_relaxed);
    e.terminal[j] = (nd.flags.load(std::memory_order_relaxed) & TERMINAL_FLAG) ? 1 : 0;
    e.payload[j] = cold(i).payload;
  }
  return e;
}

MemoryStats Forest::memory_stats() const {
  MemoryStats m{};
  m.node_bytes = kNodeBytes;
  m.max_nodes = opt_.max_nodes;
  m.high_water = high_water_.load(std::memory_order_relaxed);
  m.nodes_free = static_cast<std::uint64_t>(std::max<std::int64_t>(0, nodes_free_.load(std::memory_order_relaxed)));
  m.nodes_in_use = m.high_water - std::min(m.high_water, m.nodes_free);
  m.trees_live = static_cast<std::uint64_t>(trees_live_.load(std::memory_order_relaxed));
  m.trees_created = trees_created_.load(std::memory_order_relaxed);
  m.tickets_open = static_cast<std::uint64_t>(tickets_open_.load(std::memory_order_relaxed));
  const std::uint64_t slots = ticket_slots_.load(std::memory_order_relaxed);
  const std::uint64_t tree_chunks = (m.trees_created + decltype(trees_)::kChunk - 1) / decltype(trees_)::kChunk;
  const std::uint64_t ticket_chunks = (slots + decltype(tickets_)::kChunk - 1) / decltype(tickets_)::kChunk;
  m.resident_bytes_estimate = m.high_water * kNodeBytes + tree_chunks * decltype(trees_)::kChunk * sizeof(TreeRec) +
                              ticket_chunks * decltype(tickets_)::kChunk * sizeof(TicketRec);
  return m;
}

Counters Forest::stats() const {
  return Counters{counters_.selects.load(),    counters_.leaves.load(),     counters_.collisions.load(),
                  counters_.dead_ends.load(),  counters_.expansions.load(), counters_.backups.load(),
                  counters_.cancels.load()};
}

}  // namespace rstar
