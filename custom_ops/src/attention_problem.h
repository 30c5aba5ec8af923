// One attention call as the kernels see it: shapes, data and the mask, already
// validated by the ORT binding. Both paths (exact and kNN) read only this.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "parallel_for.h"

namespace ice {

struct AttentionShape {
  int64_t batch = 0, q_heads = 0, kv_heads = 0, q_len = 0, k_len = 0, dim = 0, v_dim = 0;
  int64_t group() const { return q_heads / kv_heads; }  // query heads per kv head
  // Last key query i may see under causality (may be < 0: no key).
  int64_t causal_last_key(int64_t i) const { return i + k_len - q_len; }
};

// attn_mask seen through numpy broadcasting as [B, Hq, Sq, Sk]: element (b, h, i, j)
// is data[b*stride[0] + h*stride[1] + i*stride[2] + j*stride[3]].
struct MaskView {
  enum class Kind { kNone, kBool, kFloat };
  Kind kind = Kind::kNone;
  const void* data = nullptr;
  int64_t stride[4] = {0, 0, 0, 0};

  bool present() const { return kind != Kind::kNone; }
  // Same for every head and query: [B|1, 1, 1, Sk] once broadcast.
  bool per_key_only() const { return stride[1] == 0 && stride[2] == 0; }
  int64_t offset(int64_t b, int64_t h, int64_t i) const {
    return b * stride[0] + h * stride[1] + i * stride[2];
  }
  // The same mask seen from batch element b on (as batch 0).
  MaskView from_batch(int64_t b) const {
    MaskView view = *this;
    if (kind == Kind::kBool) view.data = static_cast<const uint8_t*>(data) + b * stride[0];
    if (kind == Kind::kFloat) view.data = static_cast<const float*>(data) + b * stride[0];
    return view;
  }
};

// The largest magnitudes of a call's inputs.
struct Magnitudes {
  float q = 0.0f;  // over Q's finite elements
  float k = 0.0f;  // over the existing keys; +inf if one is NaN or infinite
  float v = 0.0f;  // over the existing values; likewise
};

// max |x[j]| over j < n, +inf if some x[j] is NaN or infinite (or, with
// `skip_non_finite`, the largest over the finite ones).
inline float largest_magnitude(const float* x, int64_t n, bool skip_non_finite = false) {
  constexpr float kFloatMax = std::numeric_limits<float>::max();
  float largest = 0.0f;
  bool non_finite = false;
  for (int64_t j = 0; j < n; ++j) {
    const float a = std::fabs(x[j]);
    const bool finite = a <= kFloatMax;  // false for NaN too
    non_finite |= !finite;
    largest = std::max(largest, finite ? a : 0.0f);
  }
  return non_finite && !skip_non_finite ? std::numeric_limits<float>::infinity() : largest;
}

struct AttentionProblem {
  // shape.k_len counts the keys that exist (key_lengths); K and V may hold more rows
  // per (batch, kv-head): kv_capacity, a shared buffer's length. Rows past k_len are
  // never read.
  AttentionShape shape;
  int64_t kv_capacity = 0;
  const float* q = nullptr;  // [B, Hq, Sq, D]
  const float* k = nullptr;  // [B, Hkv, Sk, D]
  const float* v = nullptr;  // [B, Hkv, Sk, Dv]
  float* y = nullptr;        // [B, Hq, Sq, Dv]
  MaskView mask;
  float scale = 1.0f;        // resolved (never <= 0)
  bool causal = false;
  float softcap = 0.0f;        // > 0: scores s -> softcap * tanh(s / softcap), before the mask
  int64_t sliding_window = 0;  // > 0: query i sees keys j > causal_last_key(i) - sliding_window
  bool zero_empty_rows = false;  // a row with no allowed key outputs 0 (else the mean of V)

  // First key query i may see under the sliding window (0 without one).
  int64_t first_key(int64_t i) const {
    return sliding_window > 0 ? std::max<int64_t>(0, shape.causal_last_key(i) - sliding_window + 1) : 0;
  }
  // One past the last key query i may see (causality; the mask aside).
  int64_t key_end(int64_t i) const {
    return causal ? std::clamp<int64_t>(shape.causal_last_key(i) + 1, 0, shape.k_len) : shape.k_len;
  }

  const float* q_rows(int64_t b, int64_t h) const { return q + (b * shape.q_heads + h) * shape.q_len * shape.dim; }
  const float* k_rows(int64_t b, int64_t kvh) const {
    return k + (b * shape.kv_heads + kvh) * kv_capacity * shape.dim;
  }
  const float* v_rows(int64_t b, int64_t kvh) const {
    return v + (b * shape.kv_heads + kvh) * kv_capacity * shape.v_dim;
  }
  float* y_rows(int64_t b, int64_t h) const { return y + (b * shape.q_heads + h) * shape.q_len * shape.v_dim; }

  Magnitudes magnitudes() const {
    Magnitudes m;
    m.q = largest_magnitude(q, shape.batch * shape.q_heads * shape.q_len * shape.dim, true);
    for (int64_t b = 0; b < shape.batch; ++b)
      for (int64_t kvh = 0; kvh < shape.kv_heads; ++kvh) {
        m.k = std::max(m.k, largest_magnitude(k_rows(b, kvh), shape.k_len * shape.dim));
        m.v = std::max(m.v, largest_magnitude(v_rows(b, kvh), shape.k_len * shape.v_dim));
      }
    return m;
  }

  // Batch element b alone, with `keys` of its keys existing.
  AttentionProblem batch_element(int64_t b, int64_t keys) const {
    AttentionProblem one = *this;
    one.shape.batch = 1;
    one.shape.k_len = keys;
    one.q = q_rows(b, 0);
    one.k = k_rows(b, 0);
    one.v = v_rows(b, 0);
    one.y = y_rows(b, 0);
    one.mask = mask.from_batch(b);
    return one;
  }
};

}  // namespace ice
