#include "attention_call.h"

#include <algorithm>
#include <functional>

#include "exact_attention.h"
#include "knn_attention.h"
#include "run_stats.h"

namespace ice {
namespace {

// kNN mode writes the mean of V to a row with no allowed key; with empty_rows =
// "zero" such rows get 0. kNN masks only remove keys, so a row sees nothing exactly
// when no allowed key lies at or before its last causal one.
void zero_rows_without_keys(const AttentionProblem& p) {
  const AttentionShape& sh = p.shape;
  const MaskView& m = p.mask;
  for (int64_t b = 0; b < sh.batch; ++b) {
    int64_t first_kept = 0;
    for (; m.present() && first_kept < sh.k_len; ++first_kept) {
      const int64_t at = b * m.stride[0] + first_kept * m.stride[3];
      if (m.kind == MaskView::Kind::kBool ? static_cast<const uint8_t*>(m.data)[at] != 0
                                          : static_cast<const float*>(m.data)[at] == 0.0f)
        break;
    }
    for (int64_t h = 0; h < sh.q_heads; ++h)
      for (int64_t i = 0; i < sh.q_len; ++i)
        if (p.key_end(i) <= first_kept) std::fill_n(p.y_rows(b, h) + i * sh.v_dim, sh.v_dim, 0.0f);
  }
}

void run_problem(const AttentionProblem& problem, const AttentionParams& params, const ParallelFor& parallel) {
  if (!use_knn(problem, params)) {
    exact_attention(problem, parallel);
    run_stats::count_exact_call(problem.shape);
    return;
  }
  knn_attention(problem, params, parallel);
  if (problem.zero_empty_rows) zero_rows_without_keys(problem);
}

}  // namespace

void run_call(AttentionProblem& problem, const std::vector<int64_t>& key_lengths, const AttentionParams& params,
              const ParallelFor& parallel) {
  const bool uniform = std::adjacent_find(key_lengths.begin(), key_lengths.end(), std::not_equal_to<>()) ==
                       key_lengths.end();
  if (uniform) {
    if (!key_lengths.empty()) problem.shape.k_len = key_lengths.front();
    return run_problem(problem, params, parallel);
  }
  for (int64_t b = 0; b < problem.shape.batch; ++b)
    run_problem(problem.batch_element(b, key_lengths[b]), params, parallel);
}

}  // namespace ice
