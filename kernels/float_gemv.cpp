// Float products for a few activation rows on x86-64 CPUs, the weights in nn.Linear's own layout:
//
//     y[m, n] = sum_k w[n, k] * x[m, k] + bias[n]        (w [N, K] row-major, bfloat16 or float32)
//
// x [M, K], y [M, N] and bias [N] in the weights' dtype (codes below). The sum is float32, the bias is added
// in float32 and y is rounded once to its dtype (round to nearest even), as PyTorch's CPU products do; only
// the order of the additions differs.
//
// Built and loaded by kernels/cpu_gemv.py (g++ -O3 -mavx2 -mfma -fopenmp; the AVX-512 paths are compiled
// with target attributes and chosen at run time by the caller's `isa`), plain C ABI through ctypes.
//
// The same shape as int8_gemv.cpp: each weight row is streamed once, by one thread, whatever the number of
// activation rows (up to four of them share each loaded weight vector), with a software prefetch ahead of
// the stream and 2-4 independent accumulators per activation row.
// - bf16, isa 2 (avx512_bf16): vdpbf16ps multiplies 32 bf16 pairs and adds them into 16 float32 lanes;
//   x stays bf16.
// - bf16, isa 1 (AVX-512F) / 0 (AVX2): the weights are widened to float32 in registers (a 16-bit shift),
//   x is widened once per call.
// - float32: FMA, 16 (isa >= 1) or 8 lanes.

#include <immintrin.h>
#include <stdint.h>

#include <vector>

#include "cpu_common.h"

namespace {

using namespace points_cpu;

constexpr int64_t kPrefetch = 1024;  // bytes ahead of the weight stream
// ---------------------------------------------------------------- AVX2 (8 float32 lanes)

// The weight vector of 8 elements at w (bf16 or float32) as float32.
template <int DT>
inline __m256 wload8(const void* w, int64_t k) {
  if (DT == kFloat32) return _mm256_loadu_ps(static_cast<const float*>(w) + k);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + k));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <int DT, int MB, int U>
inline void row_avx2(const float* x, int64_t ldx, const void* w, int64_t K, float* out, int64_t ldo) {
  const int64_t esize = DT == kFloat32 ? 4 : 2;
  __m256 acc[MB][U];
  for (int m = 0; m < MB; m++)
    for (int u = 0; u < U; u++) acc[m][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    _mm_prefetch(static_cast<const char*>(w) + k * esize + kPrefetch, _MM_HINT_T0);
    for (int u = 0; u < U; u++) {
      const __m256 wv = wload8<DT>(w, k + 8 * u);
      for (int m = 0; m < MB; m++) acc[m][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k + 8 * u), acc[m][u]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = wload8<DT>(w, k);
    for (int m = 0; m < MB; m++) acc[m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k), acc[m][0]);
  }
  for (int m = 0; m < MB; m++) {
    __m256 a = acc[m][0];
    for (int u = 1; u < U; u++) a = _mm256_add_ps(a, acc[m][u]);
    float s = hsum256(a);
    for (int64_t kk = k; kk < K; kk++) s += to_float(w, kk, DT) * x[m * ldx + kk];
    out[m * ldo] = s;
  }
}

// ---------------------------------------------------------------- AVX-512F (16 float32 lanes)

template <int DT>
__attribute__((target("avx512f,avx512bw"))) inline __m512 wload16(const void* w, int64_t k) {
  if (DT == kFloat32) return _mm512_loadu_ps(static_cast<const float*>(w) + k);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(w) + k));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int DT, int MB, int U>
__attribute__((target("avx512f,avx512bw"))) void row_avx512(const float* x, int64_t ldx, const void* w, int64_t K,
                                                            float* out, int64_t ldo) {
  const int64_t esize = DT == kFloat32 ? 4 : 2;
  __m512 acc[MB][U];
  for (int m = 0; m < MB; m++)
    for (int u = 0; u < U; u++) acc[m][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U) {
    _mm_prefetch(static_cast<const char*>(w) + k * esize + kPrefetch, _MM_HINT_T0);
    for (int u = 0; u < U; u++) {
      const __m512 wv = wload16<DT>(w, k + 16 * u);
      for (int m = 0; m < MB; m++)
        acc[m][u] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * ldx + k + 16 * u), acc[m][u]);
    }
  }
  for (; k + 16 <= K; k += 16) {
    const __m512 wv = wload16<DT>(w, k);
    for (int m = 0; m < MB; m++) acc[m][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + m * ldx + k), acc[m][0]);
  }
  for (int m = 0; m < MB; m++) {
    __m512 a = acc[m][0];
    for (int u = 1; u < U; u++) a = _mm512_add_ps(a, acc[m][u]);
    float s = _mm512_reduce_add_ps(a);
    for (int64_t kk = k; kk < K; kk++) s += to_float(w, kk, DT) * x[m * ldx + kk];
    out[m * ldo] = s;
  }
}

// ---------------------------------------------------------------- AVX-512 BF16 (vdpbf16ps; x in bf16)

