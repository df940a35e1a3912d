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
// xs * sum(xq), the factor of the group's offset). Each weight row is streamed once, by one thread (OpenMP,
// static), up to four activation rows sharing each unpacked weight vector, a prefetch ahead of the stream.
//
// Built by kernels/cpu_int4.py through kernels/cpu_build.py (g++ -O3 -mavx2 -mfma -mf16c -fopenmp; the
// AVX-512 paths carry target attributes and are chosen by the caller's `isa`), plain C ABI through ctypes.

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include <vector>

namespace {

constexpr int64_t kBlock = 32;       // activation block (inputs per activation scale)
constexpr int64_t kPrefetch = 512;   // bytes ahead of the weight stream
enum Dtype { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline float to_float(const void* p, int64_t i, int dtype) {
  if (dtype == kFloat32) return static_cast<const float*>(p)[i];
  const uint16_t h = static_cast<const uint16_t*>(p)[i];
  if (dtype == kBFloat16) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
  }
  return _cvtsh_ss(h);
}

inline void store(void* p, int64_t i, float v, int dtype) {
  if (dtype == kFloat32) {
    static_cast<float*>(p)[i] = v;
  } else if (dtype == kBFloat16) {
    uint32_t bits;
    __builtin_memcpy(&bits, &v, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN
      bits |= 0x00400000u;
    } else {
      bits += 0x7fffu + ((bits >> 16) & 1u);
    }
    static_cast<uint16_t*>(p)[i] = static_cast<uint16_t>(bits >> 16);
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

// One weight row (its codes w, G inputs a group, scales s and offsets o per group in float32) against MB
// activation rows from m0: the sums in out[0..MB). The body is written once, as a macro, and compiled once
// per instruction set (a function carrying a target attribute cannot share an inlined body with one that
// does not, and the AVX2 one must not carry any).
#define ROW256(DOT)                                                                                          \
  __m256 tot[MB], grp[MB];                                                                                   \
  float off[MB];                                                                                             \
  for (int m = 0; m < MB; m++) tot[m] = _mm256_setzero_ps(), off[m] = 0.0f;                                  \
  const int64_t per_group = G / kBlock;                                                                      \
  for (int64_t g = 0; g < a.groups; g++) {                                                                   \
    for (int m = 0; m < MB; m++) grp[m] = _mm256_setzero_ps();                                               \
    for (int64_t j = 0; j < per_group; j++) {                                                                \
      const int64_t b = g * per_group + j;                                                                   \
      _mm_prefetch(reinterpret_cast<const char*>(w + b * 16) + kPrefetch, _MM_HINT_T0);                      \
      const __m256i wq = codes32(w + b * 16);                                                                \
      for (int m = 0; m < MB; m++) {                                                                         \
        const __m256i xq =                                                                                   \
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + (m0 + m) * K_pad + b * kBlock)); \
        grp[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(wq, xq)),                                            \
                                 _mm256_loadu_ps(a.scale.data() + ((m0 + m) * a.blocks + b) * 8), grp[m]);   \
      }                                                                                                      \
    }                                                                                                        \
    const __m256 sg = _mm256_set1_ps(s[g]);                                                                  \
    for (int m = 0; m < MB; m++) {                                                                           \
      tot[m] = _mm256_fmadd_ps(grp[m], sg, tot[m]);                                                          \
      off[m] += o[g] * a.gsum[(m0 + m) * a.groups + g];                                                      \
    }                                                                                                        \
  }                                                                                                          \
  for (int m = 0; m < MB; m++) out[m] = hsum256(tot[m]) + off[m];

#define ROW_ARGS const Acts &a, int64_t m0, int64_t K_pad, int64_t G, const uint8_t *w, const float *s, \
                 const float *o, float *out

template <int MB>
void row256_avx2(ROW_ARGS) { ROW256(dot_avx2) }

template <int MB>
VNNI_TARGET void row256_vnni(ROW_ARGS) { ROW256(dot_vnni256) }

// ---------------------------------------------------------------- 512 bits: 64 weights (two blocks) a step, G >= 64

BW_TARGET inline __m512i dot512_bw(__m512i w, __m512i x) {
  return _mm512_madd_epi16(_mm512_maddubs_epi16(w, x), _mm512_set1_epi16(1));
}

VNNI_TARGET inline __m512i dot512_vnni(__m512i w, __m512i x) {
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x);
}

