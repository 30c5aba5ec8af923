// One attention call as the kernels see it: shapes, data and the mask, already
// validated by the ORT binding. Both paths (exact and kNN) read only this.
#pragma once

#include <cstdint>

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
};

struct AttentionProblem {
  AttentionShape shape;
  const float* q = nullptr;  // [B, Hq, Sq, D]
  const float* k = nullptr;  // [B, Hkv, Sk, D]
  const float* v = nullptr;  // [B, Hkv, Sk, Dv]
  float* y = nullptr;        // [B, Hq, Sq, Dv]
  MaskView mask;
  float scale = 1.0f;        // resolved (never <= 0)
  bool causal = false;

  const float* q_rows(int64_t b, int64_t h) const { return q + (b * shape.q_heads + h) * shape.q_len * shape.dim; }
  const float* k_rows(int64_t b, int64_t kvh) const { return k + (b * shape.kv_heads + kvh) * shape.k_len * shape.dim; }
  const float* v_rows(int64_t b, int64_t kvh) const { return v + (b * shape.kv_heads + kvh) * shape.k_len * shape.v_dim; }
  float* y_rows(int64_t b, int64_t h) const { return y + (b * shape.q_heads + h) * shape.q_len * shape.v_dim; }
};

}  // namespace ice
