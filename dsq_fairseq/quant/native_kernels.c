/* Native CPU kernels (AVX-512 or AVX2, native_simd.h): BFP quantize (round to nearest or
 * stochastic), pack and unpack; 1-bit masks.
 *
 * Loaded by dsq_fairseq/quant/native.py (built with -O3 -march=native -fopenmp
 * -ffp-contract=off, no -ffast-math: IEEE semantics, no fused multiply-adds, no flush-to-zero).
 * Every kernel performs the reference's IEEE operations in the reference's order on every element
 * (dsq_fairseq/quant/bfp.py, packing.py), so the results are bit-identical;
 * tests/test_quant_native.py checks them against the references.
 *
 * Layout: x is [P, n, Q] (row-major, contiguous), blocks of B consecutive elements along n (a
 * short tail block where B does not divide n). Q == 1: blocks are contiguous ("rows"); Q > 1:
 * a block is B rows of Q lanes ("cols"), one shared exponent per lane.
 *
 * Vectors: 16 lanes of the native_simd.h layer (one zmm register with AVX-512, two ymm with
 * AVX2; the same bits either way). Without either, the file compiles to
 * dsq_native_vectorized() == 0 only, and Python keeps the torch.compile paths.
 */
#include <stdint.h>

#include "native_simd.h"

#if DSQ_SIMD
/* Every helper is inlined into its kernel: the vector types then stay in registers (AVX2's are
 * two-register structs) and constant widths fold the code-layout branches. */
#define DSQ_INLINE static inline __attribute__((always_inline))

/* The vector width the kernels were built for: 512 (AVX-512) or 256 (AVX2). */
int dsq_native_vectorized(void) { return DSQ_SIMD; }

DSQ_INLINE vmask lane_mask(int64_t len) {
  return len >= 16 ? (vmask)0xFFFF : (vmask)((1u << len) - 1u);
}

/* Per lane, from a NaN-free block maximum amax >= 0: the shared exponent
 * E = clamp(field(amax) - 127, -emax, emax) (0 for amax == 0) and the scale-up halves
 * 2^(lo), 2^(hi), lo = floor(k / 2), hi = k - lo, k = (w - 2) - E, and their reciprocals
 * (fast._pow2_factors / bfp._exp2_halves); all normal powers of two built from their bits
 * (|lo|, |hi| <= 79 for w <= 31, emax <= 127).
 *
 * Round to nearest also has a one-step form: x * 2^k and k_int * 2^-k (up, down) where every
 * lane has |k| <= 126 (single), bit-identical to the halves. A product by a power of two is
 * exact unless it leaves the normal range. Up: if x * 2^lo is normal, both forms round the
 * same exact x * 2^k once; if it is subnormal, |x * 2^k| < 2^-126 * 2^hi <= 2^-47 either way
 * and both round to a zero of x's sign; if it overflows, so does x * 2^k (same sign of lo, k).
 * Down: k_int * 2^-lo is exact (an integer |k_int| < 2^30 times 2^-lo >= 2^-79), so both round
 * the same exact k_int * 2^-k once. Stochastic rounding keeps the halves: there a rounded-away
 * tiny y still differs where u == 0. */
typedef struct {
  vf up_a, up_b, down_a, down_b;
  vf up, down; /* 2^k, 2^-k; meaningful where single */
  vi e;
  int single;
} factors_t;

DSQ_INLINE factors_t pow2_factors(vf amax, int wm2, int emax) {
  factors_t f;
  const vi bits = v_castps_si512(amax);
  vi e = v_sub_epi32(v_srai_epi32(bits, 23), v_set1_epi32(127));
  e = v_max_epi32(v_min_epi32(e, v_set1_epi32(emax)), v_set1_epi32(-emax));
  e = v_mask_mov_epi32(e, v_cmpeq_epi32_mask(bits, v_setzero_si512()), v_setzero_si512());
  const vi k = v_sub_epi32(v_set1_epi32(wm2), e);
  const vi lo = v_srai_epi32(k, 1);
  const vi hi = v_sub_epi32(k, lo);
  const vi bias = v_set1_epi32(127);
  f.up_a = v_castsi512_ps(v_slli_epi32(v_add_epi32(bias, lo), 23));
  f.up_b = v_castsi512_ps(v_slli_epi32(v_add_epi32(bias, hi), 23));
  f.down_a = v_castsi512_ps(v_slli_epi32(v_sub_epi32(bias, lo), 23));
  f.down_b = v_castsi512_ps(v_slli_epi32(v_sub_epi32(bias, hi), 23));
  const vi kc = v_max_epi32(v_min_epi32(k, v_set1_epi32(126)), v_set1_epi32(-126));
  f.up = v_castsi512_ps(v_slli_epi32(v_add_epi32(bias, kc), 23));
  f.down = v_castsi512_ps(v_slli_epi32(v_sub_epi32(bias, kc), 23));
  f.single = v_cmpeq_epi32_mask(kc, k) == (vmask)0xFFFF;
  f.e = e;
  return f;
}

/* Lane i of the result: factor vector lane i broadcast. */
DSQ_INLINE vf lane(const float* v, int i) { return v_set1_ps(v[i]); }

/* y clamped to [-qmax, qmax]; NaN stays NaN (max/min return their second operand when either
 * is NaN, as torch.clamp propagates it). */
DSQ_INLINE vf clamp_q(vf y, vf qmax) {
  const vf nqmax = v_sub_ps(v_setzero_ps(), qmax);
  return v_min_ps(qmax, v_max_ps(nqmax, y));
}

/* round-to-nearest-even(x * up_a * up_b) clamped to [-qmax, qmax]. */
DSQ_INLINE vf scaled_int(vf x, vf up_a, vf up_b, vf qmax) {
  const vf y = v_mul_ps(v_mul_ps(x, up_a), up_b);
  return clamp_q(v_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), qmax);
}

DSQ_INLINE vf quantize(vf x, vf up_a, vf up_b, vf down_a, vf down_b, vf qmax) {
  return v_mul_ps(v_mul_ps(scaled_int(x, up_a, up_b, qmax), down_a), down_b);
}

