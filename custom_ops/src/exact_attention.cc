#include "exact_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "tile_kernels.h"

namespace ice {
namespace {

constexpr int64_t kQueryBlock = 64;
// Keys per online-softmax step: each step rescales and reloads every row's accumulator, so
// long steps pay (1 thread, D 64, vs 128 keys: +10-13 % non-causal, +12 % causal at 512-4K keys;
// the 64 x 512 score tile, 128 KiB, stays in L2).
constexpr int64_t kKeyBlock = 32 * kPanelWidth;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLowest = std::numeric_limits<float>::lowest();
constexpr float kHighest = std::numeric_limits<float>::max();

// Per-thread scratch above this many floats is released after use: one call with a
// huge head size must not pin its buffers for the thread's lifetime.
constexpr size_t kScratchFloatsKept = size_t{1} << 18;

// Applies the softcap, the mask, causality and the sliding window to scores
// s[0..nk) of query row i for keys kb0.. . (Scores are in base 2 here: the cap and
// float biases are scaled by log2(e) too.)
void mask_scores(const AttentionProblem& p, int64_t b, int64_t h, int64_t i, int64_t kb0, int64_t nk,
                 float* s) {
  if (p.softcap > 0.0f) {  // before the mask, as in ONNX Attention: -inf stays -inf
    const float cap = p.softcap * kLog2e, inv = 1.0f / cap;
    for (int64_t j = 0; j < nk; ++j) s[j] = cap * std::tanh(s[j] * inv);
  }
  const MaskView& m = p.mask;
  if (m.kind == MaskView::Kind::kBool) {
    const uint8_t* row = static_cast<const uint8_t*>(m.data) + m.offset(b, h, i);
    for (int64_t j = 0; j < nk; ++j)
      if (!row[(kb0 + j) * m.stride[3]]) s[j] = kNegInf;
  } else if (m.kind == MaskView::Kind::kFloat) {
    const float* row = static_cast<const float*>(m.data) + m.offset(b, h, i);
    for (int64_t j = 0; j < nk; ++j) {
      const float bias = row[(kb0 + j) * m.stride[3]];
      // A finite bias near either float limit must stay finite in base 2 too (-inf
      // blocks; +3.4e38, as (1 - m) * -finfo.min gives, is finite in dense attention).
      s[j] = bias == kNegInf ? bias : s[j] + std::clamp(kLog2e * bias, kLowest, kHighest);  // blocked even if s[j] is NaN
    }
  }
  if (p.causal) {
    const int64_t first_hidden = p.shape.causal_last_key(i) + 1 - kb0;
    for (int64_t j = std::max<int64_t>(first_hidden, 0); j < nk; ++j) s[j] = kNegInf;
  }
  const int64_t before_window = std::min(p.first_key(i) - kb0, nk);
  for (int64_t j = 0; j < before_window; ++j) s[j] = kNegInf;
}

// Whether the mask element at index `at` lets its query see its key.
bool mask_allows(const MaskView& m, int64_t at) {
  if (m.kind == MaskView::Kind::kBool) return static_cast<const uint8_t*>(m.data)[at] != 0;
  if (m.kind == MaskView::Kind::kFloat) return static_cast<const float*>(m.data)[at] != kNegInf;
  return true;
}

// Whether query row i may attend at least one key (the mask, causality and window).
bool sees_a_key(const AttentionProblem& p, int64_t b, int64_t h, int64_t i) {
  const MaskView& m = p.mask;
  const int64_t begin = p.first_key(i), end = p.key_end(i);
  if (!m.present()) return end > begin;
  for (int64_t j = begin; j < end; ++j)
    if (mask_allows(m, m.offset(b, h, i) + j * m.stride[3])) return true;
  return false;
}

// Whether some row may have no key to attend (then it outputs the mean of V or 0).
bool may_see_nothing(const AttentionProblem& p) {
  return p.mask.present() || p.shape.k_len == 0 || (p.causal && p.shape.q_len > p.shape.k_len);
}

template <typename Buffer>
void release_if_large(Buffer& buffer) {
  if (buffer.capacity() > kScratchFloatsKept) Buffer().swap(buffer);
}

}  // namespace

bool exact_row_in_double(const AttentionProblem& p, int64_t b, int64_t h, int64_t i, float* out) {
  const AttentionShape& sh = p.shape;
  const float* q = p.q_rows(b, h) + i * sh.dim;
  const float* keys = p.k_rows(b, h / sh.group());
  const float* values = p.v_rows(b, h / sh.group());
  const MaskView& m = p.mask;
  const int64_t begin = p.first_key(i), end = p.key_end(i);
  std::vector<double> scores(std::max<int64_t>(end - begin, 0), -std::numeric_limits<double>::infinity());
  double top = -std::numeric_limits<double>::infinity();
  bool any = false;
  for (int64_t j = begin; j < end; ++j) {
    const int64_t at = m.present() ? m.offset(b, h, i) + j * m.stride[3] : 0;
    if (!mask_allows(m, at)) continue;
    double s = 0.0;
    for (int64_t d = 0; d < sh.dim; ++d) s += static_cast<double>(q[d]) * keys[j * sh.dim + d];
    s *= p.scale;
    if (p.softcap > 0.0f) s = p.softcap * std::tanh(s / p.softcap);
    if (m.kind == MaskView::Kind::kFloat) s += static_cast<const float*>(m.data)[at];
    scores[j - begin] = s;
    if (s != s || (top == top && s > top)) top = s;  // a NaN score sticks, as in dense attention
    any = true;
  }
  if (!any) return false;
  std::vector<double> acc(sh.v_dim, 0.0);
  double total = 0.0;
  for (int64_t j = begin; j < end; ++j) {
    const double s = scores[j - begin];
    if (s == -std::numeric_limits<double>::infinity()) continue;  // blocked (or no weight)
    const double w = std::exp(s - top);
    total += w;
    for (int64_t c = 0; c < sh.v_dim; ++c) acc[c] += w * values[j * sh.v_dim + c];
  }
  for (int64_t c = 0; c < sh.v_dim; ++c) out[c] = static_cast<float>(acc[c] / total);
  return true;
}

bool PackedKeys::inputs_finite(const AttentionProblem& p, int64_t slice) const {
  uint8_t state = finite_state[slice].load(std::memory_order_relaxed);
  if (state == 0) {  // two threads may both check: same answer
    const AttentionShape& sh = p.shape;
    const int64_t b = slice / sh.kv_heads, kvh = slice % sh.kv_heads;
    const bool finite =
        all_finite(p.k_rows(b, kvh), sh.k_len * sh.dim) && all_finite(p.v_rows(b, kvh), sh.k_len * sh.v_dim);
    state = finite ? 1 : 2;
    finite_state[slice].store(state, std::memory_order_relaxed);
  }
  return state == 1;
}

namespace {

// Whether a key-padding mask can be folded into the packing: it drops keys and does
// nothing else (bool, or float biases of only 0 and -inf), and nothing else refers to
// keys by position (causality, the window) or rewrites scores (the softcap).
bool mask_foldable(const AttentionProblem& p) {
  return p.mask.present() && p.mask.per_key_only() && !p.causal && p.sliding_window == 0 && p.softcap == 0.0f;
}

// The keys slice (b, kvh)'s mask allows, or false when the mask cannot be folded
// there: a float bias other than 0 / -inf, or a dropped key whose value is not finite
// (dense attention's weight 0 times it is NaN, which must still reach the output).
bool allowed_keys(const AttentionProblem& p, int64_t b, int64_t kvh, std::vector<int64_t>& ids) {
  const AttentionShape& sh = p.shape;
  const MaskView& m = p.mask;
  const float* values = p.v_rows(b, kvh);
  ids.clear();
  for (int64_t j = 0; j < sh.k_len; ++j) {
    const int64_t at = m.offset(b, 0, 0) + j * m.stride[3];
    if (m.kind == MaskView::Kind::kFloat) {
      const float bias = static_cast<const float*>(m.data)[at];
      if (bias != 0.0f && bias != kNegInf) return false;
    }
    if (mask_allows(m, at))
      ids.push_back(j);
    else if (!all_finite(values + j * sh.v_dim, sh.v_dim))
      return false;
  }
  return true;
}

}  // namespace

PackedKeys pack_keys(const AttentionProblem& p, const ParallelFor& parallel) {
  const AttentionShape& sh = p.shape;
  PackedKeys packed;
  packed.first_key = sh.q_len > 0 ? p.first_key(0) / kPanelWidth * kPanelWidth : 0;
  packed.count = sh.k_len - packed.first_key;
  packed.slice_floats = padded_to_panels(packed.count) * sh.dim;
  const int64_t slices = sh.batch * sh.kv_heads;
  packed.slice_strip_floats = strip_count(sh.v_dim) * kStripWidth * packed.count;
  packed.panels.reset(new float[slices * packed.slice_floats]);
  packed.strips.reset(new float[slices * packed.slice_strip_floats]);
  const bool fold = mask_foldable(p);
  if (fold) packed.kept.assign(slices, PackedKeys::kUnfolded);
  packed.finite_state = std::make_unique<std::atomic<uint8_t>[]>(slices);
  const bool means = may_see_nothing(p);
  if (means) packed.value_means.resize(slices * sh.v_dim);
  parallel(slices, [&](int64_t slice) {
    const int64_t b = slice / sh.kv_heads, kvh = slice % sh.kv_heads;
    const float* k = p.k_rows(b, kvh) + packed.first_key * sh.dim;
    const float* v = p.v_rows(b, kvh) + packed.first_key * sh.v_dim;
    std::vector<int64_t> ids;
    const int64_t* chosen = nullptr;  // all keys
    int64_t n = packed.count;
    if (fold && allowed_keys(p, b, kvh, ids)) {
      packed.kept[slice] = n = static_cast<int64_t>(ids.size());
      chosen = ids.data();
    }
    pack_panels(k, sh.dim, sh.dim, chosen, n, packed.panels.get() + slice * packed.slice_floats);
    pack_strips(v, sh.v_dim, n, sh.v_dim, packed.strips.get() + slice * packed.slice_strip_floats, chosen);
    if (means) mean_rows(p.v_rows(b, kvh), sh.v_dim, sh.k_len, sh.v_dim, packed.value_means.data() + slice * sh.v_dim);
  });
  return packed;
}

void exact_attention_rows(const AttentionProblem& p, const PackedKeys& keys, int64_t b, int64_t h,
                          int64_t row_begin, int64_t row_end) {
  const AttentionShape& sh = p.shape;
  const int64_t slice = b * sh.kv_heads + h / sh.group();
  const float* panels = keys.keys(slice);
  const float* strips = keys.values(slice);
  const bool folded = keys.mask_folded(slice);
  const int64_t dim = sh.dim, v_dim = sh.v_dim;
  const int64_t nstrips = strip_count(v_dim), acc_ld = nstrips * kStripWidth;

  // Per-thread buffers: fresh ones on every task would cost more than small products.
  thread_local std::vector<float> scaled_q, scores, acc, row_max, row_sum, block_max, new_max, block_sum;
  scaled_q.resize(kQueryBlock * dim);
  scores.resize(kQueryBlock * kKeyBlock);
  acc.resize(kQueryBlock * acc_ld);
  row_max.resize(kQueryBlock);
  row_sum.resize(kQueryBlock);
  block_max.resize(kQueryBlock);
  new_max.resize(kQueryBlock);
  block_sum.resize(kQueryBlock);

  for (int64_t i0 = row_begin; i0 < row_end; i0 += kQueryBlock) {
    const int64_t rows = std::min(kQueryBlock, row_end - i0);
    const float* q = p.q_rows(b, h) + i0 * dim;
    // The scale goes into the queries once instead of into every score, and with it
    // log2(e): the softmax runs in base 2 (cheaper exponentials).
    const float q_scale = p.scale * kLog2e;
    for (int64_t t = 0; t < rows * dim; ++t) scaled_q[t] = q[t] * q_scale;
    std::fill(acc.begin(), acc.begin() + rows * acc_ld, 0.0f);
    std::fill(row_max.begin(), row_max.end(), kNegInf);
    std::fill(row_sum.begin(), row_sum.end(), 0.0f);

    // Under causality no row of this block sees past the last row's last key, and
    // under a sliding window none before the first row's first key (from its panel).
    // (A folded mask: only the allowed keys are packed, all visible to every row.)
    const int64_t key_end = folded ? keys.packed_keys(slice) : p.key_end(i0 + rows - 1);
    const int64_t key_begin = folded ? 0 : p.first_key(i0) / kPanelWidth * kPanelWidth;
    const int64_t last_window_start = p.first_key(i0 + rows - 1);
    const bool masked = (p.mask.present() && !folded) || p.softcap > 0.0f;

    for (int64_t kb0 = key_begin; kb0 < key_end; kb0 += kKeyBlock) {
      const int64_t nk = std::min(kKeyBlock, key_end - kb0);
      const bool causal_cut = p.causal && kb0 + nk - 1 > sh.causal_last_key(i0);
      const bool window_cut = last_window_start > kb0;
      const bool plain = !masked && !causal_cut && !window_cut;  // every score of the block counts as computed
      const float* block_keys = panels + (kb0 - keys.first_key) * dim;
      if (plain)  // the row maxima come out of the product itself
        score_panels_max(scaled_q.data(), dim, rows, block_keys, nk, dim, scores.data(), kKeyBlock, block_max.data());
      else
        score_panels(scaled_q.data(), dim, rows, block_keys, panel_count(nk), dim, scores.data(), kKeyBlock);
      for (int64_t r = 0; r < rows; ++r) {
        if (!plain) {
          float* s = scores.data() + r * kKeyBlock;
          mask_scores(p, b, h, i0 + r, kb0, nk, s);
          block_max[r] = max_of(s, nk);
        }
        // NaN if a score is NaN: it must reach the output.
        new_max[r] = block_max[r] != block_max[r] ? block_max[r] : std::max(row_max[r], block_max[r]);
      }
      exp2_shifted_rows(scores.data(), kKeyBlock, rows, nk, new_max.data(), block_sum.data());
      for (int64_t r = 0; r < rows; ++r) {
        if (new_max[r] == kNegInf) {  // nothing visible yet in this row: no weight
          std::fill_n(scores.data() + r * kKeyBlock, nk, 0.0f);
          continue;
        }
        if (row_max[r] == kNegInf) {  // the first visible block: nothing to rescale (the
          row_sum[r] = block_sum[r];    // accumulator holds zeros, or NaN that scaling keeps)
        } else {
          const float rescale = std::exp2(row_max[r] - new_max[r]);
          row_sum[r] = row_sum[r] * rescale + block_sum[r];
          if (rescale != 1.0f) scale_in_place(rescale, acc_ld, acc.data() + r * acc_ld);
        }
        row_max[r] = new_max[r];
      }
      accumulate_weighted_strips(scores.data(), kKeyBlock, rows, strips + (kb0 - keys.first_key) * kStripWidth,
                                 keys.packed_keys(slice) * kStripWidth, nstrips, nk, acc.data(), acc_ld);
    }

    float* y = p.y_rows(b, h) + i0 * v_dim;
    for (int64_t r = 0; r < rows; ++r) {
      float* out = y + r * v_dim;
      const int64_t i = i0 + r;
      if (row_sum[r] == 0.0f && may_see_nothing(p) && !sees_a_key(p, b, h, i)) {  // the contract's empty row
        if (p.zero_empty_rows)
          std::fill_n(out, v_dim, 0.0f);
        else
          std::copy_n(keys.value_mean(slice, v_dim), v_dim, out);
        continue;
      }
      if (row_sum[r] == 0.0f) {  // every visible score -inf: overflow, or NaN / inf inputs
        std::fill_n(out, v_dim, std::numeric_limits<float>::quiet_NaN());
      } else {
        const float inv = 1.0f / row_sum[r];
        for (int64_t c = 0; c < v_dim; ++c) out[c] = acc[r * acc_ld + c] * inv;
      }
    }
    // Finite inputs with a non-finite row: float32 overflowed where float64 need not.
    // (Non-finite inputs propagate as in dense attention and are left alone.) One
    // check of the block first: on the common path every row is finite.
    if (!all_finite(y, rows * v_dim))
      for (int64_t r = 0; r < rows; ++r) {
        float* out = y + r * v_dim;
        if (!all_finite(out, v_dim) && all_finite(q + r * dim, dim) && keys.inputs_finite(p, slice))
          exact_row_in_double(p, b, h, i0 + r, out);
      }
  }
  for (auto* buffer : {&scaled_q, &scores, &acc}) release_if_large(*buffer);  // the others hold 64 floats
}

void exact_attention(const AttentionProblem& p, const ParallelFor& parallel) {
  const AttentionShape& sh = p.shape;
  if (sh.q_len == 0) return;
  const PackedKeys keys = pack_keys(p, parallel);
  const int64_t blocks = (sh.q_len + kQueryBlock - 1) / kQueryBlock;
  parallel(sh.batch * sh.q_heads * blocks, [&](int64_t task) {
    const int64_t bh = task / blocks, block = task % blocks;
    const int64_t row_begin = block * kQueryBlock;
    exact_attention_rows(p, keys, bh / sh.q_heads, bh % sh.q_heads, row_begin,
                         std::min(sh.q_len, row_begin + kQueryBlock));
  });
}

}  // namespace ice
