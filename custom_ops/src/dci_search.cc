#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "dci_index.h"
#include "dci_internal.h"
#include "ip_to_l2.h"

namespace ice {

using namespace dci;

namespace {
thread_local int64_t t_last_search_scored = 0;
}  // namespace

namespace dci {

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
void score_rows(const float* q, const float* rows, int64_t count, int64_t stride, float* out) {
  auto finish = [](const float* acc) {
    const float score = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    return std::isnan(score) ? -kInf : score;  // NaN inputs rank last
  };
  int64_t r = 0;
  for (; r + 4 <= count; r += 4) {  // four rows share each load of q
    const float* row = rows + r * stride;
    float acc[4][kLanes] = {};
    for (int64_t i = 0; i < stride; i += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) {
        const float qi = q[i + l];
        acc[0][l] += qi * row[i + l];
        acc[1][l] += qi * row[stride + i + l];
        acc[2][l] += qi * row[2 * stride + i + l];
        acc[3][l] += qi * row[3 * stride + i + l];
      }
    for (int j = 0; j < 4; ++j) out[r + j] = finish(acc[j]);
  }
  for (; r < count; ++r) {  // same lanes, same order: a row scores alike in either loop
    const float* row = rows + r * stride;
    float acc[kLanes] = {};
    for (int64_t i = 0; i < stride; i += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) acc[l] += q[i + l] * row[i + l];
    out[r] = finish(acc);
  }
}
}  // namespace dci

int64_t DciIndex::last_search_scored() { return t_last_search_scored; }

// Keeps `score` for the level's expansion and offers the key as a result. The results
// are a heap of the best k with the worst in front; the returned threshold is what a
// score must reach to enter it (ties are then settled by key index).
inline float DciIndex::record(const Probe& probe, int32_t slot, float score, Scratch& s) const {
  if (s.keep_level) s.level.push_back({score, slot});
  const int64_t id = key_id_[slot];
  if (id <= probe.last_key && probe.k > 0) {  // a later key routes the descent, never returned
    const Hit hit{score, id};
    if (static_cast<int64_t>(s.top.size()) < probe.k) {
      s.top.push_back(hit);
      std::push_heap(s.top.begin(), s.top.end(), HitBetter());
    } else if (HitBetter()(hit, s.top.front())) {
      std::pop_heap(s.top.begin(), s.top.end(), HitBetter());
      s.top.back() = hit;
      std::push_heap(s.top.begin(), s.top.end(), HitBetter());
    }
  }
  return threshold(probe, s);
}

inline float DciIndex::threshold(const Probe& probe, const Scratch& s) const {
  return static_cast<int64_t>(s.top.size()) < probe.k || probe.k == 0 ? -kInf : s.top.front().score;
}

void DciIndex::score_slot(const Probe& probe, int32_t slot, Scratch& s) const {
  if (subtree_min_id_[slot] > probe.last_key) return;  // neither a result nor a way to one
  float score;
  score_rows(probe.score_row, &rows_[static_cast<size_t>(slot) * stride_], 1, stride_, &score);
  if (probe.row_scale) score = scaled(score, probe.row_scale[slot]);
  ++s.scored_count;
  record(probe, slot, score, s);
}

void DciIndex::visit_cell(const Probe& probe, int32_t begin, int32_t end, Scratch& s) const {
  const int64_t size = end - begin;
  if (size == 0) return;
  const int64_t min_candidates = std::min<int64_t>(size, probe.field_of_view);
  const int64_t target = std::min<int64_t>(
      size, std::max<int64_t>(min_candidates, static_cast<int64_t>(std::ceil(probe.prop_to_retrieve * size))));
  if (target >= size || size <= params_.exhaustive_cell_size) {
    // The whole cell, as one block of contiguous rows.
    s.cell_scores.resize(size);
    score_rows(probe.score_row, &rows_[static_cast<size_t>(begin) * stride_], size, stride_, s.cell_scores.data());
    s.scored_count += size;
    if (probe.row_scale)
      for (int32_t i = 0; i < size; ++i) s.cell_scores[i] = scaled(s.cell_scores[i], probe.row_scale[begin + i]);
    const float* scores = s.cell_scores.data();
    const bool causal = probe.last_key != kNoLimit;
    if (probe.k == 0 && !causal) {  // a build probe: every key is a parent candidate
      for (int32_t i = 0; i < size; ++i) s.level.push_back({scores[i], begin + i});
      return;
    }
    // Most keys neither expand nor enter the results: keep this loop tight.
    float bar = threshold(probe, s);
    for (int32_t i = 0; i < size; ++i) {
      const int32_t slot = begin + i;
      if (causal && subtree_min_id_[slot] > probe.last_key) continue;
      if (scores[i] >= bar) bar = record(probe, slot, scores[i], s);
      else if (s.keep_level) s.level.push_back({scores[i], slot});
    }
    return;
  }
  walk_cell(probe, begin, end, target, min_candidates, s);
}

// The prioritized DCI walk over one cell. Each composite index repeatedly advances
// the simple index whose next entry lies nearest to the probe's projection; a key
// reached by all simple indices of a composite index becomes a candidate.
void DciIndex::walk_cell(const Probe& probe, int32_t begin, int32_t end, int64_t target,
                         int64_t min_candidates, Scratch& s) const {
  const int C = params_.composite_indices, S = params_.simple_indices;
  const int32_t size = end - begin;
  const size_t n = key_id_.size();
  s.counts.assign(static_cast<size_t>(C) * size, 0);
  s.seen.assign(size, 0);

  auto values = [&](int p) { return &sorted_value_[p * n + begin]; };
  auto gap_of = [&](int p) {
    const float* v = values(p);
    const float q = probe.projections[p];
    const float left = s.left[p] >= 0 ? q - v[s.left[p]] : kInf;
    const float right = s.right[p] < size ? v[s.right[p]] - q : kInf;
    return std::min(left, right);
  };
  for (int p = 0; p < C * S; ++p) {
    const float* v = values(p);
    s.right[p] = static_cast<int32_t>(std::lower_bound(v, v + size, probe.projections[p]) - v);
    s.left[p] = s.right[p] - 1;
    s.gap[p] = gap_of(p);
  }

  const int64_t max_rounds = static_cast<int64_t>(size) * S;
  const int64_t visit_budget = static_cast<int64_t>(std::ceil(probe.prop_to_visit * max_rounds));
  int64_t candidates = 0;
  for (int64_t round = 1; round <= max_rounds; ++round) {
    bool advanced = false;
    for (int c = 0; c < C; ++c) {
      int best = c * S;
      for (int p = c * S + 1; p < (c + 1) * S; ++p)
        if (s.gap[p] < s.gap[best]) best = p;
      if (!(s.gap[best] < kInf)) continue;  // this composite index is exhausted
      advanced = true;
      const float* v = values(best);
      const float q = probe.projections[best];
      const bool take_right =
          s.left[best] < 0 || (s.right[best] < size && v[s.right[best]] - q < q - v[s.left[best]]);
      const int32_t local = sorted_local_[best * n + begin + (take_right ? s.right[best]++ : s.left[best]--)];
      s.gap[best] = gap_of(best);
      if (++s.counts[static_cast<size_t>(c) * size + local] == S && !s.seen[local]) {
        s.seen[local] = 1;
        const int64_t before = s.scored_count;
        score_slot(probe, begin + local, s);
        candidates += s.scored_count - before;
      }
    }
    if (!advanced) break;
    if (candidates >= min_candidates && (round >= visit_budget || candidates >= target)) break;
  }
}

// Visits the levels from the top down to stop_level. On return s.level holds the keys
// scored on stop_level and s.top the best probe.k results of all levels.
void DciIndex::descend(const Probe& probe, int stop_level, Scratch& s) const {
  s.top.clear();
  s.frontier.assign(1, -1);  // -1: the root cell (the top level)
  for (int t = 0;; ++t) {
    s.level.clear();
    s.keep_level = t < stop_level || probe.k == 0;  // a build probe reads the last level
    const int64_t level_start = s.scored_count;
    for (int32_t parent : s.frontier) {  // best parents first
      if (s.scored_count - level_start >= probe.max_candidates) break;
      if (parent < 0) visit_cell(probe, 0, level_begin_[1], s);
      else visit_cell(probe, child_begin_[parent], child_end_[parent], s);
    }
    if (t == stop_level) return;

    // Expand the field_of_view best keys that have children, and more while their
    // subtrees together hold fewer than k keys.
    s.expandable.clear();
    for (const Scored& e : s.level)
      if (child_end_[e.slot] > child_begin_[e.slot])
        s.expandable.push_back(probe.route_scale ? Scored{scaled(e.score, probe.route_scale[e.slot]), e.slot} : e);
    auto& cand = s.expandable;
    size_t count = std::min<size_t>(cand.size(), static_cast<size_t>(probe.field_of_view));
    if (count < cand.size()) std::nth_element(cand.begin(), cand.begin() + count, cand.end(), better);
    std::sort(cand.begin(), cand.begin() + count, better);  // best first, for max_candidates
    int64_t held = 0;
    for (size_t i = 0; i < count; ++i) held += subtree_size_[cand[i].slot] - 1;
    if (held < probe.k && count < cand.size()) {
      std::sort(cand.begin() + count, cand.end(), better);
      for (; count < cand.size() && held < probe.k; ++count) held += subtree_size_[cand[count].slot] - 1;
    }
    s.frontier.clear();
    for (size_t i = 0; i < count; ++i) s.frontier.push_back(cand[i].slot);
    if (s.frontier.empty()) return;
  }
}

// Scores every key the query may see (short causal prefixes, and the fallback).
void DciIndex::collect_exact(const Probe& probe, int64_t visible, Scratch& s) const {
  s.top.clear();
  s.keep_level = false;
  for (int64_t i = 0; i < visible; ++i) score_slot(probe, slots_by_id_[i], s);
}

void DciIndex::search_one(const float* query, int64_t k, int64_t last_key, Scratch& s, float* scores,
                          int64_t* ids, int32_t* found) const {
  std::fill(ids, ids + k, -1);
  *found = 0;
  s.scored_count = 0;
  const int64_t visible =
      std::upper_bound(slots_by_id_.begin(), slots_by_id_.end(), last_key,
                       [&](int64_t id, int32_t slot) { return id < key_id_[slot]; }) - slots_by_id_.begin();
  const int64_t wanted = std::min(k, visible);
  if (wanted == 0) return;

  std::copy(query, query + dim_, s.query_row.begin());
  if (may_walk_) {
    ip_to_l2::transform_query(query, dim_, s.transformed.data());
    for (int p = 0; p < num_projections_; ++p)
      s.projections[p] = orderable(dot(s.transformed.data(), &directions_[static_cast<size_t>(p) * stride_]));
  }
  const int fov = params_.query_field_of_view > 0 ? params_.query_field_of_view
                                                  : static_cast<int>(std::min<int64_t>(k, 1 << 30));
  const int64_t budget = params_.max_candidates > 0 ? params_.max_candidates : kNoLimit;
  // With parents chosen by direction, a query expands the keys of its most similar
  // direction too (cosine), while results still rank by q·k.
  const float* route = params_.parent == DciParams::Parent::direction ? inv_norm_.data() : nullptr;
  const Probe probe{s.query_row.data(), s.projections.data(), k, fov, params_.prop_to_retrieve,
                    params_.prop_to_visit, last_key, budget, nullptr, route};
  if (visible <= params_.exact_scan_below) {
    collect_exact(probe, visible, s);
  } else {
    descend(probe, num_levels() - 1, s);
    // Never return fewer keys than the query may see: fall back to an exact scan.
    if (static_cast<int64_t>(s.top.size()) < wanted) collect_exact(probe, visible, s);
  }
  t_last_search_scored += s.scored_count;

  std::sort_heap(s.top.begin(), s.top.end(), HitBetter());  // best first
  for (int64_t i = 0; i < wanted; ++i) ids[i] = s.top[i].id, scores[i] = s.top[i].score;
  *found = static_cast<int32_t>(wanted);
}

void DciIndex::search(const QueryBlock& block, Neighbours out) const {
  static thread_local Scratch scratch;
  Scratch& s = scratch;
  s.prepare(stride_, num_projections_);
  t_last_search_scored = 0;
  if (block.k < 1) {  // no room for results (the kernel rejects top_k < 1 before this)
    std::fill(out.found, out.found + std::max<int64_t>(block.count, 0), 0);
    return;
  }
  for (int64_t i = 0; i < block.count; ++i) {
    const int64_t last_key = block.last_key ? block.last_key[i] : kNoLimit;
    search_one(block.queries + i * dim_, block.k, last_key, s, out.scores + i * block.k, out.ids + i * block.k,
               out.found + i);
  }
}

}  // namespace ice
