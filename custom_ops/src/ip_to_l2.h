// Maximum inner product search → nearest-neighbour search (IceFormer step 1).
//
// With c = max‖k‖ over the keys, keys become k̃ = [k, √(c² − ‖k‖²)] (all of norm c)
// and queries q̃ = [q/‖q‖, 0] (norm 1). Then ‖q̃ − k̃‖² = 1 + c² − 2·q·k/‖q‖: the
// Euclidean nearest k̃ are exactly the keys with the largest q·k. Between two keys,
// ‖k̃a − k̃b‖² = 2c² − 2·k̃a·k̃b, so "nearest" is "largest augmented inner product".
// Kept apart from the index so both can be tested (and replaced) on their own.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace ice::ip_to_l2 {

inline float squared_norm(const float* v, int64_t dim) {
  float sum = 0.f;
  for (int64_t i = 0; i < dim; ++i) sum += v[i] * v[i];
  return sum;
}

// c² = max‖k‖² over the keys with allowed[j] != 0 (all keys when allowed is null).
inline float max_squared_norm(const float* keys, int64_t n, int64_t dim, const uint8_t* allowed) {
  float max_sq = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    if (allowed && !allowed[j]) continue;
    max_sq = std::max(max_sq, squared_norm(keys + j * dim, dim));
  }
  return max_sq;
}

// out[0..dim] = [k, √(c² − ‖k‖²)]; the max(0, ·) absorbs rounding for the longest keys.
inline void transform_key(const float* key, int64_t dim, float max_sq_norm, float* out) {
  std::copy(key, key + dim, out);
  out[dim] = std::sqrt(std::max(0.f, max_sq_norm - squared_norm(key, dim)));
}

// out[0..dim] = [q/‖q‖, 0]; a zero query stays zero (every key is then equally near).
inline void transform_query(const float* query, int64_t dim, float* out) {
  const float norm = std::sqrt(squared_norm(query, dim));
  const float inv = norm > 0.f ? 1.f / norm : 0.f;
  for (int64_t i = 0; i < dim; ++i) out[i] = query[i] * inv;
  out[dim] = 0.f;
}

}  // namespace ice::ip_to_l2
