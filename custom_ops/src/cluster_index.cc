#include "cluster_index.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <utility>

#include "contract.h"
#include "kmeans.h"
#include "tile_kernels.h"

namespace ice {
namespace {

constexpr int64_t kScanRows = 32;     // queries per scan tile
constexpr int64_t kScanPanels = 16;   // key panels per scan tile (256 keys)
constexpr int64_t kScanTileWidth = kScanPanels * kPanelWidth;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kNoneCounted = std::numeric_limits<int64_t>::min();

constexpr int64_t kRankBuckets = 64;

// Buffers of clusters_for_budget, reused across queries.
struct BudgetScratch {
  std::vector<int32_t> bucket;             // [clusters]: score bucket, 0 = best; -1: holds nothing
  std::vector<int64_t> held;               // [kRankBuckets]: keys the clusters of each bucket hold
  std::vector<std::pair<float, int32_t>> boundary;  // the bucket where the budget runs out
};

// The best clusters by score, taken best first (ties: lower index) until they hold
// `budget` keys (`keys[c]` each; clusters holding none are never taken), written to
// `out` in index order. One pass sorts the clusters into linear score buckets
// between the best and worst score; only the bucket where the budget runs out is
// sorted. Scores with a NaN (overflowing inputs) rank nothing: index order.
void clusters_for_budget(const float* scores, const int32_t* keys, int64_t clusters, int64_t budget,
                         BudgetScratch& s, std::vector<int32_t>& out) {
  out.clear();
  float best = kNegInf, worst = -kNegInf;
  bool nan = false;
  for (int64_t c = 0; c < clusters; ++c) {
    if (keys[c] == 0) continue;
    nan |= scores[c] != scores[c];
    best = std::max(best, scores[c]);
    worst = std::min(worst, scores[c]);
  }
  if (nan || !(best > worst)) {  // no order to use (or a single score): index order
    int64_t held = 0;
    for (int64_t c = 0; c < clusters && held < budget; ++c)
      if (keys[c] > 0) out.push_back(static_cast<int32_t>(c)), held += keys[c];
    return;
  }
  const float per_bucket = static_cast<float>(kRankBuckets) / (best - worst);  // 0 if the range overflows
  s.bucket.resize(clusters);
  s.held.assign(kRankBuckets, 0);
  for (int64_t c = 0; c < clusters; ++c) {
    if (keys[c] == 0) {
      s.bucket[c] = -1;
      continue;
    }
    const float position = (best - scores[c]) * per_bucket;  // >= 0; NaN for inf x 0: the last bucket
    const int64_t b = position < kRankBuckets - 1 ? static_cast<int64_t>(position) : kRankBuckets - 1;
    s.bucket[c] = static_cast<int32_t>(b);
    s.held[b] += keys[c];
  }
  int64_t last = 0, held = 0;  // the buckets before `last` are taken whole
  for (; last < kRankBuckets && held + s.held[last] < budget; ++last) held += s.held[last];
  s.boundary.clear();
  for (int64_t c = 0; c < clusters; ++c) {
    if (s.bucket[c] < 0 || s.bucket[c] > last) continue;
    if (s.bucket[c] < last) out.push_back(static_cast<int32_t>(c));
    else s.boundary.push_back({scores[c], static_cast<int32_t>(c)});
  }
  std::sort(s.boundary.begin(), s.boundary.end(), [](const auto& x, const auto& y) {
    return x.first > y.first || (x.first == y.first && x.second < y.second);
  });
  const size_t whole = out.size();
  for (size_t i = 0; i < s.boundary.size() && held < budget; ++i) {
    out.push_back(s.boundary[i].second);
    held += keys[s.boundary[i].second];
  }
  std::sort(out.begin() + whole, out.end());
  std::inplace_merge(out.begin(), out.begin() + whole, out.end());
}

}  // namespace

struct ClusterIndex::SearchScratch {
  std::vector<float> centroid_scores, rows, tile, tile_acc, tile_max, tile_shift, tile_sum;
  std::vector<int32_t> visible;  // [clusters_]: keys of each cluster at or before visible_upto
  int64_t visible_upto = -1;
  std::vector<int64_t> probe_begin, list_begin, fill, scanner, scanner_visible;
  std::vector<Probe> all_probes, probes;
  std::vector<int32_t> ranked;
  BudgetScratch budget;
};

void ClusterIndex::build(const KeySet& keys, uint64_t seed) {
  n_ = keys.n;
  dim_ = keys.dim;
  std::vector<int64_t> members;
  members.reserve(n_);
  allowed_up_to_.assign(n_, 0);
  for (int64_t j = 0, count = 0; j < n_; ++j) {
    if (!keys.allowed || keys.allowed[j]) members.push_back(j), ++count;
    allowed_up_to_[j] = count;
  }
  const int64_t m = static_cast<int64_t>(members.size());
  // About sqrt(m) clusters by default, never more than the contract's bound (every
  // query scores every centroid; causal summaries snapshot them all).
  const int64_t wanted =
      params_.clusters > 0 ? params_.clusters
                           : std::min(AttentionParams::kMaxClusters,
                                      static_cast<int64_t>(std::lround(std::sqrt(static_cast<double>(m)))));
  const Clustering clustering = kmeans(keys.keys, dim_, members, wanted, params_.kmeans_iters, seed, keys.parallel);
  clusters_ = clustering.k;
  partition_.k = clusters_;
  partition_.centroids = clustering.centroids;
  partition_.cluster_of.assign(n_, -1);
  for (int64_t i = 0; i < m; ++i) partition_.cluster_of[members[i]] = clustering.assignment[i];

  // Slots: clusters one after another, each padded to whole panels; members keep
  // ascending key order inside their cluster (members is ascending).
  cluster_size_ = clustering.sizes;
  largest_cluster_ = cluster_size_.empty() ? 0 : *std::max_element(cluster_size_.begin(), cluster_size_.end());
  cluster_begin_.assign(clusters_ + 1, 0);
  for (int64_t c = 0; c < clusters_; ++c) cluster_begin_[c + 1] = cluster_begin_[c] + padded_to_panels(cluster_size_[c]);
  slot_key_.assign(cluster_begin_[clusters_], -1);
  std::vector<int64_t> fill(cluster_begin_.begin(), cluster_begin_.end() - 1);
  for (int64_t i = 0; i < m; ++i) slot_key_[fill[clustering.assignment[i]]++] = members[i];

  key_panels_.assign(cluster_begin_[clusters_] * dim_, 0.0f);
  for (int64_t c = 0; c < clusters_; ++c)
    pack_panels(keys.keys, dim_, dim_, slot_key_.data() + cluster_begin_[c], cluster_size_[c],
                key_panels_.data() + cluster_begin_[c] * dim_);
  v_dim_ = keys.values ? keys.v_dim : 0;
  const int64_t slots = cluster_begin_[clusters_];
  value_strips_.assign(strip_count(v_dim_) * slots * kStripWidth, 0.0f);
  for (int64_t slot = 0; slot < slots && v_dim_ > 0; ++slot) {
    if (slot_key_[slot] < 0) continue;
    const float* row = keys.values + slot_key_[slot] * v_dim_;
    for (int64_t d = 0; d < v_dim_; ++d)
      value_strips_[((d / kStripWidth) * slots + slot) * kStripWidth + d % kStripWidth] = row[d];
  }
  centroid_panels_.assign(padded_to_panels(clusters_) * dim_, 0.0f);
  pack_panels(clustering.centroids.data(), dim_, dim_, nullptr, clusters_, centroid_panels_.data());
  // A wide cluster may hold keys scoring well above its centroid: for a query q,
  // q.(k - c) over n members of RMS radius r peaks near |q| r sqrt(2 ln n / d).
  spread_.assign(clusters_, 0.0f);
  for (int64_t c = 0; c < clusters_; ++c) {
    double sq = 0.0;
    const float* centre = clustering.centroids.data() + c * dim_;
    for (int64_t t = cluster_begin_[c]; t < cluster_begin_[c] + cluster_size_[c]; ++t) {
      const float* key = keys.keys + slot_key_[t] * dim_;
      for (int64_t d = 0; d < dim_; ++d) sq += (key[d] - centre[d]) * (key[d] - centre[d]);
    }
    const double n = static_cast<double>(cluster_size_[c]);
    if (n > 1) spread_[c] = static_cast<float>(std::sqrt(sq / n) * std::sqrt(2.0 * std::log(n) / dim_));
  }
}

int64_t ClusterIndex::result_slots(int64_t k) const {
  // choose_probes takes whole clusters until the budget is reached, rarely much past
  // it; search keeps the first this many keys a query scans (the rest stay in the tail).
  const int64_t budget = std::max({params_.scan_min, k, static_cast<int64_t>(std::llround(params_.scan_fraction * n_))});
  return std::max<int64_t>(1, std::min(n_, 2 * budget + largest_cluster_));
}

int64_t ClusterIndex::visible_in_cluster(int64_t c, int64_t last_key) const {
  const int64_t* begin = slot_key_.data() + cluster_begin_[c];
  const int64_t* end = begin + cluster_size_[c];
  if (last_key >= n_ - 1 || end == begin || end[-1] <= last_key) return cluster_size_[c];
  return std::upper_bound(begin, end, last_key) - begin;
}

// Causal queries come in position order: their per-cluster counts grow by the keys
// between one query's last key and the next's (no search per cluster and query).
void ClusterIndex::count_visible(int64_t last_key, SearchScratch& t) const {
  last_key = std::min(last_key, n_ - 1);
  if (t.visible_upto == kNoneCounted || last_key < t.visible_upto) {
    t.visible.resize(clusters_);
    for (int64_t c = 0; c < clusters_; ++c) t.visible[c] = static_cast<int32_t>(visible_in_cluster(c, last_key));
  } else {
    for (int64_t j = std::max<int64_t>(t.visible_upto + 1, 0); j <= last_key; ++j)
      if (partition_.cluster_of[j] >= 0) ++t.visible[partition_.cluster_of[j]];
  }
  t.visible_upto = last_key;
}

int64_t ClusterIndex::visible_total(int64_t last_key) const {
  if (last_key < 0 || n_ == 0) return 0;
  return allowed_up_to_[std::min(last_key, n_ - 1)];
}

// The clusters a query scans: the best by rank score that together hold the budget
// of visible keys (every cluster when the budget covers all it may see).
void ClusterIndex::choose_probes(const float* rank_scores, int64_t last_key, int64_t scan_min, SearchScratch& t) const {
  t.probes.clear();
  const int64_t total = visible_total(last_key);
  if (total == 0) return;
  const int64_t budget = std::max<int64_t>(scan_min, std::llround(params_.scan_fraction * total));
  if (budget >= total) {
    t.ranked.resize(clusters_);
    std::iota(t.ranked.begin(), t.ranked.end(), 0);
  } else {
    clusters_for_budget(rank_scores, t.visible.data(), clusters_, budget, t.budget, t.ranked);
  }
  for (int32_t c : t.ranked)
    if (t.visible[c] > 0) t.probes.push_back({c, t.visible[c]});
}

void ClusterIndex::plan_scans(const QueryBlock& block, SearchScratch& t) const {
  const int64_t count = block.count;
  // 1. Every query against every centroid: one matrix product.
  const int64_t padded_clusters = padded_to_panels(clusters_);
  t.centroid_scores.resize(count * padded_clusters);
  score_panels(block.queries, dim_, count, centroid_panels_.data(), panel_count(clusters_), dim_,
               t.centroid_scores.data(), padded_clusters);

  // 2. Each query's probes, then inverted into lists of the queries scanning each cluster.
  t.visible_upto = kNoneCounted;
  t.probe_begin.assign(count + 1, 0);
  t.all_probes.clear();
  for (int64_t i = 0; i < count; ++i) {
    const int64_t last_key = block.last_key ? block.last_key[i] : n_ - 1;
    // Clusters rank by the best score they are expected to hold, not their centre's.
    const float q_norm = std::sqrt(dot(block.queries + i * dim_, block.queries + i * dim_, dim_));
    float* rank_scores = t.centroid_scores.data() + i * padded_clusters;
    for (int64_t c = 0; c < clusters_; ++c) rank_scores[c] += q_norm * spread_[c];
    count_visible(last_key, t);
    choose_probes(rank_scores, last_key, block.scan_min > 0 ? block.scan_min : params_.scan_min, t);
    t.all_probes.insert(t.all_probes.end(), t.probes.begin(), t.probes.end());
    t.probe_begin[i + 1] = static_cast<int64_t>(t.all_probes.size());
  }
  t.list_begin.assign(clusters_ + 1, 0);
  for (const Probe& probe : t.all_probes) ++t.list_begin[probe.cluster + 1];
  for (int64_t c = 0; c < clusters_; ++c) t.list_begin[c + 1] += t.list_begin[c];
  t.scanner.resize(t.all_probes.size());
  t.scanner_visible.resize(t.all_probes.size());
  t.fill.assign(t.list_begin.begin(), t.list_begin.end() - 1);
  for (int64_t i = 0; i < count; ++i)
    for (int64_t pr = t.probe_begin[i]; pr < t.probe_begin[i + 1]; ++pr) {
      const int64_t slot = t.fill[t.all_probes[pr].cluster]++;
      t.scanner[slot] = i;
      t.scanner_visible[slot] = t.all_probes[pr].visible;
    }
}

// 3. Cluster by cluster: (the queries scanning it, times row_scale) x (its keys) in
//    tiles of kScanRows x kScanPanels panels: visit(list row range, cluster, first slot,
//    panels, keys) scores them (t.rows holds the scaled queries, `keys` of the tile's
//    slots are visible to at least one of them).
template <typename Visit>
void ClusterIndex::for_each_scan_tile(const QueryBlock& block, float row_scale, SearchScratch& t, Visit&& visit) const {
  t.rows.resize(kScanRows * dim_);
  t.tile.resize(kScanRows * kScanTileWidth);
  for (int64_t c = 0; c < clusters_; ++c) {
    const float* cluster_panels = key_panels_.data() + cluster_begin_[c] * dim_;
    for (int64_t s0 = t.list_begin[c]; s0 < t.list_begin[c + 1]; s0 += kScanRows) {
      const int64_t nrows = std::min(kScanRows, t.list_begin[c + 1] - s0);
      int64_t most_visible = 0;
      for (int64_t r = 0; r < nrows; ++r) {
        const float* q = block.queries + t.scanner[s0 + r] * dim_;
        float* row = t.rows.data() + r * dim_;
        for (int64_t d = 0; d < dim_; ++d) row[d] = row_scale * q[d];
        most_visible = std::max(most_visible, t.scanner_visible[s0 + r]);
      }
      for (int64_t p0 = 0; p0 < panel_count(most_visible); p0 += kScanPanels) {
        const int64_t np = std::min(kScanPanels, panel_count(most_visible) - p0);
        const int64_t first = p0 * kPanelWidth;
        visit(s0, nrows, c, cluster_panels + first * dim_, first, np, std::min(np * kPanelWidth, most_visible - first));
      }
    }
  }
}

void ClusterIndex::search(const QueryBlock& block, Neighbours out) const {
  const int64_t count = block.count, k = block.k;
  std::fill(out.ids, out.ids + count * k, int64_t{-1});
  std::fill(out.found, out.found + count, 0);
  if (count == 0 || clusters_ == 0) return;
  // Buffers live per thread: large fresh allocations would page-fault on every call.
  thread_local SearchScratch scratch;
  SearchScratch& t = scratch;
  plan_scans(block, t);
  // Every visible key scanned is a result.
  for_each_scan_tile(block, 1.0f, t, [&](int64_t s0, int64_t nrows, int64_t c, const float* panels, int64_t first,
                                          int64_t np, int64_t) {
    score_panels(t.rows.data(), dim_, nrows, panels, np, dim_, t.tile.data(), kScanTileWidth);
    const int64_t* cluster_keys = slot_key_.data() + cluster_begin_[c];
    for (int64_t r = 0; r < nrows; ++r) {
      const int64_t i = t.scanner[s0 + r];
      const int64_t end = std::min({np * kPanelWidth, t.scanner_visible[s0 + r] - first, k - out.found[i]});
      if (end <= 0) continue;
      const int64_t at = i * k + out.found[i];
      std::copy_n(cluster_keys + first, end, out.ids + at);
      std::copy_n(t.tile.data() + r * kScanTileWidth, end, out.scores + at);
      out.found[i] += static_cast<int32_t>(end);
    }
  });
}

bool ClusterIndex::attend(const QueryBlock& block, float scale, ScannedAttention& out) const {
  if (v_dim_ == 0 && n_ > 0) return false;  // built without values
  const int64_t count = block.count, ldacc = strip_count(v_dim_) * kStripWidth;
  out.max.assign(count, kNegInf);
  out.sum.assign(count, 0.0f);
  out.acc.assign(count * v_dim_, 0.0f);
  out.probe_begin.assign(count + 1, 0);
  out.probes.clear();
  out.keys.assign(count, 0);
  if (count == 0 || clusters_ == 0) return true;
  thread_local SearchScratch scratch;
  SearchScratch& t = scratch;
  plan_scans(block, t);
  out.probe_begin = t.probe_begin;
  out.probes.reserve(t.all_probes.size());
  for (const Probe& probe : t.all_probes) out.probes.push_back(probe.cluster);
  for (int64_t i = 0; i < count; ++i)
    for (int64_t pr = t.probe_begin[i]; pr < t.probe_begin[i + 1]; ++pr) out.keys[i] += t.all_probes[pr].visible;

  // Online softmax in base 2 (queries scaled by scale * log2 e, as on the exact
  // path): a tile row's weights use the query's running maximum; a new maximum
  // rescales what the query has gathered so far.
  const int64_t slots = cluster_begin_[clusters_];
  t.tile_acc.resize(kScanRows * ldacc);
  t.tile_max.resize(kScanRows);
  t.tile_shift.resize(kScanRows);
  t.tile_sum.resize(kScanRows);
  for_each_scan_tile(block, scale * kLog2e, t, [&](int64_t s0, int64_t nrows, int64_t c, const float* panels,
                                                   int64_t first, int64_t np, int64_t keys) {
    const int64_t width = np * kPanelWidth;
    score_panels_max(t.rows.data(), dim_, nrows, panels, keys, dim_, t.tile.data(), kScanTileWidth, t.tile_max.data());
    for (int64_t r = 0; r < nrows; ++r) {
      const int64_t i = t.scanner[s0 + r];
      float* w = t.tile.data() + r * kScanTileWidth;
      const int64_t end = std::clamp<int64_t>(t.scanner_visible[s0 + r] - first, 0, keys);
      if (end < keys) {  // a causal query sees a shorter prefix of this cluster
        std::fill(w + end, w + keys, kNegInf);
        t.tile_max[r] = max_of(w, end);
      }
      std::fill(w + keys, w + width, 0.0f);  // padding slots
      if (t.tile_max[r] > out.max[i]) {
        const float shrink = std::exp2(out.max[i] - t.tile_max[r]);
        out.sum[i] *= shrink;
        scale_in_place(shrink, v_dim_, out.acc.data() + i * v_dim_);
        out.max[i] = t.tile_max[r];
      }
      t.tile_shift[r] = out.max[i];
    }
    exp2_shifted_rows(t.tile.data(), kScanTileWidth, nrows, keys, t.tile_shift.data(), t.tile_sum.data());
    for (int64_t r = 0; r < nrows; ++r) {
      if (t.tile_shift[r] == kNegInf)  // nothing visible scored yet: no weight
        std::fill_n(t.tile.data() + r * kScanTileWidth, keys, 0.0f);
      else
        out.sum[t.scanner[s0 + r]] += t.tile_sum[r];
    }
    std::fill_n(t.tile_acc.data(), nrows * ldacc, 0.0f);
    accumulate_weighted_strips(t.tile.data(), kScanTileWidth, nrows,
                               value_strips_.data() + (cluster_begin_[c] + first) * kStripWidth, slots * kStripWidth,
                               strip_count(v_dim_), width, t.tile_acc.data(), ldacc);
    for (int64_t r = 0; r < nrows; ++r) {
      float* acc = out.acc.data() + t.scanner[s0 + r] * v_dim_;
      const float* add = t.tile_acc.data() + r * ldacc;
      for (int64_t d = 0; d < v_dim_; ++d) acc[d] += add[d];
    }
  });
  for (float& m : out.max) m *= kLn2;  // the caller's scores are natural
  return true;
}

}  // namespace ice
