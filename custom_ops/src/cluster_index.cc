#include "cluster_index.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "kmeans.h"
#include "tile_kernels.h"

namespace ice {
namespace {

constexpr int64_t kScanRows = 32;     // queries per scan tile
constexpr int64_t kScanPanels = 16;   // key panels per scan tile (256 keys)
// Bisection passes for a first threshold: a lower bound of the k-th best score
// within 2^-12 of the range, which lets only a few more than k scores through.
constexpr int kSeedBits = 12;

// The k best (score, key) pairs seen, kept loosely: candidates above the threshold
// are appended to a buffer of 4k; a full buffer is cut back to its k best, whose
// lowest score becomes the threshold. The cut finds the k-th best score by a
// branch-free vectorised bisection (kth_largest) and compacts in arrival order, so
// no comparison sort runs. Amortised O(1) per candidate; results come out unordered.
class TopK {
 public:
  TopK(float* scores, int64_t* keys, int64_t k) : scores_(scores), keys_(keys), k_(k) {}
  static int64_t buffer_size(int64_t k) { return 4 * k; }

  float threshold() const { return threshold_; }
  bool empty() const { return size_ == 0; }
  // After pushing at least k scores >= t: later scores must beat t.
  void raise_threshold(float t) { threshold_ = std::max(threshold_, t); }
  void push(float score, int64_t key) {
    scores_[size_] = score;
    keys_[size_] = key;
    if (++size_ == buffer_size(k_)) shrink();
  }
  // Writes the k best keys and their scores (in arrival order); returns how many.
  int64_t finish(int64_t* keys, float* scores) {
    if (size_ > k_) shrink();
    std::copy_n(keys_, size_, keys);
    if (scores) std::copy_n(scores_, size_, scores);
    return size_;
  }

 private:
  void shrink() {
    const float kth = kth_largest(scores_, size_, k_);
    // Everything above the k-th score, then ties at it in arrival order (the first
    // seen win, as the threshold keeps later equal scores out).
    int64_t above = 0;
    for (int64_t i = 0; i < size_; ++i) above += scores_[i] > kth;
    int64_t kept = 0, ties_left = k_ - above;
    for (int64_t i = 0; i < size_; ++i) {
      const bool keep = scores_[i] > kth || (scores_[i] == kth && ties_left-- > 0);
      scores_[kept] = scores_[i];
      keys_[kept] = keys_[i];
      kept += keep;
    }
    size_ = kept;
    threshold_ = kth;
  }

  float* scores_;
  int64_t* keys_;
  int64_t k_;
  int64_t size_ = 0;
  float threshold_ = -std::numeric_limits<float>::infinity();
};

// The `want` best clusters by score (ties: smaller index), best first. The cut is the
// want-th best score (kth_largest: no branch per cluster); only the few above it
// are sorted.
void best_clusters(const float* scores, int64_t clusters, int64_t want, std::vector<int32_t>& out) {
  auto better = [scores](int32_t a, int32_t b) { return scores[a] > scores[b] || (scores[a] == scores[b] && a < b); };
  out.resize(clusters);
  int64_t count = 0;
  if (want < clusters) {
    const float cut = std::nextafter(kth_largest(scores, clusters, want), -std::numeric_limits<float>::infinity());
    count = indices_above(scores, clusters, cut, out.data());
  }
  if (count < want) {  // every cluster wanted, or NaN scores (overflowing inputs)
    for (int64_t c = 0; c < clusters; ++c) out[c] = static_cast<int32_t>(c);
    count = clusters;
    if (std::any_of(scores, scores + clusters, [](float s) { return s != s; })) {  // no order ranks NaN
      out.resize(std::min(want, clusters));
      return;
    }
  }
  out.resize(count);
  std::sort(out.begin(), out.end(), better);  // (no NaN among them)
  out.resize(std::min(want, count));
}

}  // namespace

struct ClusterIndex::SearchScratch {
  std::vector<float> centroid_scores, rows, tile;
  std::vector<int64_t> probe_begin, list_begin, fill, scanner, scanner_visible;
  std::vector<Probe> all_probes, probes;
  std::vector<int32_t> ranked, hits;
  std::vector<float> candidate_scores;
  std::vector<int64_t> candidate_keys;
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
  const int64_t wanted = params_.clusters > 0 ? params_.clusters
                                              : static_cast<int64_t>(std::lround(std::sqrt(static_cast<double>(m))));
  const Clustering clustering = kmeans(keys.keys, dim_, members, wanted, params_.kmeans_iters, seed, keys.parallel);
  clusters_ = clustering.k;
  partition_.k = clusters_;
  partition_.centroids = clustering.centroids;
  partition_.cluster_of.assign(n_, -1);
  for (int64_t i = 0; i < m; ++i) partition_.cluster_of[members[i]] = clustering.assignment[i];