/* The one-step forms (factors_t.single): scaled_int and quantize with up = 2^k, down = 2^-k. */
DSQ_INLINE vf scaled_int1(vf x, vf up, vf qmax) {
  return clamp_q(v_roundscale_ps(v_mul_ps(x, up), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                 qmax);
}

DSQ_INLINE vf quantize1(vf x, vf up, vf down, vf qmax) {
  return v_mul_ps(scaled_int1(x, up, qmax), down);
}

/* Stochastic rounding (dsq_fairseq/quant/rounding.py): the stream key (k0, k1); u of element i
 * (its flat index in x) = (mix(mix(lo32(i) ^ k0) ^ hi32(i) ^ k1) >> 8) * 2^-24, mix = lowbias32. */
typedef struct {
  uint32_t k0, k1;
} rng_t;

DSQ_INLINE vi mix32(vi h) {
  h = v_xor_si512(h, v_srli_epi32(h, 16));
  h = v_mullo_epi32(h, v_set1_epi32(0x7feb352d));
  h = v_xor_si512(h, v_srli_epi32(h, 15));
  h = v_mullo_epi32(h, v_set1_epi32((int)0x846ca68bu));
  return v_xor_si512(h, v_srli_epi32(h, 16));
}

/* u of the 16 consecutive indices i0 .. i0 + 15 (lane j: i0 + j; a carry into the high word
 * where the low word wraps). */
DSQ_INLINE vf uniform16(const rng_t* r, int64_t i0) {
  const vi lo0 = v_set1_epi32((int)(uint32_t)i0);
  const vi lo =
      v_add_epi32(lo0, v_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  vi hi = v_set1_epi32((int)(uint32_t)((uint64_t)i0 >> 32));
  hi = v_mask_add_epi32(hi, v_cmplt_epu32_mask(lo, lo0), hi, v_set1_epi32(1));
  vi h = mix32(v_xor_si512(lo, v_set1_epi32((int)r->k0)));
  h = mix32(v_xor_si512(h, v_xor_si512(hi, v_set1_epi32((int)r->k1))));
  return v_mul_ps(v_cvtepi32_ps(v_srli_epi32(h, 8)), v_set1_ps(0x1p-24f));
}

/* quantize() with stochastic rounding: floor(y) + (u < y - floor(y) ? 1 : 0), the addition done
 * unconditionally as the reference does it (so -0 becomes +0 there too). */
DSQ_INLINE vf quantize_sr(vf x, vf up_a, vf up_b, vf down_a, vf down_b, vf qmax, vf u) {
  const vf y = v_mul_ps(v_mul_ps(x, up_a), up_b);
  const vf lo = v_roundscale_ps(y, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const vmask up = v_cmp_ps_mask(u, v_sub_ps(y, lo), _CMP_LT_OQ);
  vf k = v_add_ps(lo, v_maskz_mov_ps(up, v_set1_ps(1.0f)));
  const vf nqmax = v_sub_ps(v_setzero_ps(), qmax);
  k = v_min_ps(qmax, v_max_ps(nqmax, k));
  return v_mul_ps(v_mul_ps(k, down_a), down_b);
}

/* quantize() (r == 0) or quantize_sr() with the u of flat indices idx .. idx + 15. */
DSQ_INLINE vf quantize_at(vf x, vf up_a, vf up_b, vf down_a, vf down_b, vf qmax, const rng_t* r,
                          int64_t idx) {
  if (r) return quantize_sr(x, up_a, up_b, down_a, down_b, qmax, uniform16(r, idx));
  return quantize(x, up_a, up_b, down_a, down_b, qmax);
}

/* NaN-free |x| (NaN -> 0: max returns its second operand for a NaN first one). */
DSQ_INLINE vf mag(vf v) { return v_max_ps(v_abs_ps(v), v_setzero_ps()); }

/* The NaN/inf check of many vectors, one integer max each: |v|'s bits as int32 order as |v| for
 * finite values and are >= 0x7F800000 exactly for inf and NaN; any_nonfinite() of the running
 * max (start: v_setzero_si512()) says whether one of them held either. */
DSQ_INLINE vi bits_max(vi acc, vf v) { return v_max_epi32(acc, v_castps_si512(v_abs_ps(v))); }
DSQ_INLINE int any_nonfinite(vi acc) {
  return v_cmpge_epi32_mask(acc, v_set1_epi32(0x7F800000)) != 0;
}

/* 16 vectors of magnitudes m[i] (mag(): NaN-free, >= 0): lane i of the result = max m[i] (a
 * transposing max tree). */
#if DSQ_SIMD == 512
DSQ_INLINE vf max16x16m(const vf* m) {
  vf a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = v_max_ps(v_unpacklo_ps(m[2 * i], m[2 * i + 1]), v_unpackhi_ps(m[2 * i], m[2 * i + 1]));
  for (int i = 0; i < 4; ++i)
    b[i] = v_max_ps(v_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44),
                    v_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 2; ++i)
    c[i] = v_max_ps(v_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                    v_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  return v_max_ps(v_shuffle_f32x4(c[0], c[1], 0x88), v_shuffle_f32x4(c[0], c[1], 0xDD));
}
#else
/* AVX2: each row's two halves first (16 -> 8 lanes), then one 8 x 8 tree per group of 8 rows
 * (rows 0-7 -> lanes 0-7, rows 8-15 -> lanes 8-15): about a third of the 16-lane tree's ops. */
DSQ_INLINE __m256 max8x8_(const __m256* r) {
  __m256 a[4], b[2];
  for (int i = 0; i < 4; ++i)
    a[i] = _mm256_max_ps(_mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]),
                         _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]));
  for (int i = 0; i < 2; ++i)
    b[i] = _mm256_max_ps(_mm256_shuffle_ps(a[2 * i], a[2 * i + 1], 0x44),
                         _mm256_shuffle_ps(a[2 * i], a[2 * i + 1], 0xEE));
  return _mm256_max_ps(_mm256_permute2f128_ps(b[0], b[1], 0x20),
                       _mm256_permute2f128_ps(b[0], b[1], 0x31));
}
DSQ_INLINE vf max16x16m(const vf* m) {
  __m256 r[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm256_max_ps(m[i].l, m[i].h);
  return (vf){max8x8_(r), max8x8_(r + 8)};
}
#endif

/* 16 blocks of 16 contiguous floats at xb: lane i = NaN-free max |x| of block i. */
DSQ_INLINE vf max16x16(const float* xb) {
  vf v[16];
  for (int i = 0; i < 16; ++i) v[i] = v_loadu_ps(xb + 16 * i);
  for (int i = 0; i < 16; ++i) v[i] = mag(v[i]);
  return max16x16m(v);
}

/* NaN-free max |x| over `len` contiguous floats (as a broadcast vector), and whether any
 * is NaN/inf (*bad). */
DSQ_INLINE vf block_max(const float* xb, int64_t len, int* bad) {
  vf acc = v_setzero_ps();
  vi nf = v_setzero_si512();
  for (int64_t c = 0; c < len; c += 16) {
    const vf v = v_maskz_loadu_ps(lane_mask(len - c), xb + c);
    nf = bits_max(nf, v);
    acc = v_max_ps(mag(v), acc);
  }
  if (bad) *bad |= any_nonfinite(nf);
  return v_set1_ps(v_reduce_max_ps(acc));
}

typedef struct {
  float up_a[16], up_b[16], down_a[16], down_b[16], up[16], down[16];
} lanes_t;

DSQ_INLINE void store_factors(const factors_t* f, lanes_t* l) {
  v_storeu_ps(l->up, f->up);
  v_storeu_ps(l->down, f->down);
  v_storeu_ps(l->up_a, f->up_a);
  v_storeu_ps(l->up_b, f->up_b);
  v_storeu_ps(l->down_a, f->down_a);
  v_storeu_ps(l->down_b, f->down_b);
}

/* Column kernels read 16 rows of one block a cache line at a time, rows a whole row apart: as
 * many streams as rows, more than the hardware prefetchers follow on some CPUs (AMD Zen 3).
 * Each row's load asks for the line PREFETCH_FLOATS further along that row (a prefetch never
 * faults, so past the end is harmless). */
#define PREFETCH_FLOATS 64
DSQ_INLINE void prefetch_ahead(const float* p) { __builtin_prefetch(p + PREFETCH_FLOATS); }
/* The same for the rows a kernel writes (a second one where b is not NULL). */
DSQ_INLINE void prefetch_write(float* a, float* b) {
  __builtin_prefetch(a + PREFETCH_FLOATS, 1);
  if (b) __builtin_prefetch(b + PREFETCH_FLOATS, 1);
}

#define PAR_MIN 32768 /* elements below which a kernel runs on one thread */

/* ---------------------------------------------------------------------------------------- */
/* quantize                                                                                   */

static void quantize_rows16(const float* x, float* out, int64_t nblocks, int wm2, float qmaxf,
                            int emax, const rng_t* r, int nthreads) {
  const int64_t ntiles = nblocks / 16;
  const vf qmax = v_set1_ps(qmaxf);
#pragma omp parallel for num_threads(nthreads) schedule(static) if (ntiles * 256 > PAR_MIN)
  for (int64_t t = 0; t < ntiles; ++t) {
    const float* xb = x + t * 256;
    float* ob = out + t * 256;
    const factors_t f = pow2_factors(max16x16(xb), wm2, emax);
    lanes_t l;
    store_factors(&f, &l);
    if (f.single && !r) {
      for (int i = 0; i < 16; ++i)
        v_storeu_ps(ob + 16 * i,
                    quantize1(v_loadu_ps(xb + 16 * i), lane(l.up, i), lane(l.down, i), qmax));
      continue;
    }
    for (int i = 0; i < 16; ++i)
      v_storeu_ps(ob + 16 * i,
                  quantize_at(v_loadu_ps(xb + 16 * i), lane(l.up_a, i), lane(l.up_b, i),
                              lane(l.down_a, i), lane(l.down_b, i), qmax, r, t * 256 + 16 * i));
  }
  for (int64_t b = ntiles * 16; b < nblocks; ++b) {
    const factors_t f = pow2_factors(block_max(x + 16 * b, 16, 0), wm2, emax);
    v_storeu_ps(out + 16 * b, quantize_at(v_loadu_ps(x + 16 * b), f.up_a, f.up_b, f.down_a,
                                          f.down_b, qmax, r, 16 * b));
  }
}

static void quantize_rows(const float* x, float* out, int64_t P, int64_t n, int64_t B, int wm2,
                          float qmaxf, int emax, const rng_t* r, int nthreads) {
  const int64_t nb = (n + B - 1) / B;
  const vf qmax = v_set1_ps(qmaxf);
#pragma omp parallel for num_threads(nthreads) schedule(static) if (P * n > PAR_MIN)
  for (int64_t t = 0; t < P * nb; ++t) {
    const int64_t p = t / nb, s = (t - p * nb) * B;
    const int64_t len = n - s < B ? n - s : B;
    const float* xb = x + p * n + s;
    float* ob = out + p * n + s;
    const factors_t f = pow2_factors(block_max(xb, len, 0), wm2, emax);
    for (int64_t c = 0; c < len; c += 16) {
      const vmask m = lane_mask(len - c);
      v_mask_storeu_ps(ob + c, m,
                       quantize_at(v_maskz_loadu_ps(m, xb + c), f.up_a, f.up_b, f.down_a, f.down_b,
                                   qmax, r, p * n + s + c));
    }
  }
}

static void quantize_cols(const float* x, float* out, int64_t P, int64_t n, int64_t Q, int64_t B,
                          int wm2, float qmaxf, int emax, const rng_t* r, int nthreads) {
  const int64_t nb = (n + B - 1) / B;
  const vf qmax = v_set1_ps(qmaxf);
#pragma omp parallel for num_threads(nthreads) schedule(static) if (P * n * Q > PAR_MIN)
  for (int64_t t = 0; t < P * nb; ++t) {
    const int64_t p = t / nb, s = (t - p * nb) * B;
    const int64_t len = n - s < B ? n - s : B;
    const float* xb = x + (p * n + s) * Q;
    float* ob = out + (p * n + s) * Q;
    for (int64_t c = 0; c < Q; c += 16) {
      const vmask m = lane_mask(Q - c);
      vf acc = v_setzero_ps();
      for (int64_t i = 0; i < len; ++i) {
        prefetch_ahead(xb + i * Q + c);
        acc = v_max_ps(mag(v_maskz_loadu_ps(m, xb + i * Q + c)), acc);
      }
      const factors_t f = pow2_factors(acc, wm2, emax);
      if (f.single && !r) {
        for (int64_t i = 0; i < len; ++i)
          v_mask_storeu_ps(ob + i * Q + c, m,
                           quantize1(v_maskz_loadu_ps(m, xb + i * Q + c), f.up, f.down, qmax));
        continue;
      }
      for (int64_t i = 0; i < len; ++i)
        v_mask_storeu_ps(ob + i * Q + c, m,
                         quantize_at(v_maskz_loadu_ps(m, xb + i * Q + c), f.up_a, f.up_b, f.down_a,
                                     f.down_b, qmax, r, (p * n + s + i) * Q + c));
    }
  }
}

static void bfp_quantize_any(const float* x, float* out, int64_t P, int64_t n, int64_t Q, int64_t B,
                             int wm2, float qmax, int emax, const rng_t* r, int nthreads) {
  if (Q > 1)
    quantize_cols(x, out, P, n, Q, B, wm2, qmax, emax, r, nthreads);
  else if (B == 16 && n % 16 == 0)
    quantize_rows16(x, out, P * (n / 16), wm2, qmax, emax, r, nthreads);
  else
    quantize_rows(x, out, P, n, B, wm2, qmax, emax, r, nthreads);
}

/* bfp_quantize(x, w, e, B, dim, "nearest") of fp32 x viewed [P, n, Q] into out (same layout).
 * wm2 = w - 2, qmax = 2^(w-1) - 1, emax = 2^(e-1) - 1. */
void dsq_bfp_quantize(const float* x, float* out, int64_t P, int64_t n, int64_t Q, int64_t B,
                      int wm2, float qmax, int emax, int nthreads) {
  bfp_quantize_any(x, out, P, n, Q, B, wm2, qmax, emax, 0, nthreads);
}

/* The same with rounding="stochastic" and the stream key (k0, k1) (rounding.draw_key). */
void dsq_bfp_quantize_sr(const float* x, float* out, int64_t P, int64_t n, int64_t Q, int64_t B,
                         int wm2, float qmax, int emax, uint32_t k0, uint32_t k1, int nthreads) {
  const rng_t r = {k0, k1};
  bfp_quantize_any(x, out, P, n, Q, B, wm2, qmax, emax, &r, nthreads);
}

/* out[i] = u of flat index i of the stream (k0, k1), i < n: rounding.uniform_like. */
void dsq_uniform(float* out, int64_t n, uint32_t k0, uint32_t k1, int nthreads) {
  const rng_t r = {k0, k1};
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n > PAR_MIN)
  for (int64_t i = 0; i < n; i += 16) v_mask_storeu_ps(out + i, lane_mask(n - i), uniform16(&r, i));
}

