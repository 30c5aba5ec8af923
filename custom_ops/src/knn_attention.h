// The kNN path: per (batch, kv-head) one KeyIndex (and, with compensation, one
// TailModel) over the keys the mask allows; per block of queries, the index's
// top_k keys, then softmax and the weighted sum of V over those keys only
// (plus the tail estimate). Memory O(S * (D + index)); no Sq x Sk buffer. Under
// causality the leading query blocks, whose rows see little more than a scan would
// cover, run exactly (CONTRACT.md).
#pragma once

#include "attention_problem.h"
#include "contract.h"

namespace ice {

// Whether this call takes the kNN path. It runs exactly when an index cannot pay or
// cannot honour the call:
//  - Sk < exact_below or top_k >= Sk (the contract);
//  - the index's least work per query (the cluster scan floor, DCI's top_k, an
//    explicit cluster count) is more than an eighth of the keys: on SmolLM2 (2 threads,
//    CPU time) kNN at the default budget was 2.5 % slower than exact at 4K keys;
//  - sinks and the causal window already cover every key;
//  - a softcap, or a sliding window shorter than the keys (the exact path scores
//    only the window, so it is already cheap);
//  - the mask is not a key-padding mask (broadcast shape [B|1, 1, 1, Sk] whose float
//    values are 0 or blocking, i.e. <= -1e30 or -inf): other masks change scores per
//    query, which an index over keys cannot honour;
//  - fewer than 4 * sqrt(Sk) queries share each index (Sq * Hq / Hkv): building costs
//    a few passes of Sk x sqrt(Sk) products, an exact query one pass over Sk keys, so
//    a decoding step or a short chunk runs exactly;
//  - K or V holds a NaN or an infinity (it must reach the outputs as in dense
//    attention; an index would drop it), or magnitudes near the float limit that
//    would overflow the index's sums. A query row with a NaN or inf runs exactly too.
// (The eighth is kMinKeysPerScanned, contract.h.)

bool use_knn(const AttentionProblem& p, const AttentionParams& params);

void knn_attention(const AttentionProblem& p, const AttentionParams& params, const ParallelFor& parallel);

}  // namespace ice
