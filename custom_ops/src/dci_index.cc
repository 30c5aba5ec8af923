#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>

#include "dci_index.h"
#include "dci_internal.h"
#include "ip_to_l2.h"

namespace ice {

using namespace dci;

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

float DciIndex::dot(const float* a, const float* b) const {
  // Eight independent partial sums: the compiler turns this into SIMD lanes of whatever
  // width the target has, without -ffast-math reassociation.
  float acc[kLanes] = {};
  for (int64_t i = 0; i < stride_; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

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

}  // namespace ice
