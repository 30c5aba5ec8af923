// Portable SIMD building blocks: GCC/Clang vector extensions (lowered to whatever the
// target has) plus run-time dispatch, so no instruction set is hard-coded.
#pragma once

#include <cstdint>
#include <cstring>

namespace ice {

// 8 floats: one AVX register, two SSE/NEON registers.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

// Hot functions get an AVX2+FMA clone chosen at load time (ifunc) next to the
// baseline build; helpers below are always inlined into them, so they compile for
// the clone's instruction set.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(ICE_NO_DISPATCH)
#define ICE_DISPATCH __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ICE_DISPATCH
#endif
#define ICE_INLINE inline __attribute__((always_inline))

ICE_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
ICE_INLINE void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
// (a shuffle of lane 0: compiles to one broadcast instruction)
ICE_INLINE v8f splat8(float x) {
  const v8f lane0 = {x};
  return __builtin_shuffle(lane0, v8i{});
}

// NaN-propagating: once a lane is NaN it stays NaN.
ICE_INLINE v8f max8(v8f a, v8f b) {
  v8i take_b = (v8i)(b > a) | (v8i)(b != b);
  return (v8f)(((v8i)a & ~take_b) | ((v8i)b & take_b));
}

ICE_INLINE float hmax8(v8f v) {
  float m = v[0];
  for (int i = 1; i < 8; ++i) m = (v[i] > m || v[i] != v[i]) ? v[i] : m;
  return m;
}
ICE_INLINE float hsum8(v8f v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// exp(x) to about 2 ulp (Cephes' polynomial). exp(-inf) and anything below the
// smallest normal result is exactly 0; NaN stays NaN; large x saturates at exp(88).
ICE_INLINE v8f exp8(v8f x) {
  const v8f lo = splat8(-87.33654f), hi = splat8(88.0f);
  v8i underflow = (v8i)(x < lo);
  x = (v8f)(((v8i)x & ~underflow) | ((v8i)lo & underflow));
  v8i overflow = (v8i)(x > hi);
  x = (v8f)(((v8i)x & ~overflow) | ((v8i)hi & overflow));
  // n = round(x / ln 2) with the 1.5·2^23 trick; r = x - n ln 2 in two parts.
  const v8f magic = splat8(12582912.0f);
  v8f shifted = x * splat8(1.44269504088896341f) + magic;
  v8f n = shifted - magic;
  v8f r = x - n * splat8(0.693359375f);
  r = r - n * splat8(-2.12194440e-4f);
  v8f p = splat8(1.9875691500e-4f);
  p = p * r + splat8(1.3981999507e-3f);
  p = p * r + splat8(8.3334519073e-3f);
  p = p * r + splat8(4.1665795894e-2f);
  p = p * r + splat8(1.6666665459e-1f);
  p = p * r + splat8(5.0000001201e-1f);
  p = p * (r * r) + r + splat8(1.0f);
  v8i n_int = (v8i)shifted - (v8i)magic;
  v8f two_n = (v8f)((n_int + 127) << 23);
  return (v8f)((v8i)(p * two_n) & ~underflow);
}

}  // namespace ice
