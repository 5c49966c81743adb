// rstar forest engine: many MCTS trees over LLM reasoning steps in one flat node arena.
//
// Plain C++20, no Python. The contract (semantics, validation order, dtypes) is
// rstar/_core.pyi; docs/engine.md explains the layout and the concurrency design.
//
// Concurrency in one sentence: every public method may be called from many threads at once
// on the same forest and the same tree; search statistics are atomic adds, an expansion is
// claimed by CAS (UNEXPANDED -> EXPANDING) and published with release stores, tickets and
// free lists are lock-free, and a tree can only be released when no call is inside it.
#pragma once

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "thread_pool.hpp"

// Hidden symbols: the engine is linked statically into the module and the tests, so nothing
// interposes its functions. Without this, -fPIC code calls small members (q_of, add_to_root)
// through the PLT and GCC cannot inline them (CMakeLists.txt builds it as a plain static lib).
#pragma GCC visibility push(hidden)

namespace rstar {

inline constexpr std::uint32_t NONE = 0xFFFFFFFFu;
inline constexpr double VALUE_SCALE = 4294967296.0;  // 2^32, fixed point of W
inline constexpr double MAX_ABS_VALUE = 1048576.0;   // 2^20: |v| above this is rejected

enum NodeState : std::uint8_t {
  UNEXPANDED = 0,
  EXPANDING = 1,
  EXPANDED = 2,
  TERMINAL = 3,
  INVALID = 4,
  FREE_STATE = 0xFF,  // internal: the slot is on a free list (or never used)
};

enum class Rule : std::uint8_t { RStar, Puct };
enum class FpuMode : std::uint8_t { Value, Parent };

// ---- errors (the bindings map them onto the Python classes of the .pyi) ---------------------
struct InvalidArgument : std::invalid_argument {  // -> ValueError
  using std::invalid_argument::invalid_argument;
};
struct ForestError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ForestStateError : ForestError {
  using ForestError::ForestError;
};
struct CapacityError : ForestError {
  using ForestError::ForestError;
};
struct UnknownIdError : ForestError {
  using ForestError::ForestError;
};

struct Options {
  std::uint64_t max_nodes = std::uint64_t{1} << 26;
  Rule rule = Rule::RStar;
  double c = 2.0;
  FpuMode fpu_mode = FpuMode::Value;
  double fpu_value = 0.0;
  double virtual_loss = 0.0;
  std::uint32_t max_children = 1024;
  std::uint32_t num_threads = 0;  // 0 = hardware concurrency
  std::uint64_t seed = 0;         // selection is deterministic; kept for future random rules
};

// ---- result records (structs of arrays; the bindings hand the vectors to numpy) -------------
struct Selection {
  std::vector<std::uint64_t> tickets;
  std::vector<std::uint32_t> trees;
  std::vector<std::uint32_t> nodes;
  std::vector<std::int32_t> depths;
  std::vector<std::int64_t> path_offsets{0};
  std::vector<std::uint32_t> path_nodes;
  std::vector<std::uint64_t> path_payloads;
  std::uint64_t collisions = 0;
  std::uint64_t dead_ends = 0;
};

struct NodeStats {
  std::vector<std::int64_t> visits, pending;
  std::vector<double> value_sum, q, init_value;
  std::vector<float> prior;
  std::vector<double> reward;
  std::vector<std::uint8_t> state, terminal;
  std::vector<std::uint64_t> payload;
  std::vector<std::uint32_t> parent, first_child, n_children;
  std::vector<std::int32_t> depth;
  std::vector<std::uint32_t> tree;
};

struct TreeStats {
  std::vector<std::uint32_t> root;
  std::vector<std::int64_t> visits;
  std::vector<double> q;
  std::vector<std::int64_t> pending, n_nodes, open_tickets;
  std::vector<std::uint8_t> terminal;
};

struct RootChildStats {
  std::vector<std::int64_t> offsets{0};
  std::vector<std::uint32_t> node;
  std::vector<std::int64_t> visits, pending;
  std::vector<double> q;
  std::vector<float> prior;
  std::vector<double> init_value;
  std::vector<std::uint8_t> state, terminal;
  std::vector<std::uint64_t> payload;
};

struct TreeExport {  // breadth-first, children contiguous
  std::vector<std::uint32_t> node;
  std::vector<std::int64_t> parent_index;
  std::vector<std::int32_t> depth;
  std::vector<std::int64_t> visits, pending;
  std::vector<double> value_sum, q, init_value;
  std::vector<float> prior;
  std::vector<double> reward;
  std::vector<std::uint8_t> state, terminal;
  std::vector<std::uint64_t> payload;
};

struct MemoryStats {
  std::uint64_t node_bytes, max_nodes, nodes_in_use, nodes_free, high_water;
  std::uint64_t trees_live, trees_created, tickets_open, resident_bytes_estimate;
};

struct Counters {
  std::uint64_t selects, leaves, collisions, dead_ends, expansions, backups, cancels;
};

struct ExpandArgs {
  std::span<const std::uint64_t> tickets;
  std::span<const std::int64_t> n_children;
  std::optional<std::span<const double>> priors;
  std::optional<std::span<const std::uint64_t>> payloads;
  std::optional<std::span<const std::uint8_t>> terminal;
  std::optional<std::span<const double>> rewards;
};

namespace detail {

// The hot record: everything a descent or a backup touches, two records per cache line.
//
//  offset size field        notes
//       0    8 W            value sum, fixed point 2^32 (atomic add)
//       8    4 N            completed visits     } one atomic 64-bit word NO, so a backup
//      12    4 O            pending visits       } adds N+1 and O-1 in a single RMW
//      16    4 first_child  first id of the children block (NONE); free list: next block
//      20    4 parent       parent id; a root stores ROOT_BIT | tree id
//      24    4 prior        float32 prior P
//      28    2 n_children   size of the children block
//      30    1 state        NodeState (release store publishes an expansion)
//      31    1 flags        TERMINAL_FLAG | VALUED_FLAG
//
// The cold record (payload, init value, reward) lives in a parallel array: selection never
// reads it, so it never shares cache lines with the statistics.
struct Node {
  std::atomic<std::int64_t> W;
  std::atomic<std::uint64_t> NO;  // N in the low half, O in the high half (see NO_* below)
  std::atomic<std::uint32_t> first_child;
  std::atomic<std::uint32_t> parent;
  float prior;
  std::uint16_t n_children;
  std::atomic<std::uint8_t> state;
  std::atomic<std::uint8_t> flags;
};
static_assert(sizeof(Node) == 32, "hot node record must stay 32 bytes");
static_assert(offsetof(Node, NO) == 8 && offsetof(Node, first_child) == 16 && offsetof(Node, state) == 30);

// Adds to NO. N and O never leave [0, 2^32): O is the number of open tickets through the node
// and N would need 2^32 visits of one node, so no carry crosses the halves.
inline constexpr std::uint64_t NO_N = 1;                       // N += 1
inline constexpr std::uint64_t NO_O = std::uint64_t{1} << 32;  // O += 1
inline constexpr std::uint64_t NO_N_MINUS_O = NO_N - NO_O;     // N += 1, O -= 1 (mod 2^64)
inline std::uint32_t n_of(std::uint64_t no) { return static_cast<std::uint32_t>(no); }
inline std::uint32_t o_of(std::uint64_t no) { return static_cast<std::uint32_t>(no >> 32); }
static_assert(alignof(Node) == 8);
static_assert(std::atomic<std::int64_t>::is_always_lock_free);
static_assert(std::atomic<std::uint32_t>::is_always_lock_free);
static_assert(std::atomic<std::uint8_t>::is_always_lock_free);

struct Cold {
  std::uint64_t payload;
  std::atomic<double> init_value;  // NaN until set_values
  double reward;
};
static_assert(sizeof(Cold) == 24);
static_assert(std::atomic<double>::is_always_lock_free);

inline constexpr std::uint8_t TERMINAL_FLAG = 1;  // selection skips the node
inline constexpr std::uint8_t VALUED_FLAG = 2;    // set_values happened
inline constexpr std::uint32_t ROOT_BIT = 0x80000000u;

enum TreeStatus : std::uint8_t { TREE_UNUSED = 0, TREE_LIVE = 1, TREE_RELEASING = 2, TREE_RELEASED = 3 };

// What pins a tree (release_trees refuses a tree with either): open tickets in the low half,
// calls currently inside the tree ("users") in the high half of one word, so a select leaves
// the tree and adds its new tickets in one RMW, and a release reads both in one load.
inline constexpr std::uint64_t PIN_USER = std::uint64_t{1} << 32;
inline std::uint32_t open_of(std::uint64_t pins) { return static_cast<std::uint32_t>(pins); }
inline std::uint32_t users_of(std::uint64_t pins) { return static_cast<std::uint32_t>(pins >> 32); }

struct TreeRec {
  std::atomic<std::uint32_t> root{NONE};
  std::atomic<std::uint8_t> status{TREE_UNUSED};
  std::atomic<std::int64_t> n_nodes{0};
  std::atomic<std::uint64_t> pins{0};  // open tickets | users << 32
};

enum TicketStatus : std::uint32_t { TK_FREE = 0, TK_OPEN = 1, TK_EXPANDED = 2, TK_BUSY = 3 };

// A ticket slot. `tag` = generation << 32 | status | owner << 8; a call claims a ticket by
// CAS to TK_BUSY with its own owner token, which also detects duplicates within one call.
struct TicketRec {
  std::atomic<std::uint64_t> tag{0};
  std::atomic<std::uint32_t> next_free{NONE};
  std::uint32_t tree = 0, start = 0, leaf = 0;
};

// A table of T that grows by whole chunks and never moves: references stay valid while other
// threads append. Chunks are installed by CAS.
template <class T, unsigned ChunkBits, std::size_t MaxChunks>
class ChunkTable {
 public:
  static constexpr std::uint64_t kChunk = std::uint64_t{1} << ChunkBits;
  static constexpr std::uint64_t kCapacity = kChunk * MaxChunks;
  ChunkTable() : chunks_(new std::atomic<T*>[MaxChunks]) {
    for (std::size_t i = 0; i < MaxChunks; ++i) chunks_[i].store(nullptr, std::memory_order_relaxed);
  }
  ~ChunkTable() {
    for (std::size_t i = 0; i < MaxChunks; ++i) delete[] chunks_[i].load(std::memory_order_relaxed);
  }
  ChunkTable(const ChunkTable&) = delete;
  ChunkTable& operator=(const ChunkTable&) = delete;

