// Weight-only int4 product for a few activation rows on x86-64 CPUs (AVX2; AVX-512BW; AVX-512 VNNI):
//
//     y[m, n] = sum_g sum_{k in g} (q[n, k] * s[n, g] + o[n, g]) * x[m, k] + bias[n]
//
// q: 4-bit codes 0..15, two a byte (the even input in the low nibble; points.io.quantized), groups of G
// inputs (32, 64 or 128) along each row of K_pad = groups * G inputs, a scale s and an offset o per group
// (the symmetric scheme has no offsets: o = -8 s). x [M, K], y [M, N], s, o, bias in float32, bfloat16 or
// float16 (dtype codes below).
//
// The activations are rounded to int8 once per call, per block of 32 inputs (xs = max |x| / 127, xq =
// round(x / xs), half to even), as llama.cpp's q4_0 x q8_0 dot product does; so the product is the float
// product of the dequantized weights with the dequantized activations, summed exactly in int32 within a
// block and in float32 across blocks. That is what makes it fast: the codes are multiplied as bytes
// (vpmaddubsw + vpmaddwd, or vpdpbusd with VNNI: 32 or 64 products an instruction) instead of being widened
// to float32 one by one, so that a 4-bit weight costs fewer instructions than an int8 one does in
// int8_gemv.cpp. Error: the activations' rounding is at most 1/254 of each block's largest value, far
// below the weights' 1/30 of a group's range (tools/quantization_quality.py measures both).
//
// Layout of the work: the activations are prepared once per call (codes with each block's even inputs
// first, then its odd ones, to match the nibbles as they come out of a byte; scales per block; and per group
// xs * sum(xq), the factor of the group's offset). Each weight row is streamed once, two or four rows at a time
// by one thread (OpenMP, static), each unpacked weight vector shared by up to four activation rows and each
// activation vector by those weight rows, a prefetch 1 KiB ahead of each stream (measured best of 256 B - 4 KiB).
//
// Built by kernels/cpu_int4.py through kernels/cpu_build.py (g++ -O3 -mavx2 -mfma -mf16c -fopenmp; the
// AVX-512 paths carry target attributes and are chosen by the caller's `isa`), plain C ABI through ctypes.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include <vector>

#include "cpu_common.h"

