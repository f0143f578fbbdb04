/* int4 weights x int8 activations on AVX2 or AVX-512 VNNI: the product of the W4A8 layers (w4a8.py).
 *
 * Why it exists: PyTorch's CPU int4 kernel converts every weight to bf16 before multiplying, which on an
 * AVX2 CPU reads ~7 GB/s of packed weights, slower than the int8 kernels. Here the 4-bit codes are
 * multiplied with int8 activations in integer arithmetic, so the product reads its weights at close to
 * the memory's speed.
 *
 * Layout: the output rows are taken 16 at a time (a tile; the last one is padded with zero rows), so that
 * a vector's lanes are 16 outputs and the scales of a group are one vector load, not 16 broadcasts. A
 * tile holds, for each 8 input features j..j+7, 64 bytes: byte 4 * o + i is output o's code of feature
 * j + i in its low nibble and of j + 4 + i in its high one. A weight is q * scale + corr for its code q in
 * [0, 15] and its group's scale and corr, float32, (tiles, groups, 16): corr is the ATen layout's
 * zero - 8 * scale, so the weights are those of aten._weight_int4pack_mm_for_cpu.
 *
 * Activations: each row's group of gs features is quantized to int8 on its own peak (scale = peak /
 * 127), so a row's output depends on that row only, alone or in a batch. A group then contributes
 * scale_w * scale_a * sum(q * a) + corr * scale_a * sum(a), summed in int32 inside the group; a product
 * takes 4 features' activations broadcast to all 16 outputs.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE 16

static inline int32_t load4(const int8_t *p) { /* 4 activations, for a broadcast */
  int32_t v;
  memcpy(&v, p, 4);
  return v;
}

static void quantize_rows(const float *x, int64_t M, int64_t K, int64_t gs, int8_t *aq, float *as,
                          float *asa, int nthreads) {
  const int64_t G = K / gs;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
#pragma omp parallel for schedule(static) num_threads(nthreads) if (M > 1)
  for (int64_t mg = 0; mg < M * G; mg++) {
    const float *xs = x + mg * gs;
    int8_t *qs = aq + mg * gs;
    __m256 peak = _mm256_setzero_ps();
    for (int64_t i = 0; i < gs; i += 8) peak = _mm256_max_ps(peak, _mm256_and_ps(_mm256_loadu_ps(xs + i), absmask));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(peak), _mm256_extractf128_ps(peak, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    const float amax = _mm_cvtss_f32(h);
    const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    __m256i sum = _mm256_setzero_si256();
    for (int64_t i = 0; i < gs; i += 8) {
      /* rounded to nearest even; |q| <= 127, the peak maps to 127 */
      const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xs + i), inv));
      sum = _mm256_add_epi32(sum, q);
      const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
      _mm_storel_epi64((__m128i *)(qs + i), _mm_packs_epi16(q16, q16));
    }
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    as[mg] = amax / 127.0f;
    asa[mg] = as[mg] * (float)_mm_cvtsi128_si32(s);
  }
}

static inline void store_tile(float *y, const float *t, int64_t width) {
  for (int64_t o = 0; o < width; o++) y[o] = t[o];
}

/* One tile's 16 outputs for R consecutive rows from row m: each weight vector is unpacked once for all R.
 * A row's operations and their order are the same for any R, so a row gives the same bits in any batch. */
