#include "knn_attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "exact_attention.h"
#include "index_factory.h"
#include "kmeans.h"
#include "run_stats.h"
#include "tail_estimate.h"
#include "tile_kernels.h"

namespace ice {
namespace {

constexpr int64_t kQueryBlock = 512;   // queries searched together (many per cluster: bigger products)
// Consecutive queries sharing one tail summary (tail_estimate.h): rows of its
// matrix products; a causal query counts fewer than this many recent keys exactly.
constexpr int64_t kTailTile = 16;
constexpr float kBlockingBias = -1e30f;  // a float mask value at or below it removes the key
// From this many slices on they are built side by side; a single one spreads its
// k-means assignment over the pool instead. Only that step splits, so side by side
// wins as soon as there are two (SmolLM2's 3 slices at 8K, 2 threads: 35-42 -> 18-26 ms).
constexpr int64_t kSlicesBuiltSideBySide = 2;
// The guard doubles a failing head's budget while it stays within this share of the
// keys (beyond, a scan costs about what exact attention does).
constexpr int64_t kMinKeysPerEscalatedScan = 4;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
// A kNN row costs its scan plus about this many keys' worth of planning and tail
// (SmolLM2 at 8K and 32K, 1 thread): a causal row that sees at most its scan plus
// that many keys (or twice a smaller scan) runs exactly, for less.
constexpr int64_t kKnnRowOverheadKeys = 1024;

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

uint64_t slice_seed(int64_t seed, int64_t slice, uint64_t purpose) {
  SplitMix64 mix(static_cast<uint64_t>(seed) * 0x2545F4914F6CDD1Dull + static_cast<uint64_t>(slice) + (purpose << 56));
  return mix.next();
}

// One kNN call: per (batch, kv-head) an index over the keys between the sinks and
// the window, and a TailModel that adds the keys every query counts exactly (sinks,
// window) and, with compensation, the estimate of the rest.
class KnnRun {
 public:
  KnnRun(const AttentionProblem& p, const AttentionParams& params) : p_(p), params_(params) {
    key_padding_flags(p.mask, p.shape, &padding_);
    const AttentionShape& sh = p.shape;
    sinks_ = std::min(params.sinks, sh.k_len);
    if (sinks_ > 0 || !padding_.empty()) {  // the index sees neither removed keys nor sinks
      indexed_.assign(sh.batch * sh.k_len, 1);
      for (int64_t b = 0; b < sh.batch; ++b)
        for (int64_t j = 0; j < sh.k_len; ++j)
          indexed_[b * sh.k_len + j] = j >= sinks_ && (padding_.empty() || padding_[b * sh.k_len + j]);
    }
    slices_.resize(sh.batch * sh.kv_heads);
  }

  // The index and summary of one (batch, kv-head); `inner` (or nullptr) may spread it.
  void build(int64_t slice, const ParallelFor* inner) {
    const AttentionShape& sh = p_.shape;
    const int64_t b = slice / sh.kv_heads, kvh = slice % sh.kv_heads;
    Slice& s = slices_[slice];
    const uint8_t* indexed = indexed_.empty() ? nullptr : indexed_.data() + b * sh.k_len;
    s.index = make_key_index(params_.index, params_);
    s.index->build(KeySet{p_.k_rows(b, kvh), sh.k_len, sh.dim, indexed, inner, p_.v_rows(b, kvh), sh.v_dim},
                   slice_seed(params_.seed, slice, 1));
    const int64_t keys = indexed ? std::count(indexed, indexed + sh.k_len, 1) : sh.k_len;
    const KeyPartition* partition = s.index->partition();
    const int64_t tail_clusters =
        !params_.compensate ? 0 : params_.effective_tail_clusters(keys, partition ? partition->k : 0);
    s.tail.build(p_.k_rows(b, kvh), p_.v_rows(b, kvh), sh.k_len, sh.dim, sh.v_dim, padding(b), sinks_, tail_clusters,
                 params_.kmeans_iters, slice_seed(params_.seed, slice, 2), p_.causal, inner, partition);
    s.value_mean.resize(sh.v_dim);
    mean_rows(p_.v_rows(b, kvh), sh.v_dim, sh.k_len, sh.v_dim, s.value_mean.data());
  }