namespace {

using namespace points_cpu;

constexpr int64_t kBlock = 32;       // activation block (inputs per activation scale)
constexpr int64_t kPrefetch = 1024;  // bytes ahead of the weight stream (512: 0.86x, 2048: 0.97x, 4096: 0.86x)
// count values of p from `first` as float32 into out (the dtype branch outside the loops, which vectorise).
inline void widen(const void* p, int64_t first, int64_t count, int dtype, float* out) {
  if (dtype == kFloat32) {
    const float* f = static_cast<const float*>(p) + first;
    for (int64_t i = 0; i < count; i++) out[i] = f[i];
  } else if (dtype == kBFloat16) {
    const uint16_t* h = static_cast<const uint16_t*>(p) + first;
    for (int64_t i = 0; i < count; i++) {
      const uint32_t bits = static_cast<uint32_t>(h[i]) << 16;
      __builtin_memcpy(out + i, &bits, 4);
    }
  } else {
    const uint16_t* h = static_cast<const uint16_t*>(p) + first;
    for (int64_t i = 0; i < count; i++) out[i] = _cvtsh_ss(h[i]);
  }
}

// The activations as the kernels read them, for M rows of K_pad inputs (K real ones, zeros after).
struct Acts {
  int64_t blocks, groups;
  std::vector<int8_t> q;     // [M, K_pad]: per block of 32, its 16 even inputs, then its 16 odd ones
  std::vector<float> scale;  // [M, blocks * 8]: each block's scale, 8 times (one per int32 lane of its sums)
  std::vector<float> gsum;   // [M, groups]: sum over the group's blocks of xs * sum(xq)
};

void prepare(const void* x, int xdtype, int64_t M, int64_t K, int64_t K_pad, int64_t G, Acts& a) {
  a.blocks = K_pad / kBlock;
  a.groups = K_pad / G;
  a.q.assign(M * K_pad, 0);
  a.scale.assign(M * a.blocks * 8, 0.0f);
  a.gsum.assign(M * a.groups, 0.0f);
  float v[kBlock];
  for (int64_t m = 0; m < M; m++) {
    for (int64_t b = 0; b < a.blocks; b++) {
      float amax = 0.0f;
      for (int64_t i = 0; i < kBlock; i++) {
        const int64_t k = b * kBlock + i;
        v[i] = k < K ? to_float(x, m * K + k, xdtype) : 0.0f;
        amax = fmaxf(amax, fabsf(v[i]));
      }
      const float xs = amax / 127.0f;
      int8_t* q = a.q.data() + m * K_pad + b * kBlock;
      int sum = 0;
      for (int64_t i = 0; i < kBlock; i++) {
        const int c = xs > 0.0f ? static_cast<int>(nearbyintf(v[i] / xs)) : 0;  // (half to even: the default mode)
        q[(i & 1) * 16 + i / 2] = static_cast<int8_t>(c);
        sum += c;
      }
      for (int l = 0; l < 8; l++) a.scale[(m * a.blocks + b) * 8 + l] = xs;
      a.gsum[m * a.groups + b * kBlock / G] += xs * static_cast<float>(sum);
    }
  }
}

// ---------------------------------------------------------------- 256 bits: 32 weights (one block) a step

// The 32 codes of a block (16 bytes at p) as bytes: the low nibbles (even inputs), then the high ones.
inline __m256i codes32(const uint8_t* p) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m4 = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m4), _mm_and_si128(b, m4));
}

inline __m256i dot_avx2(__m256i w, __m256i x) {  // 8 int32 lanes, each the sum of 4 products
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1));
}

#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define BW_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))

VNNI_TARGET inline __m256i dot_vnni256(__m256i w, __m256i x) {
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, x);
}

// NR weight rows (codes from w, ldw bytes apart; scales s and offsets o [NR][groups] in float32) against MB
// activation rows from m0: their sums in out[r * MB + m]. Per step each weight vector is unpacked once and each
// activation vector loaded once for all NR x MB products; the scale of a product is the activation block's
// times the weight group's (one multiply), so that nothing is left to do at a group's end; the offsets'
// share, sum over groups of o * (xs * sum xq), is a dot product over the groups after the loop. The body is
// written once, as a macro, and compiled once per instruction set (a function carrying a target attribute
// cannot share an inlined body with one that does not, and the AVX2 one must carry none).
#define ROWS_BODY(VEC, ZERO, FMA, MUL, CVT, SET1, LOADF, LOADI, WQ, DOT, LANES, STEP, REDUCE)                 \
  VEC tot[NR][MB];                                                                                           \
  for (int r = 0; r < NR; r++)                                                                               \
    for (int m = 0; m < MB; m++) tot[r][m] = ZERO;                                                          \
  const int64_t per_group = G / STEP;                                                                        \
  for (int64_t g = 0; g < a.groups; g++) {                                                                   \
    VEC sg[NR];                                                                                              \
    for (int r = 0; r < NR; r++) sg[r] = SET1(s[r * a.groups + g]);                                          \
    for (int64_t j = 0; j < per_group; j++) {                                                                \
      const int64_t b = (g * per_group + j) * (STEP / kBlock);                                               \
      WQ wq[NR];                                                                                             \
      for (int r = 0; r < NR; r++) {                                                                        \
        _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw + b * 16) + kPrefetch, _MM_HINT_T0);          \
        wq[r] = UNPACK(w + r * ldw + b * 16);                                                                \
      }                                                                                                      \
      for (int m = 0; m < MB; m++) {                                                                         \
        const WQ xq = LOADI(a.q.data() + (m0 + m) * K_pad + b * kBlock);                                     \
        const VEC xs = LOADF(a.scale.data() + ((m0 + m) * a.blocks + b) * 8);                                \
        for (int r = 0; r < NR; r++) tot[r][m] = FMA(CVT(DOT(wq[r], xq)), MUL(xs, sg[r]), tot[r][m]);        \
      }                                                                                                      \
    }                                                                                                        \
  }                                                                                                          \
  for (int r = 0; r < NR; r++)                                                                               \
    for (int m = 0; m < MB; m++) {                                                                           \
      const float* gs = a.gsum.data() + (m0 + m) * a.groups;                                                 \
      const float* orow = o + r * a.groups;                                                                  \
      VEC offv = ZERO;                                                                                       \
      int64_t g = 0;                                                                                         \
      for (; g + LANES <= a.groups; g += LANES) offv = FMA(LOADF(orow + g), LOADF(gs + g), offv);            \
      float off = REDUCE(offv);                                                                              \
      for (; g < a.groups; g++) off += orow[g] * gs[g];                                                      \
      out[r * MB + m] = REDUCE(tot[r][m]) + off;                                                             \
    }

