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
};

// A block of queries searched together (so an implementation may share work).
struct QueryBlock {
  const float* queries = nullptr;   // [count, dim], row-major
  int64_t count = 0;
  int64_t k = 0;                    // keys wanted per query
  const int64_t* last_key = nullptr;// [count] or nullptr; query i may see key j only if j <= last_key[i]
};

// Results of one QueryBlock: for query i, ids[i*k .. i*k+found[i]) are key indices
// (in an order fixed by the index: decreasing q·k, or arrival order); the rest of
// the row is -1.
struct Neighbours {
  int64_t* ids = nullptr;           // [count, k]
  int32_t* found = nullptr;         // [count]
  // [count, k] or nullptr. Filled with q·k of each returned key by indexes whose
  // reports_scores() is true (saves the kernel from scoring them again).
  float* scores = nullptr;
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
  // Whether search() fills Neighbours::scores when given one.
  virtual bool reports_scores() const { return false; }
  // The index's partition of the keys after build(), or nullptr if it has none.
  virtual const KeyPartition* partition() const { return nullptr; }
};

}  // namespace ice