  // Slots: clusters one after another, each padded to whole panels; members keep
  // ascending key order inside their cluster (members is ascending).
  cluster_size_ = clustering.sizes;
  cluster_begin_.assign(clusters_ + 1, 0);
  for (int64_t c = 0; c < clusters_; ++c) cluster_begin_[c + 1] = cluster_begin_[c] + padded_to_panels(cluster_size_[c]);
  slot_key_.assign(cluster_begin_[clusters_], -1);
  std::vector<int64_t> fill(cluster_begin_.begin(), cluster_begin_.end() - 1);
  for (int64_t i = 0; i < m; ++i) slot_key_[fill[clustering.assignment[i]]++] = members[i];

  key_panels_.assign(cluster_begin_[clusters_] * dim_, 0.0f);
  for (int64_t c = 0; c < clusters_; ++c)
    pack_panels(keys.keys, dim_, dim_, slot_key_.data() + cluster_begin_[c], cluster_size_[c],
                key_panels_.data() + cluster_begin_[c] * dim_);
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

int64_t ClusterIndex::visible_in_cluster(int64_t c, int64_t last_key) const {
  const int64_t* begin = slot_key_.data() + cluster_begin_[c];
  const int64_t* end = begin + cluster_size_[c];
  if (last_key >= n_ - 1 || end == begin || end[-1] <= last_key) return cluster_size_[c];
  return std::upper_bound(begin, end, last_key) - begin;
}

int64_t ClusterIndex::visible_total(int64_t last_key) const {
  if (last_key < 0 || n_ == 0) return 0;
  return allowed_up_to_[std::min(last_key, n_ - 1)];
}

// The clusters a query scans: by decreasing centroid score until the budget of
// visible keys is reached (every cluster when the budget covers all it may see).
void ClusterIndex::choose_probes(const float* centroid_scores, int64_t last_key, std::vector<Probe>& probes,
                                 std::vector<int32_t>& ranked) const {
  probes.clear();
  const int64_t total = visible_total(last_key);
  if (total == 0) return;
  const int64_t budget = std::max<int64_t>(params_.scan_min, std::llround(params_.scan_fraction * total));
  auto add = [&](int64_t c) {
    const int64_t visible = visible_in_cluster(c, last_key);
    if (visible > 0) probes.push_back({static_cast<int32_t>(c), static_cast<int32_t>(visible)});
    return visible;
  };
  if (budget >= total || total <= params_.scan_all_up_to) {
    for (int64_t c = 0; c < clusters_; ++c) add(c);
    return;
  }
  // Partial ranking: the best `want` clusters, widened if they hold too few keys.
  const int64_t mean_size = std::max<int64_t>(1, total / clusters_);
  for (int64_t want = std::min(clusters_, 2 * (budget / mean_size) + 2);; want = std::min(clusters_, 2 * want)) {
    best_clusters(centroid_scores, clusters_, want, ranked);
    probes.clear();
    int64_t scanned = 0;
    for (int64_t r = 0; r < want && scanned < budget; ++r) scanned += add(ranked[r]);  // (ranked holds want)
    if (scanned >= budget || want == clusters_) return;
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

  // 1. Every query against every centroid: one matrix product.
  const int64_t padded_clusters = padded_to_panels(clusters_);
  t.centroid_scores.resize(count * padded_clusters);
  score_panels(block.queries, dim_, count, centroid_panels_.data(), panel_count(clusters_), dim_,
               t.centroid_scores.data(), padded_clusters);

  // 2. Each query's probes (best first), then inverted into lists of the queries
  //    scanning each cluster. Two rounds: every query's best cluster first, so its
  //    top-k threshold is already high when the other clusters are scanned (far
  //    fewer candidates to keep).
  t.probe_begin.assign(count + 1, 0);
  t.all_probes.clear();
  for (int64_t i = 0; i < count; ++i) {
    const int64_t last_key = block.last_key ? block.last_key[i] : n_ - 1;
    // Clusters rank by the best score they are expected to hold, not their centre's.
    const float q_norm = std::sqrt(dot(block.queries + i * dim_, block.queries + i * dim_, dim_));
    float* rank_scores = t.centroid_scores.data() + i * padded_clusters;
    for (int64_t c = 0; c < clusters_; ++c) rank_scores[c] += q_norm * spread_[c];
    choose_probes(rank_scores, last_key, t.probes, t.ranked);
    t.all_probes.insert(t.all_probes.end(), t.probes.begin(), t.probes.end());
    t.probe_begin[i + 1] = static_cast<int64_t>(t.all_probes.size());
  }
  auto list_of = [&](int64_t i, int64_t probe) {  // round * clusters + cluster
    return (probe == t.probe_begin[i] ? 0 : clusters_) + t.all_probes[probe].cluster;
  };
  const int64_t lists = 2 * clusters_;
  t.list_begin.assign(lists + 1, 0);
  for (int64_t i = 0; i < count; ++i)
    for (int64_t pr = t.probe_begin[i]; pr < t.probe_begin[i + 1]; ++pr) ++t.list_begin[list_of(i, pr) + 1];
  for (int64_t l = 0; l < lists; ++l) t.list_begin[l + 1] += t.list_begin[l];
  t.scanner.resize(t.all_probes.size());
  t.scanner_visible.resize(t.all_probes.size());
  t.fill.assign(t.list_begin.begin(), t.list_begin.end() - 1);
  for (int64_t i = 0; i < count; ++i)
    for (int64_t pr = t.probe_begin[i]; pr < t.probe_begin[i + 1]; ++pr) {
      const int64_t slot = t.fill[list_of(i, pr)]++;
      t.scanner[slot] = i;
      t.scanner_visible[slot] = t.all_probes[pr].visible;
    }

  // 3. List by list: (its queries) x (its cluster's keys) in tiles; keep each query's top k.
  t.candidate_scores.resize(count * TopK::buffer_size(k));
  t.candidate_keys.resize(count * TopK::buffer_size(k));
  std::vector<TopK> best;
  best.reserve(count);
  for (int64_t i = 0; i < count; ++i)
    best.emplace_back(t.candidate_scores.data() + i * TopK::buffer_size(k),
                      t.candidate_keys.data() + i * TopK::buffer_size(k), k);
  t.rows.resize(kScanRows * dim_);
  t.tile.resize(kScanRows * kScanPanels * kPanelWidth);
  t.hits.resize(kScanPanels * kPanelWidth);
  constexpr int64_t ld = kScanPanels * kPanelWidth;
  for (int64_t l = 0; l < lists; ++l) {
    const int64_t c = l % clusters_;
    const float* cluster_panels = key_panels_.data() + cluster_begin_[c] * dim_;
    const int64_t* cluster_keys = slot_key_.data() + cluster_begin_[c];
    for (int64_t s0 = t.list_begin[l]; s0 < t.list_begin[l + 1]; s0 += kScanRows) {
      const int64_t nrows = std::min(kScanRows, t.list_begin[l + 1] - s0);
      int64_t most_visible = 0;
      for (int64_t r = 0; r < nrows; ++r) {
        std::copy_n(block.queries + t.scanner[s0 + r] * dim_, dim_, t.rows.data() + r * dim_);
        most_visible = std::max(most_visible, t.scanner_visible[s0 + r]);
      }
      for (int64_t p0 = 0; p0 < panel_count(most_visible); p0 += kScanPanels) {
        const int64_t np = std::min(kScanPanels, panel_count(most_visible) - p0);
        score_panels(t.rows.data(), dim_, nrows, cluster_panels + p0 * kPanelWidth * dim_, np, dim_, t.tile.data(),
                     ld);
        const int64_t first = p0 * kPanelWidth;
        for (int64_t r = 0; r < nrows; ++r) {
          TopK& top = best[t.scanner[s0 + r]];
          const int64_t end = std::min(np * kPanelWidth, t.scanner_visible[s0 + r] - first);
          const float* s = t.tile.data() + r * ld;
          // Candidates beat the threshold as it was before this tile row (pushing a
          // few that a later push would have excluded is harmless: TopK keeps the best).
          // A query's first tile (its best cluster) sets its threshold at once: its
          // k-th best score, instead of filling the buffer first.
          float cut = top.threshold(), seeded = cut;
          if (top.empty() && end > k) {
            seeded = kth_largest(s, end, k, kSeedBits);
            cut = std::nextafter(seeded, -std::numeric_limits<float>::infinity());
          }
          const int64_t above = indices_above(s, end, cut, t.hits.data());
          for (int64_t h = 0; h < above; ++h) top.push(s[t.hits[h]], cluster_keys[first + t.hits[h]]);
          top.raise_threshold(seeded);
        }
      }
    }
  }

  // 4. Results (unordered).
  for (int64_t i = 0; i < count; ++i)
    out.found[i] = static_cast<int32_t>(best[i].finish(out.ids + i * k, out.scores ? out.scores + i * k : nullptr));
}

}  // namespace ice
