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

// As score_panels over the first `keys` keys (panel_count(keys) panels), and
// row_max[i] = the largest of row i's scores (NaN if one is NaN). The slots past
// `keys` in the last panel are written too but do not count.
void score_panels_max(const float* a, int64_t lda, int64_t rows, const float* panels, int64_t keys,
                      int64_t dim, float* out, int64_t ldo, float* row_max);

// Values are packed in strips of kStripWidth columns stored as [key][kStripWidth]
// (strip_count(dv) strips of n keys each), so the weighted sum reads one contiguous
// run per strip. Rows ids[0..n) of v, or rows 0..n-1 when ids == nullptr; columns
// past dv are zero.
constexpr int64_t kStripWidth = 16;
inline int64_t strip_count(int64_t dv) { return (dv + kStripWidth - 1) / kStripWidth; }
void pack_strips(const float* v, int64_t ld, int64_t n, int64_t dv, float* strips, const int64_t* ids = nullptr);

// acc[i][c] += sum_{j < nkeys} w[i][j] * v_j[c] for i < rows, c < strips*kStripWidth,
// where strip t of v starts at strips + t * strip_stride (and key j is kStripWidth
// floats further per key).
void accumulate_weighted_strips(const float* w, int64_t ldw, int64_t rows, const float* strips,
                                int64_t strip_stride, int64_t nstrips, int64_t nkeys, float* acc, int64_t ldacc);

// y[c] += a * x[c].
void axpy(float a, const float* x, int64_t n, float* y);

// x[c] *= a.
void scale_in_place(float a, int64_t n, float* x);

// max_j x[j]: -inf for n == 0, NaN if any x[j] is NaN (dense softmax's behaviour).
float max_of(const float* x, int64_t n);

// Row r of x ([rows][ld]): x[r][j] = 2^(x[r][j] - shift[r]) for j < n and sums[r] =
// their sum; shift[r] must be at least every x[r][j] (the row maximum). A row whose
// shift is -inf (nothing visible) is left alone with sum 0.
void exp2_shifted_rows(float* x, int64_t ld, int64_t rows, int64_t n, const float* shift, float* sums);

// x[j] = exp(x[j] - shift) for j < n; returns their sum. shift must be at least
// every x[j] (the maximum), as in a softmax.
float exp_shifted(float* x, int64_t n, float shift);

// Whether no x[j] is NaN or infinite.
bool all_finite(const float* x, int64_t n);

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
