#include "exact_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "tile_kernels.h"

namespace ice {
namespace {

constexpr int64_t kQueryBlock = 64;
// Query blocks that walk the keys together (see attend_runs).
constexpr int64_t kBlocksPerPass = 4;
// Scattered single rows (the kNN guard's probes) share a pass more widely: each is
// one matrix-vector product per key block, so the key block's load dominates.
constexpr int64_t kSingleRowsPerPass = 16;
// Tasks a call is cut into at least, when it has that many query blocks: enough for
// the pool's threads to even out.
constexpr int64_t kMinTasks = 16;
// Floats a packing task copies at least, when the call has that many (measured at 2
// threads, S 128, D 32, 192 slices: a task per slice 0.6x MultiHeadAttention's CPU
// time, 8 slices per task 1.04x).
constexpr int64_t kPackFloatsPerTask = int64_t{1} << 16;
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
  auto pack_slice = [&](int64_t slice) {
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
  };
  // Whole slices per task, enough of them that a task outweighs handing it to a thread
  // (a task per slice of a short sequence costs more in the pool than the copy).
  const int64_t slice_total = std::max<int64_t>(1, packed.slice_floats + packed.slice_strip_floats);
  const int64_t per_task = std::max<int64_t>(1, kPackFloatsPerTask / slice_total);
  parallel((slices + per_task - 1) / per_task, [&](int64_t task) {
    for (int64_t slice = task * per_task; slice < std::min(slices, (task + 1) * per_task); ++slice) pack_slice(slice);
  });
  return packed;
}

namespace {

// Per-thread scratch: fresh buffers on every task would cost more than small products.
struct Scratch {
  // Per block of the pass: scaled queries, accumulators, running maxima and sums.
  std::vector<float> scaled_q, acc, row_max, row_sum;
  // Shared by the blocks, one key block at a time.
  std::vector<float> scores, block_max, new_max, block_sum;

  void reserve(int64_t blocks, int64_t dim, int64_t acc_ld) {
    scaled_q.resize(blocks * kQueryBlock * dim);
    acc.resize(blocks * kQueryBlock * acc_ld);
    row_max.resize(blocks * kQueryBlock);
    row_sum.resize(blocks * kQueryBlock);
    scores.resize(kQueryBlock * kKeyBlock);
    block_max.resize(kQueryBlock);
    new_max.resize(kQueryBlock);
    block_sum.resize(kQueryBlock);
  }
  void release_large() {
    for (auto* buffer : {&scaled_q, &acc, &scores}) release_if_large(*buffer);  // the others are small
  }
};

// One block of up to kQueryBlock query rows of head h in batch b, attending the keys
// of its slice one key block at a time with an online softmax.
class QueryBlock {
 public:
  QueryBlock(const AttentionProblem& p, const PackedKeys& keys, int64_t b, int64_t h, int64_t i0, int64_t rows,
             Scratch& scratch, int64_t index)
      : p_(p), keys_(keys), b_(b), h_(h), i0_(i0), rows_(rows), scratch_(scratch),
        slice_(b * p.shape.kv_heads + h / p.shape.group()), folded_(keys.mask_folded(slice_)),
        acc_ld_(strip_count(p.shape.v_dim) * kStripWidth),
        scaled_q_(scratch.scaled_q.data() + index * kQueryBlock * p.shape.dim),
        acc_(scratch.acc.data() + index * kQueryBlock * acc_ld_),
        row_max_(scratch.row_max.data() + index * kQueryBlock),
        row_sum_(scratch.row_sum.data() + index * kQueryBlock) {
    const int64_t dim = p.shape.dim;
    const float* q = p.q_rows(b, h) + i0 * dim;
    // The scale goes into the queries once instead of into every score, and with it
    // log2(e): the softmax runs in base 2 (cheaper exponentials).
    const float q_scale = p.scale * kLog2e;
    for (int64_t t = 0; t < rows * dim; ++t) scaled_q_[t] = q[t] * q_scale;
    std::fill_n(acc_, rows * acc_ld_, 0.0f);
    std::fill_n(row_max_, rows, kNegInf);
    std::fill_n(row_sum_, rows, 0.0f);
  }

  // Under causality no row of this block sees past the last row's last key, and
  // under a sliding window none before the first row's first key (from its panel).
  // (A folded mask: only the allowed keys are packed, all visible to every row.)
  int64_t key_begin() const { return folded_ ? 0 : p_.first_key(i0_) / kPanelWidth * kPanelWidth; }
  int64_t key_end() const { return folded_ ? keys_.packed_keys(slice_) : p_.key_end(i0_ + rows_ - 1); }

