// Tail compensation: the keys top-k leaves out still carry softmax mass (a lot of it
// in diffuse heads). The keys of one (batch, kv-head) are summarised by k-means
// clusters (count, key sum, value sum; the index's clusters grouped when it has
// enough of them). For a
// query, the retrieved keys count exactly; the other visible keys of cluster c,
// n_c of them with mean key m_c and value sum V_c, are estimated as n_c keys that
// all score scale * q.m_c (first order around the cluster mean):
//   den = sum_{j retrieved} e^{s_j - M} + sum_c n_c e^{t_c - M}
//   num = sum_{j retrieved} e^{s_j - M} v_j + sum_c e^{t_c - M} V_c
//   with t_c = scale * q.m_c = (scale * q.K_c - sum_{j retrieved in c} s_j) / n_c,
// where K_c, V_c are the cluster's visible sums minus its retrieved keys (so no key
// is counted twice). Exact when every visible key is retrieved.
//
// Queries go in tiles of consecutive positions that share one summary, kept packed
// for matrix products: one scores the tile against the summaries, another weights
// their value sums. Causal tiles share a boundary: the keys before it are summarised,
// the few keys from it up to each query's own position count exactly, as retrieved
// ones do. Those keys and the sinks are one short run shared by the tile (each row
// sees a prefix of it), so they too are scored and weighted by tile products, not
// gathered row by row. The summary at a boundary is a running one: it starts from the nearest
// snapshot below (every kSnapshotKeys positions) and adds keys as the boundary
// advances, so no per-position sums are stored.
#pragma once

#include <cstdint>
#include <vector>

#include "key_index.h"
#include "parallel_for.h"

namespace ice {

class TailModel {
 public:
  // Summarises the allowed keys (allowed == nullptr: all) in about `clusters`
  // clusters. `causal` keeps per-position prefix sums so a query counts only the
  // keys it may see. `parallel` (or nullptr) may spread the clustering over
  // threads; the result is the same.
  // `fine` (or nullptr): the index's own partition of the same keys; when it has at
  // least `clusters` clusters, they are grouped (k-means over their centroids)
  // instead of clustering every key again.
  // The first `sinks` keys are never summarised: every query counts them exactly.
  // `clusters` 0: no summary at all (the exact part alone: pure top-k).
  void build(const float* keys, const float* values, int64_t n, int64_t dim, int64_t v_dim, const uint8_t* allowed,
             int64_t sinks, int64_t clusters, int64_t iterations, uint64_t seed, bool causal,
             const ParallelFor* parallel = nullptr, const KeyPartition* fine = nullptr);

  // Per-task buffers, reused across tiles.
  struct Scratch {
    // The summary of keys [0, boundary): counts, key sums as panels, value sums as strips.
    int64_t boundary = -1, count = 0;
    std::vector<float> summarised;         // [clusters] keys summarised (counts, as floats)
    std::vector<float> key_panels, value_strips;
    // Per tile row: scale * q.K_c (then the weight of one tail key of c), total weight, used.
    std::vector<float> tile_scores, tile_total, acc;
    std::vector<uint8_t> tile_used;
    std::vector<float> left, retrieved_score;  // [clusters] keys not retrieved, retrieved keys' summed scores
    std::vector<int64_t> exact_ids;        // retrieved keys before the boundary
    std::vector<float> exact_scores;
    // The tile's run of exact keys: the sinks the summary does not hold, then every
    // allowed key from the boundary to the tile's last; packed, and per tile row
    // their scaled scores (then weights) (a row sees a prefix of the run).
    std::vector<int64_t> run_ids;
    std::vector<float> run_panels, run_strips, run_scores;
  };

  // A tile of `count` consecutive queries that each see at least keys [0, boundary)
  // (without causal: every key) and at most keys up to last_key: scores them against
  // the clusters' summaries and the tile's exact keys in two matrix products. Then
  // attend() for the rows that use the tail, then finish_tile().
  void begin_tile(const float* queries, int64_t count, int64_t boundary, int64_t last_key, float scale,
                  Scratch& scratch) const;

  // Row `row` of the tile: writes y = the unnormalised part from retrieved keys;
  // finish_tile adds the tile's exact keys and the tail and normalises. scores[j] =
  // scale * q.k of the retrieved keys ids[0..found) (all visible: id <= last_key, and
  // last_key >= the boundary - 1). Returns false if the query sees no key at all (y
  // untouched, row left out).
  bool attend(int64_t row, int64_t last_key, const int64_t* ids, const float* scores, int64_t found, float* y,
              Scratch& scratch) const;

  // Whether attend_scanned() applies: no summary, or the index's partition as it is.
  bool summarises_by_partition() const { return clusters_ == 0 || by_partition_; }

  // As attend(), for a query whose keys before the boundary were attended by an index
  // that scans whole clusters of this model's partition: `scanned` is that part
  // (max, sum, acc as in ScannedAttention), `probes[0..n_probes)` the clusters it
  // covered, so only the other clusters are estimated.
  bool attend_scanned(int64_t row, int64_t last_key, const int32_t* probes, int64_t n_probes, float scanned_max,
                      float scanned_sum, const float* scanned_acc, float* y, Scratch& scratch) const;

  // y rows of the tile (row stride ldy): adds the tail's value sums and normalises
  // the rows attend() accepted.
  void finish_tile(float* y, int64_t ldy, Scratch& scratch) const;

 private:
  static constexpr int64_t kSnapshotKeys = 256;  // causal: summary snapshot spacing

  void move_boundary(int64_t boundary, Scratch& scratch) const;
  // Packs the tile's run of exact keys (see Scratch) and scores the tile's queries against it.
  void score_run(const float* queries, int64_t count, int64_t last_key, float scale, Scratch& scratch) const;
  // Row `row`'s scores of the run keys up to last_key (*seen of them; the rest of its
  // run row is zeroed: no weight in finish_tile's product).
  float* run_row(int64_t row, int64_t last_key, int64_t* seen, Scratch& scratch) const;

  // Adds the weighted values of the retrieved exact keys (scratch.exact_scores now
  // weights) to y and marks the row for finish_tile with weight sum `total`.
  bool accept_row(int64_t row, float total, int64_t exact, float* y, Scratch& scratch) const;

  bool is_allowed(int64_t key) const { return !allowed_ || allowed_[key]; }

  int64_t n_ = 0, dim_ = 0, v_dim_ = 0, clusters_ = 0, sinks_ = 0;
  const uint8_t* allowed_ = nullptr;     // [n] or nullptr: key padding
  bool causal_ = false, by_partition_ = false;
  const float* keys_ = nullptr;           // the call's K and V rows (the model lives within one call)
  const float* values_ = nullptr;
  std::vector<int32_t> cluster_of_;      // [n], -1 for removed keys
  // Snapshots of the summary at positions snapshot_at_[i] (causal: every
  // kSnapshotKeys keys; otherwise only all n): counts, key sums, value sums.
  std::vector<int64_t> snapshot_at_, snapshot_counts_;
  std::vector<float> snapshot_keys_, snapshot_values_;
};

}  // namespace ice
