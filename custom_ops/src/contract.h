// The IceKNNAttention contract in C++: op identity, attribute names, defaults and
// their validation. Mirrors custom_ops/CONTRACT.md (the source of truth).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

namespace ice {

constexpr const char* kDomain = "ai.iceformer";
constexpr const char* kOpType = "IceKNNAttention";
constexpr int kOpVersion = 1;

// Inputs: Q, K, V, optional attn_mask (bool or float32), optional key_lengths
// (int32 or int64, [B]: the keys that exist in a shared KV buffer). Output: Y.
constexpr int kInputQ = 0, kInputK = 1, kInputV = 2, kInputMask = 3, kInputKeyLengths = 4;
constexpr int kInputCount = 5;

namespace attr {
constexpr const char* kScale = "scale";
constexpr const char* kIsCausal = "is_causal";
constexpr const char* kSoftcap = "softcap";
constexpr const char* kSlidingWindow = "sliding_window";
constexpr const char* kEmptyRows = "empty_rows";
constexpr const char* kTopK = "top_k";
constexpr const char* kExactBelow = "exact_below";
constexpr const char* kSeed = "seed";
constexpr const char* kCompensate = "compensate";
constexpr const char* kIndex = "index";
constexpr const char* kClusters = "clusters";
constexpr const char* kKmeansIters = "kmeans_iters";
constexpr const char* kScanFraction = "scan_fraction";
constexpr const char* kScanMin = "scan_min";
constexpr const char* kTailClusters = "tail_clusters";
constexpr const char* kSinks = "sinks";
constexpr const char* kWindow = "window";
constexpr const char* kProbeRows = "probe_rows";
constexpr const char* kMaxError = "max_error";
}  // namespace attr

// Index names accepted by the `index` attribute.
constexpr const char* kIndexCluster = "cluster";
constexpr const char* kIndexDci = "dci";

// kNN runs only below these magnitudes, where the index's and the tail summary's
// float32 sums (of keys, of values over up to Sk keys, squared norms) cannot
// overflow: |Q|, |K| at most kMaxKnnQkMagnitude, |V| at most kValueMagnitudeBudget / Sk.
constexpr float kMaxKnnQkMagnitude = 1e12f;
constexpr float kValueMagnitudeBudget = 1e30f;

// Values of the `empty_rows` attribute: what a row with no allowed key outputs.
constexpr const char* kEmptyRowsMean = "mean";
constexpr const char* kEmptyRowsZero = "zero";

// kNN mode runs only where the index's least work per query is at most 1/this of the keys.
constexpr int64_t kMinKeysPerScanned = 8;

struct AttentionParams {
  // Multiplies Q.K^T; <= 0 means 1/sqrt(D).
  float scale = 0.0f;
  // Query i sees key j only if j <= i + L - Sq (bottom-right aligned; L = the keys
  // that exist, Sk without key_lengths).
  bool causal = false;
  // > 0: scores s become softcap * tanh(s / softcap) before the mask is added.
  float softcap = 0.0f;
  // > 0: query i sees key j only if j > i + L - Sq - sliding_window (its own key
  // counted, as transformers' sliding_window).
  int64_t sliding_window = 0;
  // What a row with no allowed key outputs: "mean" (of V) or "zero" (ONNX Attention).
  std::string empty_rows = kEmptyRowsMean;
  // Keys each query retrieves in kNN mode (>= 1). The cluster index scans whole
  // clusters, best first, until it has at least this many (or scan_min) and attends
  // all of them. SmolLM2 at 8K tokens, relative error per layer 0.01-0.09 with 1024,
  // 0.05-0.14 with 512 (unguarded).
  int64_t top_k = 1024;
  // Exact attention when Sk < exact_below or top_k >= Sk (or too few queries to
  // amortise an index: see `knn_pays_off` in knn_attention.h).
  int64_t exact_below = 2048;
  // Seeds the clustering; same seed => same output for any thread count.
  int64_t seed = 0;
  // Fold an estimate of the keys top-k left out into the softmax (tail_estimate.h).
  bool compensate = true;
  // Which KeyIndex retrieves the top-k keys ("cluster" or "dci").
  std::string index = kIndexCluster;