/* ---------------------------------------------------------------------------------------- */
/* pack / unpack: codes |k| + sign(k) << (w-1), g = 8 / w per byte, code j of a byte at bit
 * j * w, in x's row-major order (packing.pack_bits); exponents int8 [P, nblocks, Q]. Width 16
 * (wj == 16): two byte streams, the codes' low bytes at codes[i] and their high bytes at
 * codes[hoff + i] (pack_bits: hoff = numel rounded up to a multiple of 8).                    */

/* 16 one-byte codes -> their 16 / g bytes (low bytes of the result). */
DSQ_INLINE __m128i join_codes(__m128i c, int w) {
  if (w == 8) return c;
  if (w == 4) {
    const __m128i r = _mm_or_si128(_mm_and_si128(c, _mm_set1_epi16(0x0F)),
                                   _mm_and_si128(_mm_srli_epi16(c, 4), _mm_set1_epi16(0xF0)));
    return _mm_packus_epi16(r, r);
  }
  __m128i r = _mm_and_si128(c, _mm_set1_epi32(0x03));
  r = _mm_or_si128(r, _mm_and_si128(_mm_srli_epi32(c, 6), _mm_set1_epi32(0x0C)));
  r = _mm_or_si128(r, _mm_and_si128(_mm_srli_epi32(c, 12), _mm_set1_epi32(0x30)));
  r = _mm_or_si128(r, _mm_and_si128(_mm_srli_epi32(c, 18), _mm_set1_epi32(0xC0)));
  return b_cvtepi32_epi8(r);
}

