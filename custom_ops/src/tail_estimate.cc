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

bool TailModel::attend(const float* q, float scale, int64_t last_key, const int64_t* ids, const float* scores,
                       int64_t found, const float* values, float* y, Scratch& s) const {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  s.retrieved.assign(clusters_, 0);
  s.retrieved_score.assign(clusters_, 0.0f);
  s.tail_weight.assign(clusters_, 0.0f);

  float top = kNegInf;
  for (int64_t j = 0; j < found; ++j) {
    const int32_t c = cluster_of_[ids[j]];
    ++s.retrieved[c];
    s.retrieved_score[c] += scores[j];
    top = std::max(top, scores[j]);
  }
  // The clusters with keys left over, their summary rows and their members' count.
  s.tail_cluster.clear();
  s.sum_row.clear();
  s.remaining.clear();
  for (int64_t c = 0; c < clusters_; ++c) {
    const int64_t visible = visible_members(c, last_key);
    if (visible - s.retrieved[c] <= 0) continue;
    s.tail_cluster.push_back(c);
    s.sum_row.push_back(sum_begin_[c] + (causal_ ? visible : 0));
    s.remaining.push_back(visible - s.retrieved[c]);
  }
  const int64_t tails = static_cast<int64_t>(s.tail_cluster.size());
  s.tail_score.resize(tails);
  gather_dots(q, key_sums_.data(), s.sum_row.data(), tails, dim_, s.tail_score.data());
  for (int64_t t = 0; t < tails; ++t) {
    const int64_t c = s.tail_cluster[t];
    s.tail_score[t] = (scale * s.tail_score[t] - s.retrieved_score[c]) / s.remaining[t];
    top = std::max(top, s.tail_score[t]);
  }
  if (top == kNegInf) return false;

  // From here on tail_score holds the weight of each of the cluster's tail keys.
  exp_shifted(s.tail_score.data(), tails, top);
  float total = 0.0f;
  for (int64_t t = 0; t < tails; ++t) {
    s.tail_weight[s.tail_cluster[t]] = s.tail_score[t];
    total += s.tail_score[t] * static_cast<float>(s.remaining[t]);
  }
  std::fill(y, y + v_dim_, 0.0f);
  gather_accumulate(s.tail_score.data(), value_sums_.data(), s.sum_row.data(), tails, v_dim_, y);
  s.weight.assign(scores, scores + found);
  total += exp_shifted(s.weight.data(), found, top);
  // V_c above still holds each retrieved key: replace its tail weight by its exact one.
  for (int64_t j = 0; j < found; ++j) s.weight[j] -= s.tail_weight[cluster_of_[ids[j]]];
  gather_accumulate(s.weight.data(), values, ids, found, v_dim_, y);
  scale_in_place(1.0f / total, v_dim_, y);
  return true;
}

}  // namespace ice