  // Folds keys [kb0, kb0 + kKeyBlock) (up to key_end()) into the rows' softmax.
  void attend(int64_t kb0);
  // Writes the block's rows of Y.
  void finish() const;

 private:
  const AttentionProblem& p_;
  const PackedKeys& keys_;
  const int64_t b_, h_, i0_, rows_;
  Scratch& scratch_;
  const int64_t slice_;
  const bool folded_;
  const int64_t acc_ld_;
  float* const scaled_q_;
  float* const acc_;
  float* const row_max_;
  float* const row_sum_;
};

void QueryBlock::attend(int64_t kb0) {
  const AttentionShape& sh = p_.shape;
  const int64_t dim = sh.dim, rows = rows_, nk = std::min(kKeyBlock, key_end() - kb0);
  float* scores = scratch_.scores.data();
  float* block_max = scratch_.block_max.data();
  float* new_max = scratch_.new_max.data();
  float* block_sum = scratch_.block_sum.data();
  const bool masked = (p_.mask.present() && !folded_) || p_.softcap > 0.0f;
  const bool causal_cut = p_.causal && kb0 + nk - 1 > sh.causal_last_key(i0_);
  const bool window_cut = p_.first_key(i0_ + rows - 1) > kb0;
  const bool plain = !masked && !causal_cut && !window_cut;  // every score of the block counts as computed
  const float* block_keys = keys_.keys(slice_) + (kb0 - keys_.first_key) * dim;
  if (plain)  // the row maxima come out of the product itself
    score_panels_max(scaled_q_, dim, rows, block_keys, nk, dim, scores, kKeyBlock, block_max);
  else
    score_panels(scaled_q_, dim, rows, block_keys, panel_count(nk), dim, scores, kKeyBlock);
  for (int64_t r = 0; r < rows; ++r) {
    if (!plain) {
      float* s = scores + r * kKeyBlock;
      mask_scores(p_, b_, h_, i0_ + r, kb0, nk, s);
      block_max[r] = max_of(s, nk);
    }
    // NaN if a score is NaN: it must reach the output.
    new_max[r] = block_max[r] != block_max[r] ? block_max[r] : std::max(row_max_[r], block_max[r]);
  }
  exp2_shifted_rows(scores, kKeyBlock, rows, nk, new_max, block_sum);
  for (int64_t r = 0; r < rows; ++r) {
    if (new_max[r] == kNegInf) {  // nothing visible yet in this row: no weight
      std::fill_n(scores + r * kKeyBlock, nk, 0.0f);
      continue;
    }
    if (row_max_[r] == kNegInf) {  // the first visible block: nothing to rescale (the
      row_sum_[r] = block_sum[r];  // accumulator holds zeros, or NaN that scaling keeps)
    } else {
      const float rescale = std::exp2(row_max_[r] - new_max[r]);
      row_sum_[r] = row_sum_[r] * rescale + block_sum[r];
      if (rescale != 1.0f) scale_in_place(rescale, acc_ld_, acc_ + r * acc_ld_);
    }
    row_max_[r] = new_max[r];
  }
  const int64_t strip_keys = keys_.packed_keys(slice_);
  accumulate_weighted_strips(scores, kKeyBlock, rows, keys_.values(slice_) + (kb0 - keys_.first_key) * kStripWidth,
                             strip_keys * kStripWidth, strip_count(sh.v_dim), nk, acc_, acc_ld_);
}

void QueryBlock::finish() const {
  const AttentionShape& sh = p_.shape;
  const int64_t v_dim = sh.v_dim;
  float* y = p_.y_rows(b_, h_) + i0_ * v_dim;
  for (int64_t r = 0; r < rows_; ++r) {
    float* out = y + r * v_dim;
    if (row_sum_[r] == 0.0f && may_see_nothing(p_) && !sees_a_key(p_, b_, h_, i0_ + r)) {  // the contract's empty row
      if (p_.zero_empty_rows)
        std::fill_n(out, v_dim, 0.0f);
      else
        std::copy_n(keys_.value_mean(slice_, v_dim), v_dim, out);
      continue;
    }
    if (row_sum_[r] == 0.0f) {  // every visible score -inf: overflow, or NaN / inf inputs
      std::fill_n(out, v_dim, std::numeric_limits<float>::quiet_NaN());
    } else {
      const float inv = 1.0f / row_sum_[r];
      for (int64_t c = 0; c < v_dim; ++c) out[c] = acc_[r * acc_ld_ + c] * inv;
    }
  }
  // Finite inputs with a non-finite row: float32 overflowed where float64 need not.
  // (Non-finite inputs propagate as in dense attention and are left alone.) One
  // check of the block first: on the common path every row is finite.
  if (all_finite(y, rows_ * v_dim)) return;
  const float* q = p_.q_rows(b_, h_) + i0_ * sh.dim;
  for (int64_t r = 0; r < rows_; ++r) {
    float* out = y + r * v_dim;
    if (!all_finite(out, v_dim) && all_finite(q + r * sh.dim, sh.dim) && keys_.inputs_finite(p_, slice_))
      exact_row_in_double(p_, b_, h_, i0_ + r, out);
  }
}

// Runs of query rows [first, first + rows), each a QueryBlock, attended in passes of
// up to `per_pass` blocks walking the keys together, each key block folded into every
// one of them in turn: the keys and values of a step are loaded from memory once per
// pass, not once per block (long rows outgrow the caches). With a sliding window the
// blocks' key ranges differ: one block per pass, so that every row's key blocks (and
// with them its rounding) stay those of its own block.
struct RowRun {
  int64_t first, rows;
};

void attend_runs(const AttentionProblem& p, const PackedKeys& keys, int64_t b, int64_t h, const RowRun* runs,
                 int64_t count, int64_t per_pass) {
  per_pass = std::min(count, p.sliding_window > 0 ? int64_t{1} : per_pass);
  if (per_pass <= 0) return;
  const int64_t acc_ld = strip_count(p.shape.v_dim) * kStripWidth;
  thread_local Scratch scratch;
  scratch.reserve(per_pass, p.shape.dim, acc_ld);
  std::vector<QueryBlock> pass;
  pass.reserve(per_pass);
  for (int64_t r0 = 0; r0 < count; r0 += per_pass) {
    pass.clear();
    int64_t key_begin = std::numeric_limits<int64_t>::max(), key_end = 0;
    for (int64_t t = 0; t < per_pass && r0 + t < count; ++t) {
      pass.emplace_back(p, keys, b, h, runs[r0 + t].first, runs[r0 + t].rows, scratch, t);
      key_begin = std::min(key_begin, pass.back().key_begin());
      key_end = std::max(key_end, pass.back().key_end());
    }
    for (int64_t kb0 = key_begin; kb0 < key_end; kb0 += kKeyBlock)
      for (QueryBlock& block : pass)
        if (kb0 < block.key_end()) block.attend(kb0);
    for (const QueryBlock& block : pass) block.finish();
  }
  scratch.release_large();
}

}  // namespace

void exact_attention_rows(const AttentionProblem& p, const PackedKeys& keys, int64_t b, int64_t h,
                          int64_t row_begin, int64_t row_end) {
  std::vector<RowRun> runs;
  for (int64_t i0 = row_begin; i0 < row_end; i0 += kQueryBlock)
    runs.push_back({i0, std::min(kQueryBlock, row_end - i0)});
  attend_runs(p, keys, b, h, runs.data(), static_cast<int64_t>(runs.size()), kBlocksPerPass);
}

void exact_attention_at_rows(const AttentionProblem& p, const PackedKeys& keys, int64_t b, int64_t h,
                             const int64_t* rows, int64_t count) {
  std::vector<RowRun> runs(count);
  for (int64_t t = 0; t < count; ++t) runs[t] = {rows[t], 1};
  attend_runs(p, keys, b, h, runs.data(), count, kSingleRowsPerPass);
}

void exact_attention(const AttentionProblem& p, const ParallelFor& parallel) {
  const AttentionShape& sh = p.shape;
  if (sh.q_len == 0) return;
  const PackedKeys keys = pack_keys(p, parallel);
  // Tasks of up to one pass of query blocks each; smaller ones when that would leave
  // too few to spread over the pool's threads. (A row's result does not depend on
  // its task.)
  const int64_t heads = sh.batch * sh.q_heads, blocks = (sh.q_len + kQueryBlock - 1) / kQueryBlock;
  const int64_t task_rows = kQueryBlock * std::clamp<int64_t>(heads * blocks / kMinTasks, 1, kBlocksPerPass);
  const int64_t tasks_per_head = (sh.q_len + task_rows - 1) / task_rows;
  parallel(heads * tasks_per_head, [&](int64_t task) {
    const int64_t bh = task / tasks_per_head, row_begin = task % tasks_per_head * task_rows;
    exact_attention_rows(p, keys, bh / sh.q_heads, bh % sh.q_heads, row_begin, std::min(sh.q_len, row_begin + task_rows));
  });
}

}  // namespace ice
