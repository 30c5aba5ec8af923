// The kNN path: per (batch, kv-head) one KeyIndex (and, with compensation, one
// TailModel) over the keys the mask allows; per block of queries, the index's
// top_k keys, then softmax and the weighted sum of V over those keys only
// (plus the tail estimate). Memory O(S * (D + index)); no Sq x Sk buffer.
#pragma once

#include "attention_problem.h"
#include "contract.h"

namespace ice {

// Whether this call takes the kNN path. Exact attention is used when
//  - Sk < exact_below or top_k >= Sk (the contract), or
//  - the cluster index would scan more than an eighth of the keys (Sk < 8 x its
//    scan budget): measured end to end on SmolLM2 (2 threads, CPU time), kNN at the
//    default budget is 2.5 % slower than exact at 4K keys and 7 % faster at 8K; or
//  - the mask is not a key-padding mask (broadcast shape [B|1, 1, 1, Sk] whose
//    float values are 0 or blocking, i.e. <= -1e30 or -inf): other masks change
//    scores per query, which an index over keys cannot honour, or
//  - too few queries share each index to pay for building it: kNN needs at least
//    4 * sqrt(Sk) queries per kv head (Sq * Hq / Hkv). Building costs a few passes
//    of Sk x sqrt(Sk) products, an exact query one pass over Sk keys, so a
//    decoding step (Sq = 1) or a short chunk always runs exactly, or
//  - K or V holds a NaN or an infinity (it must reach the outputs as in dense
//    attention; an index would drop it). A query row with one runs exactly too.
constexpr int64_t kMinKeysPerScanned = 8;

bool use_knn(const AttentionProblem& p, const AttentionParams& params);

void knn_attention(const AttentionProblem& p, const AttentionParams& params, const ParallelFor& parallel);

}  // namespace ice