static inline __attribute__((always_inline)) void tile_avx2(const uint8_t *wt, const float *st, const float *ct,
                                                            const int8_t *aq, const float *as, const float *asa,
                                                            int64_t K, int64_t G, int64_t gs, int64_t m, float *y,
                                                            int64_t N, int64_t width, const int R) {
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[4][2];
  for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    __m256i dot[4][2];
    for (int r = 0; r < R; r++) dot[r][0] = dot[r][1] = _mm256_setzero_si256();
    for (int64_t j = g * gs; j < (g + 1) * gs; j += 8) {
      const uint8_t *wb = wt + j * (TILE / 2);
      __m256i lo[2], hi[2];
      for (int h = 0; h < 2; h++) {
        const __m256i b = _mm256_loadu_si256((const __m256i *)(wb + 32 * h));
        lo[h] = _mm256_and_si256(b, low);
        hi[h] = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
      }
      for (int r = 0; r < R; r++) {
        const int8_t *ar = aq + (m + r) * K + j;
        const __m256i a0 = _mm256_set1_epi32(load4(ar)), a1 = _mm256_set1_epi32(load4(ar + 4));
        for (int h = 0; h < 2; h++) {
          const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo[h], a0), _mm256_maddubs_epi16(hi[h], a1));
          dot[r][h] = _mm256_add_epi32(dot[r][h], _mm256_madd_epi16(p, ones));
        }
      }
    }
    for (int h = 0; h < 2; h++) {
      const __m256 s = _mm256_loadu_ps(st + g * TILE + 8 * h), c = _mm256_loadu_ps(ct + g * TILE + 8 * h);
      for (int r = 0; r < R; r++) {
        const int64_t mg = (m + r) * G + g;
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r][h]), _mm256_mul_ps(s, _mm256_set1_ps(as[mg])), acc[r][h]);
        acc[r][h] = _mm256_fmadd_ps(c, _mm256_set1_ps(asa[mg]), acc[r][h]);
      }
    }
  }
  for (int r = 0; r < R; r++) {
    float t[TILE];
    _mm256_storeu_ps(t, acc[r][0]);
    _mm256_storeu_ps(t + 8, acc[r][1]);
    store_tile(y + (m + r) * N, t, width);
  }
}

static void product_avx2(const int8_t *aq, const float *as, const float *asa, int64_t M, int64_t K,
                         const uint8_t *w, const float *scales, const float *corr, int64_t N, int64_t gs, float *y,
                         int nthreads) {
  const int64_t G = K / gs, tiles = (N + TILE - 1) / TILE;
  /* A thread costs a few microseconds to start: small products (tiny test models) run on this one. */
#pragma omp parallel for schedule(static) num_threads(nthreads) if (N * K * M >= (1 << 16))
  for (int64_t t = 0; t < tiles; t++) {
    const uint8_t *wt = w + t * TILE * (K / 2); /* the tile's bytes stay in L2 across the batch */
    const float *st = scales + t * G * TILE, *ct = corr + t * G * TILE;
    const int64_t width = N - t * TILE < TILE ? N - t * TILE : TILE;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) tile_avx2(wt, st, ct, aq, as, asa, K, G, gs, m, y + t * TILE, N, width, 4);
    for (; m < M; m++) tile_avx2(wt, st, ct, aq, as, asa, K, G, gs, m, y + t * TILE, N, width, 1);
  }
}

/* The same product with AVX-512 VNNI: vpdpbusd multiplies u8 by s8 and sums each 4 products into an int32
 * lane in one instruction, so a 64-byte vector is a whole tile. The high nibbles are multiplied in place
 * (16 times the code, masked, not shifted) into their own sums, exact in int32 (at most 16 * 15 * 127 * gs
 * for a group of gs features) and divided by 16 once per group. Integer sums are exact either way; only
 * the float sums' order differs from the AVX2 path, so the two agree to rounding, and each gives a row
 * the same bits alone or in any batch. */
#if defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 9)
#define HAVE_VNNI 1
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

