// Running one call of the op on its path: exact attention, or kNN where use_knn()
// says an index pays (then the contract's empty_rows rule applied afterwards).
#pragma once

#include <cstdint>
#include <vector>

#include "attention_problem.h"
#include "contract.h"
#include "parallel_for.h"

namespace ice {

// The call: as one problem when every batch element holds as many keys (the usual
// case, batch 1 included), else element by element, each deciding its own path on
// the keys it has. key_lengths: empty (all Sk) or [B].
void run_call(AttentionProblem& problem, const std::vector<int64_t>& key_lengths, const AttentionParams& params,
              const ParallelFor& parallel);

}  // namespace ice
