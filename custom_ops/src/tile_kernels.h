// Dense building blocks shared by every attention path: keys packed in panels,
// block score products, weighted value sums and softmax helpers. Each is a small
// matrix product with a register-tiled, vectorised inner loop (see simd.h).
#pragma once

#include <cstdint>

namespace ice {

// Keys are packed in panels of kPanelWidth keys stored as [dim][kPanelWidth], so a
// score micro-kernel reads one contiguous vector pair per dimension.
constexpr int64_t kPanelWidth = 16;

inline int64_t panel_count(int64_t n) { return (n + kPanelWidth - 1) / kPanelWidth; }
inline int64_t padded_to_panels(int64_t n) { return panel_count(n) * kPanelWidth; }

// Packs rows ids[0..n) of `src` ([*, dim], row stride ld) into panel_count(n) panels;
// ids == nullptr means rows 0..n-1. Slots past n are zero.
void pack_panels(const float* src, int64_t ld, int64_t dim, const int64_t* ids, int64_t n,
                 float* panels);

// out[i][j] = sum_d a[i][d] * key_j[d] for i < rows, j < npanels*kPanelWidth.
// Each score is one fused multiply-add chain over d in order, whatever its place
// in the tile, so a score never depends on how rows were grouped.
void score_panels(const float* a, int64_t lda, int64_t rows, const float* panels,
                  int64_t npanels, int64_t dim, float* out, int64_t ldo);

// acc[i][c] += sum_{j < nkeys} w[i][j] * v[j][c] for i < rows, c < dv.
void accumulate_weighted(const float* w, int64_t ldw, int64_t rows, const float* v,
                         int64_t ldv, int64_t nkeys, int64_t dv, float* acc, int64_t ldacc);

// y[c] += a * x[c].
void axpy(float a, const float* x, int64_t n, float* y);

// x[c] *= a.
void scale_in_place(float a, int64_t n, float* x);

// max_j x[j]: -inf for n == 0, NaN if any x[j] is NaN (dense softmax's behaviour).
float max_of(const float* x, int64_t n);

// x[j] = exp(x[j] - shift) in place; returns the sum. shift must be finite.
float exp_shifted_sum(float shift, int64_t n, float* x);

// Writes the j < n with x[j] > threshold to out (ascending); returns how many.
int64_t indices_above(const float* x, int64_t n, float threshold, int32_t* out);

// sum_d a[d] * b[d].
float dot(const float* a, const float* b, int64_t n);

// out[j] = q . rows[ids[j]] for j < n (rows: [*, dim], row stride dim).
void gather_dots(const float* q, const float* rows, const int64_t* ids, int64_t n, int64_t dim, float* out);

// y[c] += sum_{j < n} w[j] * rows[ids[j]][c] (rows: [*, dim], row stride dim).
void gather_accumulate(const float* w, const float* rows, const int64_t* ids, int64_t n, int64_t dim, float* y);

}  // namespace ice

namespace ice {
// out[c] = mean over the n rows of v ([n, dv], row stride ld) (zeros when n == 0).
void mean_rows(const float* v, int64_t ld, int64_t n, int64_t dv, float* out);
}  // namespace ice
