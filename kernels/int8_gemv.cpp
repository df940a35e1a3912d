// Weight-only int8 product for a few activation rows on x86-64 CPUs with AVX2 and FMA:
//
//     y[m, n] = scale[n] * sum_k w[n, k] * x[m, k] + bias[n]        (w int8 [N, K] row-major)
//
// x [M, K], y [M, N], scale and bias [N] each float32, bfloat16 or float16 (dtype codes below); x is
// widened to float32 once per call, the sum, the scale and the bias are applied in float32 and y is
// rounded once to its dtype (round to nearest even).
//
// Built and loaded by kernels/cpu_int8.py (g++ -O3 -mavx2 -mfma -fopenmp, plain C ABI through ctypes);
// PyTorch's own libgomp is already loaded when this library is, so the OpenMP threads are PyTorch's.
//
// Why it is faster than aten._weight_int8pack_mm on the CPUs this project measured (docs/benchmarks.md):
// - each weight row is streamed once, by one thread, whatever the number of activation rows (the rows are
//   taken four at a time from L1 while the weight row is there), so the memory system sees one sequential
//   stream per thread, and a software prefetch 512 bytes ahead keeps that stream ahead of the arithmetic;
// - the int8 -> float32 conversion (vpmovsxbd + vcvtdq2ps) is done once per weight and shared by all the
//   activation rows of a block, and each row has 2-4 independent accumulators, so the FMA latency is hidden.
// Summation: float32, 8 lanes per accumulator, lanes added at the end.

#include <immintrin.h>
#include <stdint.h>

#include <vector>

#include "cpu_common.h"

namespace {

using namespace points_cpu;

constexpr int64_t kPrefetch = 512;
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// One weight row `w` against MB activation rows x[0..MB), U accumulators of 8 lanes per activation row.
template <int MB, int U>
inline void row(const float* x, int64_t ldx, const int8_t* w, int64_t K, float scale, float bias, void* y,
                int64_t iy, int64_t ldy, int ydtype) {
  __m256 acc[MB][U];
  for (int m = 0; m < MB; m++)
    for (int u = 0; u < U; u++) acc[m][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k + kPrefetch), _MM_HINT_T0);
    for (int u = 0; u < U; u++) {
      const __m256 wv = load8(w + k + 8 * u);
      for (int m = 0; m < MB; m++)
        acc[m][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k + 8 * u), acc[m][u]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = load8(w + k);
    for (int m = 0; m < MB; m++) acc[m][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + m * ldx + k), acc[m][0]);
  }
  for (int m = 0; m < MB; m++) {
    __m256 a = acc[m][0];
    for (int u = 1; u < U; u++) a = _mm256_add_ps(a, acc[m][u]);
    float s = hsum256(a);
    for (int64_t kk = k; kk < K; kk++) s += static_cast<float>(w[kk]) * x[m * ldx + kk];
    store(y, iy + m * ldy, s * scale + bias, ydtype);
  }
}

}  // namespace

// x, scale, bias (may be null) and y carry their dtype codes; returns 0, or 1 for a dtype code it does not know.
extern "C" int points_int8_gemv(const void* x, int xdtype, const int8_t* w, const void* scale, const void* bias,
                                int sdtype, void* y, int ydtype, int64_t M, int64_t N, int64_t K) {
  for (int d : {xdtype, sdtype, ydtype})
    if (d != kFloat32 && d != kBFloat16 && d != kFloat16) return 1;
  if (M <= 0 || N <= 0 || K <= 0) return 0;
  std::vector<float> widened;
  const float* xf = static_cast<const float*>(x);
  if (xdtype != kFloat32) {
    widened.resize(M * K);
    for (int64_t i = 0; i < M * K; i++) widened[i] = to_float(x, i, xdtype);
    xf = widened.data();
  }
  // Below about 64 KiB of weights the fork/join costs more than it saves.
#pragma omp parallel for schedule(static) if (N * K >= (int64_t{1} << 16))
  for (int64_t n = 0; n < N; n++) {
    const int8_t* wn = w + n * K;
    const float sn = to_float(scale, n, sdtype), bn = bias ? to_float(bias, n, sdtype) : 0.0f;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) row<4, 2>(xf + m * K, K, wn, K, sn, bn, y, m * N + n, N, ydtype);
    switch (M - m) {
      case 3: row<3, 2>(xf + m * K, K, wn, K, sn, bn, y, m * N + n, N, ydtype); break;
      case 2: row<2, 2>(xf + m * K, K, wn, K, sn, bn, y, m * N + n, N, ydtype); break;
      case 1: row<1, 4>(xf + m * K, K, wn, K, sn, bn, y, m * N + n, N, ydtype); break;
      default: break;
    }
  }
  return 0;
}
