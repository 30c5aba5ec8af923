#include "tail_estimate.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "kmeans.h"
#include "tile_kernels.h"

namespace ice {

void TailModel::build(const float* keys, const float* values, int64_t n, int64_t dim, int64_t v_dim,
                      const uint8_t* allowed, int64_t sinks, int64_t clusters, int64_t iterations, uint64_t seed,
                      bool causal, const ParallelFor* parallel, const KeyPartition* fine) {
  n_ = n, dim_ = dim, v_dim_ = v_dim, causal_ = causal, keys_ = keys, values_ = values;
  allowed_ = allowed;
  sinks_ = std::min(sinks, n);
  cluster_of_.assign(n, -1);
  by_partition_ = false;
  if (clusters <= 0) {
    clusters_ = 0;  // no summary: the exact part alone (pure top-k)
  } else if (fine && fine->k == clusters && static_cast<int64_t>(fine->cluster_of.size()) == n) {
    clusters_ = fine->k;  // the index's clusters as they are
    cluster_of_ = fine->cluster_of;
    by_partition_ = true;
  } else if (fine && fine->k > clusters && static_cast<int64_t>(fine->cluster_of.size()) == n) {
    // Group the index's clusters: each key follows its cluster (no pass over every key).
    std::vector<int64_t> fine_ids(fine->k);
    for (int64_t c = 0; c < fine->k; ++c) fine_ids[c] = c;
    const Clustering groups = kmeans(fine->centroids.data(), dim, fine_ids, clusters, iterations, seed);
    clusters_ = groups.k;
    for (int64_t j = 0; j < n; ++j)
      if (fine->cluster_of[j] >= 0) cluster_of_[j] = groups.assignment[fine->cluster_of[j]];
  } else {
    std::vector<int64_t> members;
    for (int64_t j = sinks_; j < n; ++j)
      if (!allowed || allowed[j]) members.push_back(j);
    const Clustering clustering = kmeans(keys, dim, members, clusters, iterations, seed, parallel);
    clusters_ = clustering.k;
    for (size_t i = 0; i < members.size(); ++i) cluster_of_[members[i]] = clustering.assignment[i];
  }

  // Sums in position order (double: thousands of keys per cluster), snapshotted.
  snapshot_at_.clear();
  if (causal)
    for (int64_t at = 0; at < n; at += kSnapshotKeys) snapshot_at_.push_back(at);
  snapshot_at_.push_back(n);
  const int64_t snapshots = static_cast<int64_t>(snapshot_at_.size());
  snapshot_counts_.assign(snapshots * clusters_, 0);
  snapshot_keys_.assign(snapshots * clusters_ * dim, 0.0f);
  snapshot_values_.assign(snapshots * clusters_ * v_dim, 0.0f);
  std::vector<int64_t> count(clusters_, 0);
  std::vector<double> key_acc(clusters_ * dim, 0.0), value_acc(clusters_ * v_dim, 0.0);
  int64_t key = 0;
  for (int64_t i = 0; i < snapshots; ++i) {
    for (; key < snapshot_at_[i]; ++key) {
      const int32_t c = cluster_of_[key];
      if (c < 0) continue;
      ++count[c];
      for (int64_t d = 0; d < dim; ++d) key_acc[c * dim + d] += keys[key * dim + d];
      for (int64_t d = 0; d < v_dim; ++d) value_acc[c * v_dim + d] += values[key * v_dim + d];
    }
    std::copy(count.begin(), count.end(), snapshot_counts_.begin() + i * clusters_);
    std::copy(key_acc.begin(), key_acc.end(), snapshot_keys_.begin() + i * clusters_ * dim);
    std::copy(value_acc.begin(), value_acc.end(), snapshot_values_.begin() + i * clusters_ * v_dim);
  }
}

void TailModel::move_boundary(int64_t boundary, Scratch& s) const {
  int64_t from = s.boundary;
  if (from < 0 || boundary < from || boundary - from > kSnapshotKeys) {  // restart from a snapshot
    const int64_t i = std::upper_bound(snapshot_at_.begin(), snapshot_at_.end(), boundary) - snapshot_at_.begin() - 1;
    from = snapshot_at_[i];
    s.summarised.assign(snapshot_counts_.begin() + i * clusters_, snapshot_counts_.begin() + (i + 1) * clusters_);
    s.key_panels.resize(padded_to_panels(clusters_) * dim_);
    pack_panels(snapshot_keys_.data() + i * clusters_ * dim_, dim_, dim_, nullptr, clusters_, s.key_panels.data());
    s.value_strips.resize(strip_count(v_dim_) * clusters_ * kStripWidth);
    pack_strips(snapshot_values_.data() + i * clusters_ * v_dim_, v_dim_, clusters_, v_dim_, s.value_strips.data());
  }
  // Add keys [from, boundary) in place: key sums at [panel][d][lane], values at [strip][cluster][lane].
  for (int64_t key = from; key < boundary; ++key) {
    const int32_t c = cluster_of_[key];
    if (c < 0) continue;
    ++s.summarised[c];
    float* panel = s.key_panels.data() + (c / kPanelWidth) * kPanelWidth * dim_ + c % kPanelWidth;
    for (int64_t d = 0; d < dim_; ++d) panel[d * kPanelWidth] += keys_[key * dim_ + d];
    for (int64_t d = 0; d < v_dim_; ++d)
      s.value_strips[(d / kStripWidth) * clusters_ * kStripWidth + c * kStripWidth + d % kStripWidth] +=
          values_[key * v_dim_ + d];
  }
  s.boundary = boundary;
}

void TailModel::begin_tile(const float* queries, int64_t count, int64_t boundary, int64_t last_key, float scale,
                           Scratch& s) const {
  move_boundary(causal_ ? std::clamp<int64_t>(boundary, 0, n_) : n_, s);
  const int64_t width = padded_to_panels(clusters_);
  s.count = count;
  s.tile_scores.resize(count * width);
  score_panels(queries, dim_, count, s.key_panels.data(), panel_count(clusters_), dim_, s.tile_scores.data(), width);
  scale_in_place(scale, count * width, s.tile_scores.data());
  s.tile_total.assign(count, 0.0f);
  s.tile_used.assign(count, 0);
  score_run(queries, count, std::min(last_key, n_ - 1), scale, s);
}

void TailModel::score_run(const float* queries, int64_t count, int64_t last, float scale, Scratch& s) const {
  s.run_ids.clear();
  for (int64_t key = 0; key < std::min({sinks_, s.boundary, last + 1}); ++key)
    if (is_allowed(key)) s.run_ids.push_back(key);
  for (int64_t key = std::max<int64_t>(s.boundary, 0); key <= last; ++key)
    if (is_allowed(key)) s.run_ids.push_back(key);
  const int64_t keys = static_cast<int64_t>(s.run_ids.size()), width = padded_to_panels(keys);
  s.run_panels.resize(width * dim_);
  pack_panels(keys_, dim_, dim_, s.run_ids.data(), keys, s.run_panels.data());
  s.run_strips.resize(strip_count(v_dim_) * keys * kStripWidth);
  pack_strips(values_, v_dim_, keys, v_dim_, s.run_strips.data(), s.run_ids.data());
  s.run_scores.resize(count * width);
  score_panels(queries, dim_, count, s.run_panels.data(), panel_count(keys), dim_, s.run_scores.data(), width);
  scale_in_place(scale, count * width, s.run_scores.data());
}

float* TailModel::run_row(int64_t row, int64_t last_key, int64_t* seen, Scratch& s) const {
  const int64_t width = padded_to_panels(static_cast<int64_t>(s.run_ids.size()));
  *seen = std::upper_bound(s.run_ids.begin(), s.run_ids.end(), last_key) - s.run_ids.begin();
  float* scores = s.run_scores.data() + row * width;
  std::fill(scores + *seen, scores + width, 0.0f);
  return scores;
}

bool TailModel::attend(int64_t row, int64_t last_key, const int64_t* ids, const float* scores, int64_t found, float* y,
                       Scratch& s) const {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  // left[c]: cluster c's summarised keys not retrieved; their scores' sum is
  // scale q.K_c minus the retrieved ones' (taken out below).
  s.left.assign(s.summarised.begin(), s.summarised.end());
  s.retrieved_score.assign(clusters_, 0.0f);

  // Retrieved keys the summary holds count exactly (the tile's run, scored in begin_tile, adds the rest).
  const int64_t last = std::min(last_key, n_ - 1);
  s.exact_ids.resize(found);
  s.exact_scores.resize(found);
  int64_t exact = 0;
  for (int64_t j = 0; j < found; ++j) {
    if (ids[j] >= s.boundary || ids[j] < sinks_) continue;  // counted with the sinks or the keys from the boundary
    const int32_t c = cluster_of_[ids[j]];
    if (c >= 0) {  // (no summary: no cluster)
      s.left[c] -= 1.0f;
      s.retrieved_score[c] += scores[j];
    }
    s.exact_ids[exact] = ids[j];
    s.exact_scores[exact++] = scores[j];
  }
  int64_t seen;
  float* run = run_row(row, last, &seen, s);
  float top = std::max(max_of(s.exact_scores.data(), exact), max_of(run, seen));  // (-inf when empty)

  // Each cluster's left-over keys score their mean: (scale q.K_c - retrieved scores) / count.
  float* tail = s.tile_scores.data() + row * padded_to_panels(clusters_);
  const float* left = s.left.data();
  for (int64_t c = 0; c < clusters_; ++c)
    tail[c] = left[c] > 0.0f ? (tail[c] - s.retrieved_score[c]) / left[c] : kNegInf;
  top = std::max(top, max_of(tail, clusters_));
  if (top == kNegInf) return false;

  // From here on tail[c] is the weight of one of cluster c's tail keys.
  exp_shifted(tail, clusters_, top);  // (clusters with no tail: exp(-inf) = 0)
  float total = dot(tail, left, clusters_);
  total += exp_shifted(s.exact_scores.data(), exact, top) + exp_shifted(run, seen, top);
  // V_c still holds each summarised retrieved key: its tail weight becomes its exact one.
  for (int64_t j = 0; j < exact; ++j)
    if (const int32_t c = cluster_of_[s.exact_ids[j]]; c >= 0) s.exact_scores[j] -= tail[c];
  std::fill(y, y + v_dim_, 0.0f);
  return accept_row(row, total, exact, y, s);
}

bool TailModel::attend_scanned(int64_t row, int64_t last_key, const int32_t* probes, int64_t n_probes,
                               float scanned_max, float scanned_sum, const float* scanned_acc, float* y,
                               Scratch& s) const {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  int64_t seen;
  float* run = run_row(row, std::min(last_key, n_ - 1), &seen, s);
  float top = std::max(scanned_max, max_of(run, seen));

  // The clusters not scanned keep all their summarised keys; each scores its mean.
  float* tail = s.tile_scores.data() + row * padded_to_panels(clusters_);
  s.left.assign(s.summarised.begin(), s.summarised.end());
  if (clusters_ > 0)
    for (int64_t p = 0; p < n_probes; ++p) s.left[probes[p]] = 0.0f;
  const float* left = s.left.data();
  for (int64_t c = 0; c < clusters_; ++c) tail[c] = left[c] > 0.0f ? tail[c] / left[c] : kNegInf;
  top = std::max(top, max_of(tail, clusters_));
  if (top == kNegInf) return false;

  exp_shifted(tail, clusters_, top);  // now the weight of one tail key of each cluster
  const float scanned_weight = scanned_max == kNegInf ? 0.0f : std::exp(scanned_max - top);
  float total = dot(tail, left, clusters_) + scanned_sum * scanned_weight;
  total += exp_shifted(run, seen, top);
  for (int64_t c = 0; c < v_dim_; ++c) y[c] = scanned_weight * scanned_acc[c];
  return accept_row(row, total, 0, y, s);
}

bool TailModel::accept_row(int64_t row, float total, int64_t exact, float* y, Scratch& s) const {
  gather_accumulate(s.exact_scores.data(), values_, s.exact_ids.data(), exact, v_dim_, y);
  s.tile_total[row] = total;
  s.tile_used[row] = 1;
  return true;
}

void TailModel::finish_tile(float* y, int64_t ldy, Scratch& s) const {
  const int64_t width = padded_to_panels(clusters_), acc_width = strip_count(v_dim_) * kStripWidth;
  const int64_t run_keys = static_cast<int64_t>(s.run_ids.size()), run_width = padded_to_panels(run_keys);
  // Rows attend() did not accept must not feed stale weights into the products.
  for (int64_t r = 0; r < s.count; ++r)
    if (!s.tile_used[r]) {
      std::fill_n(s.tile_scores.data() + r * width, clusters_, 0.0f);
      std::fill_n(s.run_scores.data() + r * run_width, run_width, 0.0f);
    }
  s.acc.assign(s.count * acc_width, 0.0f);
  accumulate_weighted_strips(s.tile_scores.data(), width, s.count, s.value_strips.data(), clusters_ * kStripWidth,
                             strip_count(v_dim_), clusters_, s.acc.data(), acc_width);
  accumulate_weighted_strips(s.run_scores.data(), run_width, s.count, s.run_strips.data(), run_keys * kStripWidth,
                             strip_count(v_dim_), run_keys, s.acc.data(), acc_width);
  for (int64_t r = 0; r < s.count; ++r) {
    if (!s.tile_used[r]) continue;
    float* row = y + r * ldy;
    for (int64_t c = 0; c < v_dim_; ++c) row[c] += s.acc[r * acc_width + c];
    scale_in_place(1.0f / s.tile_total[r], v_dim_, row);
  }
}

}  // namespace ice