/* Inverse of join_codes: 16 / g bytes (low bytes of b) -> 16 one-byte codes. */
DSQ_INLINE __m128i split_codes(__m128i b, int w) {
  if (w == 8) return b;
  if (w == 4) {
    const __m128i m = _mm_set1_epi8(0x0F);
    return _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
  }
  const __m128i m = _mm_set1_epi8(0x03);
  const __m128i c0 = _mm_and_si128(b, m), c1 = _mm_and_si128(_mm_srli_epi16(b, 2), m);
  const __m128i c2 = _mm_and_si128(_mm_srli_epi16(b, 4), m);
  const __m128i c3 = _mm_and_si128(_mm_srli_epi16(b, 6), m);
  return _mm_unpacklo_epi16(_mm_unpacklo_epi8(c0, c1), _mm_unpacklo_epi8(c2, c3));
}

DSQ_INLINE vmask byte_mask(int64_t ncodes, int w) { return lane_mask(ncodes * w / 8); }

/* The codes of up to 16 integers k = scaled_int(x) (ncodes, a multiple of 8 / w) stored at
 * stream position pos. */
DSQ_INLINE void store_codes_k(uint8_t* codes, int64_t pos, int64_t ncodes, vf k, int w, int wj,
                              int64_t hoff) {
  const vi mag_k = v_abs_epi32(v_cvtps_epi32(k));
  const vi sign = v_srli_epi32(v_castps_si512(k), 31);
  const vi c32 = v_or_si512(mag_k, v_slli_epi32(sign, w - 1));
  if (wj == 16) {
    const vmask m = lane_mask(ncodes);
    b_mask_storeu_epi8(codes + pos, m, v_cvtepi32_epi8(c32));
    b_mask_storeu_epi8(codes + hoff + pos, m, v_cvtepi32_epi8(v_srli_epi32(c32, 8)));
    return;
  }
  const __m128i c = v_cvtepi32_epi8(c32);
  b_mask_storeu_epi8(codes + pos * wj / 8, byte_mask(ncodes, wj), join_codes(c, wj));
}

