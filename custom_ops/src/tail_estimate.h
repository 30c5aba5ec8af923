// Tail compensation: the keys top-k leaves out still carry softmax mass (a lot of it
// in diffuse heads). The keys of one (batch, kv-head) are summarised by k-means
// clusters (count, key sum, value sum; per position prefix when causal). For a
// query, the retrieved keys count exactly; the other visible keys of cluster c,
// n_c of them with mean key m_c and value sum V_c, are estimated as n_c keys that
// all score scale * q.m_c (first order around the cluster mean):
//   den = sum_{j retrieved} e^{s_j - M} + sum_c n_c e^{t_c - M}
//   num = sum_{j retrieved} e^{s_j - M} v_j + sum_c e^{t_c - M} V_c
//   with t_c = scale * q.m_c = (scale * q.K_c - sum_{j retrieved in c} s_j) / n_c,
// where K_c, V_c are the cluster's visible sums minus its retrieved keys (so no key
// is counted twice). Exact when every visible key is retrieved.
#pragma once

#include <cstdint>
#include <vector>

#include "parallel_for.h"

namespace ice {

class TailModel {
 public:
  // Summarises the allowed keys (allowed == nullptr: all) in about `clusters`
  // clusters. `causal` keeps per-position prefix sums so a query counts only the
  // keys it may see. `parallel` (or nullptr) may spread the clustering over
  // threads; the result is the same.
  void build(const float* keys, const float* values, int64_t n, int64_t dim, int64_t v_dim, const uint8_t* allowed,
             int64_t clusters, int64_t iterations, uint64_t seed, bool causal, const ParallelFor* parallel = nullptr);

  // Per-task buffers, reused across queries.
  struct Scratch {
    std::vector<int32_t> retrieved;        // [clusters] retrieved keys per cluster
    std::vector<float> retrieved_score;    // [clusters] their summed scores
    std::vector<float> tail_weight;        // [clusters] weight of one tail key
    std::vector<int64_t> tail_cluster, sum_row, remaining;  // per cluster with a tail
    std::vector<float> tail_score, weight;
  };

  // y = the compensated softmax average for one query. scores[j] = scale * q.k of
  // the retrieved keys ids[0..found) (all visible: id <= last_key). Returns false
  // if the query sees no key at all (y untouched).
  bool attend(const float* q, float scale, int64_t last_key, const int64_t* ids, const float* scores,
              int64_t found, const float* values, float* y, Scratch& scratch) const;

 private:
  int64_t visible_members(int64_t c, int64_t last_key) const;
  const float* key_sum(int64_t c, int64_t visible) const;
  const float* value_sum(int64_t c, int64_t visible) const;

  int64_t n_ = 0, dim_ = 0, v_dim_ = 0, clusters_ = 0;
  bool causal_ = false;
  std::vector<int32_t> cluster_of_;      // [n], -1 for removed keys
  std::vector<int64_t> member_begin_;    // [clusters + 1]
  std::vector<int64_t> member_key_;      // ascending key ids inside each cluster
  // Sums: causal -> prefix rows (size_c + 1 per cluster, from sum_begin_[c]);
  // otherwise one total row per cluster.
  std::vector<int64_t> sum_begin_;
  std::vector<float> key_sums_, value_sums_;
};

}  // namespace ice
