// Lloyd's k-means (Euclidean), deterministic in its seed: shared by the cluster
// index (to partition the keys) and the tail model (to summarise them).
#pragma once

#include <cstdint>
#include <vector>

#include "parallel_for.h"

namespace ice {

struct Clustering {
  int64_t k = 0, dim = 0;
  std::vector<float> centroids;     // [k][dim], the mean of each cluster's members
  std::vector<int32_t> assignment;  // [members.size()]: the cluster of each member
  std::vector<int64_t> sizes;       // [k] (a cluster may end up empty)
};

// Clusters the rows members[0..n) of `points` ([*, dim], row stride dim) into
// min(k, n) clusters: k-means++ seeding, then Lloyd iterations, on a seeded sample
// of about 32 points per cluster; the final assignment and means cover every member.
// `parallel` (or nullptr) spreads the assignment steps over threads in fixed chunks:
// the result is the same for any thread count.
Clustering kmeans(const float* points, int64_t dim, const std::vector<int64_t>& members, int64_t k,
                  int64_t iterations, uint64_t seed, const ParallelFor* parallel = nullptr);

// A small, fast, seedable generator (splitmix64) so results never depend on the
// standard library's distributions.
struct SplitMix64 {
  uint64_t state;
  explicit SplitMix64(uint64_t seed) : state(seed) {}
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  uint64_t below(uint64_t n) { return next() % n; }
};

}  // namespace ice