  // The slot, or nullptr when its chunk was never allocated.
  T* find(std::uint64_t i) const {
    if (i >= kCapacity) return nullptr;
    T* c = chunks_[i >> ChunkBits].load(std::memory_order_acquire);
    return c ? c + (i & (kChunk - 1)) : nullptr;
  }
  // A slot known to exist (no range or null check: GCC 12 -O3 would also warn about the
  // null branch it cannot rule out).
  T& at(std::uint64_t i) const { return chunks_[i >> ChunkBits].load(std::memory_order_acquire)[i & (kChunk - 1)]; }
  // Makes sure slot i exists (i < kCapacity).
  T& ensure(std::uint64_t i) {
    auto& slot = chunks_[i >> ChunkBits];
    T* c = slot.load(std::memory_order_acquire);
    if (!c) {
      T* fresh = new T[kChunk];
      if (slot.compare_exchange_strong(c, fresh, std::memory_order_acq_rel)) {
        c = fresh;
      } else {
        delete[] fresh;
      }
    }
    return c[i & (kChunk - 1)];
  }

 private:
  std::unique_ptr<std::atomic<T*>[]> chunks_;
};

}  // namespace detail

class Forest {
 public:
  explicit Forest(const Options& options);
  ~Forest();
  Forest(const Forest&) = delete;
  Forest& operator=(const Forest&) = delete;

