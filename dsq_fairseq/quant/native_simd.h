/* The 16-lane vector layer of native_kernels.c: one source, two instruction sets.
 *
 *   vf     16 x fp32          vi     16 x int32          vmask  16 lane bits (uint16)
 *   v_*    the AVX-512 intrinsic _mm512_* of the same name and semantics
 *   b_*    16-byte ops that need AVX-512 BW/VL (_mm_maskz_loadu_epi8, _mm_mask_storeu_epi8,
 *          _mm_cvtepi32_epi8); plain SSE _mm_* ops are used as they are
 *
 * AVX-512 (F/BW/VL/DQ): every name is the intrinsic itself. AVX2: a vf / vi is a pair of 256-bit
 * registers (lanes 0-7, 8-15) and every op does, lane for lane, the IEEE / integer operation of
 * its AVX-512 namesake (max/min return the second operand when either is NaN, rounding by
 * vroundps with the same mode bits, truncating byte conversions, masked loads that never touch
 * masked-off memory), so the kernels give the same bits on both. Only the ops the kernels use
 * are defined, and only the immediates they pass (v_shuffle_f32x4: 0x88 and 0xDD).
 *
 * DSQ_SIMD is 512, 256 or 0 (neither: the kernels are not built).
 */
#ifndef DSQ_NATIVE_SIMD_H
#define DSQ_NATIVE_SIMD_H
#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)
#define DSQ_SIMD 512
#include <immintrin.h>

typedef __m512 vf;
typedef __m512i vi;
typedef __mmask16 vmask;

#define v_abs_epi32 _mm512_abs_epi32
#define v_abs_ps _mm512_abs_ps
#define v_add_epi32 _mm512_add_epi32
#define v_add_ps _mm512_add_ps
#define v_and_si512 _mm512_and_si512
#define v_castps_si512 _mm512_castps_si512
#define v_castsi512_ps _mm512_castsi512_ps
#define v_cmp_ps_mask _mm512_cmp_ps_mask
#define v_cmpeq_epi32_mask _mm512_cmpeq_epi32_mask
#define v_cmpge_epi32_mask _mm512_cmpge_epi32_mask
#define v_cmplt_epu32_mask _mm512_cmplt_epu32_mask
#define v_cvtepi32_epi8 _mm512_cvtepi32_epi8
#define v_cvtepi32_ps _mm512_cvtepi32_ps
#define v_cvtepi8_epi32 _mm512_cvtepi8_epi32
#define v_cvtepu8_epi32 _mm512_cvtepu8_epi32
#define v_cvtps_epi32 _mm512_cvtps_epi32
#define v_loadu_ps _mm512_loadu_ps
#define v_mask_add_epi32 _mm512_mask_add_epi32
#define v_mask_blend_ps _mm512_mask_blend_ps
#define v_mask_mov_epi32 _mm512_mask_mov_epi32
#define v_mask_mov_ps _mm512_mask_mov_ps
#define v_mask_storeu_ps _mm512_mask_storeu_ps
#define v_max_epi32 _mm512_max_epi32
#define v_max_ps _mm512_max_ps
#define v_maskz_loadu_ps _mm512_maskz_loadu_ps
#define v_maskz_mov_ps _mm512_maskz_mov_ps
#define v_min_epi32 _mm512_min_epi32
#define v_min_ps _mm512_min_ps
#define v_mul_ps _mm512_mul_ps
#define v_mullo_epi32 _mm512_mullo_epi32
#define v_or_si512 _mm512_or_si512
#define v_reduce_max_ps _mm512_reduce_max_ps
#define v_roundscale_ps _mm512_roundscale_ps
#define v_set1_epi32 _mm512_set1_epi32
#define v_set1_ps _mm512_set1_ps
#define v_setr_epi32 _mm512_setr_epi32
#define v_setzero_ps _mm512_setzero_ps
#define v_setzero_si512 _mm512_setzero_si512
#define v_shuffle_f32x4 _mm512_shuffle_f32x4
#define v_shuffle_ps _mm512_shuffle_ps
#define v_slli_epi32 _mm512_slli_epi32
#define v_srai_epi32 _mm512_srai_epi32
#define v_srli_epi32 _mm512_srli_epi32
#define v_storeu_ps _mm512_storeu_ps
#define v_sub_epi32 _mm512_sub_epi32
#define v_sub_ps _mm512_sub_ps
#define v_unpackhi_ps _mm512_unpackhi_ps
#define v_unpacklo_ps _mm512_unpacklo_ps
#define v_xor_si512 _mm512_xor_si512
#define b_cvtepi32_epi8 _mm_cvtepi32_epi8
#define b_mask_storeu_epi8 _mm_mask_storeu_epi8
#define b_maskz_loadu_epi8 _mm_maskz_loadu_epi8

