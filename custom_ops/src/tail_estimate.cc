#include "tail_estimate.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "kmeans.h"
#include "tile_kernels.h"

namespace ice {

void TailModel::build(const float* keys, const float* values, int64_t n, int64_t dim, int64_t v_dim,
                      const uint8_t* allowed, int64_t clusters, int64_t iterations, uint64_t seed, bool causal,
                      const ParallelFor* parallel) {
  n_ = n, dim_ = dim, v_dim_ = v_dim, causal_ = causal;
  std::vector<int64_t> members;
  for (int64_t j = 0; j < n; ++j)
    if (!allowed || allowed[j]) members.push_back(j);
  const Clustering clustering = kmeans(keys, dim, members, clusters, iterations, seed, parallel);
  clusters_ = clustering.k;

  cluster_of_.assign(n, -1);
  member_begin_.assign(clusters_ + 1, 0);
  for (size_t i = 0; i < members.size(); ++i) {
    cluster_of_[members[i]] = clustering.assignment[i];
    ++member_begin_[clustering.assignment[i] + 1];
  }
  for (int64_t c = 0; c < clusters_; ++c) member_begin_[c + 1] += member_begin_[c];
  member_key_.resize(members.size());
  std::vector<int64_t> fill(member_begin_.begin(), member_begin_.end() - 1);
  for (int64_t key : members) member_key_[fill[cluster_of_[key]]++] = key;

  sum_begin_.assign(clusters_ + 1, 0);
  for (int64_t c = 0; c < clusters_; ++c)
    sum_begin_[c + 1] = sum_begin_[c] + (causal ? member_begin_[c + 1] - member_begin_[c] + 1 : 1);
  key_sums_.assign(sum_begin_[clusters_] * dim, 0.0f);
  value_sums_.assign(sum_begin_[clusters_] * v_dim, 0.0f);
  std::vector<double> key_acc(dim), value_acc(v_dim);
  for (int64_t c = 0; c < clusters_; ++c) {
    std::fill(key_acc.begin(), key_acc.end(), 0.0);
    std::fill(value_acc.begin(), value_acc.end(), 0.0);
    int64_t row = sum_begin_[c];
    for (int64_t t = member_begin_[c]; t < member_begin_[c + 1]; ++t) {
      const float* k = keys + member_key_[t] * dim;
      const float* v = values + member_key_[t] * v_dim;
      for (int64_t d = 0; d < dim; ++d) key_acc[d] += k[d];
      for (int64_t d = 0; d < v_dim; ++d) value_acc[d] += v[d];
      if (causal) {  // row t+1 of the cluster = sum of its first t+1 members
        ++row;
        for (int64_t d = 0; d < dim; ++d) key_sums_[row * dim + d] = static_cast<float>(key_acc[d]);
        for (int64_t d = 0; d < v_dim; ++d) value_sums_[row * v_dim + d] = static_cast<float>(value_acc[d]);
      }
    }
    if (!causal) {
      for (int64_t d = 0; d < dim; ++d) key_sums_[row * dim + d] = static_cast<float>(key_acc[d]);
      for (int64_t d = 0; d < v_dim; ++d) value_sums_[row * v_dim + d] = static_cast<float>(value_acc[d]);
    }
  }
}

int64_t TailModel::visible_members(int64_t c, int64_t last_key) const {
  const int64_t* begin = member_key_.data() + member_begin_[c];
  const int64_t* end = member_key_.data() + member_begin_[c + 1];
  if (!causal_ || begin == end || end[-1] <= last_key) return end - begin;
  return std::upper_bound(begin, end, last_key) - begin;
}

const float* TailModel::key_sum(int64_t c, int64_t visible) const {
  return key_sums_.data() + (sum_begin_[c] + (causal_ ? visible : 0)) * dim_;
}

const float* TailModel::value_sum(int64_t c, int64_t visible) const {
  return value_sums_.data() + (sum_begin_[c] + (causal_ ? visible : 0)) * v_dim_;
}

void TailModel::begin_tile(const float* queries, int64_t count, int64_t boundary, float scale, Scratch& s) const {
  boundary = causal_ ? std::clamp<int64_t>(boundary, 0, n_) : n_;
  const int64_t width = padded_to_panels(clusters_);
  if (boundary != s.boundary) {  // pack the summary rows of this boundary (once without causal)
    s.boundary = boundary;
    s.summary_row.resize(clusters_);
    s.summarised.resize(clusters_);
    for (int64_t c = 0; c < clusters_; ++c) {
      const int64_t members = visible_members(c, boundary - 1);
      s.summarised[c] = members;
      s.summary_row[c] = sum_begin_[c] + (causal_ ? members : 0);
    }
    s.key_panels.resize(width * dim_);
    pack_panels(key_sums_.data(), dim_, dim_, s.summary_row.data(), clusters_, s.key_panels.data());
    s.sum_rows.resize(clusters_ * v_dim_);
    for (int64_t c = 0; c < clusters_; ++c)
      std::copy_n(value_sums_.data() + s.summary_row[c] * v_dim_, v_dim_, s.sum_rows.data() + c * v_dim_);
    s.value_strips.resize(strip_count(v_dim_) * clusters_ * kStripWidth);
    pack_strips(s.sum_rows.data(), v_dim_, clusters_, v_dim_, s.value_strips.data());
  }
  s.count = count;
  s.tile_scores.resize(count * width);
  score_panels(queries, dim_, count, s.key_panels.data(), panel_count(clusters_), dim_, s.tile_scores.data(), width);
  scale_in_place(scale, count * width, s.tile_scores.data());
  s.tile_total.assign(count, 0.0f);
  s.tile_used.assign(count, 0);
}

bool TailModel::attend(int64_t row, const float* q, float scale, int64_t last_key, const int64_t* ids,
                       const float* scores, int64_t found, const float* keys, const float* values, float* y,
                       Scratch& s) const {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  s.retrieved.assign(clusters_, 0);
  s.retrieved_score.assign(clusters_, 0.0f);

  // Exact keys: the retrieved ones the summary holds (their tail share is taken out
  // of their cluster below), then every allowed key from the boundary on.
  s.exact_ids.clear();
  s.exact_scores.clear();
  for (int64_t j = 0; j < found; ++j) {
    if (ids[j] >= s.boundary) continue;  // counted with the keys from the boundary
    const int32_t c = cluster_of_[ids[j]];
    ++s.retrieved[c];
    s.retrieved_score[c] += scores[j];
    s.exact_ids.push_back(ids[j]);
    s.exact_scores.push_back(scores[j]);
  }
  const int64_t summarised_exact = static_cast<int64_t>(s.exact_ids.size());
  for (int64_t key = s.boundary; key <= std::min(last_key, n_ - 1); ++key)
    if (cluster_of_[key] >= 0) s.exact_ids.push_back(key);
  const int64_t exact = static_cast<int64_t>(s.exact_ids.size());
  s.exact_scores.resize(exact);
  gather_dots(q, keys, s.exact_ids.data() + summarised_exact, exact - summarised_exact, dim_,
              s.exact_scores.data() + summarised_exact);
  scale_in_place(scale, exact - summarised_exact, s.exact_scores.data() + summarised_exact);
  float top = exact > 0 ? max_of(s.exact_scores.data(), exact) : kNegInf;

  // Each cluster's left-over keys score their mean: (scale q.K_c - retrieved scores) / count.
  float* tail = s.tile_scores.data() + row * padded_to_panels(clusters_);
  for (int64_t c = 0; c < clusters_; ++c) {
    const int64_t left = s.summarised[c] - s.retrieved[c];
    tail[c] = left > 0 ? (tail[c] - s.retrieved_score[c]) / static_cast<float>(left) : kNegInf;
    top = std::max(top, tail[c]);
  }
  if (top == kNegInf) return false;

  // From here on tail[c] is the weight of one of cluster c's tail keys.
  exp_shifted(tail, clusters_, top);  // (clusters with no tail: exp(-inf) = 0)
  float total = 0.0f;
  for (int64_t c = 0; c < clusters_; ++c) total += tail[c] * static_cast<float>(s.summarised[c] - s.retrieved[c]);
  total += exp_shifted(s.exact_scores.data(), exact, top);
  // V_c still holds each summarised retrieved key: its tail weight becomes its exact one.
  for (int64_t j = 0; j < summarised_exact; ++j) s.exact_scores[j] -= tail[cluster_of_[s.exact_ids[j]]];
  std::fill(y, y + v_dim_, 0.0f);
  gather_accumulate(s.exact_scores.data(), values, s.exact_ids.data(), exact, v_dim_, y);
  s.tile_total[row] = total;
  s.tile_used[row] = 1;
  return true;
}

void TailModel::finish_tile(float* y, int64_t ldy, Scratch& s) const {
  const int64_t width = padded_to_panels(clusters_), acc_width = strip_count(v_dim_) * kStripWidth;
  // Rows attend() did not accept must not feed stale weights into the product.
  for (int64_t r = 0; r < s.count; ++r)
    if (!s.tile_used[r]) std::fill_n(s.tile_scores.data() + r * width, clusters_, 0.0f);
  s.acc.assign(s.count * acc_width, 0.0f);
  accumulate_weighted_strips(s.tile_scores.data(), width, s.count, s.value_strips.data(), clusters_ * kStripWidth,
                             strip_count(v_dim_), clusters_, s.acc.data(), acc_width);
  for (int64_t r = 0; r < s.count; ++r) {
    if (!s.tile_used[r]) continue;
    float* row = y + r * ldy;
    for (int64_t c = 0; c < v_dim_; ++c) row[c] += s.acc[r * acc_width + c];
    scale_in_place(1.0f / s.tile_total[r], v_dim_, row);
  }
}

}  // namespace ice