  const Options& options() const { return opt_; }
  unsigned num_threads() const { return pool_.size(); }

  // trees
  std::vector<std::uint32_t> add_trees(std::span<const std::uint64_t> root_payloads);
  std::vector<std::uint32_t> roots(std::span<const std::int64_t> tree_ids);
  std::uint64_t release_trees(std::span<const std::int64_t> tree_ids);
  std::vector<std::uint32_t> live_trees() const;

  // the search cycle (rule / c: per-call overrides)
  Selection select(std::span<const std::int64_t> tree_ids, std::int64_t k, std::optional<Rule> rule = {},
                   std::optional<double> c = {});
  Selection select_from(std::span<const std::int64_t> nodes, std::int64_t k, std::optional<Rule> rule = {},
                        std::optional<double> c = {});
  std::vector<std::uint32_t> expand(const ExpandArgs& args);
  void set_values(std::span<const std::int64_t> nodes, std::span<const double> values);
  void backup(std::span<const std::uint64_t> tickets, std::span<const double> values);
  void backup_nodes(std::span<const std::int64_t> nodes, std::span<const double> values);
  void mark_invalid(std::span<const std::int64_t> nodes, double value);
  void cancel(std::span<const std::uint64_t> tickets);

  // reading
  NodeStats node_stats(std::span<const std::int64_t> nodes);
  std::vector<std::uint32_t> children(std::int64_t node);
  TreeStats tree_stats(std::span<const std::int64_t> tree_ids);
  RootChildStats root_child_stats(std::span<const std::int64_t> tree_ids);
  TreeExport export_tree(std::int64_t tree_id);
  MemoryStats memory_stats() const;
  Counters stats() const;

