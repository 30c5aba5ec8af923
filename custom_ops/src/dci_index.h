// Prioritized DCI (Li & Malik 2017) with IceFormer's levels, behind ice::KeyIndex.
//
// Keys are mapped to a Euclidean problem by ip_to_l2.h. Every key lives on exactly
// one level (about n^((t+1)/levels) keys on or above level t, top = 0); the top level
// forms the root cell, and every other key is a child of one key on the level above
// (DciParams::parent says which, found by searching the levels built so far). A cell
// is the set of children of one key; it may carry, per random direction, its children
// sorted by projection (composite_indices × simple_indices directions).
//
// A query walks down: in every cell it visits it either scores every key (a block of
// contiguous rows) or runs the prioritized DCI walk (each composite index advances the
// simple index whose next projection is nearest; a key seen by all simple indices of a
// composite becomes a candidate and is scored by its exact q·k); then it descends into
// the children of the field_of_view best keys of the level (more while their subtrees
// hold fewer than k keys). Every scored key the query may see competes for the top k,
// ranked by the exact q·k of the original vectors (ties: lower key index).
//
// Memory layout: keys are copied, augmented, into "slot" order — level by level
// from the top, children of one parent contiguous — so a cell is one contiguous
// block of rows and a cell's sorted projections one contiguous range.
// Search allocates nothing once a thread's scratch is warm (thread_local, grows only).
#pragma once

#include <cstdint>
#include <vector>

#include "key_index.h"

namespace ice {

struct DciParams {
  int levels = 3;                 // hierarchy depth (levels with no keys are dropped)
  int composite_indices = 2;      // independent candidate sources per cell
  int simple_indices = 4;         // projections per composite index
  int construction_field_of_view = 5;  // keys expanded per level when finding a parent
  float construction_prop_to_retrieve = 0.002f;  // cell walk stop while building
  int query_field_of_view = 0;    // keys expanded per level when searching; 0 = k
  float prop_to_retrieve = 0.8f;  // a cell walk stops once this share of the cell is scored
  float prop_to_visit = 1.0f;     // ... or after this share of the cell's projection entries
  // Per level of a query's descent: no further cell is opened once this many keys
  // were scored on the level (cells of the best parents come first); 0 = no cap.
  // A query left with fewer than min(k, keys it may see) results falls back to an
  // exact scan, so keep it well above k.
  int max_candidates = 0;
  // Cells of at most this many keys are scored whole (contiguous rows) instead of
  // walked. Measured on clustered data (3 levels, Parent::nearest): the walk costs
  // ~7x more per scored key than the scan; at prop_to_retrieve 0.8 it scores most of
  // the cell anyway, and the keys it skips cost recall (16K, k=10: 0.41 walked vs 0.92
  // scanned, for building and searching). After the IP→L2 transform every key sits at
  // about the same distance c from a query, so 1-D projections separate the nearest
  // ones poorly (one cell of 4K keys walked to 10%: recall 0.30). Walking can pay only
  // with a small prop_to_retrieve over large cells (few levels). 0 = always walk (the
  // original's behaviour).
  int exhaustive_cell_size = 1 << 30;
  // How a key picks its parent among the keys one level up.
  enum class Parent : int {
    // Its nearest neighbour in the transformed space (the original). The extra
    // coordinate √(c² − ‖k‖²) then dominates for short keys, so a short key tends to
    // hang under another short key of a different direction, where the queries that
    // want it never look (measured: most of the complete misses at 16K).
    nearest = 0,
    // The key a query pointing along it would rank first (largest k̂·p): the rule
    // queries descend by, but long keys become hubs with huge cells.
    query = 1,
    // The key of the most similar direction (largest cosine); queries then also pick
    // the keys to expand by cosine (results still rank by q·k). Measured on clustered
    // data, k=10, nearest → direction: recall 0.92 → 0.97 at 16K (queries missing most
    // of their top k: 6.6% → 1%), 0.79 → 0.95 at 32K, 0.85 → 0.98 at 16K with D=128,
    // 0.99 → 0.99 at 4K, and a 1.6–2.3x faster build (smaller cells for the probes).
    direction = 2,
  };
  Parent parent = Parent::direction;
  // A query that may see at most this many keys (an early causal prefix) scores them
  // all: exact, and cheaper than a descent, which scores several hundred keys.
  int exact_scan_below = 256;
};

class DciIndex final : public KeyIndex {
 public:
  explicit DciIndex(const DciParams& params = DciParams());

  void build(const KeySet& keys, uint64_t seed) override;
  void search(const QueryBlock& block, Neighbours out) const override;

  // Introspection for tests and benchmarks.
  int64_t size() const { return static_cast<int64_t>(key_id_.size()); }
  int num_levels() const { return static_cast<int>(level_begin_.size()) - 1; }
  // Keys scored by the last search on the calling thread, summed over its block.
  static int64_t last_search_scored();

  struct Scratch;  // per-thread search state (defined in the .cc)

 private:
  struct Probe;
  struct Staging;
  Staging stage(const KeySet& keys) const;
  void allocate_slots(int32_t n);
  void place(Staging& staging, int32_t position, int32_t slot);
  void attach_level(int t, Staging& staging, Scratch& scratch);
  int32_t find_parent(const Staging& staging, int32_t position, int parent_level, Scratch& s) const;
  void sum_subtrees();
  void search_one(const float* query, int64_t k, int64_t last_key, Scratch& s, float* scores,
                  int64_t* ids, int32_t* found) const;
  void collect_exact(const Probe& probe, int64_t visible, Scratch& s) const;
  void descend(const Probe& probe, int stop_level, Scratch& s) const;
  void visit_cell(const Probe& probe, int32_t begin, int32_t end, Scratch& s) const;
  void walk_cell(const Probe& probe, int32_t begin, int32_t end, int64_t target,
                 int64_t min_candidates, Scratch& s) const;
  void score_slot(const Probe& probe, int32_t slot, Scratch& s) const;
  float record(const Probe& probe, int32_t slot, float score, Scratch& s) const;
  float threshold(const Probe& probe, const Scratch& s) const;
  void build_cell(int32_t begin, int32_t end, Staging& staging);
  float dot(const float* a, const float* b) const;

  DciParams params_;
  int64_t dim_ = 0;
  int64_t stride_ = 0;                 // augmented row length: dim + 1 padded to 8 floats
  int num_projections_ = 0;            // composite_indices * simple_indices
  std::vector<float> directions_;      // [num_projections, stride] unit vectors in R^(dim+1)
  std::vector<float> rows_;            // [slots, stride] augmented keys, slot order
  std::vector<int64_t> key_id_;        // [slots] original key index
  std::vector<int32_t> child_begin_;   // [slots] children = [child_begin, child_end)
  std::vector<int32_t> child_end_;
  std::vector<int32_t> subtree_size_;  // [slots] keys in the subtree, itself included
  std::vector<int64_t> subtree_min_id_;// [slots] smallest key index in the subtree (causal pruning)
  std::vector<int32_t> level_begin_;   // slot range of each level, top level first
  // Per projection p, entries [p*slots + begin, p*slots + end) hold the cell
  // [begin, end) sorted by projection: value and position within the cell.
  std::vector<float> sorted_value_;
  std::vector<int32_t> sorted_local_;
  std::vector<float> inv_norm_;        // [slots] 1/‖k‖ (Parent::direction)
  bool may_walk_ = false;              // some cell is larger than exhaustive_cell_size
  std::vector<int32_t> slots_by_id_;   // [slots] slots in increasing key index (exact scans)
};

}  // namespace ice
