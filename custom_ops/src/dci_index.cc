#include "dci_index.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>

#include "ip_to_l2.h"
#include "kmeans.h"

namespace ice {

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kNoLimit = std::numeric_limits<int64_t>::max();
constexpr int64_t kLanes = 8;  // row padding: dot products run in 8 independent lanes

// The kernel's seedable generator, with the two distributions the projections need.
struct Rng : SplitMix64 {
  using SplitMix64::SplitMix64;
  double uniform() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  double normal() {  // Box-Muller; 1 - u keeps the log finite
    const double radius = std::sqrt(-2.0 * std::log(1.0 - uniform()));
    return radius * std::cos(6.283185307179586 * uniform());
  }
};

// A key scored against a probe. Ordered best first: higher score, then lower slot.
struct Scored {
  float score;
  int32_t slot;
};
// A function object (not a function pointer) so the sorts inline the comparison.
struct Better {
  bool operator()(const Scored& a, const Scored& b) const {
    return a.score > b.score || (a.score == b.score && a.slot < b.slot);
  }
};
constexpr Better better;

// A result: ordered by score, then key index — the order the search returns.
struct Hit {
  float score;
  int64_t id;
};
struct HitBetter {
  bool operator()(const Hit& a, const Hit& b) const {
    return a.score > b.score || (a.score == b.score && a.id < b.id);
  }
};

// Scores `count` consecutive rows (length stride, a multiple of kLanes) against q.
// Eight independent partial sums per row vectorise at any SIMD width without
// -ffast-math; on x86-64 an AVX2/FMA clone is picked at load time (runtime dispatch,
// so the baseline build still runs on any x86-64). Every key score of the index goes
// through this one function, so all paths rank keys identically.
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

// A score times a row's scale (cosine); -inf × 0 must not turn into NaN.
inline float scaled(float score, float scale) {
  const float v = score * scale;
  return std::isnan(v) ? -kInf : v;
}

// Sort keys must be totally ordered: NaN (from NaN inputs) is mapped to +inf.
inline float orderable(float v) { return std::isnan(v) ? kInf : v; }

thread_local int64_t t_last_search_scored = 0;

}  // namespace

// What one descent searches for: a query (search) or a key looking for its parent (build).
struct DciIndex::Probe {
  const float* score_row;    // [stride]: scored against the augmented key rows
  const float* projections;  // [num_projections]: the transformed probe's projections
  int64_t k;                 // results kept; expansion goes on until subtrees hold k keys
  int field_of_view;         // keys expanded per level
  float prop_to_retrieve;
  float prop_to_visit;
  int64_t last_key;          // keys with a larger index are never results
  int64_t max_candidates;            // per level
  const float* row_scale = nullptr;    // [slots] or null: scores are multiplied by it (cosine)
  const float* route_scale = nullptr;  // [slots] or null: the same, for choosing expansions only
};

// Search state, reused across queries so a search allocates nothing once warm.
struct DciIndex::Scratch {
  std::vector<float> query_row;    // [stride] = [q, 0, padding]
  std::vector<float> transformed;  // [stride] = [q/|q|, 0, padding]
  std::vector<float> projections;  // [num_projections]
  std::vector<Scored> level;       // keys scored on the current level
  std::vector<float> cell_scores;  // scores of one cell's rows
  std::vector<Hit> top;            // the best k results so far: a heap, worst in front
  bool keep_level = true;          // false on a query's last level: nothing is expanded
  std::vector<Scored> expandable;
  std::vector<int32_t> frontier;   // parents whose cells the next level visits
  std::vector<uint8_t> counts;     // [composite, cell]: simple indices that have seen a key
  std::vector<uint8_t> seen;       // [cell]: already a candidate
  std::vector<int32_t> left, right;
  std::vector<float> gap;          // [num_projections]: distance to the next entry
  int64_t scored_count = 0;

  void prepare(int64_t stride, int num_projections) {
    query_row.assign(stride, 0.f);
    transformed.assign(stride, 0.f);
    projections.resize(num_projections);
    left.resize(num_projections);
    right.resize(num_projections);
    gap.resize(num_projections);
  }
};

