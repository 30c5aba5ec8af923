#include "tile_kernels.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "simd.h"

namespace ice {
namespace {

constexpr int kRows = 6;  // query rows per register tile (12 accumulators of 16 registers)
constexpr int64_t kMaxRowsPerCall = 64;  // score_panels_max keeps one vector of maxima per row

// A row's running maximum as score_panels_max folds it: lane maxima that skip NaN
// (one vmaxps each) and, beside them, whether some score was NaN, which makes the row's
// maximum NaN at the end (cheaper than a NaN-propagating maximum per vector).
struct RowMax {
  v8f best;
  v8i nan;
};

ICE_INLINE v8f max_skipping_nan(v8f a, v8f b) { return a > b ? a : b; }  // b where either is NaN

// R rows x 16 keys of scores, accumulators held in registers over the whole d loop.
// With `row_max`, also folds each row's scores of the first `valid` keys into it.
template <int R, bool kMax>
ICE_INLINE void score_micro(const float* a, int64_t lda, const float* panel, int64_t dim,
                            float* out, int64_t ldo, int64_t valid, RowMax* row_max) {
  v8f lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = splat8(0.0f);
  for (int64_t d = 0; d < dim; ++d) {
    const v8f k_lo = load8(panel + d * kPanelWidth);
    const v8f k_hi = load8(panel + d * kPanelWidth + 8);
    for (int r = 0; r < R; ++r) {
      const float x = a[r * lda + d];  // scalar op vector: a broadcast
      lo[r] += x * k_lo;
      hi[r] += x * k_hi;
    }
  }
  for (int r = 0; r < R; ++r) {
    store8(out + r * ldo, lo[r]);
    store8(out + r * ldo + 8, hi[r]);
  }
  if (kMax) {
    if (valid < kPanelWidth) {  // the last panel: its padding slots do not count
      const v8i lane = {0, 1, 2, 3, 4, 5, 6, 7};
      const v8i keep_lo = lane < static_cast<int32_t>(valid), keep_hi = lane + 8 < static_cast<int32_t>(valid);
      const v8i minus_inf = (v8i)splat8(-std::numeric_limits<float>::infinity());
      for (int r = 0; r < R; ++r) {
        lo[r] = (v8f)(((v8i)lo[r] & keep_lo) | (minus_inf & ~keep_lo));
        hi[r] = (v8f)(((v8i)hi[r] & keep_hi) | (minus_inf & ~keep_hi));
      }
    }
    for (int r = 0; r < R; ++r) {
      row_max[r].best = max_skipping_nan(row_max[r].best, max_skipping_nan(lo[r], hi[r]));
      row_max[r].nan |= (lo[r] != lo[r]) | (hi[r] != hi[r]);
    }
  }
}

template <bool kMax>
ICE_INLINE void score_rows(const float* a, int64_t lda, int64_t rows, const float* panel, int64_t dim,
                           float* out, int64_t ldo, int64_t valid, RowMax* row_max) {
  // (never offsets a null pointer: UBSan would rightly object)
  auto maxes = [row_max](int64_t i) -> RowMax* {
    if constexpr (kMax) return row_max + i;
    return nullptr;
  };
  int64_t i = 0;
  for (; i + kRows <= rows; i += kRows)
    score_micro<kRows, kMax>(a + i * lda, lda, panel, dim, out + i * ldo, ldo, valid, maxes(i));
  switch (rows - i) {
    case 5: score_micro<5, kMax>(a + i * lda, lda, panel, dim, out + i * ldo, ldo, valid, maxes(i)); break;
    case 4: score_micro<4, kMax>(a + i * lda, lda, panel, dim, out + i * ldo, ldo, valid, maxes(i)); break;
    case 3: score_micro<3, kMax>(a + i * lda, lda, panel, dim, out + i * ldo, ldo, valid, maxes(i)); break;
    case 2: score_micro<2, kMax>(a + i * lda, lda, panel, dim, out + i * ldo, ldo, valid, maxes(i)); break;
    case 1: score_micro<1, kMax>(a + i * lda, lda, panel, dim, out + i * ldo, ldo, valid, maxes(i)); break;
    default: break;
  }
}

// R rows x (8*NV) value columns: acc += w . v over nkeys keys.
template <int R, int NV>
ICE_INLINE void weighted_micro(const float* w, int64_t ldw, const float* v, int64_t ldv,
                               int64_t nkeys, float* acc, int64_t ldacc) {
  v8f sum[R][NV];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) sum[r][c] = load8(acc + r * ldacc + 8 * c);
  for (int64_t j = 0; j < nkeys; ++j) {
    v8f vj[NV];
    for (int c = 0; c < NV; ++c) vj[c] = load8(v + j * ldv + 8 * c);
    for (int r = 0; r < R; ++r) {
      const float x = w[r * ldw + j];
      for (int c = 0; c < NV; ++c) sum[r][c] += x * vj[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < NV; ++c) store8(acc + r * ldacc + 8 * c, sum[r][c]);
}

// One tile of R rows against every strip of values.
template <int R>
ICE_INLINE void weighted_strips_tile(const float* w, int64_t ldw, const float* strips, int64_t strip_stride,
                                     int64_t nstrips, int64_t nkeys, float* acc, int64_t ldacc) {
  for (int64_t t = 0; t < nstrips; ++t)
    weighted_micro<R, 2>(w, ldw, strips + t * strip_stride, kStripWidth, nkeys, acc + t * kStripWidth, ldacc);
}

#if ICE_WIDE_KERNELS
// The weighted sum with AVX-512: a strip of 16 values is one register, so a tile of 8
// rows x 2 strips holds 16 accumulators and each broadcast weight feeds 32 columns
// (the 6 x 16 tile above: 16). Every accumulator column is the same fused multiply-add
// chain over the keys in the same order, so results are bitwise those of the narrow
// kernel. (A wide score kernel, 16 rows x 16 keys, measured slower than the narrow one.)
constexpr int kWideWeightedRows = 8;

// R rows x NS strips of values: acc += w . v over nkeys keys.
template <int R, int NS>
ICE_INLINE void weighted_micro_wide(const float* w, int64_t ldw, const float* strips, int64_t strip_stride,
                                    int64_t nkeys, float* acc, int64_t ldacc) {
  v16f sum[R][NS];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NS; ++t) sum[r][t] = load16(acc + r * ldacc + t * kStripWidth);
  for (int64_t j = 0; j < nkeys; ++j) {
    v16f vj[NS];
    for (int t = 0; t < NS; ++t) vj[t] = load16(strips + t * strip_stride + j * kStripWidth);
    for (int r = 0; r < R; ++r) {
      const float x = w[r * ldw + j];
      for (int t = 0; t < NS; ++t) sum[r][t] += x * vj[t];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < NS; ++t) store16(acc + r * ldacc + t * kStripWidth, sum[r][t]);
}

template <int R>
ICE_INLINE void weighted_strips_tile_wide(const float* w, int64_t ldw, const float* strips, int64_t strip_stride,
                                          int64_t nstrips, int64_t nkeys, float* acc, int64_t ldacc) {
  int64_t t = 0;
  for (; t + 2 <= nstrips; t += 2)
    weighted_micro_wide<R, 2>(w, ldw, strips + t * strip_stride, strip_stride, nkeys, acc + t * kStripWidth, ldacc);
  if (t < nstrips)
    weighted_micro_wide<R, 1>(w, ldw, strips + t * strip_stride, strip_stride, nkeys, acc + t * kStripWidth, ldacc);
}

ICE_WIDE void accumulate_weighted_strips_wide(const float* w, int64_t ldw, int64_t rows, const float* strips,
                                              int64_t strip_stride, int64_t nstrips, int64_t nkeys, float* acc,
                                              int64_t ldacc) {
  int64_t i = 0;
  for (; i + kWideWeightedRows <= rows; i += kWideWeightedRows)
    weighted_strips_tile_wide<kWideWeightedRows>(w + i * ldw, ldw, strips, strip_stride, nstrips, nkeys,
                                                 acc + i * ldacc, ldacc);
  if (rows - i >= 4) {
    weighted_strips_tile_wide<4>(w + i * ldw, ldw, strips, strip_stride, nstrips, nkeys, acc + i * ldacc, ldacc);
    i += 4;
  }
  if (rows - i >= 2) {
    weighted_strips_tile_wide<2>(w + i * ldw, ldw, strips, strip_stride, nstrips, nkeys, acc + i * ldacc, ldacc);
    i += 2;
  }
  if (rows - i >= 1)
    weighted_strips_tile_wide<1>(w + i * ldw, ldw, strips, strip_stride, nstrips, nkeys, acc + i * ldacc, ldacc);
}
#endif

// x[j] = 2^(x[j] - shift) for j in [j0, n), 8 at a time (a last partial vector padded
// with -inf), each vector added to `total` in turn.
ICE_INLINE void exp2_shifted_from(float* x, int64_t j0, int64_t n, float shift, v8f& total) {
  const v8f s = splat8(shift);
  int64_t j = j0;
  for (; j + 8 <= n; j += 8) {
    const v8f e = exp2_lanes(load8(x + j) - s);
    store8(x + j, e);
    total += e;
  }
  if (j < n) {
    v8f rest = splat8(-std::numeric_limits<float>::infinity());
    for (int64_t t = 0; j + t < n; ++t) rest[t] = x[j + t];
    const v8f e = exp2_lanes(rest - s);
    for (int64_t t = 0; j + t < n; ++t) x[j + t] = e[t];
    total += e;
  }
}

#if ICE_WIDE_KERNELS
// As exp2_shifted_rows, 16 exponentials per instruction; each half is added to the
// row's 8-lane sum in the narrow kernel's order, so sums are bitwise the same.
ICE_WIDE void exp2_shifted_rows_wide(float* x, int64_t ld, int64_t rows, int64_t n, const float* shift,
                                     float* sums) {
  for (int64_t r = 0; r < rows; ++r) {
    if (shift[r] == -std::numeric_limits<float>::infinity()) {
      sums[r] = 0.0f;
      continue;
    }
    float* row = x + r * ld;
    const v16f s = splat16(shift[r]);
    v8f total = splat8(0.0f);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      const v16f e = exp2_lanes(load16(row + j) - s);
      store16(row + j, e);
      v8f half[2];
      std::memcpy(half, &e, sizeof e);
      total += half[0];
      total += half[1];
    }
    exp2_shifted_from(row, j, n, shift[r], total);
    sums[r] = hsum8(total);
  }
}
#endif

}  // namespace

void pack_strips(const float* v, int64_t ld, int64_t n, int64_t dv, float* strips, const int64_t* ids) {
  const int64_t nstrips = strip_count(dv);
  for (int64_t t = 0; t < nstrips; ++t) {
    float* strip = strips + t * n * kStripWidth;
    const int64_t width = std::min(kStripWidth, dv - t * kStripWidth);
    for (int64_t j = 0; j < n; ++j) {
      const float* row = v + (ids ? ids[j] : j) * ld + t * kStripWidth;
      float* slot = strip + j * kStripWidth;
      if (width == kStripWidth) {  // a fixed-size copy the compiler inlines (no memmove call per key)
        std::memcpy(slot, row, sizeof(float) * kStripWidth);
      } else {
        std::copy_n(row, width, slot);
        std::fill(slot + width, slot + kStripWidth, 0.0f);
      }
    }
  }
}

ICE_DISPATCH
void accumulate_weighted_strips(const float* w, int64_t ldw, int64_t rows, const float* strips,
                                int64_t strip_stride, int64_t nstrips, int64_t nkeys, float* acc, int64_t ldacc) {
#if ICE_WIDE_KERNELS
  if (wide_vectors_available())
    return accumulate_weighted_strips_wide(w, ldw, rows, strips, strip_stride, nstrips, nkeys, acc, ldacc);
#endif
  int64_t i = 0;
  for (; i + kRows <= rows; i += kRows)
    weighted_strips_tile<kRows>(w + i * ldw, ldw, strips, strip_stride, nstrips, nkeys, acc + i * ldacc, ldacc);
  switch (rows - i) {
    case 5: weighted_strips_tile<5>(w + i * ldw, ldw, strips, strip_stride, nstrips, nkeys, acc + i * ldacc, ldacc); break;
    case 4: weighted_strips_tile<4>(w + i * ldw, ldw, strips, strip_stride, nstrips, nkeys, acc + i * ldacc, ldacc); break;
    case 3: weighted_strips_tile<3>(w + i * ldw, ldw, strips, strip_stride, nstrips, nkeys, acc + i * ldacc, ldacc); break;
    case 2: weighted_strips_tile<2>(w + i * ldw, ldw, strips, strip_stride, nstrips, nkeys, acc + i * ldacc, ldacc); break;
    case 1: weighted_strips_tile<1>(w + i * ldw, ldw, strips, strip_stride, nstrips, nkeys, acc + i * ldacc, ldacc); break;
    default: break;
  }
}

void pack_panels(const float* src, int64_t ld, int64_t dim, const int64_t* ids, int64_t n,
                 float* panels) {
  for (int64_t j = 0; j < n; ++j) {
    const float* row = src + (ids ? ids[j] : j) * ld;
    float* slot = panels + (j / kPanelWidth) * kPanelWidth * dim + j % kPanelWidth;
    for (int64_t d = 0; d < dim; ++d) slot[d * kPanelWidth] = row[d];
  }
  // Only the last panel's slots past n need zeros (the caller's buffer may be fresh).
  for (int64_t j = n; j < padded_to_panels(n); ++j) {
    float* slot = panels + (j / kPanelWidth) * kPanelWidth * dim + j % kPanelWidth;
    for (int64_t d = 0; d < dim; ++d) slot[d * kPanelWidth] = 0.0f;
  }
}

ICE_DISPATCH
void score_panels(const float* a, int64_t lda, int64_t rows, const float* panels,
                  int64_t npanels, int64_t dim, float* out, int64_t ldo) {
  for (int64_t p = 0; p < npanels; ++p)
    score_rows<false>(a, lda, rows, panels + p * kPanelWidth * dim, dim, out + p * kPanelWidth, ldo, kPanelWidth,
                      nullptr);
}

ICE_DISPATCH
void score_panels_max(const float* a, int64_t lda, int64_t rows, const float* panels, int64_t keys,
                      int64_t dim, float* out, int64_t ldo, float* row_max) {
  for (int64_t i0 = 0; i0 < rows; i0 += kMaxRowsPerCall) {
    const int64_t n = std::min(kMaxRowsPerCall, rows - i0);
    RowMax best[kMaxRowsPerCall];
    for (int64_t r = 0; r < n; ++r) best[r] = {splat8(-std::numeric_limits<float>::infinity()), v8i{}};
    for (int64_t p = 0; p < panel_count(keys); ++p)
      score_rows<true>(a + i0 * lda, lda, n, panels + p * kPanelWidth * dim, dim, out + i0 * ldo + p * kPanelWidth,
                       ldo, keys - p * kPanelWidth, best);
    for (int64_t r = 0; r < n; ++r) {
      bool nan = false;
      for (int lane = 0; lane < 8; ++lane) nan |= best[r].nan[lane] != 0;
      row_max[i0 + r] = nan ? std::numeric_limits<float>::quiet_NaN() : hmax8(best[r].best);
    }
  }
}

ICE_DISPATCH
void axpy(float a, const float* __restrict x, int64_t n, float* __restrict y) {
  for (int64_t c = 0; c < n; ++c) y[c] += a * x[c];
}

ICE_DISPATCH
void scale_in_place(float a, int64_t n, float* x) {
  for (int64_t c = 0; c < n; ++c) x[c] *= a;
}

ICE_DISPATCH
float max_of(const float* x, int64_t n) {
  v8f m = splat8(-std::numeric_limits<float>::infinity());
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) m = max8(m, load8(x + j));
  float best = hmax8(m);
  for (; j < n; ++j) best = (x[j] > best || x[j] != x[j]) ? x[j] : best;
  return best;
}