#define ROW_ARGS const Acts &a, int64_t m0, int64_t K_pad, int64_t G, const uint8_t *w, int64_t ldw, \
                 const float *s, const float *o, float *out

#define LOADI256(p) _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
#define BODY256(DOT) ROWS_BODY(__m256, _mm256_setzero_ps(), _mm256_fmadd_ps, _mm256_mul_ps, _mm256_cvtepi32_ps, \
                               _mm256_set1_ps, _mm256_loadu_ps, LOADI256, __m256i, DOT, 8, 32, hsum256)
#define UNPACK codes32
template <int NR, int MB>
void row256_avx2(ROW_ARGS) { BODY256(dot_avx2) }

template <int NR, int MB>
VNNI_TARGET void row256_vnni(ROW_ARGS) { BODY256(dot_vnni256) }
#undef UNPACK

// ---------------------------------------------------------------- 512 bits: 64 weights (two blocks) a step, G >= 64

BW_TARGET inline __m512i dot512_bw(__m512i w, __m512i x) {
  return _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1));
}

VNNI_TARGET inline __m512i dot512_vnni(__m512i w, __m512i x) {
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
}

// Two blocks' 32 code bytes: [lo(b) | lo(b+1)] and [hi(b) | hi(b+1)] (128-bit halves) reordered to
// lo(b), hi(b), lo(b+1), hi(b+1), each block's bytes as its activations are.
BW_TARGET inline __m512i codes64(const uint8_t* p) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_permutexvar_epi64(_mm512_set_epi64(7, 6, 3, 2, 5, 4, 1, 0),
                                  _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, m4)),
                                                     _mm256_and_si256(_mm256_srli_epi16(b, 4), m4), 1));
}

#define LOADI512(p) _mm512_loadu_si512(p)
#define BODY512(DOT) ROWS_BODY(__m512, _mm512_setzero_ps(), _mm512_fmadd_ps, _mm512_mul_ps, _mm512_cvtepi32_ps, \
                               _mm512_set1_ps, _mm512_loadu_ps, LOADI512, __m512i, DOT, 16, 64, _mm512_reduce_add_ps)
#define UNPACK codes64
template <int NR, int MB>
BW_TARGET void row512_bw(ROW_ARGS) { BODY512(dot512_bw) }

template <int NR, int MB>
VNNI_TARGET void row512_vnni(ROW_ARGS) { BODY512(dot512_vnni) }
#undef UNPACK