DciIndex::DciIndex(const DciParams& params) : params_(params) {
  auto require = [](bool ok, const char* what) {
    if (!ok) throw std::invalid_argument(std::string("DciParams: ") + what);
  };
  require(params.levels >= 1, "levels must be >= 1");
  require(params.composite_indices >= 1, "composite_indices must be >= 1");
  require(params.simple_indices >= 1 && params.simple_indices <= 255,
          "simple_indices must be in [1, 255]");
  require(params.construction_field_of_view >= 1, "construction_field_of_view must be >= 1");
  require(params.query_field_of_view >= 0, "query_field_of_view must be >= 0");
  require(params.prop_to_retrieve >= 0.f && params.prop_to_retrieve <= 1.f,
          "prop_to_retrieve must be in [0, 1]");
  require(params.construction_prop_to_retrieve >= 0.f && params.construction_prop_to_retrieve <= 1.f,
          "construction_prop_to_retrieve must be in [0, 1]");
  require(params.prop_to_visit > 0.f && params.prop_to_visit <= 1.f, "prop_to_visit must be in (0, 1]");
  require(params.max_candidates >= 0, "max_candidates must be >= 0");
  require(params.exhaustive_cell_size >= 0, "exhaustive_cell_size must be >= 0");
  require(params.exact_scan_below >= 0, "exact_scan_below must be >= 0");
  num_projections_ = params.composite_indices * params.simple_indices;
}

int64_t DciIndex::last_search_scored() { return t_last_search_scored; }