// Two blocks' 32 code bytes: [lo(b) | lo(b+1)] and [hi(b) | hi(b+1)] (128-bit halves) reordered to
// lo(b), hi(b), lo(b+1), hi(b+1), each block's bytes as its activations are.
#define ROW512(DOT)                                                                                          \
  __m512 tot[MB], grp[MB];                                                                                   \
  float off[MB];                                                                                             \
  for (int m = 0; m < MB; m++) tot[m] = _mm512_setzero_ps(), off[m] = 0.0f;                                  \
  const __m256i m4 = _mm256_set1_epi8(0x0F);                                                                 \
  const __m512i order = _mm512_set_epi64(7, 6, 3, 2, 5, 4, 1, 0);                                            \
  const int64_t per_group = G / (2 * kBlock);                                                                \
  for (int64_t g = 0; g < a.groups; g++) {                                                                   \
    for (int m = 0; m < MB; m++) grp[m] = _mm512_setzero_ps();                                               \
    for (int64_t j = 0; j < per_group; j++) {                                                                \
      const int64_t b = (g * per_group + j) * 2;                                                             \
      _mm_prefetch(reinterpret_cast<const char*>(w + b * 16) + kPrefetch, _MM_HINT_T0);                      \
      const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * 16));                    \
      const __m512i wq = _mm512_permutexvar_epi64(                                                           \
          order, _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(p, m4)),                         \
                                    _mm256_and_si256(_mm256_srli_epi16(p, 4), m4), 1));                      \
      for (int m = 0; m < MB; m++) {                                                                         \
        const __m512i xq = _mm512_loadu_si512(a.q.data() + (m0 + m) * K_pad + b * kBlock);                   \
        grp[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(DOT(wq, xq)),                                            \
                                 _mm512_loadu_ps(a.scale.data() + ((m0 + m) * a.blocks + b) * 8), grp[m]);   \
      }                                                                                                      \
    }                                                                                                        \
    const __m512 sg = _mm512_set1_ps(s[g]);                                                                  \
    for (int m = 0; m < MB; m++) {                                                                           \
      tot[m] = _mm512_fmadd_ps(grp[m], sg, tot[m]);                                                          \
      off[m] += o[g] * a.gsum[(m0 + m) * a.groups + g];                                                      \
    }                                                                                                        \
  }                                                                                                          \
  for (int m = 0; m < MB; m++) out[m] = _mm512_reduce_add_ps(tot[m]) + off[m];

template <int MB>
BW_TARGET void row512_bw(ROW_ARGS) { ROW512(dot512_bw) }

template <int MB>
VNNI_TARGET void row512_vnni(ROW_ARGS) { ROW512(dot512_vnni) }

// Up to four activation rows from m0 (mb of them) against one weight row: their sums in out[0..mb).
template <int MB>
inline void rows(int isa, ROW_ARGS) {
  if (isa >= 1 && G >= 2 * kBlock) {
    if (isa == 2) row512_vnni<MB>(a, m0, K_pad, G, w, s, o, out); else row512_bw<MB>(a, m0, K_pad, G, w, s, o, out);
  } else if (isa == 2) {
    row256_vnni<MB>(a, m0, K_pad, G, w, s, o, out);
  } else {
    row256_avx2<MB>(a, m0, K_pad, G, w, s, o, out);  // (AVX-512BW without VNNI at G = 32: the AVX2 step)
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
  prepare(x, xdtype, M, K, K_pad, G, a);
  // Below about 64 KiB of weights the fork/join costs more than it saves.
#pragma omp parallel if (N * K_pad / 2 >= (int64_t{1} << 16))
  {
    std::vector<float> so(2 * groups);  // (a row's scales and offsets in float32)
    float* s = so.data();
    float* o = so.data() + groups;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) {
      widen(scale, n * groups, groups, sdtype, s);
      if (offset) {
        widen(offset, n * groups, groups, sdtype, o);
      } else {
        for (int64_t g = 0; g < groups; g++) o[g] = -8.0f * s[g];
      }
      const uint8_t* wn = w + n * (K_pad / 2);
      const float b = bias ? to_float(bias, n, sdtype) : 0.0f;
      float out[4];
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) {
        rows<4>(isa, a, m, K_pad, G, wn, s, o, out);
        for (int i = 0; i < 4; i++) store(y, (m + i) * N + n, out[i] + b, ydtype);
      }
      const int rest = static_cast<int>(M - m);
      if (rest == 3) rows<3>(isa, a, m, K_pad, G, wn, s, o, out);
      if (rest == 2) rows<2>(isa, a, m, K_pad, G, wn, s, o, out);
      if (rest == 1) rows<1>(isa, a, m, K_pad, G, wn, s, o, out);
      for (int i = 0; i < rest; i++) store(y, (m + i) * N + n, out[i] + b, ydtype);
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
      for (int64_t g = 0; g < groups; g++) {
        const float sg = s[g], og = o[g];
        float* dst = row.data() + g * G;
        const uint8_t* src = wn + g * G / 2;
        for (int64_t i = 0; i < G / 2; i++) {  // (vectorised by the compiler)
          dst[2 * i] = static_cast<float>(src[i] & 0x0F) * sg + og;
          dst[2 * i + 1] = static_cast<float>(src[i] >> 4) * sg + og;
        }
      }
      if (odtype == kFloat32) {
        __builtin_memcpy(static_cast<float*>(out) + r * K, row.data(), K * sizeof(float));
      } else {
        for (int64_t k = 0; k < K; k++) store(out, r * K + k, row[k], kBFloat16);
      }
    }
  }
  return 0;
}
