// Weight-only int4 product for a few activation rows on x86-64 CPUs (AVX2; AVX-512BW; AVX-512 VNNI):
//
//     y[m, n] = sum_g sum_{k in g} (q[n, k] * s[n, g] + o[n, g]) * x[m, k] + bias[n]
//
// q: 4-bit codes 0..15, two a byte (the even input in the low nibble; points.io.quantized), groups of G
// inputs (32, 64 or 128) along each row of K_pad = groups * G inputs, a scale s and an offset o per group
// (the symmetric scheme has no offsets: o = -8 s). x [M, K], y [M, N], s, o, bias in float32, bfloat16 or
// float16 (dtype codes below).
//
// The activations are rounded to int8 once per call, per group of G inputs, the weights' own groups (xs =
// max |x| / 127, xq = round(x / xs), half to even), as llama.cpp's q4 x q8 dot products do with their
// blocks; so the product is the float product of the dequantized weights with the dequantized activations,
// summed exactly in int32 within a group and in float32 across groups. That is what makes it fast: the codes
// are multiplied as bytes (vpmaddubsw + vpmaddwd, or vpdpbusd with VNNI: 32 or 64 products an instruction)
// into int32 sums that stay integers for the whole group, so that a group of 128 weights costs one conversion
// and one multiply-add in float32, however many instructions its bytes take. Error: the activations' rounding
// is at most 1/254 of each group's largest value, far below the weights' 1/30 of a group's range
// (tools/quantization_quality.py measures both).
//
// Layout of the work: the activations are prepared once per call (codes in chunks of C inputs, the chunk's
// even inputs first, then its odd ones, to match the nibbles as they come out of C / 2 bytes; a scale per
// group; and per group xs * sum(xq), the factor of the group's offset). Each weight row is streamed once, two
// or four rows at a time by one thread (OpenMP, static), each unpacked weight vector shared by up to four
// activation rows and each activation vector by those weight rows, a prefetch 8 KiB ahead of each stream
// (kPrefetch).
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

// Bytes ahead of each weight row's stream, fetched into L2 (the small preset's products, one token, 2 threads,
// Xeon with AMX, medians against 1 KiB into L1: 8 KiB into L2 1.13x; 16-32 KiB 1.07x; 8 KiB into L1 1.03x;
// 512 B into L1 0.82x).
constexpr int64_t kPrefetch = 8192;
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
  int64_t groups;
  std::vector<int8_t> q;     // [M, K_pad]: per chunk of C inputs, its C / 2 even inputs, then its odd ones
  std::vector<float> scale;  // [M, groups]: each group's xs
  std::vector<float> gsum;   // [M, groups]: xs * sum(xq) over the group
};

// (AVX2, eight inputs at a time: the exact division and the round-half-to-even of the scalar definition)
void prepare(const void* x, int xdtype, int64_t M, int64_t K, int64_t K_pad, int64_t G, int64_t C, Acts& a) {
  a.groups = K_pad / G;
  a.q.assign(M * K_pad, 0);
  a.scale.assign(M * a.groups, 0.0f);
  a.gsum.assign(M * a.groups, 0.0f);
  std::vector<float> v(G);
  std::vector<int32_t> c(G);
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t m = 0; m < M; m++) {
    for (int64_t g = 0; g < a.groups; g++) {
      const int64_t k0 = g * G, real = K - k0 < G ? K - k0 : G;
      widen(x, m * K + k0, real, xdtype, v.data());
      for (int64_t i = real; i < G; i++) v[i] = 0.0f;
      __m256 top = _mm256_setzero_ps();
      for (int64_t i = 0; i < G; i += 8) top = _mm256_max_ps(top, _mm256_and_ps(_mm256_loadu_ps(v.data() + i), magnitude));
      __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
      t = _mm_max_ps(t, _mm_movehl_ps(t, t));
      const float xs = _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t))) / 127.0f;
      __m256i sums = _mm256_setzero_si256();
      const __m256 d = _mm256_set1_ps(xs > 0.0f ? xs : 1.0f);
      for (int64_t i = 0; i < G; i += 8) {
        __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(v.data() + i), d),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm256_max_ps(_mm256_min_ps(r, _mm256_set1_ps(127.0f)), _mm256_set1_ps(-127.0f));  // (subnormal xs)
        const __m256i ci = _mm256_cvtps_epi32(r);  // (0 everywhere when xs is 0: every v is)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(c.data() + i), ci);
        sums = _mm256_add_epi32(sums, ci);
      }
      int8_t* q = a.q.data() + m * K_pad + k0;
      for (int64_t b = 0; b < G; b += C)  // each chunk: its even inputs, then its odd ones
        for (int64_t j = 0; j < C / 2; j++) {
          q[b + j] = static_cast<int8_t>(c[b + 2 * j]);
          q[b + C / 2 + j] = static_cast<int8_t>(c[b + 2 * j + 1]);
        }
      alignas(32) int32_t lanes[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), sums);
      int sum = 0;
      for (int l = 0; l < 8; l++) sum += lanes[l];
      a.scale[m * a.groups + g] = xs;
      a.gsum[m * a.groups + g] = xs * static_cast<float>(sum);
    }
  }
}

