#include "kmeans.h"

#include <algorithm>
#include <limits>
#include <cmath>
#include <numeric>

#include "tile_kernels.h"

namespace ice {
namespace {

constexpr int64_t kSamplePerCluster = 32;
constexpr int64_t kAssignRows = 64;

constexpr int64_t kAssignChunk = 1024;  // points per task: the work split never depends on threads

// For each listed point, the centroid maximising x.c - |c|^2/2 (= the nearest one).
void assign(const float* points, int64_t dim, const int64_t* ids, int64_t n, const std::vector<float>& centroids,
            int64_t k, int32_t* out, const ParallelFor* parallel) {
  const int64_t padded = padded_to_panels(k);
  std::vector<float> panels(padded * dim), half_norm(k);
  pack_panels(centroids.data(), dim, dim, nullptr, k, panels.data());
  for (int64_t c = 0; c < k; ++c) half_norm[c] = 0.5f * dot(&centroids[c * dim], &centroids[c * dim], dim);
  const int64_t chunks = (n + kAssignChunk - 1) / kAssignChunk;
  run_tasks(chunks > 1 ? parallel : nullptr, chunks, [&](int64_t chunk) {
    std::vector<float> rows(kAssignRows * dim), scores(kAssignRows * padded);
    const int64_t end = std::min(n, (chunk + 1) * kAssignChunk);
    for (int64_t i0 = chunk * kAssignChunk; i0 < end; i0 += kAssignRows) {
      const int64_t count = std::min(kAssignRows, end - i0);
      for (int64_t r = 0; r < count; ++r) std::copy_n(points + ids[i0 + r] * dim, dim, rows.data() + r * dim);
      score_panels(rows.data(), dim, count, panels.data(), panel_count(k), dim, scores.data(), padded);
      for (int64_t r = 0; r < count; ++r) {
        const float* s = scores.data() + r * padded;
        int32_t best = 0;
        float best_score = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < k; ++c) {
          const float score = s[c] - half_norm[c];
          if (score > best_score) best_score = score, best = static_cast<int32_t>(c);
        }
        out[i0 + r] = best;
      }
    }
  });
}

// Centroid = mean of its members; a cluster without members keeps its centroid.
void update(const float* points, int64_t dim, const int64_t* ids, int64_t n, const int32_t* assignment, int64_t k,
            std::vector<float>& centroids, std::vector<int64_t>& sizes) {
  std::vector<double> sums(k * dim, 0.0);
  sizes.assign(k, 0);
  for (int64_t i = 0; i < n; ++i) {
    const float* x = points + ids[i] * dim;
    double* sum = sums.data() + assignment[i] * dim;
    for (int64_t d = 0; d < dim; ++d) sum[d] += x[d];
    ++sizes[assignment[i]];
  }
  for (int64_t c = 0; c < k; ++c)
    if (sizes[c] > 0)
      for (int64_t d = 0; d < dim; ++d) centroids[c * dim + d] = static_cast<float>(sums[c * dim + d] / sizes[c]);
}

// k-means++ seeding on the sample: each next centroid is a sample point drawn with
// probability proportional to its squared distance from the nearest centroid so far,
// so every well-separated group gets one (a plain random pick leaves some groups
// without and splits others, which a few Lloyd iterations do not repair).
void seed_centroids(const float* points, int64_t dim, const std::vector<int64_t>& sample, int64_t k,
                    SplitMix64& rng, float* centroids) {
  const int64_t m = static_cast<int64_t>(sample.size());
  // The sample in score panels: each new centroid is scored against all of it in
  // one product.
  std::vector<float> panels(padded_to_panels(m) * dim), dots(padded_to_panels(m));
  pack_panels(points, dim, dim, sample.data(), m, panels.data());
  std::vector<double> norm(m), nearest(m, std::numeric_limits<double>::infinity());
  for (int64_t i = 0; i < m; ++i) norm[i] = dot(points + sample[i] * dim, points + sample[i] * dim, dim);
  int64_t pick = 0;  // the sample is in random order: its first point starts
  for (int64_t c = 0; c < k; ++c) {
    const float* chosen = points + sample[pick] * dim;
    std::copy_n(chosen, dim, centroids + c * dim);
    if (c + 1 == k) break;
    const double chosen_norm = norm[pick];
    score_panels(chosen, dim, 1, panels.data(), panel_count(m), dim, dots.data(), padded_to_panels(m));
    double total = 0.0;
    for (int64_t i = 0; i < m; ++i) {
      const double d2 = std::max(0.0, norm[i] - 2.0 * dots[i] + chosen_norm);
      nearest[i] = std::min(nearest[i], d2);
      total += nearest[i];
    }
    // Uniform in [0, total) from 53 random bits; points already chosen weigh 0.
    // (Overflowing magnitudes or duplicates: fall back to the next point in order.)
    pick = c + 1;
    if (total > 0.0 && total < std::numeric_limits<double>::infinity()) {
      double target = static_cast<double>(rng.next() >> 11) * 0x1.0p-53 * total;
      for (int64_t i = 0; i < m; ++i) {
        target -= nearest[i];
        if (target < 0.0 && nearest[i] > 0.0) {
          pick = i;
          break;
        }
      }
    }
  }
}

}  // namespace

Clustering kmeans(const float* points, int64_t dim, const std::vector<int64_t>& members, int64_t k,
                  int64_t iterations, uint64_t seed, const ParallelFor* parallel) {
  const int64_t n = static_cast<int64_t>(members.size());
  Clustering result;
  result.dim = dim;
  result.k = std::max<int64_t>(std::min(k, n), n > 0 ? 1 : 0);
  if (n == 0) return result;
  k = result.k;

  // A seeded sample (partial Fisher-Yates) of about 32 points per cluster.
  SplitMix64 rng(seed ^ 0x5DEECE66Dull);
  std::vector<int64_t> sample(members);
  const int64_t sample_size = std::min(n, std::max(k, kSamplePerCluster * k));
  for (int64_t i = 0; i < sample_size; ++i) std::swap(sample[i], sample[i + rng.below(n - i)]);
  sample.resize(sample_size);

  result.centroids.resize(k * dim);
  seed_centroids(points, dim, sample, k, rng, result.centroids.data());

  std::vector<int32_t> sample_assignment(sample_size);
  for (int64_t it = 0; it < iterations; ++it) {
    assign(points, dim, sample.data(), sample_size, result.centroids, k, sample_assignment.data(), parallel);
    update(points, dim, sample.data(), sample_size, sample_assignment.data(), k, result.centroids, result.sizes);
  }
  result.assignment.resize(n);
  assign(points, dim, members.data(), n, result.centroids, k, result.assignment.data(), parallel);
  update(points, dim, members.data(), n, result.assignment.data(), k, result.centroids, result.sizes);
  return result;
}

}  // namespace ice