ICE_DISPATCH
void exp2_shifted_rows(float* x, int64_t ld, int64_t rows, int64_t n, const float* shift, float* sums) {
#if ICE_WIDE_KERNELS
  if (wide_vectors_available()) return exp2_shifted_rows_wide(x, ld, rows, n, shift, sums);
#endif
  for (int64_t r = 0; r < rows; ++r) {
    if (shift[r] == -std::numeric_limits<float>::infinity()) {
      sums[r] = 0.0f;
      continue;
    }
    v8f total = splat8(0.0f);
    exp2_shifted_from(x + r * ld, 0, n, shift[r], total);
    sums[r] = hsum8(total);
  }
}

ICE_DISPATCH
float exp_shifted(float* x, int64_t n, float shift) {
  // exp(t) = 2^(t log2 e): the base-2 exponential of the exact path.
  const v8f s = splat8(shift), log2e = splat8(1.44269504088896341f);
  v8f total = splat8(0.0f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const v8f e = exp2_lanes((load8(x + j) - s) * log2e);
    store8(x + j, e);
    total += e;
  }
  if (j < n) {  // the tail through the same vector code, padded with -inf
    v8f rest = splat8(-std::numeric_limits<float>::infinity());
    for (int64_t t = 0; j + t < n; ++t) rest[t] = x[j + t];
    const v8f e = exp2_lanes((rest - s) * log2e);
    for (int64_t t = 0; j + t < n; ++t) x[j + t] = e[t];
    total += e;
  }
  return hsum8(total);
}

