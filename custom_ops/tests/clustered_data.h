// Clustered keys with peaked queries, and the brute-force top-k oracle: shared by the
// DCI index test and its benchmark. Gaussian keys would make attention diffuse and say
// nothing about an index; here keys gather around cluster centres with a spread of key
// norms (which the inner-product transform must handle), and each query points at one
// centre, so its top keys stand far above the rest but are close among themselves.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

namespace ice::testing {

struct Clustered {
  int64_t n = 0, dim = 0, queries = 0;
  std::vector<float> keys;     // [n, dim]
  std::vector<float> query;    // [queries, dim]
};

inline Clustered make_clustered(int64_t n, int64_t dim, int64_t queries, uint64_t seed,
                                int64_t keys_per_cluster = 128) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> norm_scale(0.6f, 1.4f);
  const int64_t clusters = std::max<int64_t>(2, n / keys_per_cluster);
  std::vector<float> centre(clusters * dim);
  for (float& c : centre) c = normal(rng);
  std::uniform_int_distribution<int64_t> pick(0, clusters - 1);

  Clustered data;
  data.n = n;
  data.dim = dim;
  data.queries = queries;
  data.keys.resize(n * dim);
  for (int64_t j = 0; j < n; ++j) {
    const float* c = &centre[pick(rng) * dim];
    const float s = norm_scale(rng);
    for (int64_t i = 0; i < dim; ++i) data.keys[j * dim + i] = s * (c[i] + 0.5f * normal(rng));
  }
  data.query.resize(queries * dim);
  for (int64_t q = 0; q < queries; ++q) {
    const float* c = &centre[pick(rng) * dim];
    for (int64_t i = 0; i < dim; ++i) data.query[q * dim + i] = c[i] + 0.5f * normal(rng);
  }
  return data;
}

// Exact q·k in double precision.
inline double exact_dot(const float* a, const float* b, int64_t dim) {
  double sum = 0;
  for (int64_t i = 0; i < dim; ++i) sum += static_cast<double>(a[i]) * b[i];
  return sum;
}

// The exact top-k keys of one query among keys j <= last_key with allowed[j] != 0,
// ordered by decreasing q·k (ties: lower index first).
inline std::vector<int64_t> exact_top_k(const float* keys, int64_t n, int64_t dim, const float* q,
                                        int64_t k, int64_t last_key = INT64_MAX,
                                        const uint8_t* allowed = nullptr) {
  std::vector<std::pair<double, int64_t>> scored;
  for (int64_t j = 0; j < n && j <= last_key; ++j)
    if (!allowed || allowed[j]) scored.push_back({-exact_dot(q, keys + j * dim, dim), j});
  const size_t take = std::min<size_t>(k, scored.size());
  std::partial_sort(scored.begin(), scored.begin() + take, scored.end());
  std::vector<int64_t> ids(take);
  for (size_t i = 0; i < take; ++i) ids[i] = scored[i].second;
  return ids;
}

// |found ∩ exact| / |exact|.
inline double recall(const int64_t* found, int64_t found_count, const std::vector<int64_t>& exact) {
  if (exact.empty()) return 1.0;
  int64_t hits = 0;
  for (int64_t id : exact) hits += std::count(found, found + found_count, id) > 0;
  return static_cast<double>(hits) / exact.size();
}

}  // namespace ice::testing