  static constexpr std::size_t kNodeBytes = sizeof(detail::Node) + sizeof(detail::Cold);

 private:
  using Node = detail::Node;
  using Cold = detail::Cold;
  using TreeRec = detail::TreeRec;
  using TicketRec = detail::TicketRec;

  struct SelectParams {  // per call: the options a descent reads, hoisted out of opt_
    bool puct;
    bool fpu_parent;  // puct with fpu_mode "parent"
    double c;
    double fpu_value;
    double virtual_loss;
    bool finite;  // c and virtual_loss small enough that no score can be NaN (see select_params)
  };
  enum class Step : std::uint8_t { Next, Leaf, End };
  class TreeGuard;  // RAII: calls inside trees (blocks release)

  // arena
  Node& node(std::uint32_t i) const { return nodes_[i]; }
  Cold& cold(std::uint32_t i) const { return cold_[i]; }
  void plan_blocks(std::span<const std::uint32_t> sizes) const;  // throws CapacityError
  std::uint32_t alloc_block(std::uint32_t n);                      // NONE when full
  void push_block(std::uint32_t start, std::uint32_t n);
  void push_blocks(std::uint32_t n, std::span<const std::uint32_t> starts);
  std::uint32_t pop_block(std::uint32_t n);
  void init_node(std::uint32_t i, std::uint32_t parent, float prior, std::uint64_t payload);
  void construct_node(std::uint32_t i, std::uint32_t parent, float prior, std::uint64_t payload, double reward,
                      bool terminal);

  // trees and nodes
  TreeRec* find_tree(std::int64_t id) const;
  std::uint32_t tree_of(std::uint32_t node) const;  // NONE when unknown
  bool node_known(std::int64_t id) const;
  std::int32_t depth_of(std::uint32_t node) const;
  void check_nodes(std::span<const std::int64_t> ids, TreeGuard& guard);
  void check_trees(std::span<const std::int64_t> ids, TreeGuard& guard);