float DciIndex::dot(const float* a, const float* b) const {
  // Eight independent partial sums: the compiler turns this into SIMD lanes of whatever
  // width the target has, without -ffast-math reassociation.
  float acc[kLanes] = {};
  for (int64_t i = 0; i < stride_; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// ---------------------------------------------------------------------------------
// Build

namespace {

// Unit random directions in R^(dim+1) (the augmented space), one row of `stride` each.
std::vector<float> random_directions(int count, int64_t dim, int64_t stride, Rng& rng) {
  std::vector<float> directions(static_cast<size_t>(count) * stride, 0.f);
  for (int p = 0; p < count; ++p) {
    float* d = &directions[static_cast<size_t>(p) * stride];
    double sq = 0;
    for (int64_t i = 0; i <= dim; ++i) {
      d[i] = static_cast<float>(rng.normal());
      sq += static_cast<double>(d[i]) * d[i];
    }
    const float inv = static_cast<float>(1.0 / std::sqrt(sq));
    for (int64_t i = 0; i <= dim; ++i) d[i] *= inv;
  }
  return directions;
}

// A random order of the n keys, cut so that about n^((t+1)/levels) keys lie on or above
// level t (top = 0): each cell then holds about n^(1/levels) children. Returns the cuts
// (level t is order[cut[t], cut[t+1])); empty levels are dropped.
std::vector<int32_t> level_order(int32_t n, int levels, Rng& rng, std::vector<int32_t>& order) {
  order.resize(n);
  std::iota(order.begin(), order.end(), 0);
  for (int32_t i = n - 1; i > 0; --i) std::swap(order[i], order[rng.below(static_cast<uint64_t>(i) + 1)]);
  std::vector<int32_t> cut{0};
  for (int t = 0; t < levels; ++t) {
    const double share = static_cast<double>(t + 1) / levels;
    int32_t upto = t + 1 == levels ? n : static_cast<int32_t>(std::lround(std::pow(n, share)));
    upto = std::min(n, std::max(upto, cut.back()));
    if (upto > cut.back()) cut.push_back(upto);
  }
  return cut;
}

}  // namespace

// The build's copies of the allowed keys, indexed by "position" (allowed-key order),
// until each is placed in its slot.
struct DciIndex::Staging {
  const KeySet& keys;
  std::vector<int64_t> ids;      // [n] original key index
  std::vector<float> rows;       // [n, stride] augmented keys
  std::vector<float> proj;       // [n, P] their projections
  std::vector<int32_t> order;    // level order of the positions (level_order)
  std::vector<float> slot_proj;  // [n, P] projections in slot order: the cells' sort keys
  std::vector<int32_t> sort_order;  // build_cell's scratch
};

void DciIndex::build(const KeySet& keys, uint64_t seed) {
  if (keys.n < 0 || keys.dim < 1 || (keys.n > 0 && !keys.keys))
    throw std::invalid_argument("DciIndex::build: bad KeySet");
  dim_ = keys.dim;
  stride_ = (dim_ + 1 + kLanes - 1) / kLanes * kLanes;
  Rng rng(seed);
  directions_ = random_directions(num_projections_, dim_, stride_, rng);
  Staging staging = stage(keys);
  const int32_t n = static_cast<int32_t>(staging.ids.size());
  level_begin_ = level_order(n, params_.levels, rng, staging.order);  // slots go level by level too
  allocate_slots(n);
  staging.slot_proj.resize(static_cast<size_t>(n) * num_projections_);

  if (n > 0) {
    for (int32_t i = 0; i < level_begin_[1]; ++i) place(staging, staging.order[i], i);
    build_cell(0, level_begin_[1], staging);
  }
  Scratch scratch;
  scratch.prepare(stride_, num_projections_);
  for (int t = 1; t < num_levels(); ++t) attach_level(t, staging, scratch);
  sum_subtrees();
}

DciIndex::Staging DciIndex::stage(const KeySet& keys) const {
  Staging staging{keys, {}, {}, {}, {}, {}, {}};
  for (int64_t j = 0; j < keys.n; ++j)
    if (!keys.allowed || keys.allowed[j]) staging.ids.push_back(j);
  if (staging.ids.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max()))
    throw std::invalid_argument("DciIndex::build: too many keys");
  const size_t n = staging.ids.size();
  const int P = num_projections_;
  const float max_sq = ip_to_l2::max_squared_norm(keys.keys, keys.n, dim_, keys.allowed);
  staging.rows.assign(n * stride_, 0.f);
  staging.proj.resize(n * P);
  for (size_t a = 0; a < n; ++a) {
    float* row = &staging.rows[a * stride_];
    ip_to_l2::transform_key(keys.keys + staging.ids[a] * dim_, dim_, max_sq, row);
    for (int p = 0; p < P; ++p) staging.proj[a * P + p] = orderable(dot(row, &directions_[static_cast<size_t>(p) * stride_]));
  }
  return staging;
}

void DciIndex::allocate_slots(int32_t n) {
  rows_.assign(static_cast<size_t>(n) * stride_, 0.f);
  key_id_.assign(n, 0);
  child_begin_.assign(n, 0);
  child_end_.assign(n, 0);
  subtree_size_.assign(n, 1);
  subtree_min_id_.assign(n, 0);
  // Sorted projections serve only cells that are walked (larger than exhaustive_cell_size).
  may_walk_ = params_.exhaustive_cell_size < n;
  sorted_value_.assign(may_walk_ ? static_cast<size_t>(num_projections_) * n : 0, 0.f);
  sorted_local_.assign(may_walk_ ? static_cast<size_t>(num_projections_) * n : 0, 0);
  slots_by_id_.assign(n, 0);
  inv_norm_.assign(n, 0.f);
}

void DciIndex::place(Staging& staging, int32_t position, int32_t slot) {
  const int P = num_projections_;
  std::copy_n(&staging.rows[static_cast<size_t>(position) * stride_], stride_, &rows_[static_cast<size_t>(slot) * stride_]);
  std::copy_n(&staging.proj[static_cast<size_t>(position) * P], P, &staging.slot_proj[static_cast<size_t>(slot) * P]);
  const int64_t id = staging.ids[position];
  key_id_[slot] = id;
  subtree_min_id_[slot] = id;
  const float norm = std::sqrt(ip_to_l2::squared_norm(staging.keys.keys + id * dim_, dim_));
  inv_norm_[slot] = norm > 0.f ? 1.f / norm : 0.f;
  slots_by_id_[position] = slot;
}

// Hangs the keys of level t under their parents on level t - 1 (DciParams::parent says
// which, found by searching the levels built so far), children of one parent in
// consecutive slots, parents in slot order.
void DciIndex::attach_level(int t, Staging& staging, Scratch& scratch) {
  const int32_t begin = level_begin_[t], end = level_begin_[t + 1];
  const int32_t parents_begin = level_begin_[t - 1];
  std::vector<int32_t> parent_of(end - begin);
  for (int32_t i = begin; i < end; ++i) parent_of[i - begin] = find_parent(staging, staging.order[i], t - 1, scratch);

  std::vector<int32_t> fill(begin - parents_begin + 1, 0);  // next free slot per parent
  for (int32_t parent : parent_of) ++fill[parent - parents_begin + 1];
  fill[0] = begin;
  std::partial_sum(fill.begin(), fill.end(), fill.begin());
  for (int32_t p = parents_begin; p < begin; ++p) {
    child_begin_[p] = fill[p - parents_begin];
    child_end_[p] = fill[p - parents_begin + 1];
  }
  for (int32_t i = begin; i < end; ++i) place(staging, staging.order[i], fill[parent_of[i - begin] - parents_begin]++);
  for (int32_t p = parents_begin; p < begin; ++p) build_cell(child_begin_[p], child_end_[p], staging);
}

int32_t DciIndex::find_parent(const Staging& staging, int32_t position, int parent_level, Scratch& s) const {
  const int P = num_projections_;
  const float* row = &staging.rows[static_cast<size_t>(position) * stride_];
  const float* projections = &staging.proj[static_cast<size_t>(position) * P];
  if (params_.parent != DciParams::Parent::nearest) {  // the key probes as a query would
    ip_to_l2::transform_query(row, dim_, s.transformed.data());
    for (int p = 0; p < P; ++p)
      s.projections[p] = orderable(dot(s.transformed.data(), &directions_[static_cast<size_t>(p) * stride_]));
    row = s.transformed.data();
    projections = s.projections.data();
  }
  const Probe probe{row, projections, /*k=*/0, params_.construction_field_of_view,
                    params_.construction_prop_to_retrieve, /*prop_to_visit=*/1.f, kNoLimit, kNoLimit,
                    params_.parent == DciParams::Parent::direction ? inv_norm_.data() : nullptr};
  descend(probe, parent_level, s);
  // Nothing is scored only when every projection is NaN: any parent will do.
  if (s.level.empty()) return level_begin_[parent_level];
  return std::min_element(s.level.begin(), s.level.end(), better)->slot;
}

// Children sit at higher slots than their parent: one backward pass sums subtrees.
void DciIndex::sum_subtrees() {
  for (int32_t s = static_cast<int32_t>(key_id_.size()) - 1; s >= 0; --s)
    for (int32_t c = child_begin_[s]; c < child_end_[s]; ++c) {
      subtree_size_[s] += subtree_size_[c];
      subtree_min_id_[s] = std::min(subtree_min_id_[s], subtree_min_id_[c]);
    }
}

void DciIndex::build_cell(int32_t begin, int32_t end, Staging& staging) {
  if (end - begin <= params_.exhaustive_cell_size) return;  // scanned whole, never walked
  const int P = num_projections_;
  const size_t n = key_id_.size();
  const std::vector<float>& slot_proj = staging.slot_proj;
  std::vector<int32_t>& order = staging.sort_order;
  order.resize(end - begin);
  for (int p = 0; p < P; ++p) {
    auto value = [&](int32_t local) { return slot_proj[static_cast<size_t>(begin + local) * P + p]; };
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
      return value(a) < value(b) || (value(a) == value(b) && a < b);
    });
    for (size_t j = 0; j < order.size(); ++j) {
      sorted_value_[p * n + begin + j] = value(order[j]);
      sorted_local_[p * n + begin + j] = order[j];
    }
  }
}

// ---------------------------------------------------------------------------------
// Search

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