#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define BW_TARGET __attribute__((target("avx512f,avx512bw,avx512vl")))

// ---------------------------------------------------------------- the steps: one chunk of a weight row's bytes
// Each UNPACK turns one chunk of CB bytes (2 CB codes) into P byte vectors whose lanes line up with the
// activations' chunk layout; DOT adds the products of bytes (codes, unsigned) and activations (signed) into
// int32 lanes.

// 256 bits, G = 32 (CB = 16, P = 1): the 32 codes as one vector, the low nibbles (even inputs), then the high.
inline void unpack16(const uint8_t* p, __m256i* v) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m4 = _mm_set1_epi8(0x0F);
  v[0] = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m4), _mm_and_si128(b, m4));
}

// 256 bits, G >= 64 (CB = 32, P = 2): the low nibbles of 32 bytes, then the high ones.
inline void unpack32(const uint8_t* p, __m256i* v) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  v[0] = _mm256_and_si256(b, m4);
  v[1] = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4);
}

// 512 bits, G = 128 (CB = 64, P = 2).
BW_TARGET inline void unpack64(const uint8_t* p, __m512i* v) {
  const __m512i b = _mm512_loadu_si512(p);
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  v[0] = _mm512_and_si512(b, m4);
  v[1] = _mm512_and_si512(_mm512_srli_epi16(b, 4), m4);
}

inline __m256i dot_avx2(__m256i acc, __m256i w, __m256i x) {  // each int32 lane += the sum of 4 products
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}
VNNI_TARGET inline __m256i dot_vnni256(__m256i acc, __m256i w, __m256i x) { return _mm256_dpbusd_epi32(acc, w, x); }
BW_TARGET inline __m512i dot512_bw(__m512i acc, __m512i w, __m512i x) {
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1)));
}
VNNI_TARGET inline __m512i dot512_vnni(__m512i acc, __m512i w, __m512i x) { return _mm512_dpbusd_epi32(acc, w, x); }

