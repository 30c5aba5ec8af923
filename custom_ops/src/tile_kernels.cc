#include "tile_kernels.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "simd.h"

namespace ice {
namespace {

constexpr int kRows = 6;  // query rows per register tile (12 accumulators of 16 registers)

// R rows x 16 keys of scores, accumulators held in registers over the whole d loop.
template <int R>
ICE_INLINE void score_micro(const float* a, int64_t lda, const float* panel, int64_t dim,
                            float* out, int64_t ldo) {
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

template <int NV>
ICE_INLINE void weighted_columns(const float* w, int64_t ldw, int64_t rows, const float* v,
                                 int64_t ldv, int64_t nkeys, float* acc, int64_t ldacc) {
  int64_t i = 0;
  for (; i + kRows <= rows; i += kRows)
    weighted_micro<kRows, NV>(w + i * ldw, ldw, v, ldv, nkeys, acc + i * ldacc, ldacc);
  switch (rows - i) {
    case 5: weighted_micro<5, NV>(w + i * ldw, ldw, v, ldv, nkeys, acc + i * ldacc, ldacc); break;
    case 4: weighted_micro<4, NV>(w + i * ldw, ldw, v, ldv, nkeys, acc + i * ldacc, ldacc); break;
    case 3: weighted_micro<3, NV>(w + i * ldw, ldw, v, ldv, nkeys, acc + i * ldacc, ldacc); break;
    case 2: weighted_micro<2, NV>(w + i * ldw, ldw, v, ldv, nkeys, acc + i * ldacc, ldacc); break;
    case 1: weighted_micro<1, NV>(w + i * ldw, ldw, v, ldv, nkeys, acc + i * ldacc, ldacc); break;
    default: break;
  }
}

}  // namespace

void pack_panels(const float* src, int64_t ld, int64_t dim, const int64_t* ids, int64_t n,
                 float* panels) {
  const int64_t npanels = panel_count(n);
  std::memset(panels, 0, sizeof(float) * npanels * kPanelWidth * dim);
  for (int64_t j = 0; j < n; ++j) {
    const float* row = src + (ids ? ids[j] : j) * ld;
    float* slot = panels + (j / kPanelWidth) * kPanelWidth * dim + j % kPanelWidth;
    for (int64_t d = 0; d < dim; ++d) slot[d * kPanelWidth] = row[d];
  }
}

ICE_DISPATCH
void score_panels(const float* a, int64_t lda, int64_t rows, const float* panels,
                  int64_t npanels, int64_t dim, float* out, int64_t ldo) {
  for (int64_t p = 0; p < npanels; ++p) {
    const float* panel = panels + p * kPanelWidth * dim;
    float* out_p = out + p * kPanelWidth;
    int64_t i = 0;
    for (; i + kRows <= rows; i += kRows)
      score_micro<kRows>(a + i * lda, lda, panel, dim, out_p + i * ldo, ldo);
    switch (rows - i) {
      case 5: score_micro<5>(a + i * lda, lda, panel, dim, out_p + i * ldo, ldo); break;
      case 4: score_micro<4>(a + i * lda, lda, panel, dim, out_p + i * ldo, ldo); break;
      case 3: score_micro<3>(a + i * lda, lda, panel, dim, out_p + i * ldo, ldo); break;
      case 2: score_micro<2>(a + i * lda, lda, panel, dim, out_p + i * ldo, ldo); break;
      case 1: score_micro<1>(a + i * lda, lda, panel, dim, out_p + i * ldo, ldo); break;
      default: break;
    }
  }
}

ICE_DISPATCH
void accumulate_weighted(const float* w, int64_t ldw, int64_t rows, const float* v,
                         int64_t ldv, int64_t nkeys, int64_t dv, float* acc, int64_t ldacc) {
  int64_t c = 0;
  for (; c + 16 <= dv; c += 16) weighted_columns<2>(w, ldw, rows, v + c, ldv, nkeys, acc + c, ldacc);
  if (c + 8 <= dv) {
    weighted_columns<1>(w, ldw, rows, v + c, ldv, nkeys, acc + c, ldacc);
    c += 8;
  }
  for (; c < dv; ++c)
    for (int64_t i = 0; i < rows; ++i) {
      float sum = acc[i * ldacc + c];
      for (int64_t j = 0; j < nkeys; ++j) sum += w[i * ldw + j] * v[j * ldv + c];
      acc[i * ldacc + c] = sum;
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
float exp_shifted_sum(float shift, int64_t n, float* x) {
  const v8f s = splat8(shift);
  v8f total = splat8(0.0f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const v8f e = exp8(load8(x + j) - s);
    store8(x + j, e);
    total += e;
  }
  if (j < n) {  // the tail goes through the same vector code, padded with -inf
    v8f rest = splat8(-std::numeric_limits<float>::infinity());
    for (int64_t t = 0; j + t < n; ++t) rest[t] = x[j + t];
    const v8f e = exp8(rest - s);
    for (int64_t t = 0; j + t < n; ++t) x[j + t] = e[t];
    total += e;
  }
  return hsum8(total);
}

ICE_DISPATCH
int64_t indices_above(const float* x, int64_t n, float threshold, int32_t* out) {
  const v8f t = splat8(threshold);
  int64_t count = 0, j = 0;
  for (; j + 8 <= n; j += 8) {
    const v8i above = (v8i)(load8(x + j) > t);
    // Most blocks have no candidate: test all 8 lanes at once.
    if (((above[0] | above[1]) | (above[2] | above[3])) == 0 && ((above[4] | above[5]) | (above[6] | above[7])) == 0)
      continue;
    for (int lane = 0; lane < 8; ++lane)
      if (above[lane]) out[count++] = static_cast<int32_t>(j + lane);
  }
  for (; j < n; ++j)
    if (x[j] > threshold) out[count++] = static_cast<int32_t>(j);
  return count;
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