/* The codes of up to 16 elements of x (scaled_int with the halves). */
DSQ_INLINE void store_codes(uint8_t* codes, int64_t pos, int64_t ncodes, vf x, vf up_a, vf up_b,
                            vf qmax, int w, int wj, int64_t hoff) {
  store_codes_k(codes, pos, ncodes, scaled_int(x, up_a, up_b, qmax), w, wj, hoff);
}

/* fp32 +-|k| * scale of up to 16 codes at stream position pos (ncodes a multiple of 8 / w). */
DSQ_INLINE vf load_values(const uint8_t* codes, int64_t pos, int64_t ncodes, vf scale, int w,
                          int wj, int64_t hoff) {
  vi c;
  if (wj == 16) {
    const vmask m = lane_mask(ncodes);
    c = v_or_si512(v_cvtepu8_epi32(b_maskz_loadu_epi8(m, codes + pos)),
                   v_slli_epi32(v_cvtepu8_epi32(b_maskz_loadu_epi8(m, codes + hoff + pos)), 8));
  } else {
    const __m128i b = b_maskz_loadu_epi8(byte_mask(ncodes, wj), codes + pos * wj / 8);
    c = v_cvtepu8_epi32(split_codes(b, wj));
  }
  const vf m = v_cvtepi32_ps(v_and_si512(c, v_set1_epi32((1 << (w - 1)) - 1)));
  /* the code's sign bit (bit w - 1; codes have no higher bits) moved to the float's sign bit */
  const vi sign = v_slli_epi32(v_srli_epi32(c, w - 1), 31);
  return v_mul_ps(v_castsi512_ps(v_xor_si512(v_castps_si512(m), sign)), scale);
}

/* 2^(E - (w-2)) per lane of int8 exponents (packing._pow2: normal, or subnormal as
 * 2^(k+126) * 2^-126). */
DSQ_INLINE vf pow2_scale(vi e, int wm2) {
  const vi k = v_sub_epi32(e, v_set1_epi32(wm2));
  const vi bias = v_set1_epi32(127);
  const vf normal =
      v_castsi512_ps(v_slli_epi32(v_add_epi32(v_max_epi32(k, v_set1_epi32(-126)), bias), 23));
  const vf sub =
      v_mul_ps(v_castsi512_ps(v_slli_epi32(
                   v_add_epi32(v_max_epi32(k, v_set1_epi32(-149)), v_set1_epi32(253)), 23)),
               v_set1_ps(1.1754943508222875e-38f));
  return v_mask_blend_ps(v_cmpge_epi32_mask(k, v_set1_epi32(-126)), sub, normal);
}

static int pack_rows16(const float* x, uint8_t* codes, int8_t* exps, int64_t nblocks, int w, int wj,
                       int64_t hoff, float qmaxf, int emax, int nthreads) {
  const int64_t ntiles = nblocks / 16;
  const vf qmax = v_set1_ps(qmaxf);
  int bad = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) \
    reduction(| : bad) if (ntiles * 256 > PAR_MIN)
  for (int64_t t = 0; t < ntiles; ++t) {
    const float* xb = x + t * 256;
    vi nf = v_setzero_si512();
    for (int i = 0; i < 16; ++i) nf = bits_max(nf, v_loadu_ps(xb + 16 * i));
    bad |= any_nonfinite(nf);
    const factors_t f = pow2_factors(max16x16(xb), w - 2, emax);
    _mm_storeu_si128((__m128i*)(exps + 16 * t), v_cvtepi32_epi8(f.e));
    lanes_t l;
    store_factors(&f, &l);
    if (f.single) {
      for (int i = 0; i < 16; ++i)
        store_codes_k(codes, t * 256 + 16 * i, 16,
                      scaled_int1(v_loadu_ps(xb + 16 * i), lane(l.up, i), qmax), w, wj, hoff);
      continue;
    }
    for (int i = 0; i < 16; ++i)
      store_codes(codes, t * 256 + 16 * i, 16, v_loadu_ps(xb + 16 * i), lane(l.up_a, i),
                  lane(l.up_b, i), qmax, w, wj, hoff);
  }
  for (int64_t b = ntiles * 16; b < nblocks; ++b) {
    const factors_t f = pow2_factors(block_max(x + 16 * b, 16, &bad), w - 2, emax);
    exps[b] = (int8_t)_mm_cvtsi128_si32(v_cvtepi32_epi8(f.e));
    store_codes(codes, 16 * b, 16, v_loadu_ps(x + 16 * b), f.up_a, f.up_b, qmax, w, wj, hoff);
  }
  return !bad;
}