// NR weight rows against up to four activation rows from m0 (MB of them).
template <int NR, int MB>
inline void rows(int isa, ROW_ARGS) {
  if (isa >= 1 && G >= 2 * kBlock) {
    if (isa == 2) row512_vnni<NR, MB>(a, m0, K_pad, G, w, ldw, s, o, out);
    else row512_bw<NR, MB>(a, m0, K_pad, G, w, ldw, s, o, out);
  } else if (isa == 2) {
    row256_vnni<NR, MB>(a, m0, K_pad, G, w, ldw, s, o, out);
  } else {
    row256_avx2<NR, MB>(a, m0, K_pad, G, w, ldw, s, o, out);  // (AVX-512BW without VNNI at G = 32: the AVX2 step)
  }
}

template <int NR>
inline void all_rows(int isa, const Acts& a, int64_t M, int64_t K_pad, int64_t G, const uint8_t* w, int64_t ldw,
                     const float* s, const float* o, float* out) {
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) rows<NR, 4>(isa, a, m, K_pad, G, w, ldw, s, o, out + m * NR);
  const int rest = static_cast<int>(M - m);
  if (rest == 3) rows<NR, 3>(isa, a, m, K_pad, G, w, ldw, s, o, out + m * NR);
  if (rest == 2) rows<NR, 2>(isa, a, m, K_pad, G, w, ldw, s, o, out + m * NR);
  if (rest == 1) rows<NR, 1>(isa, a, m, K_pad, G, w, ldw, s, o, out + m * NR);
}

}  // namespace

// x [M, K] (xdtype), w [N, K_pad / 2] codes, scale and offset [N, K_pad / G] (sdtype; offset null: symmetric),
// bias [N] (sdtype, may be null), y [M, N] (ydtype). isa 0 AVX2, 1 AVX-512BW, 2 AVX-512 VNNI.
// Returns 0; 1 for a dtype, isa or group it does not know.
extern "C" int points_int4_gemv(const void* x, int xdtype, const uint8_t* w, const void* scale, const void* offset,
                                const void* bias, int sdtype, void* y, int ydtype, int isa, int64_t M, int64_t N,
                                int64_t K, int64_t G) {
  for (int d : {xdtype, sdtype, ydtype})
    if (d != kFloat32 && d != kBFloat16 && d != kFloat16) return 1;
  if (isa < 0 || isa > 2 || (G != 32 && G != 64 && G != 128)) return 1;
  if (M <= 0 || N <= 0 || K <= 0) return 0;
  const int64_t K_pad = (K + G - 1) / G * G, groups = K_pad / G;
  Acts a;
  prepare(x, xdtype, M, K, K_pad, G, a);
  // Weight rows `step` at a time, each step's rows by one thread: four with 512-bit vectors (32 registers:
  // measured 1.03x at one activation row, 1.10x at 4 and 8), two on AVX2 (16 registers: four spilled, 0.92x at
  // 4 rows). Below about 64 KiB of weights the fork/join costs more than it saves.
  const int step = isa >= 1 && G >= 2 * kBlock ? 4 : 2;
  const int64_t steps = (N + step - 1) / step;
#pragma omp parallel if (N * K_pad / 2 >= (int64_t{1} << 16))
  {
    std::vector<float> so(2 * step * groups), sums(step * (M + 3));  // (the step's scales, offsets, sums)
    float* s = so.data();
    float* o = so.data() + step * groups;
#pragma omp for schedule(static)
    for (int64_t p = 0; p < steps; p++) {
      const int64_t n = p * step, nr = N - n < step ? N - n : step;
      for (int64_t r = 0; r < nr; r++) {
        widen(scale, (n + r) * groups, groups, sdtype, s + r * groups);
        if (offset) {
          widen(offset, (n + r) * groups, groups, sdtype, o + r * groups);
        } else {
          for (int64_t g = 0; g < groups; g++) o[r * groups + g] = -8.0f * s[r * groups + g];
        }
      }
      const uint8_t* wn = w + n * (K_pad / 2);
      // sums: for each block of up to four activation rows from m, [r][m - m0] at (m0 * NR) + r * MB + (m - m0)
      switch (nr) {
        case 4: all_rows<4>(isa, a, M, K_pad, G, wn, K_pad / 2, s, o, sums.data()); break;
        case 3: all_rows<3>(isa, a, M, K_pad, G, wn, K_pad / 2, s, o, sums.data()); break;
        case 2: all_rows<2>(isa, a, M, K_pad, G, wn, K_pad / 2, s, o, sums.data()); break;
        default: all_rows<1>(isa, a, M, K_pad, G, wn, K_pad / 2, s, o, sums.data()); break;
      }
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mb = M - m0 < 4 ? M - m0 : 4;
        for (int64_t r = 0; r < nr; r++) {
          const float b = bias ? to_float(bias, n + r, sdtype) : 0.0f;
          for (int64_t i = 0; i < mb; i++) store(y, (m0 + i) * N + n + r, sums[m0 * nr + r * mb + i] + b, ydtype);
        }
      }
    }
  }
  return 0;
}

