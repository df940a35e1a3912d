// What the CPU kernels share (float_gemv.cpp, int8_gemv.cpp, int4_gemv.cpp; each built as one library by
// kernels/cpu_build.py, which rebuilds a kernel when this file changes too): the dtype codes their callers
// pass, scalar conversions to and from float32 (bfloat16 and float16 rounded to nearest even, NaN kept), a
// horizontal sum of 8 float32 lanes.
#pragma once

#include <immintrin.h>
#include <stdint.h>

namespace points_cpu {

enum Dtype { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float v) {
  uint32_t bits;
  __builtin_memcpy(&bits, &v, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits | 0x00400000u) >> 16);  // NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// p[i] as float32, p holding `dtype` values.
inline float to_float(const void* p, int64_t i, int dtype) {
  if (dtype == kFloat32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  return dtype == kBFloat16 ? bf16_to_float(h) : _cvtsh_ss(h);
}

// p[i] = v rounded once to `dtype`.
inline void store(void* p, int64_t i, float v, int dtype) {
  if (dtype == kFloat32) {
    static_cast<float*>(p)[i] = v;
  } else if (dtype == kBFloat16) {
    static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
  } else {
    static_cast<uint16_t*>(p)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
  }
}

inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace points_cpu