static int pack_rows(const float* x, uint8_t* codes, int8_t* exps, int64_t P, int64_t n, int64_t B,
                     int w, int wj, int64_t hoff, float qmaxf, int emax, int nthreads) {
  const int64_t nb = (n + B - 1) / B;
  const vf qmax = v_set1_ps(qmaxf);
  int bad = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) \
    reduction(| : bad) if (P * n > PAR_MIN)
  for (int64_t t = 0; t < P * nb; ++t) {
    const int64_t p = t / nb, s = (t - p * nb) * B;
    const int64_t len = n - s < B ? n - s : B;
    const float* xb = x + p * n + s;
    const factors_t f = pow2_factors(block_max(xb, len, &bad), w - 2, emax);
    exps[t] = (int8_t)_mm_cvtsi128_si32(v_cvtepi32_epi8(f.e));
    for (int64_t c = 0; c < len; c += 16) {
      const int64_t r = len - c < 16 ? len - c : 16;
      store_codes(codes, p * n + s + c, r, v_maskz_loadu_ps(lane_mask(r), xb + c), f.up_a, f.up_b,
                  qmax, w, wj, hoff);
    }
  }
  return !bad;
}

static int pack_cols(const float* x, uint8_t* codes, int8_t* exps, int64_t P, int64_t n, int64_t Q,
                     int64_t B, int w, int wj, int64_t hoff, float qmaxf, int emax, int nthreads) {
  const int64_t nb = (n + B - 1) / B;
  const vf qmax = v_set1_ps(qmaxf);
  int bad = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) \
    reduction(| : bad) if (P * n * Q > PAR_MIN)
  for (int64_t t = 0; t < P * nb; ++t) {
    const int64_t p = t / nb, s = (t - p * nb) * B;
    const int64_t len = n - s < B ? n - s : B;
    const float* xb = x + (p * n + s) * Q;
    for (int64_t c = 0; c < Q; c += 16) {
      const int64_t r = Q - c < 16 ? Q - c : 16;
      const vmask m = lane_mask(r);
      vf acc = v_setzero_ps();
      vi nf = v_setzero_si512();
      for (int64_t i = 0; i < len; ++i) {
        prefetch_ahead(xb + i * Q + c);
        const vf v = v_maskz_loadu_ps(m, xb + i * Q + c);
        nf = bits_max(nf, v);
        acc = v_max_ps(mag(v), acc);
      }
      bad |= any_nonfinite(nf);
      const factors_t f = pow2_factors(acc, w - 2, emax);
      b_mask_storeu_epi8(exps + t * Q + c, m, v_cvtepi32_epi8(f.e));
      if (f.single) {
        for (int64_t i = 0; i < len; ++i)
          store_codes_k(codes, (p * n + s + i) * Q + c, r,
                        scaled_int1(v_maskz_loadu_ps(m, xb + i * Q + c), f.up, qmax), w, wj, hoff);
        continue;
      }
      for (int64_t i = 0; i < len; ++i)
        store_codes(codes, (p * n + s + i) * Q + c, r, v_maskz_loadu_ps(m, xb + i * Q + c), f.up_a,
                    f.up_b, qmax, w, wj, hoff);
    }
  }
  return !bad;
}

/* packing.pack(bfp_quantize(x, w, e, B, dim), ...) of fp32 x viewed [P, n, Q], w in
 * {2, 4, 8, 16}: codes and exponents ([P, nblocks, Q] int8). wj == w: the packed stream
 * (numel * w / 8 bytes; the caller zeroes any padding after them); for w < 8 it needs every run
 * of codes a kernel writes on whole bytes: Q % (8 / w) == 0 when Q > 1, else n and B multiples
 * of 8 / w. wj == 8 (w < 8): one byte per code, any layout (dsq_codes_join then packs the
 * stream). wj == 16 (w == 16): any layout, the high bytes at hoff. Returns 0 (outputs
 * undefined) when x holds a NaN or inf. */
int dsq_bfp_pack(const float* x, uint8_t* codes, int8_t* exps, int64_t P, int64_t n, int64_t Q,
                 int64_t B, int w, int wj, int64_t hoff, float qmax, int emax, int nthreads) {
  if (Q > 1) return pack_cols(x, codes, exps, P, n, Q, B, w, wj, hoff, qmax, emax, nthreads);
  if (B == 16 && n % 16 == 0)
    return pack_rows16(x, codes, exps, P * (n / 16), w, wj, hoff, qmax, emax, nthreads);
  return pack_rows(x, codes, exps, P, n, B, w, wj, hoff, qmax, emax, nthreads);
}

/* CALL(w, wj) with compile-time constants for the common layouts (wj == w: 2, 4, 8, 16), else
 * with the runtime values: inlined per-tile bodies then fold their code-layout branches. */
#define DSQ_BY_LAYOUT(w, wj, CALL)  \
  do {                              \
    if ((w) == 4 && (wj) == 4)      \
      CALL(4, 4);                   \
    else if ((w) == 2 && (wj) == 2) \
      CALL(2, 2);                   \
    else if ((w) == 8 && (wj) == 8) \
      CALL(8, 8);                   \
    else if ((w) == 16)             \
      CALL(16, 16);                 \
    else                            \
      CALL(w, wj);                  \
  } while (0)

/* dsq_bfp_unpack's tiles: a column block t (rows row0 .. row0 + len, lanes c .. c + 15 of Q),
 * and 16 row blocks of 16 from t * 256 (nblk of them). */
DSQ_INLINE void unpack_cols_tile(const uint8_t* codes, const int8_t* exps, float* out, int64_t row0,
                                 int64_t len, int64_t Q, int64_t c, int64_t t, int w, int wj,
                                 int64_t hoff) {
  const int64_t r = Q - c < 16 ? Q - c : 16;
  const vmask m = lane_mask(r);
  const vf scale = pow2_scale(v_cvtepi8_epi32(b_maskz_loadu_epi8(m, exps + t * Q + c)), w - 2);
  if (r == 16) { /* whole vectors: constant byte counts, no masks */
    for (int64_t i = 0; i < len; ++i) {
      const int64_t pos = (row0 + i) * Q + c;
      v_storeu_ps(out + pos, load_values(codes, pos, 16, scale, w, wj, hoff));
    }
    return;
  }
  for (int64_t i = 0; i < len; ++i) {
    const int64_t pos = (row0 + i) * Q + c;
    v_mask_storeu_ps(out + pos, m, load_values(codes, pos, r, scale, w, wj, hoff));
  }
}