#elif defined(__AVX2__)
#define DSQ_SIMD 256
#include <immintrin.h>
#include <string.h>

typedef struct {
  __m256 l, h;
} vf;
typedef struct {
  __m256i l, h;
} vi;
typedef uint16_t vmask;

/* ---- masks: 8 lane bits <-> an all-ones / all-zeros 32-bit lane vector ---- */
static inline __m256i m8_(unsigned bits) {
  const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)bits), sel), sel);
}
static inline __m256i mlo_(vmask m) { return m8_(m & 0xFFu); }
static inline __m256i mhi_(vmask m) { return m8_((unsigned)m >> 8); }
static inline vmask bits_ps_(__m256 l, __m256 h) {
  return (vmask)((unsigned)_mm256_movemask_ps(l) | ((unsigned)_mm256_movemask_ps(h) << 8));
}
static inline vmask bits_epi32_(__m256i l, __m256i h) {
  return bits_ps_(_mm256_castsi256_ps(l), _mm256_castsi256_ps(h));
}

/* ---- construction, loads, stores ---- */
static inline vf v_set1_ps(float a) { return (vf){_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
static inline vi v_set1_epi32(int a) {
  return (vi){_mm256_set1_epi32(a), _mm256_set1_epi32(a)};
}
static inline vf v_setzero_ps(void) { return (vf){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline vi v_setzero_si512(void) {
  return (vi){_mm256_setzero_si256(), _mm256_setzero_si256()};
}
static inline vi v_setr_epi32(int a0, int a1, int a2, int a3, int a4, int a5, int a6, int a7,
                              int a8, int a9, int a10, int a11, int a12, int a13, int a14,
                              int a15) {
  return (vi){_mm256_setr_epi32(a0, a1, a2, a3, a4, a5, a6, a7),
              _mm256_setr_epi32(a8, a9, a10, a11, a12, a13, a14, a15)};
}
static inline vf v_loadu_ps(const float* p) {
  return (vf){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
}
static inline void v_storeu_ps(float* p, vf a) {
  _mm256_storeu_ps(p, a.l);
  _mm256_storeu_ps(p + 8, a.h);
}
/* vmaskmovps: masked-off lanes read as 0 and are never accessed (no fault past an end) */
static inline vf v_maskz_loadu_ps(vmask m, const float* p) {
  if (m == 0xFFFF) return v_loadu_ps(p);
  return (vf){_mm256_maskload_ps(p, mlo_(m)), _mm256_maskload_ps(p + 8, mhi_(m))};
}
static inline void v_mask_storeu_ps(float* p, vmask m, vf a) {
  if (m == 0xFFFF) {
    v_storeu_ps(p, a);
    return;
  }
  _mm256_maskstore_ps(p, mlo_(m), a.l);
  _mm256_maskstore_ps(p + 8, mhi_(m), a.h);
}

/* ---- elementwise fp32 ---- */
#define DSQ_PS2_(name, op)                                                 \
  static inline vf name(vf a, vf b) { return (vf){op(a.l, b.l), op(a.h, b.h)}; }
DSQ_PS2_(v_add_ps, _mm256_add_ps)
DSQ_PS2_(v_sub_ps, _mm256_sub_ps)
DSQ_PS2_(v_mul_ps, _mm256_mul_ps)
DSQ_PS2_(v_max_ps, _mm256_max_ps)
DSQ_PS2_(v_min_ps, _mm256_min_ps)
DSQ_PS2_(v_unpacklo_ps, _mm256_unpacklo_ps)
DSQ_PS2_(v_unpackhi_ps, _mm256_unpackhi_ps)
#undef DSQ_PS2_
static inline vf v_abs_ps(vf a) {
  const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  return (vf){_mm256_and_ps(a.l, m), _mm256_and_ps(a.h, m)};
}
#define v_roundscale_ps(a, imm) \
  ((vf){_mm256_round_ps((a).l, (imm)), _mm256_round_ps((a).h, (imm))})
#define v_shuffle_ps(a, b, imm) \
  ((vf){_mm256_shuffle_ps((a).l, (b).l, (imm)), _mm256_shuffle_ps((a).h, (b).h, (imm))})
/* 128-bit lanes: 0x88 -> (a0, a2, b0, b2); 0xDD (the only other one used) -> (a1, a3, b1, b3) */
static inline vf v_shuffle_f32x4(vf a, vf b, const int imm) {
  if (imm == 0x88)
    return (vf){_mm256_permute2f128_ps(a.l, a.h, 0x20), _mm256_permute2f128_ps(b.l, b.h, 0x20)};
  return (vf){_mm256_permute2f128_ps(a.l, a.h, 0x31), _mm256_permute2f128_ps(b.l, b.h, 0x31)};
}
static inline float v_reduce_max_ps(vf a) {
  __m256 m = _mm256_max_ps(a.l, a.h);
  __m128 r = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  r = _mm_max_ps(r, _mm_movehl_ps(r, r));
  r = _mm_max_ss(r, _mm_shuffle_ps(r, r, 1));
  return _mm_cvtss_f32(r);
}

/* ---- elementwise int32 ---- */
#define DSQ_EPI2_(name, op)                                                \
  static inline vi name(vi a, vi b) { return (vi){op(a.l, b.l), op(a.h, b.h)}; }
DSQ_EPI2_(v_add_epi32, _mm256_add_epi32)
DSQ_EPI2_(v_sub_epi32, _mm256_sub_epi32)
DSQ_EPI2_(v_max_epi32, _mm256_max_epi32)
DSQ_EPI2_(v_min_epi32, _mm256_min_epi32)
DSQ_EPI2_(v_mullo_epi32, _mm256_mullo_epi32)
DSQ_EPI2_(v_and_si512, _mm256_and_si256)
DSQ_EPI2_(v_or_si512, _mm256_or_si256)
DSQ_EPI2_(v_xor_si512, _mm256_xor_si256)
#undef DSQ_EPI2_
static inline vi v_abs_epi32(vi a) { return (vi){_mm256_abs_epi32(a.l), _mm256_abs_epi32(a.h)}; }
static inline vi v_slli_epi32(vi a, int n) {
  const __m128i c = _mm_cvtsi32_si128(n);
  return (vi){_mm256_sll_epi32(a.l, c), _mm256_sll_epi32(a.h, c)};
}
static inline vi v_srli_epi32(vi a, int n) {
  const __m128i c = _mm_cvtsi32_si128(n);
  return (vi){_mm256_srl_epi32(a.l, c), _mm256_srl_epi32(a.h, c)};
}
static inline vi v_srai_epi32(vi a, int n) {
  const __m128i c = _mm_cvtsi32_si128(n);
  return (vi){_mm256_sra_epi32(a.l, c), _mm256_sra_epi32(a.h, c)};
}

/* ---- conversions ---- */
static inline vf v_castsi512_ps(vi a) {
  return (vf){_mm256_castsi256_ps(a.l), _mm256_castsi256_ps(a.h)};
}
static inline vi v_castps_si512(vf a) {
  return (vi){_mm256_castps_si256(a.l), _mm256_castps_si256(a.h)};
}
static inline vf v_cvtepi32_ps(vi a) {
  return (vf){_mm256_cvtepi32_ps(a.l), _mm256_cvtepi32_ps(a.h)};
}
static inline vi v_cvtps_epi32(vf a) {
  return (vi){_mm256_cvtps_epi32(a.l), _mm256_cvtps_epi32(a.h)};
}
static inline vi v_cvtepu8_epi32(__m128i b) {
  return (vi){_mm256_cvtepu8_epi32(b), _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))};
}
static inline vi v_cvtepi8_epi32(__m128i b) {
  return (vi){_mm256_cvtepi8_epi32(b), _mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))};
}
/* the low byte of each int32 lane (truncation, vpmovdb) */
static inline __m128i lowbytes8_(__m256i a) { /* 8 lanes -> 8 bytes in the low half */
  const __m256i shuf = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                        -1, -1);
  const __m256i s = _mm256_shuffle_epi8(a, shuf);
  return _mm_unpacklo_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}
