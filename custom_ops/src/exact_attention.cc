#include "exact_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "tile_kernels.h"

namespace ice {
namespace {

constexpr int64_t kQueryBlock = 64;
constexpr int64_t kKeyBlock = 8 * kPanelWidth;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLowest = std::numeric_limits<float>::lowest();
constexpr float kHighest = std::numeric_limits<float>::max();

// Applies the mask and causality to scores s[0..nk) of query row i for keys kb0.. .
// (Scores are in base 2 here: float biases are scaled by log2(e) too.)
void mask_scores(const AttentionProblem& p, int64_t b, int64_t h, int64_t i, int64_t kb0, int64_t nk,
                 float* s) {
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
}

// Whether query row i may attend at least one key (the mask and causality only).
bool sees_a_key(const AttentionProblem& p, int64_t b, int64_t h, int64_t i) {
  const MaskView& m = p.mask;
  const int64_t end = p.causal ? std::min(p.shape.k_len, p.shape.causal_last_key(i) + 1) : p.shape.k_len;
  if (!m.present()) return end > 0;
  for (int64_t j = 0; j < end; ++j) {
    const int64_t at = m.offset(b, h, i) + j * m.stride[3];
    const bool allowed = m.kind == MaskView::Kind::kBool ? static_cast<const uint8_t*>(m.data)[at] != 0
                                                         : static_cast<const float*>(m.data)[at] != kNegInf;
    if (allowed) return true;
  }
  return false;
}

// Whether some row may have no key to attend (then it outputs the mean of V).
bool may_see_nothing(const AttentionProblem& p) {
  return p.mask.present() || p.shape.k_len == 0 || (p.causal && p.shape.q_len > p.shape.k_len);
}

}  // namespace

PackedKeys pack_keys(const AttentionProblem& p, const ParallelFor& parallel) {
  const AttentionShape& sh = p.shape;
  PackedKeys packed;
  packed.slice_floats = padded_to_panels(sh.k_len) * sh.dim;
  const int64_t slices = sh.batch * sh.kv_heads;
  packed.slice_strip_floats = strip_count(sh.v_dim) * kStripWidth * sh.k_len;
  packed.panels.resize(slices * packed.slice_floats);
  packed.strips.resize(slices * packed.slice_strip_floats);
  const bool means = may_see_nothing(p);
  if (means) packed.value_means.resize(slices * sh.v_dim);
  parallel(slices, [&](int64_t slice) {
    const int64_t b = slice / sh.kv_heads, kvh = slice % sh.kv_heads;
    pack_panels(p.k_rows(b, kvh), sh.dim, sh.dim, nullptr, sh.k_len,
                packed.panels.data() + slice * packed.slice_floats);
    pack_strips(p.v_rows(b, kvh), sh.v_dim, sh.k_len, sh.v_dim, packed.strips.data() + slice * packed.slice_strip_floats);
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

    // Under causality no row of this block sees past the last row's last key.
    int64_t key_end = sh.k_len;
    if (p.causal) key_end = std::clamp<int64_t>(sh.causal_last_key(i0 + rows - 1) + 1, 0, sh.k_len);
    const bool masked = p.mask.present();

    for (int64_t kb0 = 0; kb0 < key_end; kb0 += kKeyBlock) {
      const int64_t nk = std::min(kKeyBlock, key_end - kb0);
      const bool causal_cut = p.causal && kb0 + nk - 1 > sh.causal_last_key(i0);
      const bool plain = !masked && !causal_cut;  // every score of the block counts as computed
      if (plain)  // the row maxima come out of the product itself
        score_panels_max(scaled_q.data(), dim, rows, panels + kb0 * dim, nk, dim, scores.data(), kKeyBlock,
                         block_max.data());
      else
        score_panels(scaled_q.data(), dim, rows, panels + kb0 * dim, panel_count(nk), dim, scores.data(), kKeyBlock);
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
        const float rescale = std::exp2(row_max[r] - new_max[r]);  // 0 on the first visible block
        row_sum[r] = row_sum[r] * rescale + block_sum[r];
        if (rescale != 1.0f) scale_in_place(rescale, acc_ld, acc.data() + r * acc_ld);
        row_max[r] = new_max[r];
      }
      accumulate_weighted_strips(scores.data(), kKeyBlock, rows, strips + kb0 * kStripWidth, sh.k_len * kStripWidth,
                                 nstrips, nk, acc.data(), acc_ld);
    }

    float* y = p.y_rows(b, h) + i0 * v_dim;
    for (int64_t r = 0; r < rows; ++r) {
      float* out = y + r * v_dim;
      if (row_sum[r] == 0.0f) {
        if (may_see_nothing(p) && !sees_a_key(p, b, h, i0 + r))  // the contract's mean of V
          std::copy_n(keys.value_mean(slice, v_dim), v_dim, out);
        else  // every score -inf (overflow): 0/0, as in dense attention
          std::fill_n(out, v_dim, std::numeric_limits<float>::quiet_NaN());
        continue;
      }
      const float inv = 1.0f / row_sum[r];
      for (int64_t c = 0; c < v_dim; ++c) out[c] = acc[r * acc_ld + c] * inv;
    }
  }
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
