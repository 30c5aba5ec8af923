#include "tail_estimate.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "kmeans.h"
#include "tile_kernels.h"

namespace ice {

void TailModel::build(const float* keys, const float* values, int64_t n, int64_t dim, int64_t v_dim,
                      const uint8_t* allowed, int64_t clusters, int64_t iterations, uint64_t seed, bool causal) {
  n_ = n, dim_ = dim, v_dim_ = v_dim, causal_ = causal;
  std::vector<int64_t> members;
  for (int64_t j = 0; j < n; ++j)
    if (!allowed || allowed[j]) members.push_back(j);
  const Clustering clustering = kmeans(keys, dim, members, clusters, iterations, seed);
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
  s.tail_score.assign(clusters_, kNegInf);
  s.remaining.assign(clusters_, 0);

  float top = kNegInf;
  for (int64_t j = 0; j < found; ++j) {
    const int32_t c = cluster_of_[ids[j]];
    ++s.retrieved[c];
    s.retrieved_score[c] += scores[j];
    top = std::max(top, scores[j]);
  }
  for (int64_t c = 0; c < clusters_; ++c) {
    const int64_t visible = visible_members(c, last_key);
    const int64_t remaining = visible - s.retrieved[c];
    if (remaining <= 0) continue;
    s.remaining[c] = remaining;
    s.tail_score[c] = (scale * dot(q, key_sum(c, visible), dim_) - s.retrieved_score[c]) / remaining;
    top = std::max(top, s.tail_score[c]);
  }
  if (top == kNegInf) return false;

  std::fill(y, y + v_dim_, 0.0f);
  double total = 0.0;
  for (int64_t c = 0; c < clusters_; ++c) {
    if (s.remaining[c] == 0) continue;
    const float e = std::exp(s.tail_score[c] - top);
    s.tail_score[c] = e;  // from here on: the weight of each of the cluster's tail keys
    total += static_cast<double>(e) * s.remaining[c];
    axpy(e, value_sum(c, visible_members(c, last_key)), v_dim_, y);
  }
  for (int64_t j = 0; j < found; ++j) {
    const float w = std::exp(scores[j] - top);
    total += w;
    const int32_t c = cluster_of_[ids[j]];
    // V_c above still holds this key: replace its tail weight by its exact one.
    const float tail_weight = s.remaining[c] > 0 ? s.tail_score[c] : 0.0f;
    axpy(w - tail_weight, values + ids[j] * v_dim_, v_dim_, y);
  }
  scale_in_place(static_cast<float>(1.0 / total), v_dim_, y);
  return true;
}

}  // namespace ice