static inline __m128i v_cvtepi32_epi8(vi a) {
  return _mm_unpacklo_epi64(lowbytes8_(a.l), lowbytes8_(a.h));
}
static inline __m128i b_cvtepi32_epi8(__m128i a) {
  return _mm_shuffle_epi8(a, _mm_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                           -1, -1));
}

/* ---- comparisons to lane bits ---- */
#define v_cmp_ps_mask(a, b, pred) \
  bits_ps_(_mm256_cmp_ps((a).l, (b).l, (pred)), _mm256_cmp_ps((a).h, (b).h, (pred)))
static inline vmask v_cmpeq_epi32_mask(vi a, vi b) {
  return bits_epi32_(_mm256_cmpeq_epi32(a.l, b.l), _mm256_cmpeq_epi32(a.h, b.h));
}
static inline vmask v_cmpge_epi32_mask(vi a, vi b) { /* signed a >= b: not (b > a) */
  return (vmask)~bits_epi32_(_mm256_cmpgt_epi32(b.l, a.l), _mm256_cmpgt_epi32(b.h, a.h));
}
static inline vmask v_cmplt_epu32_mask(vi a, vi b) { /* unsigned a < b: signed after a flip */
  const __m256i f = _mm256_set1_epi32((int)0x80000000u);
  return bits_epi32_(_mm256_cmpgt_epi32(_mm256_xor_si256(b.l, f), _mm256_xor_si256(a.l, f)),
                     _mm256_cmpgt_epi32(_mm256_xor_si256(b.h, f), _mm256_xor_si256(a.h, f)));
}