// The weight rows [first, first + rows) dequantized, w = q * s + o (o = -8 s without offsets), into out
// [rows, K] (odtype: float32 or bfloat16, rounded once): for many-row products, a block at a time, so that the
// whole float weight never exists. Returns 0; 1 for a dtype or group it does not know.
extern "C" int points_int4_dequantize(const uint8_t* w, const void* scale, const void* offset, int sdtype, void* out,
                                      int odtype, int64_t first, int64_t rows, int64_t K, int64_t G) {
  if ((odtype != kFloat32 && odtype != kBFloat16) || (sdtype != kFloat32 && sdtype != kBFloat16 && sdtype != kFloat16) ||
      (G != 32 && G != 64 && G != 128))
    return 1;
  const int64_t K_pad = (K + G - 1) / G * G, groups = K_pad / G;
#pragma omp parallel if (rows * K >= (int64_t{1} << 16))
  {
    std::vector<float> so(2 * groups), row(K_pad);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      const int64_t n = first + r;
      float* s = so.data();
      float* o = so.data() + groups;
      widen(scale, n * groups, groups, sdtype, s);
      if (offset) {
        widen(offset, n * groups, groups, sdtype, o);
      } else {
        for (int64_t g = 0; g < groups; g++) o[g] = -8.0f * s[g];
      }
      const uint8_t* wn = w + n * (K_pad / 2);
      const __m128i m4 = _mm_set1_epi8(0x0F);
      for (int64_t g = 0; g < groups; g++) {
        const __m256 sg = _mm256_set1_ps(s[g]), og = _mm256_set1_ps(o[g]);
        for (int64_t c = 0; c < G; c += 32) {  // 16 bytes: 32 codes, in input order after the unpacks
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wn + (g * G + c) / 2));
          const __m128i lo = _mm_and_si128(b, m4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);
          const __m128i first = _mm_unpacklo_epi8(lo, hi), second = _mm_unpackhi_epi8(lo, hi);
          float* dst = row.data() + g * G + c;
          for (int h = 0; h < 2; h++) {
            const __m128i codes = h ? second : first;
            _mm256_storeu_ps(dst + 16 * h, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes)), sg, og));
            _mm256_storeu_ps(dst + 16 * h + 8,
                             _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8))), sg, og));
          }
        }
      }
      if (odtype == kFloat32) {
        __builtin_memcpy(static_cast<float*>(out) + r * K, row.data(), K * sizeof(float));
      } else {  // round to nearest even, 8 at a time (the weights are finite: no NaN to keep)
        uint16_t* dst = static_cast<uint16_t*>(out) + r * K;
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) {
          const __m256i bits = _mm256_castps_si256(_mm256_loadu_ps(row.data() + k));
          const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
          const __m256i r16 = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
          const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r16), _mm256_extracti128_si256(r16, 1));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + k), packed);
        }
        for (; k < K; k++) store(dst, k, row[k], kBFloat16);
      }
    }
  }
  return 0;
}