ICE_DISPATCH
bool all_finite(const float* x, int64_t n) {
  // x - x is 0 for finite x and NaN otherwise; NaN spreads through the sum.
  v8f acc = splat8(0.0f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const v8f v = load8(x + j);
    acc += v - v;
  }
  float rest = hsum8(acc);
  for (; j < n; ++j) rest += x[j] - x[j];
  return rest == 0.0f;
}

ICE_DISPATCH
float dot(const float* a, const float* b, int64_t n) {
  v8f sum = splat8(0.0f);
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) sum += load8(a + d) * load8(b + d);
  float total = hsum8(sum);
  for (; d < n; ++d) total += a[d] * b[d];
  return total;
}

ICE_DISPATCH
void gather_dots(const float* q, const float* rows, const int64_t* ids, int64_t n, int64_t dim, float* out) {
  for (int64_t j = 0; j < n; ++j) {
    const float* row = rows + ids[j] * dim;
    v8f sum = splat8(0.0f);
    int64_t d = 0;
    for (; d + 8 <= dim; d += 8) sum += load8(q + d) * load8(row + d);
    float total = hsum8(sum);
    for (; d < dim; ++d) total += q[d] * row[d];
    out[j] = total;
  }
}

ICE_DISPATCH
void gather_accumulate(const float* w, const float* rows, const int64_t* ids, int64_t n, int64_t dim, float* y) {
  int64_t c = 0;
  for (; c + 32 <= dim; c += 32) {  // 4 vectors of y stay in registers over all rows
    v8f acc[4];
    for (int t = 0; t < 4; ++t) acc[t] = load8(y + c + 8 * t);
    for (int64_t j = 0; j < n; ++j) {
      const float* row = rows + ids[j] * dim + c;
      const float wj = w[j];
      for (int t = 0; t < 4; ++t) acc[t] += wj * load8(row + 8 * t);
    }
    for (int t = 0; t < 4; ++t) store8(y + c + 8 * t, acc[t]);
  }
  for (; c + 8 <= dim; c += 8) {
    v8f acc = load8(y + c);
    for (int64_t j = 0; j < n; ++j) acc += w[j] * load8(rows + ids[j] * dim + c);
    store8(y + c, acc);
  }
  for (; c < dim; ++c) {
    float acc = y[c];
    for (int64_t j = 0; j < n; ++j) acc += w[j] * rows[ids[j] * dim + c];
    y[c] = acc;
  }
}

}  // namespace ice

namespace ice {
void mean_rows(const float* v, int64_t ld, int64_t n, int64_t dv, float* out) {
  std::fill(out, out + dv, 0.0f);
  // Accumulate in double: the mean of many rows should not drift.
  std::vector<double> sum(dv, 0.0);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t c = 0; c < dv; ++c) sum[c] += v[j * ld + c];
  if (n > 0)
    for (int64_t c = 0; c < dv; ++c) out[c] = static_cast<float>(sum[c] / n);
}
}  // namespace ice
