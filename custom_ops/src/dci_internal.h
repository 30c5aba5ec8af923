// What the DCI index's build (dci_index.cc) and search (dci_search.cc) share: the
// scoring routine every key score goes through, the orderings, and the probe and
// scratch of a descent. Private to those two files.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "dci_index.h"
#include "kmeans.h"

namespace ice {
namespace dci {

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
void score_rows(const float* q, const float* rows, int64_t count, int64_t stride, float* out);

// A score times a row's scale (cosine); -inf × 0 must not turn into NaN.
inline float scaled(float score, float scale) {
  const float v = score * scale;
  return std::isnan(v) ? -kInf : v;
}

// Sort keys must be totally ordered: NaN (from NaN inputs) is mapped to +inf.
inline float orderable(float v) { return std::isnan(v) ? kInf : v; }

}  // namespace dci

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
  std::vector<dci::Scored> level;  // keys scored on the current level
  std::vector<float> cell_scores;  // scores of one cell's rows
  std::vector<dci::Hit> top;       // the best k results so far: a heap, worst in front
  bool keep_level = true;          // false on a query's last level: nothing is expanded
  std::vector<dci::Scored> expandable;
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

}  // namespace ice