  // tickets
  // Takes n ticket slots in the order n single pops would (freed slots LIFO, then new ones)
  // with one CAS; writes the ticket id (generation << 32 | slot) of each. Slots stay FREE
  // until open_ticket.
  void take_ticket_slots(std::size_t n, std::uint64_t* ids);
  void open_ticket(std::uint64_t id, std::uint32_t tree, std::uint32_t start, std::uint32_t leaf);
  TicketRec* ticket_slot(std::uint64_t ticket) const;
  // Claims every ticket for this call (TK_BUSY); throws (and unclaims) on bad ids. Returns the
  // pre-claim status of each.
  std::vector<std::uint32_t> claim_tickets(std::span<const std::uint64_t> tickets, std::uint32_t& owner);
  void unclaim_tickets(std::span<const std::uint64_t> tickets, std::span<const std::uint32_t> status,
                       std::size_t n);
  // Frees the slots of claimed tickets as n single pushes would (one CAS), then lowers the
  // open counts of their trees (the caller already did the node work).
  void resolve_tickets(std::span<const std::uint64_t> tickets);

  // selection
  SelectParams select_params(std::int64_t k, std::optional<Rule> rule, std::optional<double> c) const;
  // guard: the caller entered the tree of each start, in order (one entry per start)
  Selection run_select(std::span<const std::uint32_t> starts, std::span<const std::uint32_t> start_trees,
                       std::uint32_t k, const SelectParams& p, TreeGuard& guard);
  template <bool Puct, bool VirtualLoss, bool Finite>
  Step descend_step(std::uint32_t& cur, std::uint32_t& depth, const SelectParams& p, bool& collided, bool& dead) const;
  void prefetch_children(std::uint32_t i) const;  // the children block of an EXPANDED node

  // statistics
  void add_to_root(std::uint32_t i, std::int64_t fx);
  // backup of one ticket: N+1, W+fx from leaf to root and O-1 from leaf to start, one walk
  void backup_path(std::uint32_t leaf, std::uint32_t start, std::int64_t fx);
  void remove_pending(std::uint32_t leaf, std::uint32_t start);
  void prefetch_path(std::span<const std::uint64_t> tickets, std::size_t j, std::size_t end) const;
  void give_back_claim(std::uint32_t leaf);
  bool alloc_top_run(std::span<const std::uint32_t> sizes, std::uint32_t* firsts);
  double q_of(const Node& n) const;

  template <class F>
  void for_chunks(std::size_t n, std::size_t min_per_thread, F&& f);

  Options opt_;
  mutable ThreadPool pool_;

  Node* nodes_ = nullptr;
  Cold* cold_ = nullptr;
  std::size_t nodes_map_bytes_ = 0, cold_map_bytes_ = 0;
  std::atomic<std::uint64_t> high_water_{0};
  std::unique_ptr<std::atomic<std::uint64_t>[]> free_heads_;  // per block size: tag << 32 | first
  std::unique_ptr<std::atomic<std::int64_t>[]> free_counts_;  // blocks on each list
  std::atomic<std::int64_t> nodes_free_{0};

  detail::ChunkTable<TreeRec, 16, 32768> trees_;  // 2^31 tree ids
  std::atomic<std::uint32_t> trees_created_{0};
  std::atomic<std::int64_t> trees_live_{0};

  detail::ChunkTable<TicketRec, 16, 16384> tickets_;  // 2^30 slots
  std::atomic<std::uint64_t> ticket_slots_{0};
  std::atomic<std::uint64_t> ticket_free_head_;  // tag << 32 | slot
  std::atomic<std::int64_t> tickets_open_{0};
  std::atomic<std::uint32_t> owner_tokens_{0};

  struct alignas(64) AtomicCounters {
    std::atomic<std::uint64_t> selects{0}, leaves{0}, collisions{0}, dead_ends{0}, expansions{0},
        backups{0}, cancels{0};
  } counters_;
};

}  // namespace rstar

#pragma GCC visibility pop