DSQ_INLINE void unpack_rows16_tile(const uint8_t* codes, const int8_t* exps, float* out, int64_t t,
                                   int64_t nblk, int w, int wj, int64_t hoff) {
  float sc[16];
  v_storeu_ps(
      sc, pow2_scale(v_cvtepi8_epi32(b_maskz_loadu_epi8(lane_mask(nblk), exps + 16 * t)), w - 2));
  for (int64_t i = 0; i < nblk; ++i) {
    const int64_t pos = t * 256 + 16 * i;
    v_storeu_ps(out + pos, load_values(codes, pos, 16, lane(sc, (int)i), w, wj, hoff));
  }
}

/* PackedTensor.unpack of dsq_bfp_pack's output (same layout rules, same wj) into fp32 out. */
void dsq_bfp_unpack(const uint8_t* codes, const int8_t* exps, float* out, int64_t P, int64_t n,
                    int64_t Q, int64_t B, int w, int wj, int64_t hoff, int nthreads) {
  const int64_t nb = (n + B - 1) / B;
  if (Q > 1) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (P * n * Q > PAR_MIN)
    for (int64_t t = 0; t < P * nb; ++t) {
      const int64_t p = t / nb, s = (t - p * nb) * B;
      const int64_t len = n - s < B ? n - s : B;
      for (int64_t c = 0; c < Q; c += 16) {
#define DSQ_TILE(W, WJ) unpack_cols_tile(codes, exps, out, p * n + s, len, Q, c, t, W, WJ, hoff)
        DSQ_BY_LAYOUT(w, wj, DSQ_TILE);
#undef DSQ_TILE
      }
    }
    return;
  }
  if (B == 16 && n % 16 == 0) {
    const int64_t nblocks = P * (n / 16), ntiles = nblocks / 16;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nblocks * 16 > PAR_MIN)
    for (int64_t t = 0; t < (nblocks + 15) / 16; ++t) {
      const int64_t nblk = t < ntiles ? 16 : nblocks - 16 * ntiles;
#define DSQ_TILE(W, WJ) unpack_rows16_tile(codes, exps, out, t, nblk, W, WJ, hoff)
      DSQ_BY_LAYOUT(w, wj, DSQ_TILE);
#undef DSQ_TILE
    }
    return;
  }
#pragma omp parallel for num_threads(nthreads) schedule(static) if (P * n > PAR_MIN)
  for (int64_t t = 0; t < P * nb; ++t) {
    const int64_t p = t / nb, s = (t - p * nb) * B;
    const int64_t len = n - s < B ? n - s : B;
    const vf scale = pow2_scale(v_set1_epi32(exps[t]), w - 2);
    for (int64_t c = 0; c < len; c += 16) {
      const int64_t r = len - c < 16 ? len - c : 16;
      const int64_t pos = p * n + s + c;
      v_mask_storeu_ps(out + pos, lane_mask(r), load_values(codes, pos, r, scale, w, wj, hoff));
    }
  }
}

/* One byte per code (n codes) -> the packed stream of w-bit codes, ceil(n / 8) * w bytes, the
 * last group of 8 codes zero-padded. */
void dsq_codes_join(const uint8_t* c8, uint8_t* out, int64_t n, int w, int nthreads) {
  const int64_t nchunks = (n + 15) / 16, nbytes = (n + 7) / 8 * w;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n > PAR_MIN)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t r = n - 16 * c < 16 ? n - 16 * c : 16;
    const __m128i codes = b_maskz_loadu_epi8(lane_mask(r), c8 + 16 * c);
    const int64_t first = 16 * c * w / 8, avail = nbytes - first;
    b_mask_storeu_epi8(out + first, lane_mask(avail < 2 * w ? avail : 2 * w), join_codes(codes, w));
  }
}

/* Inverse of dsq_codes_join: the first n codes of a packed stream, one byte each. */
void dsq_codes_split(const uint8_t* in, uint8_t* c8, int64_t n, int w, int nthreads) {
  const int64_t nchunks = (n + 15) / 16;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n > PAR_MIN)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t r = n - 16 * c < 16 ? n - 16 * c : 16;
    const __m128i b = b_maskz_loadu_epi8(byte_mask((r + 7) / 8 * 8, w), in + 16 * c * w / 8);
    b_mask_storeu_epi8(c8 + 16 * c, lane_mask(r), split_codes(b, w));
  }
}

/* ---------------------------------------------------------------------------------------- */
/* One tile of dsq_bfp_pair: rows row0 .. row0 + len (len <= 16, row-major with Q lanes each) of
 * x, lanes c .. c + 15; exps_c / t as there. pk: 0 (the second quantization into out_c) or
 * the packed width wc (codes_c); each call site with a constant pk gets its own inlined copy
 * with the code-layout branches folded. Returns nonzero when packing met a NaN or
 * inf. */