template <int MB, int U>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void row_bf16dp(const uint16_t* x, int64_t ldx,
                                                                       const uint16_t* w, int64_t K, float* out,
                                                                       int64_t ldo) {
  __m512 acc[MB][U];
  for (int m = 0; m < MB; m++)
    for (int u = 0; u < U; u++) acc[m][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 * U <= K; k += 32 * U) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + kPrefetch, _MM_HINT_T0);
    for (int u = 0; u < U; u++) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k + 32 * u);
      for (int m = 0; m < MB; m++)
        acc[m][u] = _mm512_dpbf16_ps(acc[m][u], wv, (__m512bh)_mm512_loadu_si512(x + m * ldx + k + 32 * u));
    }
  }
  for (; k + 32 <= K; k += 32) {
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k);
    for (int m = 0; m < MB; m++)
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], wv, (__m512bh)_mm512_loadu_si512(x + m * ldx + k));
  }
  for (int m = 0; m < MB; m++) {
    __m512 a = acc[m][0];
    for (int u = 1; u < U; u++) a = _mm512_add_ps(a, acc[m][u]);
    float s = _mm512_reduce_add_ps(a);
    for (int64_t kk = k; kk < K; kk++) s += bf16_to_float(w[kk]) * bf16_to_float(x[m * ldx + kk]);
    out[m * ldo] = s;
  }
}

// Up to four activation rows (mb of them) against weight row wn; their float32 sums into s[0..mb).
template <int DT>
inline void rows_block(int isa, const float* xf, const uint16_t* xh, int mb, const void* wn, int64_t K, float* s) {
  if (DT == kBFloat16 && isa == 2) {
    const uint16_t* w = static_cast<const uint16_t*>(wn);
    switch (mb) {
      case 4: row_bf16dp<4, 2>(xh, K, w, K, s, 1); break;
      case 3: row_bf16dp<3, 2>(xh, K, w, K, s, 1); break;
      case 2: row_bf16dp<2, 2>(xh, K, w, K, s, 1); break;
      default: row_bf16dp<1, 4>(xh, K, w, K, s, 1); break;
    }
  } else if (isa >= 1) {
    switch (mb) {
      case 4: row_avx512<DT, 4, 2>(xf, K, wn, K, s, 1); break;
      case 3: row_avx512<DT, 3, 2>(xf, K, wn, K, s, 1); break;
      case 2: row_avx512<DT, 2, 2>(xf, K, wn, K, s, 1); break;
      default: row_avx512<DT, 1, 4>(xf, K, wn, K, s, 1); break;
    }
  } else {
    switch (mb) {
      case 4: row_avx2<DT, 4, 2>(xf, K, wn, K, s, 1); break;
      case 3: row_avx2<DT, 3, 2>(xf, K, wn, K, s, 1); break;
      case 2: row_avx2<DT, 2, 2>(xf, K, wn, K, s, 1); break;
      default: row_avx2<DT, 1, 4>(xf, K, wn, K, s, 1); break;
    }
  }
}

// Every activation row against weight row n, four at a time; y[m, n] = sum + bias[n], rounded once.
template <int DT>
inline void weight_row(int isa, const float* xf, const uint16_t* xh, int64_t M, const void* wn, int64_t K,
                       float b, void* y, int64_t n, int64_t N) {
  for (int64_t m = 0; m < M; m += 4) {
    const int mb = static_cast<int>(M - m < 4 ? M - m : 4);
    float s[4];
    rows_block<DT>(isa, xf + m * K, xh + m * K, mb, wn, K, s);
    for (int i = 0; i < mb; i++) store(y, (m + i) * N + n, s[i] + b, DT);
  }
}

}  // namespace

// x, w, bias (may be null) and y all in `dtype` (0 float32, 1 bfloat16); isa 0 AVX2, 1 AVX-512F, 2 AVX-512 BF16
// (bf16 only). Returns 0, or 1 for a dtype or isa it does not know.
extern "C" int points_float_gemv(const void* x, const void* w, const void* bias, void* y, int dtype, int isa,
                                 int64_t M, int64_t N, int64_t K) {
  if ((dtype != kFloat32 && dtype != kBFloat16) || isa < 0 || isa > 2) return 1;
  if (M <= 0 || N <= 0 || K <= 0) return 0;
  std::vector<float> widened;
  const float* xf = static_cast<const float*>(x);
  const uint16_t* xh = static_cast<const uint16_t*>(x);
  if (dtype == kBFloat16 && isa != 2) {
    widened.resize(M * K);
    for (int64_t i = 0; i < M * K; i++) widened[i] = bf16_to_float(xh[i]);
    xf = widened.data();
  }
  const int64_t esize = dtype == kFloat32 ? 4 : 2;
  // Below about 64 KiB of weights the fork/join costs more than it saves. Each thread writes its own
  // columns of y: no buffer of sums, no serial pass after the loop.
#pragma omp parallel for schedule(static) if (N * K * esize >= (int64_t{1} << 16))
  for (int64_t n = 0; n < N; n++) {
    const void* wn = static_cast<const char*>(w) + n * K * esize;
    const float b = bias ? to_float(bias, n, dtype) : 0.0f;
    if (dtype == kFloat32)
      weight_row<kFloat32>(isa, xf, xh, M, wn, K, b, y, n, N);
    else
      weight_row<kBFloat16>(isa, xf, xh, M, wn, K, b, y, n, N);
  }
  return 0;
}