  // --- cluster index (cluster_index.h) ---
  // k-means clusters per (batch, kv-head); 0 = about sqrt(n) (cluster size ~ cluster
  // count balances centroid scoring against scanning).
  int64_t clusters = 0;
  // Lloyd iterations on a sample of the keys; a few already separate real clusters,
  // more mostly cost build time.
  int64_t kmeans_iters = 4;
  // Each query scans its best clusters until it has scored at least
  // max(scan_min, scan_fraction * visible keys) keys, and attends every one of them:
  // the accuracy/speed knob. A fixed budget (fraction 0) keeps a query's cost
  // independent of the sequence length.
  float scan_fraction = 0.0f;
  // 0 = top_k.
  int64_t scan_min = 0;

  // --- tail compensation (tail_estimate.h) ---
  // Clusters summarising the keys for the tail estimate; 0 = the index's own.
  int64_t tail_clusters = 0;

  // --- keys every query attends exactly, whatever the index finds ---
  // The first `sinks` keys: LLM heads park much of their mass on the first tokens
  // ("attention sinks"), so they are never left to the index or the tail estimate.
  int64_t sinks = 4;
  // Causal only: the `window` keys just before a query's tile (plus the tile's own,
  // up to 15 more). Local heads put most of their mass there; it costs one
  // contiguous pass and spares the index positional structure it cannot see.
  int64_t window = 64;

  // --- the accuracy guard ---
  // Before a query head runs in kNN mode, `probe_rows` of its rows (spread over the
  // sequence) run both ways; if kNN's relative error on them exceeds `max_error`, the
  // head retrieves twice the keys (while within a quarter of them) or, when no budget
  // meets it, runs exactly. 0 rows = no guard.
  int64_t probe_rows = 32;
  float max_error = 0.02f;

  static constexpr int64_t kMaxProbeRows = 4096;
  // Every query scores every centroid, and a causal summary snapshots them all:
  // bounded like tail_clusters, for the same O(S) memory.
  static constexpr int64_t kMaxClusters = 1024;
  // A causal summary keeps a snapshot of every cluster every 256 keys: bounded
  // clusters keep that O(S) (64 MiB at 32K keys, D 64, at the bound).
  static constexpr int64_t kMaxTailClusters = 1024;
  bool guarded() const { return probe_rows > 0; }

  // A query's best keys spread over several clusters: with one cluster's worth (top_k
  // below a cluster's size) the shipped line-retrieval model kept 83 % of its answers
  // at 4K keys (top_k 32, 52 keys a query), with two 98 %, with four 100 %.
  static constexpr int64_t kMinScannedClusters = 2;
  // The cluster index's least scan per query over `keys` keys: `scan_min`, or by default
  // top_k but at least kMinScannedClusters clusters' worth (sqrt(keys) keys each unless
  // `clusters` is set), that part capped at the most kNN mode scans (an eighth of the
  // keys, which only binds below 256 keys). An explicit scan_min is taken as it is.
  int64_t effective_scan_min(int64_t keys) const {
    if (scan_min > 0) return scan_min;
    keys = std::max<int64_t>(keys, 0);
    const int64_t per_cluster = clusters > 0 ? (keys + clusters - 1) / clusters
                                             : static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(keys))));
    return std::max(top_k, std::min(kMinScannedClusters * per_cluster, keys / kMinKeysPerScanned));
  }
  // Keys each kNN query over `keys` keys retrieves at least: the cluster index's scan
  // floor, DCI's top_k.
  int64_t retrieval_floor(int64_t keys) const { return index == kIndexCluster ? effective_scan_min(keys) : top_k; }
  // The summary's clusters: by key count, finer for short sequences, where the keys
  // left out hold more of the mass (128 up to 512 keys, 32 from 2048 on); with an index
  // that has clusters of its own (`index_clusters`, 0 when it has none) at least those,
  // so from about 2K keys on the summary is the index's partition, whose members the
  // scan already separates into attended and not. (The index's ~sqrt(n) alone left
  // MiniLM's 512-key calls at top_k 32 a 22-key tail cluster each: mean cosine 0.989,
  // nearest neighbour kept 84 %; 128 clusters: 0.997, 96 %.)
  int64_t effective_tail_clusters(int64_t keys, int64_t index_clusters = 0) const {
    if (tail_clusters > 0) return tail_clusters;
    return std::max(index_clusters, std::clamp<int64_t>(65536 / std::max<int64_t>(keys, 1), 32, 128));
  }
};

// Empty when the attributes are valid, else a message naming the offending one.
std::string validate(const AttentionParams& p);

}  // namespace ice