  // Rows [i0, i0 + count) of query head h in batch b, written to y (row stride Dv),
  // each query retrieving at least `budget` keys. i0 must be a multiple of kTailTile:
  // a row's result depends only on its tile.
  void attend_rows(int64_t b, int64_t h, int64_t i0, int64_t count, int64_t budget, float* y) const;

  // Leading rows that run exactly with this budget: the whole query blocks of a
  // causal call whose every row sees at most budget + min(budget, kKnnRowOverheadKeys)
  // keys, where scanning costs more than attending them all.
  int64_t exact_prefix(int64_t budget) const {
    const AttentionShape& sh = p_.shape;
    if (!p_.causal) return 0;
    // Rows [0, rows) see at most that many keys.
    const int64_t rows = budget + std::min(budget, kKnnRowOverheadKeys) - (sh.k_len - sh.q_len);
    return rows >= sh.q_len ? sh.q_len : std::max<int64_t>(0, rows / kQueryBlock * kQueryBlock);
  }

  // The guard for query head h of batch b: the least budget (the default, doubled
  // while within a quarter of the keys) whose probed rows are within max_error of
  // exact attention over `packed`, or 0: the head runs exactly.
  int64_t guarded_budget(int64_t b, int64_t h, const PackedKeys& packed) const;

 private:
  struct Slice {
    std::unique_ptr<KeyIndex> index;
    TailModel tail;
    std::vector<float> value_mean;
  };

  // The rows `row_of[0 .. count)` of query head h (their queries gathered in
  // `queries`), in tiles of `tile_rows` consecutive entries, each tile's first row a
  // tile start: the path attend_rows takes, and the guard's batch of probe rows.
  void attend(int64_t b, int64_t h, const float* queries, const int64_t* row_of, int64_t count, int64_t tile_rows,
              int64_t budget, float* y) const;

  const uint8_t* padding(int64_t b) const { return padding_.empty() ? nullptr : padding_.data() + b * p_.shape.k_len; }
  // Keys [0, boundary) are left to the index and the summary for the tile starting at row t0.
  int64_t tile_boundary(int64_t t0) const {
    if (!p_.causal) return p_.shape.k_len;
    return std::clamp<int64_t>(p_.shape.causal_last_key(t0) + 1 - params_.window, 0, p_.shape.k_len);
  }