// NR weight rows (codes from w, ldw bytes apart; scales s and offsets o [NR][groups] in float32) against MB
// activation rows from m0: their sums in out[r * M + m]. Per chunk each weight vector is unpacked once and
// each activation vector loaded once for all NR x MB products, summed in int32 over the group; at a group's
// end one conversion and one multiply-add by the activations' scale times the weights', and the offset's
// share, o * (xs * sum xq), added to a float32 sum of its own. The body is written
// once, as a macro, and compiled once per instruction set (a function carrying a target attribute cannot
// share an inlined body with one that does not, and the AVX2 one must carry none).
#define ROWS_BODY(VEC, IVEC, ZERO, IZERO, FMA, CVT, SET1, LOADI, UNPACK, CB, P, DOT, REDUCE)        \
  VEC tot[NR][MB];                                                                                           \
  float off[NR][MB];                                                                                         \
  for (int r = 0; r < NR; r++)                                                                               \
    for (int m = 0; m < MB; m++) tot[r][m] = ZERO, off[r][m] = 0.0f;                                        \
  const int64_t chunks = G / (2 * CB);                                                                       \
  for (int64_t g = 0; g < a.groups; g++) {                                                                   \
    IVEC acc[NR][MB];                                                                                        \
    for (int r = 0; r < NR; r++)                                                                             \
      for (int m = 0; m < MB; m++) acc[r][m] = IZERO;                                                       \
    for (int64_t j = 0; j < chunks; j++) {                                                                   \
      const int64_t byte = g * (G / 2) + j * CB;                                                             \
      IVEC wq[NR][P];                                                                                        \
      for (int r = 0; r < NR; r++) {                                                                        \
        _mm_prefetch(reinterpret_cast<const char*>(w + r * ldw + byte) + kPrefetch, _MM_HINT_T1);            \
        UNPACK(w + r * ldw + byte, wq[r]);                                                                   \
      }                                                                                                      \
      for (int m = 0; m < MB; m++) {                                                                         \
        const int8_t* xq = a.q.data() + (m0 + m) * K_pad + 2 * byte;                                         \
        for (int p = 0; p < P; p++) {                                                                        \
          const IVEC xv = LOADI(xq + p * (2 * CB / P));                                                      \
          for (int r = 0; r < NR; r++) acc[r][m] = DOT(acc[r][m], wq[r][p], xv);                             \
        }                                                                                                    \
      }                                                                                                      \
    }                                                                                                        \
    for (int m = 0; m < MB; m++) {                                                                           \
      const float xs = a.scale[(m0 + m) * a.groups + g], gs = a.gsum[(m0 + m) * a.groups + g];              \
      for (int r = 0; r < NR; r++) {                                                                         \
        tot[r][m] = FMA(CVT(acc[r][m]), SET1(xs * s[r * a.groups + g]), tot[r][m]);                          \
        off[r][m] += o[r * a.groups + g] * gs;                                                               \
      }                                                                                                      \
    }                                                                                                        \
  }                                                                                                          \
  for (int r = 0; r < NR; r++)                                                                               \
    for (int m = 0; m < MB; m++) out[r * M + m0 + m] = REDUCE(tot[r][m]) + off[r][m];

#define ROW_ARGS const Acts &a, int64_t m0, int64_t M, int64_t K_pad, int64_t G, const uint8_t *w, int64_t ldw, \
                 const float *s, const float *o, float *out

#define LOADI256(p) _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
#define BODY256(UNPACK, CB, P, DOT)                                                                           \
  ROWS_BODY(__m256, __m256i, _mm256_setzero_ps(), _mm256_setzero_si256(), _mm256_fmadd_ps, _mm256_cvtepi32_ps, \
            _mm256_set1_ps, LOADI256, UNPACK, CB, P, DOT, hsum256)
#define BODY512(DOT)                                                                                          \
  ROWS_BODY(__m512, __m512i, _mm512_setzero_ps(), _mm512_setzero_si512(), _mm512_fmadd_ps, _mm512_cvtepi32_ps, \
            _mm512_set1_ps, _mm512_loadu_si512, unpack64, 64, 2, DOT, _mm512_reduce_add_ps)

template <int NR, int MB> void row_avx2_g32(ROW_ARGS) { BODY256(unpack16, 16, 1, dot_avx2) }
template <int NR, int MB> void row_avx2(ROW_ARGS) { BODY256(unpack32, 32, 2, dot_avx2) }
template <int NR, int MB> VNNI_TARGET void row_vnni256_g32(ROW_ARGS) { BODY256(unpack16, 16, 1, dot_vnni256) }
template <int NR, int MB> VNNI_TARGET void row_vnni256(ROW_ARGS) { BODY256(unpack32, 32, 2, dot_vnni256) }
template <int NR, int MB> BW_TARGET void row512_bw(ROW_ARGS) { BODY512(dot512_bw) }
template <int NR, int MB> VNNI_TARGET void row512_vnni(ROW_ARGS) { BODY512(dot512_vnni) }

// Inputs per chunk of the activations' layout: 128 where the step is 512 bits (AVX-512, G = 128), 64 for the
// 256-bit steps at G >= 64, 32 at G = 32.
inline int64_t chunk_inputs(int isa, int64_t G) { return G == 32 ? 32 : isa >= 1 && G == 128 ? 128 : 64; }

// NR weight rows against MB activation rows from m0.
#define ROW_CALL(FN) FN<NR, MB>(a, m0, M, K_pad, G, w, ldw, s, o, out)
template <int NR, int MB>
inline void rows(int isa, ROW_ARGS) {
  if (G == 32) {
    if (isa == 2) ROW_CALL(row_vnni256_g32);
    else ROW_CALL(row_avx2_g32);
  } else if (G == 64) {
    if (isa == 2) ROW_CALL(row_vnni256);
    else ROW_CALL(row_avx2);  // (AVX-512BW without VNNI below G = 128: the AVX2 step)
  } else if (isa == 2) {
    ROW_CALL(row512_vnni);
  } else if (isa == 1) {
    ROW_CALL(row512_bw);
  } else {
    ROW_CALL(row_avx2);
  }
}
#undef ROW_CALL

