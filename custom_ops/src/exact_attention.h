// Exact attention, softmax(scale * Q K^T + mask) V, computed tile by tile with an
// online softmax (blocks of queries x blocks of keys, never an Sq x Sk buffer).
// Used for short sequences, few queries (decoding) and masks the kNN path cannot
// turn into key removal.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "attention_problem.h"

namespace ice {

// Keys (in panels) and values of every (batch, kv-head) slice laid out once for the
// tile kernels, plus the mean of V that a row with no allowed key outputs (the
// contract).
struct PackedKeys {
  // Keys [first_key, Sk) are packed: under a sliding window no query sees the ones
  // before (a decoding step packs its window, not the whole cache). A multiple of
  // kPanelWidth; n = Sk - first_key.
  int64_t first_key = 0, count = 0;
  // Per slice room for n keys; packed_keys(slice) of them are there (uninitialised
  // buffers: the packing writes every float the kernels read).
  std::unique_ptr<float[]> panels;  // [B*Hkv][panel_count(n) * kPanelWidth * D]
  std::unique_ptr<float[]> strips;  // [B*Hkv][strip_count(Dv)][packed_keys][kStripWidth]
  int64_t slice_floats = 0, slice_strip_floats = 0;
  // A key-padding mask folded into the packing: kept[slice] keys, those the mask
  // allows, were packed (in order) and the slice needs no mask; kUnfolded: every key
  // was, the mask applies. Empty when no slice is folded.
  static constexpr int64_t kUnfolded = -1;
  std::vector<int64_t> kept;
  std::vector<float> value_means;  // [B*Hkv][Dv], only when some row may see no key
  // Per slice, whether its keys and values are all finite: 0 = not checked yet, 1 =
  // yes, 2 = no. Checked only when a row overflows (so never on the common path).
  std::unique_ptr<std::atomic<uint8_t>[]> finite_state;

  const float* keys(int64_t slice) const { return panels.get() + slice * slice_floats; }
  bool inputs_finite(const AttentionProblem& p, int64_t slice) const;
  const float* values(int64_t slice) const { return strips.get() + slice * slice_strip_floats; }
  bool mask_folded(int64_t slice) const { return !kept.empty() && kept[slice] != kUnfolded; }
  // Keys in the slice's panels and in each of its strips.
  int64_t packed_keys(int64_t slice) const { return mask_folded(slice) ? kept[slice] : count; }
  const float* value_mean(int64_t slice, int64_t v_dim) const { return value_means.data() + slice * v_dim; }
};

PackedKeys pack_keys(const AttentionProblem& p, const ParallelFor& parallel);

// Writes Y for query rows [row_begin, row_end) of query head h in batch b.
void exact_attention_rows(const AttentionProblem& p, const PackedKeys& keys, int64_t b, int64_t h,
                          int64_t row_begin, int64_t row_end);
// Likewise for `count` scattered rows, ascending.
void exact_attention_at_rows(const AttentionProblem& p, const PackedKeys& keys, int64_t b, int64_t h,
                             const int64_t* rows, int64_t count);

// Row i of query head h in float64, the way dense attention computes it, into out
// [Dv]: for the rare rows a float32 pass cannot serve (its sums overflowed though
// dense attention is finite; a NaN query on the kNN path). False if the row sees
// no key (out untouched).
bool exact_row_in_double(const AttentionProblem& p, int64_t b, int64_t h, int64_t i, float* out);

// The whole call in exact mode.
void exact_attention(const AttentionProblem& p, const ParallelFor& parallel);

}  // namespace ice