/* ---- masked moves: lane i from the second source where bit i is set ---- */
static inline vf v_mask_mov_ps(vf src, vmask m, vf a) {
  return (vf){_mm256_blendv_ps(src.l, a.l, _mm256_castsi256_ps(mlo_(m))),
              _mm256_blendv_ps(src.h, a.h, _mm256_castsi256_ps(mhi_(m)))};
}
static inline vf v_maskz_mov_ps(vmask m, vf a) { return v_mask_mov_ps(v_setzero_ps(), m, a); }
static inline vf v_mask_blend_ps(vmask m, vf a, vf b) { return v_mask_mov_ps(a, m, b); }
static inline vi v_mask_mov_epi32(vi src, vmask m, vi a) {
  return (vi){_mm256_blendv_epi8(src.l, a.l, mlo_(m)), _mm256_blendv_epi8(src.h, a.h, mhi_(m))};
}
static inline vi v_mask_add_epi32(vi src, vmask m, vi a, vi b) {
  return v_mask_mov_epi32(src, m, v_add_epi32(a, b));
}

/* ---- 16-byte masked loads / stores (the kernels pass prefix masks: the first k bytes) ---- */
static inline __m128i b_maskz_loadu_epi8(vmask m, const void* p) {
  switch (m) {
    case 0xFFFF: return _mm_loadu_si128((const __m128i*)p);
    case 0x00FF: return _mm_loadl_epi64((const __m128i*)p);
    case 0x000F: {
      int32_t v;
      memcpy(&v, p, 4);
      return _mm_cvtsi32_si128(v);
    }
    default: {
      uint8_t buf[16] = {0};
      for (int i = 0; i < 16; ++i)
        if (m >> i & 1) buf[i] = ((const uint8_t*)p)[i];
      return _mm_loadu_si128((const __m128i*)buf);
    }
  }
}
static inline void b_mask_storeu_epi8(void* p, vmask m, __m128i a) {
  switch (m) {
    case 0xFFFF: _mm_storeu_si128((__m128i*)p, a); return;
    case 0x00FF: _mm_storel_epi64((__m128i*)p, a); return;
    case 0x000F: {
      const int32_t v = _mm_cvtsi128_si32(a);
      memcpy(p, &v, 4);
      return;
    }
    default: {
      uint8_t buf[16];
      _mm_storeu_si128((__m128i*)buf, a);
      for (int i = 0; i < 16; ++i)
        if (m >> i & 1) ((uint8_t*)p)[i] = buf[i];
    }
  }
}

#else
#define DSQ_SIMD 0
#endif
#endif
