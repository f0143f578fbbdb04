/* int4 weights x int8 activations on AVX2: the product of the W4A8 layers (lfm2audio/model/w4a8.py).
 *
 * Why it exists: PyTorch's CPU int4 kernel converts every weight to bf16 before multiplying, which on an
 * AVX2 CPU reads ~7 GB/s of packed weights, slower than the int8 kernels. Here 32 packed bytes (64
 * weights) are split into their low and high nibbles and multiplied with int8 activations by
 * vpmaddubsw (u8 x s8 -> pairs summed in s16: 15 * 127 * 2 fits, nothing saturates), so the product
 * reads its weights at about the memory's speed.
 *
 * Layout, per output row n: K / 2 bytes; each 64 input features j..j+63 are 32 bytes, byte i holding
 * feature j + i in its low nibble and j + 32 + i in its high one. A weight is q * scale + corr for its
 * code q in [0, 15] and its group's scale and corr (float32, (N, K / gs) row-major): corr is the ATen
 * layout's zero - 8 * scale, so the weights are those of aten._weight_int4pack_mm_for_cpu.
 *
 * Activations: each row's group of gs features is quantized to int8 on its own peak (scale = peak /
 * 127), so a row's output depends on that row only, alone or in a batch. A group then contributes
 * scale_w * scale_a * sum(q * a) + corr * scale_a * sum(a), summed in int32 inside the group.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

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
    const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t sum = 0;
    for (int64_t i = 0; i < gs; i++) {
      const int32_t q = (int32_t)nearbyintf(xs[i] * inv); /* |q| <= 127: the peak maps to 127 */
      qs[i] = (int8_t)q;
      sum += q;
    }
    as[mg] = amax / 127.0f;
    asa[mg] = as[mg] * (float)sum;
  }
}

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

/* Output n of R consecutive rows from row m: the weights' nibbles are unpacked once for all R. Each
 * row's operations and their order are the same for any R, so a row gives the same bits in any batch. */
static inline __attribute__((always_inline)) void rows_dot(const uint8_t *wr, const float *sr, const float *cr,
                                                           const int8_t *aq, const float *as, const float *asa,
                                                           int64_t K, int64_t G, int64_t gs, int64_t N, int64_t m,
                                                           int64_t n, float *y, const int R) {
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[4];
  float c[4];
  for (int r = 0; r < R; r++) {
    acc[r] = _mm256_setzero_ps();
    c[r] = 0.0f;
  }
  for (int64_t g = 0; g < G; g++) {
    __m256i dot[4];
    for (int r = 0; r < R; r++) dot[r] = _mm256_setzero_si256();
    for (int64_t j = g * gs; j < (g + 1) * gs; j += 64) {
      const __m256i b = _mm256_loadu_si256((const __m256i *)(wr + j / 2));
      const __m256i lo = _mm256_and_si256(b, low);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
      for (int r = 0; r < R; r++) {
        const int8_t *ar = aq + (m + r) * K + j;
        const __m256i a0 = _mm256_loadu_si256((const __m256i *)ar);
        const __m256i a1 = _mm256_loadu_si256((const __m256i *)(ar + 32));
        const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, a0), _mm256_maddubs_epi16(hi, a1));
        dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(p, ones));
      }
    }
    for (int r = 0; r < R; r++) {
      const int64_t mg = (m + r) * G + g;
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), _mm256_set1_ps(sr[g] * as[mg]), acc[r]);
      c[r] = fmaf(cr[g], asa[mg], c[r]);
    }
  }
  for (int r = 0; r < R; r++) y[(m + r) * N + n] = hsum(acc[r]) + c[r];
}

/* y (M, N) float32 = x (M, K) float32 @ W.T; K and gs multiples of 64, gs dividing K.
 * Returns 0, or -1 when the scratch for the quantized rows cannot be allocated. */
int w4a8_linear(const float *x, int64_t M, int64_t K, const uint8_t *w, const float *scales, const float *corr,
                int64_t N, int64_t gs, float *y, int nthreads) {
  const int64_t G = K / gs;
  int8_t *aq = malloc((size_t)(M * K) + 2 * sizeof(float) * (size_t)(M * G));
  if (aq == NULL) return -1;
  float *as = (float *)(aq + M * K), *asa = as + M * G; /* M * K is a multiple of 64: aligned */
  quantize_rows(x, M, K, gs, aq, as, asa, nthreads);
  /* A thread costs a few microseconds to start: small products (tiny test models) run on this one. */
#pragma omp parallel for schedule(static) num_threads(nthreads) if (N * K * M >= (1 << 16))
  for (int64_t n = 0; n < N; n++) {
    const uint8_t *wr = w + n * (K / 2); /* the row's K / 2 bytes stay in L1 across the batch */
    const float *sr = scales + n * G, *cr = corr + n * G;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) rows_dot(wr, sr, cr, aq, as, asa, K, G, gs, N, m, n, y, 4);
    for (; m < M; m++) rows_dot(wr, sr, cr, aq, as, asa, K, G, gs, N, m, n, y, 1);
  }
  free(aq);
  return 0;
}