  const AttentionProblem& p_;
  const AttentionParams& params_;
  std::vector<uint8_t> padding_;  // [B][Sk] or empty: key padding
  std::vector<uint8_t> indexed_;  // [B][Sk] or empty: keys the index holds
  int64_t sinks_ = 0;
  std::vector<Slice> slices_;
};

void KnnRun::attend_rows(int64_t b, int64_t h, int64_t i0, int64_t count, int64_t budget, float* y_rows) const {
  std::vector<int64_t> rows(count);
  for (int64_t r = 0; r < count; ++r) rows[r] = i0 + r;
  attend(b, h, p_.q_rows(b, h) + i0 * p_.shape.dim, rows.data(), count, kTailTile, budget, y_rows);
}

void KnnRun::attend(int64_t b, int64_t h, const float* queries, const int64_t* row_of, int64_t count, int64_t tile_rows,
                    int64_t budget, float* y_rows) const {
  const AttentionShape& sh = p_.shape;
  const int64_t kvh = h / sh.group();
  const Slice& s = slices_[b * sh.kv_heads + kvh];
  // The index covers the keys before each row's tile boundary (the rest count exactly).
  std::vector<int64_t> index_last(count), last_key(count);
  for (int64_t r = 0; r < count; ++r) {
    last_key[r] = p_.causal ? sh.causal_last_key(row_of[r]) : sh.k_len - 1;
    index_last[r] = tile_boundary(row_of[r - r % tile_rows]) - 1;
  }
  const QueryBlock block{queries, count, s.index->result_slots(budget), p_.causal ? index_last.data() : nullptr,
                         budget};

  // An index that attends as it scans hands over softmax partial sums; otherwise
  // neighbours, attended here.
  ScannedAttention scanned;
  const bool by_scan = s.tail.summarises_by_partition() && s.index->attend(block, p_.scale, scanned);
  const int64_t k = by_scan ? 0 : block.k;
  std::vector<int64_t> ids(count * k);
  std::vector<int32_t> found(count);
  std::vector<float> scores(count * k);
  if (!by_scan) s.index->search(block, Neighbours{ids.data(), found.data(), scores.data()});

  TailModel::Scratch scratch;
  for (int64_t t0 = 0; t0 < count; t0 += tile_rows) {
    const int64_t tile = std::min(tile_rows, count - t0);
    s.tail.begin_tile(queries + t0 * sh.dim, tile, tile_boundary(row_of[t0]), last_key[t0 + tile - 1], p_.scale,
                      scratch);
    for (int64_t r = t0; r < t0 + tile; ++r) {
      const float* q = queries + r * sh.dim;
      const int64_t* row_ids = ids.data() + r * k;
      float* y = y_rows + r * sh.v_dim;
      const int64_t n = by_scan ? scanned.probe_begin[r + 1] - scanned.probe_begin[r] : found[r];
      run_stats::note_knn_row(by_scan ? scanned.keys[r] : n, std::clamp<int64_t>(last_key[r] + 1, 0, sh.k_len));
      bool done;
      // A query only dense math can honour, or one the index found nothing for
      // though it had keys to search (NaN scores): exactly.
      if (!all_finite(q, sh.dim) || (n == 0 && index_last[r] >= sinks_)) {
        done = exact_row_in_double(p_, b, h, row_of[r], y);
      } else if (by_scan) {
        done = s.tail.attend_scanned(r - t0, last_key[r], scanned.probes.data() + scanned.probe_begin[r], n,
                                     scanned.max[r], scanned.sum[r], scanned.acc.data() + r * sh.v_dim, y, scratch);
      } else {
        float* row_scores = scores.data() + r * k;
        scale_in_place(p_.scale, n, row_scores);
        done = s.tail.attend(r - t0, last_key[r], row_ids, row_scores, n, y, scratch);
      }
      if (!done) std::copy(s.value_mean.begin(), s.value_mean.end(), y);  // no allowed key
    }
    s.tail.finish_tile(y_rows + t0 * sh.v_dim, sh.v_dim, scratch);
  }
}

int64_t KnnRun::guarded_budget(int64_t b, int64_t h, const PackedKeys& packed) const {
  const AttentionShape& sh = p_.shape;
  // Rows that see fewer keys than the scan budget scan them all: probe among the
  // others, evenly spread, at tile starts (a row's result depends only on its tile).
  // Those in the exact prefix are probed through the index all the same: the head's
  // error then counts them at what kNN would give them, an upper bound.
  int64_t first = 0;
  if (p_.causal) first = std::clamp<int64_t>(params_.retrieval_floor(sh.k_len) + sh.q_len - sh.k_len, 0, sh.q_len);
  const int64_t span = sh.q_len - first;
  if (span <= 0) return params_.retrieval_floor(sh.k_len);
  std::vector<int64_t> rows;
  for (int64_t j = 0; j < params_.probe_rows; ++j) {
    int64_t r = first + (2 * j + 1) * span / (2 * params_.probe_rows);
    r -= r % kTailTile;
    if (rows.empty() || r > rows.back()) rows.push_back(r);
  }
  // The exact rows land in Y first (every row of Y is written again by the head's own path).
  const int64_t n = static_cast<int64_t>(rows.size());
  std::vector<float> queries(n * sh.dim), exact(n * sh.v_dim), approx(n * sh.v_dim);
  exact_attention_at_rows(p_, packed, b, h, rows.data(), n);
  for (int64_t t = 0; t < n; ++t) {
    std::copy_n(p_.y_rows(b, h) + rows[t] * sh.v_dim, sh.v_dim, exact.data() + t * sh.v_dim);
    std::copy_n(p_.q_rows(b, h) + rows[t] * sh.dim, sh.dim, queries.data() + t * sh.dim);
  }
  double norm = 0.0;
  for (float x : exact) norm += static_cast<double>(x) * x;
  const double bound = static_cast<double>(params_.max_error) * params_.max_error * norm;
  for (int64_t budget = params_.retrieval_floor(sh.k_len);; budget *= 2) {
    // All probe rows in one block, each its own tile: the index shares its work across them.
    attend(b, h, queries.data(), rows.data(), n, 1, budget, approx.data());
    double error = 0.0;
    for (int64_t c = 0; c < n * sh.v_dim; ++c) {
      const double d = static_cast<double>(approx[c]) - exact[c];
      error += d * d;
    }
    if (error <= bound) return budget;
    if (2 * budget * kMinKeysPerEscalatedScan > sh.k_len) return 0;
  }
}

}  // namespace

bool use_knn(const AttentionProblem& p, const AttentionParams& params) {
#ifdef ICE_ONNX_MUTANT_EXACT_EVERYWHERE
  return false;  // a mutant for the suite to catch (make test-mutation), never installed
#endif
  const AttentionShape& sh = p.shape;
  if (sh.k_len < params.exact_below || params.top_k >= sh.k_len || sh.q_len == 0) return false;
  // Exact honours a softcap and a sliding window (which already bounds its work).
  if (p.softcap > 0.0f || (p.sliding_window > 0 && p.sliding_window < sh.k_len)) return false;
  if (sh.k_len < kMinKeysPerScanned * std::max(params.retrieval_floor(sh.k_len), params.clusters) ||
      kMinKeysPerScanned * params.scan_fraction > 1.0f)
    return false;
  if (params.sinks + (p.causal ? params.window : 0) >= sh.k_len) return false;  // all exact anyway
  const double queries_per_index = static_cast<double>(sh.q_len) * sh.group();
  if (queries_per_index < 4.0 * std::sqrt(static_cast<double>(sh.k_len))) return false;
  if (!key_padding_flags(p.mask, sh, nullptr)) return false;
  // A NaN or infinite key or value reaches every output that may see it in dense
  // attention; an index would drop it silently. Magnitudes near the float limit
  // would overflow the index's sums (exact recomputes such rows in float64).
  const Magnitudes m = p.magnitudes();
  return m.q <= kMaxKnnQkMagnitude && m.k <= kMaxKnnQkMagnitude &&
         m.v <= kValueMagnitudeBudget / static_cast<float>(sh.k_len);
}

void knn_attention(const AttentionProblem& p, const AttentionParams& params, const ParallelFor& parallel) {
  const AttentionShape& sh = p.shape;
  KnnRun run(p, params);

  // 1. One index (and summary) per (batch, kv-head). A lone slice (MQA at batch 1)
  //    is built spread over the pool; the result is the same either way (see kmeans).
  const int64_t slices = sh.batch * sh.kv_heads;
  if (slices < kSlicesBuiltSideBySide)
    for (int64_t slice = 0; slice < slices; ++slice) run.build(slice, &parallel);
  else
    parallel(slices, [&](int64_t slice) { run.build(slice, nullptr); });

  // 2. The guard: a head whose probed rows kNN gets wrong retrieves more keys, or runs
  //    exactly (budget 0).
  const int64_t heads = sh.batch * sh.q_heads;
  std::vector<int64_t> budget(heads, params.retrieval_floor(sh.k_len));
  PackedKeys packed;
  if (params.guarded() || run.exact_prefix(params.retrieval_floor(sh.k_len)) > 0) packed = pack_keys(p, parallel);
  if (params.guarded()) {
    parallel(heads, [&](int64_t bh) { budget[bh] = run.guarded_budget(bh / sh.q_heads, bh % sh.q_heads, packed); });
  }
  run_stats::count_knn_call(sh, std::count(budget.begin(), budget.end(), 0));

  // 3. Blocks of queries, each head on its path: exact for a head the guard sent there
  //    and for the leading blocks exact_prefix covers.
  const int64_t blocks = (sh.q_len + kQueryBlock - 1) / kQueryBlock;
  parallel(heads * blocks, [&](int64_t task) {
    const int64_t bh = task / blocks, b = bh / sh.q_heads, h = bh % sh.q_heads;
    const int64_t i0 = (task % blocks) * kQueryBlock, count = std::min(kQueryBlock, sh.q_len - i0);
    const run_stats::RowTally tally;  // the rows this task attends through the index
    if (budget[bh] == 0 || i0 < run.exact_prefix(budget[bh]))
      exact_attention_rows(p, packed, b, h, i0, i0 + count);
    else
#ifdef ICE_ONNX_MUTANT_ZEROS_IN_KNN
      std::fill_n(p.y_rows(b, h) + i0 * sh.v_dim, count * sh.v_dim, 0.0f);  // a mutant (make test-mutation)
#else
      run.attend_rows(b, h, i0, count, budget[bh], p.y_rows(b, h) + i0 * sh.v_dim);
#endif
  });
}

}  // namespace ice
