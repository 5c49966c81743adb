#include "forest.hpp"

#include <sys/mman.h>
#include <unistd.h>

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
// Descents of different trees interleaved by one thread (see run_select).
constexpr std::size_t kDescentsInFlight = 8;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

void* map_region(std::size_t bytes) {
  // Reserved, not committed: pages are faulted in as the arena's high water grows. Regions of
  // 1 MiB or more are 2 MiB aligned and use transparent huge pages where the system allows
  // (madvise mode): a growing arena takes one page fault per 2 MiB instead of per 4 KiB, and
  // descents across many trees miss the TLB far less. The price: a forest commits at least
  // 2 MiB per arena once used. Smaller arenas (max_nodes < 32768) keep 4 KiB pages.
  constexpr std::size_t kHuge = std::size_t{2} << 20;
  const std::size_t page = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
  auto round_up = [](std::uintptr_t x, std::size_t m) { return (x + m - 1) / m * m; };
  const bool huge = bytes >= kHuge / 2;
  const std::size_t want = huge ? bytes + kHuge : bytes;
  void* p = ::mmap(nullptr, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw CapacityError("cannot reserve " + std::to_string(bytes) + " bytes for the node arena");
  if (!huge) return p;
  const auto base = reinterpret_cast<std::uintptr_t>(p);
  const std::uintptr_t start = round_up(base, kHuge);
  const std::uintptr_t used_end = round_up(start + bytes, page), map_end = round_up(base + want, page);
  if (start > base) ::munmap(p, start - base);  // trim to [start, start + bytes): munmap(start, bytes) frees it
  if (map_end > used_end) ::munmap(reinterpret_cast<void*>(used_end), map_end - used_end);
#ifdef MADV_HUGEPAGE
  ::madvise(reinterpret_cast<void*>(start), used_end - start, MADV_HUGEPAGE);  // a hint; failure is harmless
#endif
  return reinterpret_cast<void*>(start);
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
    for (auto* t : entered_)
      if (t) t->pins.fetch_sub(detail::PIN_USER, std::memory_order_seq_cst);
  }
  bool enter(TreeRec* t) {
    for (;;) {
      t->pins.fetch_add(detail::PIN_USER, std::memory_order_seq_cst);
      const auto s = t->status.load(std::memory_order_seq_cst);
      if (s == detail::TREE_LIVE) {
        entered_.push_back(t);
        return true;
      }
      t->pins.fetch_sub(detail::PIN_USER, std::memory_order_seq_cst);
      if (s != detail::TREE_RELEASING) return false;
      std::this_thread::yield();  // a release is deciding; its outcome comes within microseconds
    }
  }
  void reserve(std::size_t n) { entered_.reserve(n); }
  // Leaves the i-th entered tree adding `opened` open tickets, in one RMW (the open tickets
  // keep pinning it); the destructor skips the trees left this way.
  void leave_opening(std::size_t i, std::uint32_t opened) {
    entered_[i]->pins.fetch_add(opened - detail::PIN_USER, std::memory_order_seq_cst);
    entered_[i] = nullptr;
  }

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

// push_block for each of `starts` in order, with one CAS: the blocks are chained first (the
// last one becomes the head), so the list ends up exactly as after the single pushes.
void Forest::push_blocks(std::uint32_t n, std::span<const std::uint32_t> starts) {
  if (starts.empty()) return;
  for (std::size_t i = 1; i < starts.size(); ++i)
    node(starts[i]).first_child.store(starts[i - 1], std::memory_order_relaxed);
  auto& head = free_heads_[n];
  std::uint64_t old = head.load(std::memory_order_relaxed);
  std::uint64_t next;
  do {
    node(starts.front()).first_child.store(static_cast<std::uint32_t>(old), std::memory_order_relaxed);
    next = (((old >> 32) + 1) << 32) | starts.back();
  } while (!head.compare_exchange_weak(old, next, std::memory_order_release, std::memory_order_relaxed));
  free_counts_[n].fetch_add(static_cast<std::int64_t>(starts.size()), std::memory_order_relaxed);
  nodes_free_.fetch_add(std::uint64_t{n} * starts.size(), std::memory_order_relaxed);
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

// When no free list holds a block of any of these sizes and the top has room for all of them,
// alloc_block would take each from the top, in order: take them all with one CAS instead.
// The slots are fresh (never constructed): the caller constructs them (construct_node).
bool Forest::alloc_top_run(std::span<const std::uint32_t> sizes, std::uint32_t* firsts) {
  std::uint64_t total = 0;
  std::uint32_t checked = 0;  // batches are mostly one size: look at each list once per run
  for (auto n : sizes) {
    if (n != checked && n != 0 && free_counts_[n].load(std::memory_order_relaxed) > 0) return false;
    checked = n;
    total += n;
  }
  std::uint64_t hw = high_water_.load(std::memory_order_relaxed);
  do {
    if (hw + total > opt_.max_nodes) return false;
  } while (!high_water_.compare_exchange_weak(hw, hw + total, std::memory_order_relaxed));
  // Not constructed here: the caller constructs each node once, with its values.
  for (std::size_t j = 0; j < sizes.size(); ++j) {
    firsts[j] = sizes[j] ? static_cast<std::uint32_t>(hw) : NONE;
    hw += sizes[j];
  }
  return true;
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

// First use of slot i (above the old high water): one pass of plain stores, no atomic RMW.
inline void Forest::construct_node(std::uint32_t i, std::uint32_t parent, float prior, std::uint64_t payload, double reward,
                            bool terminal) {
  new (&nodes_[i]) Node{{0}, {0}, {NONE}, {parent}, prior, 0, {terminal ? TERMINAL : UNEXPANDED},
                        {terminal ? TERMINAL_FLAG : std::uint8_t{0}}};
  new (&cold_[i]) Cold{payload, {kNaN}, reward};
}

void Forest::init_node(std::uint32_t i, std::uint32_t parent, float prior, std::uint64_t payload) {
  Node& nd = node(i);
  nd.W.store(0, std::memory_order_relaxed);
  nd.NO.store(0, std::memory_order_relaxed);
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
    t.pins.store(0, std::memory_order_relaxed);
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
    const std::uint64_t pins = recs[j]->pins.load(std::memory_order_seq_cst);
    const std::uint32_t open = detail::open_of(pins);
    if (open != 0) {
      undo();
      throw ForestStateError("tree " + std::to_string(tree_ids[j]) + " has " + std::to_string(open) +
                             " open tickets; resolve them first");
    }
    if (detail::users_of(pins) != 0) {
      undo();
      throw ForestStateError("tree " + std::to_string(tree_ids[j]) + " is in use by a concurrent call");
    }
  }
  std::uint64_t freed = 0;
  std::vector<std::pair<std::uint32_t, std::uint32_t>> blocks;  // (start, size), breadth-first
  std::vector<std::pair<std::uint32_t, std::uint32_t>> freed_blocks;  // (size, start), all trees
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
      freed_blocks.emplace_back(n, s);
      freed += n;
    }
    recs[j]->status.store(detail::TREE_RELEASED, std::memory_order_seq_cst);
  }
  // Pushed by size, highest address first, one chain per size: later pops hand the blocks
  // out in increasing address order, so the searches that reuse them write and read the arena
  // almost sequentially instead of jumping between the released trees' blocks (measured: a
  // reusing expand 2.7x faster at 1024 trees x 64 simulations; docs/engine.md).
  std::sort(freed_blocks.begin(), freed_blocks.end(),
            [](const auto& a, const auto& b) { return a.first != b.first ? a.first < b.first : a.second > b.second; });
  std::vector<std::uint32_t> chain;
  for (std::size_t b = 0; b < freed_blocks.size();) {
    const std::uint32_t n = freed_blocks[b].first;
    chain.clear();
    for (; b < freed_blocks.size() && freed_blocks[b].first == n; ++b) chain.push_back(freed_blocks[b].second);
    push_blocks(n, chain);
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

void Forest::take_ticket_slots(std::size_t n, std::uint64_t* ids) {
  // Pop a run of freed slots (Treiber stack, ABA tag in the high half): walk n links from the
  // head, then swing the head past them with one CAS. The head is unchanged (same tag) only if
  // no push or pop happened meanwhile, so the links read were the stack's.
  std::size_t m = 0;
  std::uint64_t old = ticket_free_head_.load(std::memory_order_acquire);
  for (;;) {
    m = 0;
    std::uint32_t s = static_cast<std::uint32_t>(old);
    while (m < n && s != NONE) {
      ids[m++] = s;
      s = tickets_.at(s).next_free.load(std::memory_order_relaxed);
    }
    if (m == 0) break;
    if (ticket_free_head_.compare_exchange_weak(old, (((old >> 32) + 1) << 32) | s, std::memory_order_acquire,
                                                std::memory_order_acquire))
      break;
  }
  for (std::size_t j = 0; j < m; ++j) {
    const auto slot = static_cast<std::uint32_t>(ids[j]);
    ids[j] = (std::uint64_t{gen_bits(tickets_.at(slot).tag.load(std::memory_order_relaxed))} << 32) | slot;
  }
  if (m == n) return;
  // Fresh slots: their tag is 0 until opened, and generation 0 never matches a ticket id.
  const std::uint64_t first = ticket_slots_.fetch_add(n - m, std::memory_order_acq_rel);
  if (first + (n - m) > decltype(tickets_)::kCapacity) throw CapacityError("ticket table full");
  for (std::size_t j = m; j < n; ++j) {
    const std::uint64_t slot = first + (j - m);
    tickets_.ensure(slot);
    ids[j] = (std::uint64_t{1} << 32) | slot;
  }
}

void Forest::open_ticket(std::uint64_t id, std::uint32_t tree, std::uint32_t start, std::uint32_t leaf) {
  TicketRec& rec = tickets_.at(static_cast<std::uint32_t>(id));
  rec.tree = tree;
  rec.start = start;
  rec.leaf = leaf;
  rec.tag.store(make_tag(static_cast<std::uint32_t>(id >> 32), detail::TK_OPEN), std::memory_order_release);
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

void Forest::resolve_tickets(std::span<const std::uint64_t> tickets) {
  const std::size_t n = tickets.size();
  if (n == 0) return;
  std::vector<std::uint32_t> trees(n);  // read first: a pushed slot may be reused at once
  for (std::size_t j = 0; j < n; ++j) {
    TicketRec& rec = tickets_.at(static_cast<std::uint32_t>(tickets[j]));
    trees[j] = rec.tree;
    std::uint32_t gen = static_cast<std::uint32_t>(tickets[j] >> 32) + 1;
    if (gen == 0) gen = 1;
    rec.tag.store(make_tag(gen, detail::TK_FREE), std::memory_order_release);
    // Chain the slots as n pushes in input order would: each links to the one before it.
    if (j > 0) rec.next_free.store(static_cast<std::uint32_t>(tickets[j - 1]), std::memory_order_relaxed);
  }
  TicketRec& bottom = tickets_.at(static_cast<std::uint32_t>(tickets[0]));
  const auto top = static_cast<std::uint32_t>(tickets[n - 1]);
  std::uint64_t old = ticket_free_head_.load(std::memory_order_relaxed);
  do {
    bottom.next_free.store(static_cast<std::uint32_t>(old), std::memory_order_relaxed);
  } while (!ticket_free_head_.compare_exchange_weak(old, (((old >> 32) + 1) << 32) | top, std::memory_order_release,
                                                    std::memory_order_relaxed));
  // Last: once open_tickets reaches 0 the tree may be released.
  for (std::size_t j = 0; j < n;) {
    std::size_t run = 1;
    while (j + run < n && trees[j + run] == trees[j]) ++run;
    trees_.at(trees[j]).pins.fetch_sub(run, std::memory_order_seq_cst);
    j += run;
  }
}

// ---- statistics --------------------------------------------------------------------------------

double Forest::q_of(const Node& n) const {
  const std::uint32_t N = detail::n_of(n.NO.load(std::memory_order_relaxed));
  if (N == 0) return 0.0;
  return static_cast<double>(n.W.load(std::memory_order_relaxed)) / VALUE_SCALE / static_cast<double>(N);
}

void Forest::add_to_root(std::uint32_t i, std::int64_t fx) {
  for (;;) {
    Node& nd = node(i);
    nd.NO.fetch_add(detail::NO_N, std::memory_order_relaxed);
    nd.W.fetch_add(fx, std::memory_order_relaxed);
    const std::uint32_t p = nd.parent.load(std::memory_order_relaxed);
    if (p & ROOT_BIT) return;
    i = p;
  }
}

// The walks of a batch are chains of dependent loads, and each step's atomic RMW waits for
// them: fetch the leaf of the ticket kLeafAhead places on, and the parent of the one
// kParentAhead places on (whose leaf was fetched earlier), so the walks find them in cache.
inline void Forest::prefetch_path(std::span<const std::uint64_t> tickets, std::size_t j, std::size_t end) const {
  constexpr std::size_t kLeafAhead = 16, kParentAhead = 8;
  if (j + kLeafAhead < end)
    __builtin_prefetch(&nodes_[tickets_.at(static_cast<std::uint32_t>(tickets[j + kLeafAhead])).leaf]);
  if (j + kParentAhead < end) {
    const std::uint32_t p =
        node(tickets_.at(static_cast<std::uint32_t>(tickets[j + kParentAhead])).leaf).parent.load(std::memory_order_relaxed);
    if (!(p & ROOT_BIT)) __builtin_prefetch(&nodes_[p]);
  }
}

void Forest::backup_path(std::uint32_t leaf, std::uint32_t start, std::int64_t fx) {
  std::uint32_t i = leaf;
  for (;;) {  // leaf .. start: the ticket's pending visit becomes a completed one
    Node& nd = node(i);
    nd.NO.fetch_add(detail::NO_N_MINUS_O, std::memory_order_relaxed);
    nd.W.fetch_add(fx, std::memory_order_relaxed);
    const std::uint32_t p = nd.parent.load(std::memory_order_relaxed);
    if (i == start) {
      if (p & ROOT_BIT) return;
      add_to_root(p, fx);  // above the start (select_from): no pending visit there
      return;
    }
    i = p;
  }
}

// A ticket's leaf that was never expanded goes back to UNEXPANDED. Only the ticket's holder
// changes the state of its EXPANDING leaf, so the load sees EXPANDING exactly when the CAS
// would succeed; it saves the locked instruction after an expansion.
void Forest::give_back_claim(std::uint32_t leaf) {
  Node& nd = node(leaf);
  std::uint8_t st = nd.state.load(std::memory_order_relaxed);
  if (st == EXPANDING)
    nd.state.compare_exchange_strong(st, UNEXPANDED, std::memory_order_release, std::memory_order_relaxed);
}

void Forest::remove_pending(std::uint32_t leaf, std::uint32_t start) {
  for (std::uint32_t i = leaf;; i = node(i).parent.load(std::memory_order_relaxed)) {
    node(i).NO.fetch_sub(detail::NO_O, std::memory_order_relaxed);
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
  SelectParams p{};
  p.puct = rule.value_or(opt_.rule) == Rule::Puct;
  p.fpu_parent = p.puct && opt_.fpu_mode == FpuMode::Parent;
  p.c = c.value_or(opt_.c);
  p.fpu_value = opt_.fpu_value;
  p.virtual_loss = opt_.virtual_loss;
  // Every score is finite (never NaN) unless c or virtual_loss is astronomically large: then
  // c * P or vl * O may overflow to inf, and inf * 0 or inf - inf give NaN. With priors below
  // 2^128, Npe and Ne below 2^33 and |W| / 2^32 below 2^63, these bounds keep every term
  // below 1e250, and adding any finite first-play value to that cannot overflow.
  p.finite = p.c <= 1e200 && p.virtual_loss <= 1e200;
  return p;
}

namespace {

struct Choice {
  std::uint32_t any = NONE;   // first best non-terminal child (offset in the block)
  std::uint32_t best = NONE;  // first best non-terminal child not in state EXPANDING
  bool any_expanding = false;
};

// Scores the children block kids[0, nch) of a parent with Npe = npe and keeps the first
// strictly greatest score twice (see the .pyi). The operations are those of the Python
// reference in the same order, so the scores agree bit for bit (-ffp-contract=off); what is
// per parent (sqrt(Npe), log(Npe), the first-play value) is computed once, and a division by
// 1.0 (N == 1, Ne == 0) is skipped: x / 1.0 == x exactly. Finite: the options guarantee
// finite scores (SelectParams::finite), so no score is NaN and "the first child, or a strictly
// greater score" is simply "a score greater than the best so far, starting from -inf".
template <bool Puct, bool VirtualLoss, bool Finite>
[[gnu::always_inline]] inline Choice scan_children(const detail::Node* kids, std::uint32_t nch, std::uint64_t npe,
                                                   double q_unvisited, double c, double vl) {
  const double sqrt_npe = Puct ? std::sqrt(static_cast<double>(npe)) : 0.0;
  const bool explore = Puct || npe > 1;  // rstar: u = 0 when Npe <= 1
  const double log_npe = (!Puct && explore) ? std::log(static_cast<double>(npe)) : 0.0;
  const double c_sqrt_log = (!Puct && explore) ? c * std::sqrt(log_npe) : 0.0;  // rstar u at Ne == 1
  Choice ch;
  double any_s = -std::numeric_limits<double>::infinity(), best_s = any_s;
  for (std::uint32_t k = 0; k < nch; ++k) {
    const detail::Node& nd = kids[k];
    if (nd.flags.load(std::memory_order_relaxed) & TERMINAL_FLAG) continue;
    const std::uint64_t no = nd.NO.load(std::memory_order_relaxed);
    const std::uint32_t n = detail::n_of(no), o = detail::o_of(no);
    const auto ne = static_cast<std::int64_t>(std::uint64_t{n} + o);  // < 2^33: converts exactly
    double q;
    if (VirtualLoss && o > 0) {
      const double w = static_cast<double>(nd.W.load(std::memory_order_relaxed)) / VALUE_SCALE;
      q = (w - vl * static_cast<double>(o)) / static_cast<double>(ne);
    } else if (n > 0) {
      q = static_cast<double>(nd.W.load(std::memory_order_relaxed)) / VALUE_SCALE;
      if (n > 1) q /= static_cast<double>(n);
    } else {
      q = q_unvisited;
    }
    double u;
    if constexpr (Puct) {
      u = c * static_cast<double>(nd.prior) * sqrt_npe;
      if (ne > 0) u /= 1.0 + static_cast<double>(ne);
    } else if (ne == 0 || !explore) {
      u = 0.0;
    } else if (ne == 1) {
      u = c_sqrt_log;
    } else {
      u = c * std::sqrt(log_npe / static_cast<double>(ne));
    }
    const double s = q + u;
    const bool expanding = nd.state.load(std::memory_order_relaxed) == EXPANDING;
    if ((!Finite && ch.any == NONE) || s > any_s) {
      ch.any = k;
      any_s = s;
      ch.any_expanding = expanding;
    }
    if (!expanding && ((!Finite && ch.best == NONE) || s > best_s)) {
      ch.best = k;
      best_s = s;
    }
  }
  return ch;
}

}  // namespace

// Software prefetch of the children block of node i when it is published (a hint only: the
// descent that reads the block acquires the state again).
[[gnu::always_inline]] inline void Forest::prefetch_children(std::uint32_t i) const {
  const Node& nd = node(i);
  if (nd.state.load(std::memory_order_acquire) != EXPANDED) return;
  const std::uint32_t first = nd.first_child.load(std::memory_order_relaxed);
  const std::uint32_t nch = std::min<std::uint32_t>(nd.n_children, 16);  // at most 8 lines
  auto line = reinterpret_cast<std::uintptr_t>(nodes_ + first) & ~std::uintptr_t{63};
  const auto end = reinterpret_cast<std::uintptr_t>(nodes_ + first + nch);
  for (; line < end; line += 64) __builtin_prefetch(reinterpret_cast<const void*>(line));
}

// One level of a descent at node `cur` (depth `depth`). Leaf: a leaf was claimed (UNEXPANDED
// -> EXPANDING): cur itself, or the child chosen here, claimed at once (the next step would
// start with exactly that). Next: cur moved to the chosen child (depth + 1), or stays after a
// lost claim, to be looked at again. End: no leaf (collided and/or dead set). Read-only
// except for the claim and the lazy closing of a node whose children are all terminal;
// pending visits are added by the caller after a claim.
template <bool Puct, bool VirtualLoss, bool Finite>
[[gnu::always_inline]] inline Forest::Step Forest::descend_step(std::uint32_t& cur, std::uint32_t& depth,
                                                                const SelectParams& p, bool& collided,
                                                                bool& dead) const {
  Node& nd = node(cur);
  std::uint8_t st = nd.state.load(std::memory_order_acquire);
  if (st == UNEXPANDED) {
    if (nd.state.compare_exchange_strong(st, EXPANDING, std::memory_order_acq_rel, std::memory_order_acquire))
      return Step::Leaf;
    return Step::Next;  // lost the claim to another thread: look again
  }
  if (st == EXPANDING) {
    collided = true;
    return Step::End;
  }
  if (st != EXPANDED || (nd.flags.load(std::memory_order_acquire) & TERMINAL_FLAG)) {
    dead = true;  // closed or invalidated by another thread since we chose it
    return Step::End;
  }
  const std::uint32_t first = nd.first_child.load(std::memory_order_acquire);
  const std::uint32_t nch = nd.n_children;
  const std::uint64_t pno = nd.NO.load(std::memory_order_relaxed);
  const std::uint64_t npe = std::uint64_t{detail::n_of(pno)} + detail::o_of(pno);
  double q_unvisited = 0.0;
  if constexpr (Puct) q_unvisited = p.fpu_parent ? q_of(nd) - p.fpu_value : p.fpu_value;
  const Choice ch =
      scan_children<Puct, VirtualLoss, Finite>(nodes_ + first, nch, npe, q_unvisited, p.c, p.virtual_loss);
  if (ch.any == NONE) {  // every child is terminal: close this node (official rStar rule)
    nd.flags.fetch_or(TERMINAL_FLAG, std::memory_order_acq_rel);
    dead = true;
    return Step::End;
  }
  if (ch.any_expanding) collided = true;
  if (ch.best == NONE) return Step::End;
  cur = first + ch.best;
  ++depth;
  __builtin_prefetch(&cold_[cur]);  // its payload, read when the tickets are assembled
  Node& next = node(cur);
  std::uint8_t cst = next.state.load(std::memory_order_acquire);
  if (cst == UNEXPANDED &&
      next.state.compare_exchange_strong(cst, EXPANDING, std::memory_order_acq_rel, std::memory_order_acquire))
    return Step::Leaf;
  // The next step reads its children block: fetch it now, so that the misses of the descents
  // in flight overlap.
  if (cst == EXPANDED) prefetch_children(cur);
  return Step::Next;
}

// Descents run kDescentsInFlight at a time, one level per turn, round robin: each step
// prefetches the block the next step of that descent reads, so the cache misses of different
// trees overlap instead of adding up. Descents of one item (its k descents) run in order in
// one slot, and an item whose tree is already in flight waits for it: every descent sees
// exactly what it would see if the items ran one after another in input order.
Selection Forest::run_select(std::span<const std::uint32_t> starts, std::span<const std::uint32_t> start_trees,
                             std::uint32_t k, const SelectParams& p, TreeGuard& guard) {
  const std::size_t n = starts.size();
  Selection out;
  if (n == 0 || k == 0) return out;
  {
    const std::uint64_t most = std::min<std::uint64_t>(std::uint64_t{n} * k, high_water_.load());
    if (static_cast<std::uint64_t>(tickets_open_.load()) + most > decltype(tickets_)::kCapacity)
      throw CapacityError("too many open tickets");
  }
  struct Leaf {
    std::uint32_t item, leaf, path_begin, path_len;
  };
  struct Shard {
    std::vector<std::uint32_t> items;  // with one shard: empty (all items, in order)
    std::vector<Leaf> leaves;          // in completion order
    std::vector<std::uint32_t> path;   // root .. leaf of each leaf
    std::uint64_t selects = 0, collisions = 0, dead_ends = 0;
  };
  std::vector<std::uint32_t> item_count(n, 0);
  const std::size_t n_shards =
      (pool_.size() > 1 && n >= 2 && std::uint64_t{n} * k >= kParallelDescents) ? std::min<std::size_t>(pool_.size(), n)
                                                                               : 1;
  std::vector<Shard> shards(n_shards);
  // Each tree goes to one shard, in input order: results do not depend on the thread count.
  if (n_shards > 1)
    for (std::size_t i = 0; i < n; ++i)
      shards[start_trees[i] % n_shards].items.push_back(static_cast<std::uint32_t>(i));
  // Strictly increasing trees (the usual case) cannot repeat: no item ever waits for another.
  bool distinct_trees = true;
  for (std::size_t i = 1; i < n && distinct_trees; ++i) distinct_trees = start_trees[i - 1] < start_trees[i];

  auto work = [&]<bool Puct, bool VirtualLoss, bool Finite>(std::size_t s) {
    Shard& sh = shards[s];
    const std::size_t n_items = n_shards == 1 ? n : sh.items.size();
    auto item_at = [&](std::size_t x) { return n_shards == 1 ? static_cast<std::uint32_t>(x) : sh.items[x]; };
    sh.leaves.reserve(n_items);
    sh.path.reserve(n_items * 4);
    struct Slot {
      std::uint32_t item, start, tree, j, cur, start_depth, depth;
      bool collided, active;
    };
    std::array<Slot, kDescentsInFlight> slots{};
    std::size_t next = 0;
    unsigned active = 0;

    // Starts descent sl.j of the slot's item; false when the item is done (terminal start).
    auto begin = [&](Slot& sl) {
      ++sh.selects;
      if (node(sl.start).flags.load(std::memory_order_acquire) & TERMINAL_FLAG) {
        // A dead end that every remaining descent of the item would repeat: count, don't walk.
        const std::uint64_t rest = k - 1 - sl.j;
        sh.selects += rest;
        sh.dead_ends += 1 + rest;
        return false;
      }
      sl.cur = sl.start;
      sl.depth = sl.start_depth;
      sl.collided = false;
      prefetch_children(sl.start);
      __builtin_prefetch(&cold_[sl.start]);
      return true;
    };
    // Gives an idle slot the next item, unless that item's tree is in flight (then it waits).
    auto fill = [&](Slot& sl) {
      while (next < n_items) {
        const std::uint32_t i = item_at(next);
        const std::uint32_t tree = start_trees[i];
        if (!distinct_trees)
          for (const Slot& o : slots)
            if (o.active && o.tree == tree) return;
        ++next;
        if (next + kDescentsInFlight < n_items) __builtin_prefetch(&nodes_[starts[item_at(next + kDescentsInFlight)]]);
        const std::uint32_t start = starts[i];
        const std::uint32_t start_depth = node(start).parent.load(std::memory_order_relaxed) & ROOT_BIT
                                              ? 0u
                                              : static_cast<std::uint32_t>(depth_of(start));
        sl = Slot{i, start, tree, 0, start, start_depth, start_depth, false, true};
        if (begin(sl)) {
          ++active;
          return;
        }
        sl.active = false;
      }
    };
    // Claimed leaf: pending visits from the start down (after the claim), and the path, written
    // root first (the leaf is at depth sl.depth).
    auto record = [&](const Slot& sl) {
      const std::uint32_t leaf = sl.cur;
      const auto at = static_cast<std::uint32_t>(sh.path.size());
      const std::uint32_t len = sl.depth + 1;
      sh.path.resize(at + len);
      std::uint32_t* path = sh.path.data() + at;
      bool pending = true;
      std::uint32_t v = leaf;
      for (std::uint32_t d = len; d-- > 0;) {
        path[d] = v;
        if (pending) {
          node(v).NO.fetch_add(detail::NO_O, std::memory_order_relaxed);
          pending = v != sl.start;
        }
        v = node(v).parent.load(std::memory_order_relaxed);  // the last one is ROOT_BIT | tree
      }
      sh.leaves.push_back(Leaf{sl.item, leaf, at, len});
      ++item_count[sl.item];
    };

    for (Slot& sl : slots) fill(sl);
    while (active > 0) {
      for (Slot& sl : slots) {
        if (!sl.active) {
          fill(sl);
          continue;
        }
        bool dead = false;
        const Step r = descend_step<Puct, VirtualLoss, Finite>(sl.cur, sl.depth, p, sl.collided, dead);
        if (r == Step::Next) continue;
        sh.collisions += sl.collided;
        bool more;
        if (r == Step::Leaf) {
          record(sl);
          more = ++sl.j < k;
        } else {
          sh.dead_ends += dead;
          // A failed descent changes nothing unless it closed a node below the start, so when
          // it collided, or the start itself is terminal, the remaining descents of this item
          // would repeat it exactly: count them without walking.
          const std::uint64_t rest = k - 1 - sl.j;
          if (!dead) {
            sh.selects += rest;
            sh.collisions += rest;
            more = false;
          } else if (node(sl.start).flags.load(std::memory_order_acquire) & TERMINAL_FLAG) {
            sh.selects += rest;
            sh.dead_ends += rest;
            more = false;
          } else {
            more = ++sl.j < k;
          }
        }
        if (more && begin(sl)) continue;
        sl.active = false;
        --active;
        fill(sl);
      }
    }
  };
  auto run = [&](std::size_t s) {  // one instance per rule, virtual loss on / off, finite scores or not
    const bool vl = p.virtual_loss > 0.0;
    if (p.finite) {
      if (p.puct)
        vl ? work.template operator()<true, true, true>(s) : work.template operator()<true, false, true>(s);
      else
        vl ? work.template operator()<false, true, true>(s) : work.template operator()<false, false, true>(s);
    } else {
      if (p.puct)
        vl ? work.template operator()<true, true, false>(s) : work.template operator()<true, false, false>(s);
      else
        vl ? work.template operator()<false, true, false>(s) : work.template operator()<false, false, false>(s);
    }
  };
  if (n_shards == 1)
    run(0);
  else
    pool_.parallel_for(n_shards, run);

  // Assemble in input order (items in order, each item's leaves in descent order) and open
  // the tickets (serially: ticket ids are deterministic).
  std::size_t L = 0, P = 0;
  for (const auto& sh : shards) {
    L += sh.leaves.size();
    P += sh.path.size();
    out.collisions += sh.collisions;
    out.dead_ends += sh.dead_ends;
  }
  std::vector<std::uint32_t> fill_at(n);
  for (std::size_t i = 0, acc = 0; i < n; ++i) {
    fill_at[i] = static_cast<std::uint32_t>(acc);
    acc += item_count[i];
  }
  std::vector<const Leaf*> order(L);
  for (const auto& sh : shards)
    for (const Leaf& lf : sh.leaves) order[fill_at[lf.item]++] = &lf;
  std::vector<const Shard*> shard_of_item;
  if (n_shards > 1) {
    shard_of_item.resize(n);
    for (const auto& sh : shards)
      for (auto i : sh.items) shard_of_item[i] = &sh;
  }
  out.tickets.resize(L);
  out.trees.resize(L);
  out.nodes.resize(L);
  out.depths.resize(L);
  out.path_offsets.resize(L + 1);
  out.path_nodes.resize(P);
  out.path_payloads.resize(P);
  take_ticket_slots(L, out.tickets.data());
  std::size_t pi = 0;
  for (std::size_t li = 0; li < L; ++li) {
    const Leaf& lf = *order[li];
    const Shard& sh = n_shards == 1 ? shards[0] : *shard_of_item[lf.item];
    const std::uint32_t tree = start_trees[lf.item];
    open_ticket(out.tickets[li], tree, starts[lf.item], lf.leaf);
    out.trees[li] = tree;
    out.nodes[li] = lf.leaf;
    out.depths[li] = static_cast<std::int32_t>(lf.path_len) - 1;
    const std::uint32_t* path = sh.path.data() + lf.path_begin;
    for (std::uint32_t q = 0; q < lf.path_len; ++q, ++pi) {  // payloads were prefetched by the descent
      out.path_nodes[pi] = path[q];
      out.path_payloads[pi] = cold(path[q]).payload;
    }
    out.path_offsets[li + 1] = static_cast<std::int64_t>(pi);
  }
  // Each item entered its tree once (in input order): leave it, adding the item's tickets.
  for (std::size_t i = 0; i < n; ++i) guard.leave_opening(i, item_count[i]);
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
  return run_select(starts, trees, kk, p, guard);
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
  return run_select(starts, trees, kk, p, guard);
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
    const double* src = a.priors->data();
    float* dst = priors32.data();
    constexpr float kMax = std::numeric_limits<float>::max();
    int ok = 1;  // two plain loops without branches: both vectorise
    for (std::size_t i = 0; i < total; ++i) dst[i] = static_cast<float>(src[i]);
    for (std::size_t i = 0; i < total; ++i) ok &= static_cast<int>(dst[i] >= 0.0f) & static_cast<int>(dst[i] <= kMax);
    if (!ok) throw InvalidArgument("priors must be finite and >= 0");  // NaN, inf or negative
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
  const bool from_top = alloc_top_run(sizes, firsts.data());  // the common case: one CAS
  for (std::size_t j = 0; j < n && !from_top; ++j) {
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
      const std::size_t o = offsets[j];
      const float uniform = a.priors ? 0.0f : static_cast<float>(1.0 / static_cast<double>(m));
      const std::uint32_t first = firsts[j];
      if (from_top && !a.payloads && !a.rewards && !a.terminal) {  // the common case, tight
        const float* pr = a.priors ? priors32.data() + o : nullptr;
        for (std::uint32_t c = 0; c < m; ++c) construct_node(first + c, rec.leaf, pr ? pr[c] : uniform, 0, 0.0, false);
      } else {
        for (std::uint32_t c = 0; c < m; ++c) {
          const std::size_t src = o + c;
          const std::uint32_t ch = first + c;
          const float prior = a.priors ? priors32[src] : uniform;
          const std::uint64_t payload = a.payloads ? (*a.payloads)[src] : 0;
          const double reward = a.rewards ? (*a.rewards)[src] : 0.0;
          const bool terminal = a.terminal && (*a.terminal)[src];
          if (from_top) {
            construct_node(ch, rec.leaf, prior, payload, reward, terminal);
            continue;
          }
          init_node(ch, rec.leaf, prior, payload);  // a reused slot: atomic stores (stale readers)
          cold(ch).reward = reward;
          if (terminal) {
            node(ch).flags.store(TERMINAL_FLAG, std::memory_order_relaxed);
            node(ch).state.store(TERMINAL, std::memory_order_relaxed);
          }
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
    node(i).NO.fetch_add(detail::NO_N, std::memory_order_relaxed);
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
      prefetch_path(tickets, j, hi);
      const TicketRec& rec = tickets_.at(static_cast<std::uint32_t>(tickets[j]));
      backup_path(rec.leaf, rec.start, to_fixed(values[j]));
      give_back_claim(rec.leaf);
    }
  });
  resolve_tickets(tickets);
  tickets_open_.fetch_sub(static_cast<std::int64_t>(tickets.size()), std::memory_order_relaxed);
  counters_.backups.fetch_add(tickets.size(), std::memory_order_relaxed);
}

void Forest::cancel(std::span<const std::uint64_t> tickets) {
  if (tickets.empty()) return;
  std::uint32_t owner = 0;
  claim_tickets(tickets, owner);
  for_chunks(tickets.size(), kParallelItems, [&](std::size_t lo, std::size_t hi) {
    for (std::size_t j = lo; j < hi; ++j) {
      prefetch_path(tickets, j, hi);
      const TicketRec& rec = tickets_.at(static_cast<std::uint32_t>(tickets[j]));
      remove_pending(rec.leaf, rec.start);
      give_back_claim(rec.leaf);
    }
  });
  resolve_tickets(tickets);
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
    nd.NO.fetch_add(detail::NO_N, std::memory_order_relaxed);
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
    s.visits[j] = detail::n_of(nd.NO.load(std::memory_order_relaxed));
    s.pending[j] = detail::o_of(nd.NO.load(std::memory_order_relaxed));
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
    s.visits[j] = detail::n_of(nd.NO.load(std::memory_order_relaxed));
    s.q[j] = q_of(nd);
    s.pending[j] = detail::o_of(nd.NO.load(std::memory_order_relaxed));
    s.n_nodes[j] = t.n_nodes.load(std::memory_order_relaxed);
    s.open_tickets[j] = detail::open_of(t.pins.load(std::memory_order_relaxed));
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
      s.visits.push_back(detail::n_of(nd.NO.load(std::memory_order_relaxed)));
      s.pending.push_back(detail::o_of(nd.NO.load(std::memory_order_relaxed)));
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
    e.visits[j] = detail::n_of(nd.NO.load(std::memory_order_relaxed));
    e.pending[j] = detail::o_of(nd.NO.load(std::memory_order_relaxed));
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