// NR weight rows against every activation row, MBMAX at a time.
template <int NR, int MBMAX>
inline void all_rows(int isa, const Acts& a, int64_t M, int64_t K_pad, int64_t G, const uint8_t* w, int64_t ldw,
                     const float* s, const float* o, float* out) {
  int64_t m = 0;
  for (; m + MBMAX <= M; m += MBMAX) rows<NR, MBMAX>(isa, a, m, M, K_pad, G, w, ldw, s, o, out);
  const int rest = static_cast<int>(M - m);
  if (MBMAX > 3 && rest == 3) rows<NR, (MBMAX > 3 ? 3 : 1)>(isa, a, m, M, K_pad, G, w, ldw, s, o, out);
  if (MBMAX > 2 && rest == 2) rows<NR, (MBMAX > 2 ? 2 : 1)>(isa, a, m, M, K_pad, G, w, ldw, s, o, out);
  if (rest == 1) rows<NR, 1>(isa, a, m, M, K_pad, G, w, ldw, s, o, out);
}

// The rows of one step (nr of them, at most NR) against every activation row.
template <int NR, int MBMAX>
inline void step_rows(int64_t nr, int isa, const Acts& a, int64_t M, int64_t K_pad, int64_t G, const uint8_t* w,
                      int64_t ldw, const float* s, const float* o, float* out) {
  switch (nr) {
    case 4: all_rows<(NR > 3 ? 4 : 1), MBMAX>(isa, a, M, K_pad, G, w, ldw, s, o, out); break;
    case 3: all_rows<(NR > 3 ? 3 : 1), MBMAX>(isa, a, M, K_pad, G, w, ldw, s, o, out); break;
    case 2: all_rows<2, MBMAX>(isa, a, M, K_pad, G, w, ldw, s, o, out); break;
    default: all_rows<1, MBMAX>(isa, a, M, K_pad, G, w, ldw, s, o, out); break;
  }
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
  prepare(x, xdtype, M, K, K_pad, G, chunk_inputs(isa, G), a);
  // Weight rows `step` at a time, each step's rows by one thread. Registers decide: each product of a weight
  // row and an activation row holds an int32 sum and a float32 one, so with AVX-512's 32 registers (VNNI's
  // bodies, and BW's at G = 128) four weight rows by two activation rows, or two by four; with AVX2's 16
  // (AVX2, and BW's bodies below G = 128, which are AVX2's), two by two.
  const bool wide = isa == 2 || (isa == 1 && G == 128), four = wide && M <= 2;  // (BW below 128: AVX2's body)
  const int step = four ? 4 : 2;
  const int64_t steps = (N + step - 1) / step;
#pragma omp parallel if (N * K_pad / 2 >= (int64_t{1} << 16))
  {
    std::vector<float> so(2 * step * groups), sums(step * M);  // (the step's scales, offsets, sums [r][m])
    float* s = so.data();
    float* o = so.data() + step * groups;
#pragma omp for schedule(static)
    for (int64_t p = 0; p < steps; p++) {
      const int64_t n = p * step, nr = N - n < step ? N - n : step;
      widen(scale, n * groups, nr * groups, sdtype, s);  // (the step's rows are consecutive)
      if (offset) {
        widen(offset, n * groups, nr * groups, sdtype, o);
      } else {
        for (int64_t i = 0; i < nr * groups; i++) o[i] = -8.0f * s[i];
      }
      const uint8_t* wn = w + n * (K_pad / 2);
      if (four) step_rows<4, 2>(nr, isa, a, M, K_pad, G, wn, K_pad / 2, s, o, sums.data());
      else if (wide) step_rows<2, 4>(nr, isa, a, M, K_pad, G, wn, K_pad / 2, s, o, sums.data());
      else step_rows<2, 2>(nr, isa, a, M, K_pad, G, wn, K_pad / 2, s, o, sums.data());
      for (int64_t r = 0; r < nr; r++) {
        const float b = bias ? to_float(bias, n + r, sdtype) : 0.0f;
        for (int64_t m = 0; m < M; m++) store(y, m * N + n + r, sums[r * M + m] + b, ydtype);
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
