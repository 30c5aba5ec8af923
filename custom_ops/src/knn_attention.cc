#include "knn_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "index_factory.h"
#include "kmeans.h"
#include "tail_estimate.h"
#include "tile_kernels.h"

namespace ice {
namespace {

constexpr int64_t kQueryBlock = 512;   // queries searched together (many per cluster: bigger products)
// Consecutive queries sharing one tail summary (tail_estimate.h): rows of its
// matrix products; a causal query counts fewer than this many recent keys exactly.
constexpr int64_t kTailTile = 16;
constexpr float kBlockingBias = -1e30f;  // a float mask value at or below it removes the key
constexpr int64_t kSlicesBuiltSideBySide = 4;  // fewer slices: each build uses the whole pool
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// The mask as "allowed" flags per batch element and key, or why it cannot be one.
bool key_padding_flags(const MaskView& m, const AttentionShape& sh, std::vector<uint8_t>* allowed) {
  if (!m.present()) return true;
  if (!m.per_key_only()) return false;
  if (allowed) allowed->assign(sh.batch * sh.k_len, 1);
  for (int64_t b = 0; b < sh.batch; ++b)
    for (int64_t j = 0; j < sh.k_len; ++j) {
      const int64_t at = b * m.stride[0] + j * m.stride[3];
      bool keep;
      if (m.kind == MaskView::Kind::kBool) {
        keep = static_cast<const uint8_t*>(m.data)[at] != 0;
      } else {
        const float bias = static_cast<const float*>(m.data)[at];
        if (bias != 0.0f && !(bias <= kBlockingBias)) return false;  // a real bias (or NaN)
        keep = bias == 0.0f;
      }
      if (allowed) (*allowed)[b * sh.k_len + j] = keep;
    }
  return true;
}

// What one (batch, kv-head) needs: its index, its tail summary, its mean of V.
struct SliceState {
  std::unique_ptr<KeyIndex> index;
  std::unique_ptr<TailModel> tail;
  std::vector<float> value_mean;
};

uint64_t slice_seed(int64_t seed, int64_t slice, uint64_t purpose) {
  SplitMix64 mix(static_cast<uint64_t>(seed) * 0x2545F4914F6CDD1Dull + static_cast<uint64_t>(slice) + (purpose << 56));
  return mix.next();
}

// Exact attention for one row (the rare rows the index returned nothing for, such
// as NaN queries). False if the row sees no key.
bool exact_row(const AttentionProblem& p, int64_t b, int64_t h, int64_t i, const uint8_t* allowed, float* y) {
  const AttentionShape& sh = p.shape;
  const float* q = p.q_rows(b, h) + i * sh.dim;
  const float* keys = p.k_rows(b, h / sh.group());
  const float* values = p.v_rows(b, h / sh.group());
  const int64_t end = p.causal ? std::min(sh.k_len, sh.causal_last_key(i) + 1) : sh.k_len;
  float top = kNegInf;
  bool any = false;
  for (int64_t j = 0; j < end; ++j)
    if (!allowed || allowed[j]) {
      const float s = p.scale * dot(q, keys + j * sh.dim, sh.dim);
      any = true;
      top = (s > top || s != s) ? s : top;
    }
  if (!any) return false;
  std::fill(y, y + sh.v_dim, 0.0f);
  double total = 0.0;
  for (int64_t j = 0; j < end; ++j)
    if (!allowed || allowed[j]) {
      const float w = std::exp(p.scale * dot(q, keys + j * sh.dim, sh.dim) - top);
      total += w;
      axpy(w, values + j * sh.v_dim, sh.v_dim, y);
    }
  scale_in_place(static_cast<float>(1.0 / total), sh.v_dim, y);
  return true;
}

// Plain softmax average over the retrieved keys.
void attend_retrieved(const float* scores, const int64_t* ids, int64_t found, const float* values, int64_t v_dim,
                      float* weights, float* y) {
  std::copy_n(scores, found, weights);
  const float total = exp_shifted(weights, found, max_of(scores, found));
  std::fill(y, y + v_dim, 0.0f);
  gather_accumulate(weights, values, ids, found, v_dim, y);
  scale_in_place(1.0f / total, v_dim, y);
}

}  // namespace

bool use_knn(const AttentionProblem& p, const AttentionParams& params) {
  const AttentionShape& sh = p.shape;
  if (sh.k_len < params.exact_below || params.top_k >= sh.k_len || sh.q_len == 0) return false;
  const double queries_per_index = static_cast<double>(sh.q_len) * sh.group();
  if (queries_per_index < 4.0 * std::sqrt(static_cast<double>(sh.k_len))) return false;
  if (!key_padding_flags(p.mask, sh, nullptr)) return false;
  // A NaN or infinite key or value reaches every output that may see it in dense
  // attention; an index would drop it silently.
  return all_finite(p.k, sh.batch * sh.kv_heads * sh.k_len * sh.dim) &&
         all_finite(p.v, sh.batch * sh.kv_heads * sh.k_len * sh.v_dim);
}

void knn_attention(const AttentionProblem& p, const AttentionParams& params, const ParallelFor& parallel) {
  const AttentionShape& sh = p.shape;
  std::vector<uint8_t> allowed;
  key_padding_flags(p.mask, sh, &allowed);
  auto allowed_keys = [&](int64_t b) { return allowed.empty() ? nullptr : allowed.data() + b * sh.k_len; };
  const bool compensate = params.compensate != 0;

  // 1. One index (and tail summary) per (batch, kv-head). With few slices (one kv
  //    head, batch 1: MQA, GQA) the slices are built one after another, each spread
  //    over the pool; the result is the same either way (see kmeans).
  const int64_t slices = sh.batch * sh.kv_heads;
  std::vector<SliceState> state(slices);
  for (SliceState& s : state) s.index = make_key_index(params.index, params);
  auto build = [&](int64_t slice, const ParallelFor* inner) {
    const int64_t b = slice / sh.kv_heads, kvh = slice % sh.kv_heads;
    SliceState& s = state[slice];
    s.index->build(KeySet{p.k_rows(b, kvh), sh.k_len, sh.dim, allowed_keys(b), inner},
                   slice_seed(params.seed, slice, 1));
    if (compensate) {
      s.tail = std::make_unique<TailModel>();
      const uint8_t* allowed_here = allowed_keys(b);
      const int64_t keys = allowed_here ? std::count(allowed_here, allowed_here + sh.k_len, 1) : sh.k_len;
      s.tail->build(p.k_rows(b, kvh), p.v_rows(b, kvh), sh.k_len, sh.dim, sh.v_dim, allowed_here,
                    params.effective_tail_clusters(keys), params.kmeans_iters, slice_seed(params.seed, slice, 2),
                    p.causal, inner, s.index->partition());
    }
    s.value_mean.resize(sh.v_dim);
    mean_rows(p.v_rows(b, kvh), sh.v_dim, sh.k_len, sh.v_dim, s.value_mean.data());
  };
  if (slices < kSlicesBuiltSideBySide)
    for (int64_t slice = 0; slice < slices; ++slice) build(slice, &parallel);
  else
    parallel(slices, [&](int64_t slice) { build(slice, nullptr); });

  // 2. Blocks of queries: search, then attend over what was found.
  const int64_t blocks = (sh.q_len + kQueryBlock - 1) / kQueryBlock;
  const int64_t k = params.top_k;
  parallel(sh.batch * sh.q_heads * blocks, [&](int64_t task) {
    const int64_t bh = task / blocks, b = bh / sh.q_heads, h = bh % sh.q_heads;
    const int64_t kvh = h / sh.group(), slice = b * sh.kv_heads + kvh;
    const int64_t i0 = (task % blocks) * kQueryBlock, count = std::min(kQueryBlock, sh.q_len - i0);
    const SliceState& s = state[slice];
    const float* keys = p.k_rows(b, kvh);
    const float* values = p.v_rows(b, kvh);

    std::vector<int64_t> last_key(count), ids(count * k);
    std::vector<int32_t> found(count);
    const bool index_scores = s.index->reports_scores();
    std::vector<float> all_scores(index_scores ? count * k : 0);
    for (int64_t r = 0; r < count; ++r) last_key[r] = p.causal ? sh.causal_last_key(i0 + r) : sh.k_len - 1;
    const float* queries = p.q_rows(b, h) + i0 * sh.dim;
    s.index->search(QueryBlock{queries, count, k, p.causal ? last_key.data() : nullptr},
                    Neighbours{ids.data(), found.data(), index_scores ? all_scores.data() : nullptr});

    std::vector<float> scores(k), weights(k);
    TailModel::Scratch scratch;
    for (int64_t t0 = 0; t0 < count; t0 += kTailTile) {
      const int64_t tile = std::min(kTailTile, count - t0);
      if (s.tail) s.tail->begin_tile(queries + t0 * sh.dim, tile, last_key[t0] + 1, p.scale, scratch);
      for (int64_t r = t0; r < t0 + tile; ++r) {
        const float* q = queries + r * sh.dim;
        const int64_t* row_ids = ids.data() + r * k;
        float* y = p.y_rows(b, h) + (i0 + r) * sh.v_dim;
        const int64_t n = found[r];
        bool done;
        if (n == 0 || !all_finite(q, sh.dim)) {  // nothing found, or a query only dense math can honour
          done = exact_row(p, b, h, i0 + r, allowed_keys(b), y);
        } else {
          if (index_scores)
            std::copy_n(all_scores.data() + r * k, n, scores.data());
          else
            gather_dots(q, keys, row_ids, n, sh.dim, scores.data());
          scale_in_place(p.scale, n, scores.data());
          if (s.tail) {
            done = s.tail->attend(r - t0, q, p.scale, last_key[r], row_ids, scores.data(), n, keys, values, y,
                                  scratch);
          } else {
            attend_retrieved(scores.data(), row_ids, n, values, sh.v_dim, weights.data(), y);
            done = true;
          }
        }
        if (!done) std::copy(s.value_mean.begin(), s.value_mean.end(), y);  // no allowed key
      }
      if (s.tail) s.tail->finish_tile(p.y_rows(b, h) + (i0 + t0) * sh.v_dim, sh.v_dim, scratch);
    }
  });
}

}  // namespace ice
