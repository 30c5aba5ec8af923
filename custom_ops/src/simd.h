// Portable SIMD building blocks: GCC/Clang vector extensions (lowered to whatever the
// target has) plus run-time dispatch, so no instruction set is hard-coded.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace ice {

// 8 floats: one AVX register, two SSE/NEON registers.
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));

// Hot functions get an AVX2+FMA clone chosen at load time (ifunc) next to the
// baseline build; helpers below are always inlined into them, so they compile for
// the clone's instruction set.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(ICE_NO_DISPATCH)
#define ICE_DISPATCH __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define ICE_DISPATCH
#endif
#define ICE_INLINE inline __attribute__((always_inline))

// 16 floats: one AVX-512 register. Only functions compiled for x86-64-v4 (ICE_WIDE) use
// them, called only where the CPU has it (wide_vectors_available()): a product's tile
// then holds twice the columns per instruction, in twice the registers.
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));

// The integer vectors of a float vector's lanes.
template <typename V>
struct LaneInts;
template <>
struct LaneInts<v8f> {
  using I = v8i;
  using U = v8u;
};
template <>
struct LaneInts<v16f> {
  using I = v16i;
  using U = v16u;
};
#if defined(__x86_64__) && defined(__GNUC__) && !defined(ICE_NO_DISPATCH)
#define ICE_WIDE_KERNELS 1
#define ICE_WIDE __attribute__((target("arch=x86-64-v4")))
inline bool wide_vectors_available() {
  static const bool available = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                                __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
  return available;
}
#else
#define ICE_WIDE_KERNELS 0
#endif

ICE_INLINE v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
ICE_INLINE void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }
ICE_INLINE v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
ICE_INLINE void store16(float* p, v16f v) { std::memcpy(p, &v, sizeof v); }
// (a shuffle of lane 0: compiles to one broadcast instruction)
ICE_INLINE v8f splat8(float x) {
  const v8f lane0 = {x};
  return __builtin_shuffle(lane0, v8i{});
}
#if ICE_WIDE_KERNELS
// (for AVX-512 GCC turns the shuffle form into a masked broadcast per lane; the
// intrinsic is one instruction. Only inside ICE_WIDE functions.)
ICE_WIDE ICE_INLINE v16f splat16(float x) { return (v16f)_mm512_set1_ps(x); }
#endif

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

// 2^x for x <= 127 to about 2 ulp: 2^n times a degree-5 polynomial (fitted for
// relative error) of the remainder in [-1/2, 1/2]. Below the smallest normal
// result (and for -inf) exactly 0; NaN stays NaN. The softmax works in base 2
// (scores pre-multiplied by log2(e)): no ln 2 range reduction, half the
// multiplies of a base-e exp.
template <typename V>
ICE_INLINE V exp2_lanes(V x) {
  using I = typename LaneInts<V>::I;
  using U = typename LaneInts<V>::U;
  auto splat = [](float c) { return V{} + c; };
  const I underflow = (I)(x < splat(-126.0f));
  // n = round(x) by the 1.5 * 2^23 trick; r = x - n is exact.
  const V magic = splat(12582912.0f);
  const V shifted = x + magic;
  const V r = x - (shifted - magic);
  V p = splat(1.326472731307149e-3f);
  p = p * r + splat(9.671512991189957e-3f);
  p = p * r + splat(5.550733581185341e-2f);
  p = p * r + splat(2.4022242426872253e-1f);
  p = p * r + splat(6.931470036506653e-1f);
  p = p * r + splat(1.0f);
  // 2^n: the low bits of `shifted` hold n; shifting them into the exponent field
  // drops the magic number's own bits.
  const V two_n = (V)(((U)shifted << 23) + (127u << 23));
  return (V)((I)(p * two_n) & ~underflow);
}

}  // namespace ice