DSQ_INLINE int pair_tile(const float* x, float* out_r, float* out_c, uint8_t* codes_c,
                         int8_t* exps_c, int64_t hoff, int64_t row0, int64_t len, int64_t Q,
                         int64_t c, int64_t t, int wr, int wc, const int pk, int emax) {
  const vf qmax_r = v_set1_ps((float)((1 << (wr - 1)) - 1));
  const vf qmax_c = v_set1_ps((float)((1 << (wc - 1)) - 1));
  const float* xb = x + row0 * Q + c;
  vf v[16], m[16];
  vf acc = v_setzero_ps();
  for (int i = 0; i < 16; ++i) {
    if (i < len) prefetch_ahead(xb + i * Q);
    v[i] = i < len ? v_loadu_ps(xb + i * Q) : v_setzero_ps();
    m[i] = mag(v[i]);
    acc = v_max_ps(m[i], acc);
  }
  const factors_t fc = pow2_factors(acc, wc - 2, emax);
  const factors_t fr = pow2_factors(max16x16m(m), wr - 2, emax);
  lanes_t l;
  store_factors(&fr, &l);
  int bad = 0;
  if (pk) {
    vi nf = v_setzero_si512();
    for (int i = 0; i < 16; ++i) nf = bits_max(nf, v[i]);
    bad = any_nonfinite(nf);
    _mm_storeu_si128((__m128i*)(exps_c + t * Q + c), v_cvtepi32_epi8(fc.e));
  }
  if (fr.single && fc.single) {
    for (int64_t i = 0; i < len; ++i) {
      const int64_t pos = (row0 + i) * Q + c;
      prefetch_write(out_r + pos, pk ? 0 : out_c + pos);
      v_storeu_ps(out_r + pos, quantize1(v[i], lane(l.up, (int)i), lane(l.down, (int)i), qmax_r));
      if (pk)
        store_codes_k(codes_c, pos, 16, scaled_int1(v[i], fc.up, qmax_c), pk, pk, hoff);
      else
        v_storeu_ps(out_c + pos, quantize1(v[i], fc.up, fc.down, qmax_c));
    }
    return bad;
  }
  for (int64_t i = 0; i < len; ++i) {
    const int64_t pos = (row0 + i) * Q + c;
    prefetch_write(out_r + pos, pk ? 0 : out_c + pos);
    v_storeu_ps(out_r + pos, quantize(v[i], lane(l.up_a, (int)i), lane(l.up_b, (int)i),
                                      lane(l.down_a, (int)i), lane(l.down_b, (int)i), qmax_r));
    if (pk)
      store_codes(codes_c, pos, 16, v[i], fc.up_a, fc.up_b, qmax_c, pk, pk, hoff);
    else
      v_storeu_ps(out_c + pos, quantize(v[i], fc.up_a, fc.up_b, fc.down_a, fc.down_b, qmax_c));
  }
  return bad;
}

/* Two quantizations of one tensor in one read: x [P, n, Q], Q % 16 == 0, blocks of 16 both
 * ways. out_r: along Q (the contiguous last dim) at width wr; along n ("cols") at width wc,
 * either fp32 into out_c (codes_c == NULL) or packed straight into codes_c / exps_c
 * ([P, nblocks, Q] int8; stream rules of dsq_bfp_pack with wj == wc, hoff for wc == 16). Each
 * 16 x 16 tile is loaded once: its per-row maxima (max16x16m) and per-lane maxima give both
 * sets of factors.
 * Returns 0 when packing met a NaN or inf (codes_c / exps_c then undefined; out_r is valid). */
int dsq_bfp_pair(const float* x, float* out_r, float* out_c, uint8_t* codes_c, int8_t* exps_c,
                 int64_t hoff, int64_t P, int64_t n, int64_t Q, int wr, int wc, int emax,
                 int nthreads) {
  const int64_t nb = (n + 15) / 16;
  const int pk = codes_c ? wc : 0;
  int bad = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) \
    reduction(| : bad) if (P * n * Q > PAR_MIN)
  for (int64_t t = 0; t < P * nb; ++t) {
    const int64_t p = t / nb, s = (t - p * nb) * 16;
    const int64_t len = n - s < 16 ? n - s : 16, row0 = p * n + s;
    for (int64_t c = 0; c < Q; c += 16) {
#define DSQ_TILE(W, WJ) \
  bad |= pair_tile(x, out_r, out_c, codes_c, exps_c, hoff, row0, len, Q, c, t, wr, wc, W, emax)
      if (pk)
        DSQ_BY_LAYOUT(pk, pk, DSQ_TILE); /* one inlined copy per packed width */
      else
        DSQ_TILE(0, 0);
#undef DSQ_TILE
    }
  }
  return !bad;
}

/* ---------------------------------------------------------------------------------------- */
/* 1-bit masks (dsq_fairseq/nn/masks.py): bit i of the stream (byte i / 8, bit i % 8) is element
 * i's bit, ceil(n / 8) bytes, the last byte's unused bits zero (packing.pack_bits, width 1).    */

/* mode 0: bit = x != 0 (dropout's noise); mode 1: bit = x <= 0 (ReLU's output; NaN -> 0). */
void dsq_mask_pack(const float* x, uint8_t* bits, int64_t n, int mode, int nthreads) {
  const int64_t nchunks = (n + 15) / 16;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n > PAR_MIN)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t r = n - 16 * c < 16 ? n - 16 * c : 16;
    const vmask m = lane_mask(r);
    const vf v = v_maskz_loadu_ps(m, x + 16 * c);
    const vmask b = m & (mode == 0 ? v_cmp_ps_mask(v, v_setzero_ps(), _CMP_NEQ_UQ)
                                   : v_cmp_ps_mask(v, v_setzero_ps(), _CMP_LE_OQ));
    bits[2 * c] = (uint8_t)(b & 0xFF);
    if (r > 8) bits[2 * c + 1] = (uint8_t)(b >> 8);
  }
}

/* The backward of a 1-bit mask: mode 0 (dropout): out = g * (bit ? scale : 0) (torch:
 * g * mask.to(float).div_(1 - p), scale = that division of 1); mode 1 (ReLU):
 * out = bit ? 0 : g (g.masked_fill(mask, 0)). */
void dsq_mask_apply(const uint8_t* bits, const float* g, float* out, int64_t n, int mode,
                    float scale, int nthreads) {
  const int64_t nchunks = (n + 15) / 16;
  const vf sc = v_set1_ps(scale);
#pragma omp parallel for num_threads(nthreads) schedule(static) if (n > PAR_MIN)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t r = n - 16 * c < 16 ? n - 16 * c : 16;
    const vmask m = lane_mask(r);
    const vmask b = (vmask)(bits[2 * c] | (r > 8 ? bits[2 * c + 1] << 8 : 0));
    const vf v = v_maskz_loadu_ps(m, g + 16 * c);
    const vf y =
        mode == 0 ? v_mul_ps(v, v_maskz_mov_ps(b, sc)) : v_mask_mov_ps(v, b, v_setzero_ps());
    v_mask_storeu_ps(out + 16 * c, m, y);
  }
}

#else
int dsq_native_vectorized(void) { return 0; }
#endif