VNNI static inline __attribute__((always_inline)) void tile_vnni(const uint8_t *wt, const float *st,
                                                                const float *ct, const int8_t *aq,
                                                                const float *as, const float *asa, int64_t K,
                                                                int64_t G, int64_t gs, int64_t m, float *y,
                                                                int64_t N, int64_t width, const int R) {
  const __m512i low = _mm512_set1_epi8(0x0f), high = _mm512_set1_epi8((char)0xf0);
  __m512 acc[8];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    __m512i dlo[8], dhi[8];
    for (int r = 0; r < R; r++) dlo[r] = dhi[r] = _mm512_setzero_si512();
    for (int64_t j = g * gs; j < (g + 1) * gs; j += 8) {
      const __m512i b = _mm512_loadu_si512((const void *)(wt + j * (TILE / 2)));
      const __m512i lo = _mm512_and_si512(b, low), hi = _mm512_and_si512(b, high);
      for (int r = 0; r < R; r++) {
        const int8_t *ar = aq + (m + r) * K + j;
        dlo[r] = _mm512_dpbusd_epi32(dlo[r], lo, _mm512_set1_epi32(load4(ar)));
        dhi[r] = _mm512_dpbusd_epi32(dhi[r], hi, _mm512_set1_epi32(load4(ar + 4)));
      }
    }
    const __m512 s = _mm512_loadu_ps(st + g * TILE), c = _mm512_loadu_ps(ct + g * TILE);
    for (int r = 0; r < R; r++) {
      const int64_t mg = (m + r) * G + g;
      const __m512i dot = _mm512_add_epi32(dlo[r], _mm512_srai_epi32(dhi[r], 4));
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(s, _mm512_set1_ps(as[mg])), acc[r]);
      acc[r] = _mm512_fmadd_ps(c, _mm512_set1_ps(asa[mg]), acc[r]);
    }
  }
  const __mmask16 keep = (__mmask16)((1u << width) - 1);
  for (int r = 0; r < R; r++) _mm512_mask_storeu_ps(y + (m + r) * N, keep, acc[r]);
}

VNNI static void product_vnni(const int8_t *aq, const float *as, const float *asa, int64_t M, int64_t K,
                              const uint8_t *w, const float *scales, const float *corr, int64_t N, int64_t gs,
                              float *y, int nthreads) {
  const int64_t G = K / gs, tiles = (N + TILE - 1) / TILE;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (N * K * M >= (1 << 16))
  for (int64_t t = 0; t < tiles; t++) {
    const uint8_t *wt = w + t * TILE * (K / 2);
    const float *st = scales + t * G * TILE, *ct = corr + t * G * TILE;
    const int64_t width = N - t * TILE < TILE ? N - t * TILE : TILE;
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) tile_vnni(wt, st, ct, aq, as, asa, K, G, gs, m, y + t * TILE, N, width, 8);
    for (; m + 4 <= M; m += 4) tile_vnni(wt, st, ct, aq, as, asa, K, G, gs, m, y + t * TILE, N, width, 4);
    for (; m < M; m++) tile_vnni(wt, st, ct, aq, as, asa, K, G, gs, m, y + t * TILE, N, width, 1);
  }
}
#else
#define HAVE_VNNI 0
#endif

static int detect_isa(void) {
#if HAVE_VNNI
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vnni"))
    return 2;
#endif
  return 1;
}

/* Which instruction sets this CPU and build allow: 1 AVX2, 2 AVX-512 VNNI as well. Asked once: every
 * product checks it, and the CPU does not change (threads racing here all store the same value). */
int w4a8_cpu_isa(void) {
  static int isa = 0;
  if (isa == 0) isa = detect_isa();
  return isa;
}

/* y (M, N) float32 = x (M, K) float32 @ W.T; K a multiple of gs, gs of 8. isa 2 takes the
 * VNNI path (where w4a8_cpu_isa() is 2; else the AVX2 one), 1 the AVX2 path.
 * Returns 0, or -1 when the scratch for the quantized rows cannot be allocated. */
int w4a8_linear(const float *x, int64_t M, int64_t K, const uint8_t *w, const float *scales, const float *corr,
                int64_t N, int64_t gs, float *y, int nthreads, int isa) {
  const int64_t G = K / gs;
  int8_t *aq = malloc((size_t)(M * K) + 2 * sizeof(float) * (size_t)(M * G) + 64);
  if (aq == NULL) return -1;
  float *as = (float *)(aq + ((M * K + 63) & ~(int64_t)63)), *asa = as + M * G;
  quantize_rows(x, M, K, gs, aq, as, asa, nthreads);
#if HAVE_VNNI
  if (isa == 2 && w4a8_cpu_isa() == 2)
    product_vnni(aq, as, asa, M, K, w, scales, corr, N, gs, y, nthreads);
  else
#endif
    product_avx2(aq, as, asa, M, K, w, scales, corr, N, gs, y, nthreads);
  free(aq);
  return 0;
}
