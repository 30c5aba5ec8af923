// The index interface the attention kernel searches through (FAISS-style: build,
// then search; any distance transform stays inside the implementation).
// One index covers the keys of one (batch, kv-head) slice; every query head of
// that kv group searches it. The kernel never knows which implementation it uses.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "parallel_for.h"

namespace ice {

// The keys of one (batch, kv-head) slice.
struct KeySet {
  const float* keys = nullptr;      // [n, dim], row-major, as the model produced them
  int64_t n = 0;
  int64_t dim = 0;
  const uint8_t* allowed = nullptr; // [n] or nullptr; 0 = key removed (key padding)
  // Or nullptr. An index may spread its build over these threads (the kernel passes
  // them when there are fewer slices than threads); the result must not change.
  const ParallelFor* parallel = nullptr;
  // [n, v_dim] or nullptr: the values, for an index that attends as it scans.
  const float* values = nullptr;
  int64_t v_dim = 0;
};

// A block of queries searched together (so an implementation may share work).
struct QueryBlock {
  const float* queries = nullptr;   // [count, dim], row-major
  int64_t count = 0;
  int64_t k = 0;                    // keys wanted per query
  const int64_t* last_key = nullptr;// [count] or nullptr; query i may see key j only if j <= last_key[i]
  // Keys each query scans at least, for an index that scans (0: its own budget); the
  // accuracy guard raises it for a head the default budget serves badly.
  int64_t scan_min = 0;
};

// Results of one QueryBlock (k = the block's k): for query i, ids[i*k .. i*k+found[i]) are key indices
// (in an order fixed by the index: decreasing q·k, or arrival order); the rest of
// the row is -1.
struct Neighbours {
  int64_t* ids = nullptr;           // [count, k]
  int32_t* found = nullptr;         // [count]
  // [count, k]: q·k of each returned key (an index scores what it returns anyway;
  // the kernel never scores them again).
  float* scores = nullptr;
};

// Softmax attention of a block's queries over the keys an index scanned for them
// (every visible key of the clusters in probes[probe_begin[i] .. probe_begin[i+1])),
// kept unnormalised as in an online softmax: query i's largest scaled score
// max[i], weight sum sum[i] = sum_j e^{s_j - max[i]} and acc[i] = sum_j e^{s_j - max[i]} v_j.
struct ScannedAttention {
  std::vector<float> max, sum, acc;      // [count], [count], [count][v_dim]
  std::vector<int64_t> probe_begin;      // [count + 1]
  std::vector<int32_t> probes;           // clusters of KeyPartition
  std::vector<int64_t> keys;             // [count]: visible keys scanned for query i
};

// A partition of one slice's allowed keys into clusters, for indexes that keep one:
// the tail summary coarsens it instead of clustering the keys a second time.
struct KeyPartition {
  int64_t k = 0;
  std::vector<float> centroids;     // [k][dim]
  std::vector<int32_t> cluster_of;  // [n], -1 for removed keys
};

class KeyIndex {
 public:
  virtual ~KeyIndex() = default;
  // Builds over `keys` (the memory must outlive the index). Deterministic in `seed`.
  virtual void build(const KeySet& keys, uint64_t seed) = 0;
  // Thread-safe: several threads may search one built index at once.
  virtual void search(const QueryBlock& block, Neighbours out) const = 0;
  // Result slots per query (the row length of Neighbours) a search needs when asked
  // for (or, scanning, for at least) k keys: k, or more for an index that returns
  // every key it scores.
  virtual int64_t result_slots(int64_t k) const { return k; }
  // The index's partition of the keys after build(), or nullptr if it has none.
  virtual const KeyPartition* partition() const { return nullptr; }
  // Attends the block over what it scans instead of returning neighbours (values
  // given at build, scores scaled by `scale`); false if the index cannot.
  virtual bool attend(const QueryBlock&, float /*scale*/, ScannedAttention&) const { return false; }
};

}  // namespace ice
