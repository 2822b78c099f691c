// The AVX-512 operations the kernels use, for CPUs with AVX2 and FMA alone (AMD Zen 1-3, Intel client
// cores before Ice Lake, ...): each 512-bit vector is two 256-bit halves, each operation the same
// operation on both halves, with the same results lane for lane. The integer dot products (VNNI's
// vpdpbusd) are exact int32 sums here too, and the bf16 ones (vdpbf16ps) add their two exact products in
// the same order, so the int8 kernels give the same bits as on AVX-512 and the bf16 ones the same sums
// (but for denormals, noted there).
// Included by common.h, after <immintrin.h>, when the compiler targets no AVX-512: the names below then
// stand for these functions, and the kernels' code is the same source for both. Only what the kernels
// use is here, with the operands they use (noted where narrower than AVX-512's).
#pragma once

#if !defined(__AVX2__) || !defined(__FMA__)
#error "the kernels need AVX-512 (with BW and BF16) or AVX2 with FMA"
#endif

namespace avx2 {

struct f32x16 {
    __m256 lo, hi;
};
struct i32x16 {
    __m256i lo, hi;
};
// bf16 pairs (vdpbf16ps' operands): made from integer vectors by a cast, as __m512bh is
struct bf16x32 {
    __m256i lo, hi;
    bf16x32() = default;
    bf16x32(i32x16 v) : lo(v.lo), hi(v.hi) {}  // NOLINT: the kernels write (__m512bh)v
};

// a mask's lanes as all-ones / all-zeros 32-bit lanes, eight at a time
inline __m256i lanes8(unsigned bits) {
    const __m256i sel = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)bits), sel), sel);
}
inline __m256 flanes8(unsigned bits) { return _mm256_castsi256_ps(lanes8(bits)); }
inline __mmask16 mask_of(__m256 lo, __m256 hi) {
    return (__mmask16)((unsigned)_mm256_movemask_ps(lo) | (unsigned)_mm256_movemask_ps(hi) << 8);
}

// fp32
inline f32x16 set1_ps(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
inline f32x16 setzero_ps() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline f32x16 loadu_ps(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void storeu_ps(float* p, f32x16 a) { _mm256_storeu_ps(p, a.lo), _mm256_storeu_ps(p + 8, a.hi); }
inline f32x16 add_ps(f32x16 a, f32x16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline f32x16 sub_ps(f32x16 a, f32x16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline f32x16 mul_ps(f32x16 a, f32x16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline f32x16 div_ps(f32x16 a, f32x16 b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline f32x16 max_ps(f32x16 a, f32x16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline f32x16 min_ps(f32x16 a, f32x16 b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline f32x16 fmadd_ps(f32x16 a, f32x16 b, f32x16 c) {
    return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline f32x16 fnmadd_ps(f32x16 a, f32x16 b, f32x16 c) {
    return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
inline f32x16 abs_ps(f32x16 a) {
    const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    return {_mm256_and_ps(a.lo, m), _mm256_and_ps(a.hi, m)};
}
template <int Imm>  // _MM_FROUND_TO_NEAREST_INT or _MM_FROUND_TO_NEG_INF, with _MM_FROUND_NO_EXC: scale 0
inline f32x16 roundscale_ps(f32x16 a) {
    static_assert((Imm & 0xF0) == 0, "roundscale with a scale");
    return {_mm256_round_ps(a.lo, Imm), _mm256_round_ps(a.hi, Imm)};
}
// a * 2^i for integral i in [-126, 127] (exp_neg's use)
inline f32x16 scalef_ps(f32x16 a, f32x16 i) {
    const auto pow2 = [](__m256 e) {
        const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(e), _mm256_set1_epi32(127));
        return _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
    };
    return {_mm256_mul_ps(a.lo, pow2(i.lo)), _mm256_mul_ps(a.hi, pow2(i.hi))};
}
inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float reduce_add_ps(f32x16 a) { return hsum8(_mm256_add_ps(a.lo, a.hi)); }
inline float reduce_max_ps(f32x16 a) {
    alignas(32) float v[8];
    _mm256_store_ps(v, _mm256_max_ps(a.lo, a.hi));
    float m = v[0];
    for (int i = 1; i < 8; i++) m = v[i] > m ? v[i] : m;
    return m;
}
inline float reduce_min_ps(f32x16 a) {
    alignas(32) float v[8];
    _mm256_store_ps(v, _mm256_min_ps(a.lo, a.hi));
    float m = v[0];
    for (int i = 1; i < 8; i++) m = v[i] < m ? v[i] : m;
    return m;
}
template <int Pred>
inline __mmask16 cmp_ps_mask(f32x16 a, f32x16 b) {
    return mask_of(_mm256_cmp_ps(a.lo, b.lo, Pred), _mm256_cmp_ps(a.hi, b.hi, Pred));
}
// lanes of b where m is set, else a
inline f32x16 mask_blend_ps(__mmask16 m, f32x16 a, f32x16 b) {
    return {_mm256_blendv_ps(a.lo, b.lo, flanes8(m)), _mm256_blendv_ps(a.hi, b.hi, flanes8(m >> 8))};
}
inline f32x16 maskz_mov_ps(__mmask16 m, f32x16 a) {
    return {_mm256_and_ps(a.lo, flanes8(m)), _mm256_and_ps(a.hi, flanes8(m >> 8))};
}
inline f32x16 mask_mov_ps(f32x16 src, __mmask16 m, f32x16 a) { return mask_blend_ps(m, src, a); }
inline f32x16 mask_mul_ps(f32x16 src, __mmask16 m, f32x16 a, f32x16 b) { return mask_blend_ps(m, src, mul_ps(a, b)); }
inline f32x16 maskz_div_ps(__mmask16 m, f32x16 a, f32x16 b) { return maskz_mov_ps(m, div_ps(a, b)); }
// Masked-off lanes are neither read nor written, as AVX-512's masked moves promise (the kernels' tails
// rely on it at the end of a buffer). AVX2's vmaskmov does not promise it on AMD's CPUs (their manual
// leaves faults on masked-off elements to the implementation), so a half of eight lanes moves whole
// when all of it is wanted, and a lane at a time when only some is.
inline __m256i load8_masked(const int32_t* p, unsigned bits) {
    bits &= 0xFF;
    if (bits == 0xFF) return _mm256_loadu_si256((const __m256i*)p);
    alignas(32) int32_t v[8] = {};
    for (int i = 0; i < 8; i++)
        if (bits >> i & 1) v[i] = p[i];
    return _mm256_load_si256((const __m256i*)v);
}
inline void store8_masked(int32_t* p, unsigned bits, __m256i a) {
    bits &= 0xFF;
    if (bits == 0xFF) return _mm256_storeu_si256((__m256i*)p, a);
    alignas(32) int32_t v[8];
    _mm256_store_si256((__m256i*)v, a);
    for (int i = 0; i < 8; i++)
        if (bits >> i & 1) p[i] = v[i];
}
inline f32x16 maskz_loadu_ps(__mmask16 m, const float* p) {
    const int32_t* q = (const int32_t*)p;
    return {_mm256_castsi256_ps(load8_masked(q, m)), _mm256_castsi256_ps(load8_masked(q + 8, m >> 8))};
}
inline void mask_storeu_ps(float* p, __mmask16 m, f32x16 a) {
    int32_t* q = (int32_t*)p;
    store8_masked(q, m, _mm256_castps_si256(a.lo)), store8_masked(q + 8, m >> 8, _mm256_castps_si256(a.hi));
}

// integers
inline i32x16 setzero_si512() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline i32x16 set1_epi32(int a) { return {_mm256_set1_epi32(a), _mm256_set1_epi32(a)}; }
inline i32x16 setr_epi32(int a0, int a1, int a2, int a3, int a4, int a5, int a6, int a7, int a8, int a9, int a10,
                         int a11, int a12, int a13, int a14, int a15) {
    return {_mm256_setr_epi32(a0, a1, a2, a3, a4, a5, a6, a7), _mm256_setr_epi32(a8, a9, a10, a11, a12, a13, a14, a15)};
}
inline i32x16 loadu_si512(const void* p) {
    const __m256i* q = (const __m256i*)p;
    return {_mm256_loadu_si256(q), _mm256_loadu_si256(q + 1)};
}
inline void storeu_si512(void* p, i32x16 a) {
    __m256i* q = (__m256i*)p;
    _mm256_storeu_si256(q, a.lo), _mm256_storeu_si256(q + 1, a.hi);
}
inline i32x16 maskz_loadu_epi32(__mmask16 m, const void* p) {
    const int32_t* q = (const int32_t*)p;
    return {load8_masked(q, m), load8_masked(q + 8, m >> 8)};
}
// bytes: no masked byte moves in AVX2, so a partial mask goes through memory a byte at a time
inline i32x16 maskz_loadu_epi8(__mmask64 m, const void* p) {
    if (m == ~0ULL) return loadu_si512(p);
    alignas(32) uint8_t v[64] = {};
    for (int i = 0; i < 64; i++)
        if (m >> i & 1) v[i] = ((const uint8_t*)p)[i];
    return loadu_si512(v);
}
inline void mask_storeu_epi8(void* p, __mmask64 m, i32x16 a) {
    alignas(32) uint8_t v[64];
    storeu_si512(v, a);
    for (int i = 0; i < 64; i++)
        if (m >> i & 1) ((uint8_t*)p)[i] = v[i];
}
#define MUSICBOT_AVX2_OP(name, op)                                                    \
    inline i32x16 name(i32x16 a, i32x16 b) { return {op(a.lo, b.lo), op(a.hi, b.hi)}; }
MUSICBOT_AVX2_OP(add_epi32, _mm256_add_epi32)
MUSICBOT_AVX2_OP(sub_epi32, _mm256_sub_epi32)
MUSICBOT_AVX2_OP(mullo_epi32, _mm256_mullo_epi32)
MUSICBOT_AVX2_OP(min_epi32, _mm256_min_epi32)
MUSICBOT_AVX2_OP(max_epi32, _mm256_max_epi32)
MUSICBOT_AVX2_OP(and_si512, _mm256_and_si256)
MUSICBOT_AVX2_OP(or_si512, _mm256_or_si256)
MUSICBOT_AVX2_OP(unpacklo_epi32, _mm256_unpacklo_epi32)  // within each 128-bit lane, as AVX-512's
MUSICBOT_AVX2_OP(unpackhi_epi32, _mm256_unpackhi_epi32)
MUSICBOT_AVX2_OP(unpacklo_epi64, _mm256_unpacklo_epi64)
MUSICBOT_AVX2_OP(unpackhi_epi64, _mm256_unpackhi_epi64)
#undef MUSICBOT_AVX2_OP
inline i32x16 slli_epi32(i32x16 a, int n) { return {_mm256_slli_epi32(a.lo, n), _mm256_slli_epi32(a.hi, n)}; }
inline __mmask16 cmpge_epi32_mask(i32x16 a, i32x16 b) {  // a >= b: not b > a
    return (__mmask16)~mask_of(_mm256_castsi256_ps(_mm256_cmpgt_epi32(b.lo, a.lo)),
                               _mm256_castsi256_ps(_mm256_cmpgt_epi32(b.hi, a.hi)));
}
inline __mmask16 cmplt_epi32_mask(i32x16 a, i32x16 b) {
    return mask_of(_mm256_castsi256_ps(_mm256_cmpgt_epi32(b.lo, a.lo)),
                   _mm256_castsi256_ps(_mm256_cmpgt_epi32(b.hi, a.hi)));
}
// 128-bit lanes: a's lanes Imm & 3, Imm >> 2 & 3, then b's Imm >> 4 & 3, Imm >> 6 & 3
template <int Imm>
inline i32x16 shuffle_i32x4(i32x16 a, i32x16 b) {
    const auto lane = [](i32x16 v, int i) {
        const __m256i h = i < 2 ? v.lo : v.hi;
        return (i & 1) ? _mm256_extracti128_si256(h, 1) : _mm256_castsi256_si128(h);
    };
    return {_mm256_set_m128i(lane(a, Imm >> 2 & 3), lane(a, Imm & 3)),
            _mm256_set_m128i(lane(b, Imm >> 6 & 3), lane(b, Imm >> 4 & 3))};
}
inline f32x16 castsi512_ps(i32x16 a) { return {_mm256_castsi256_ps(a.lo), _mm256_castsi256_ps(a.hi)}; }
inline i32x16 castps_si512(f32x16 a) { return {_mm256_castps_si256(a.lo), _mm256_castps_si256(a.hi)}; }
inline f32x16 cvtepi32_ps(i32x16 a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
inline i32x16 cvtps_epi32(f32x16 a) { return {_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi)}; }
inline i32x16 cvtepu8_epi32(__m128i a) { return {_mm256_cvtepu8_epi32(a), _mm256_cvtepu8_epi32(_mm_srli_si128(a, 8))}; }
inline i32x16 cvtepu16_epi32(__m256i a) {
    return {_mm256_cvtepu16_epi32(_mm256_castsi256_si128(a)), _mm256_cvtepu16_epi32(_mm256_extracti128_si256(a, 1))};
}
// sixteen int32 to int8, saturated (vpmovsdb)
inline __m128i cvtsepi32_epi8(i32x16 a) {
    const __m128i l = _mm_packs_epi32(_mm256_castsi256_si128(a.lo), _mm256_extracti128_si256(a.lo, 1));
    const __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(a.hi), _mm256_extracti128_si256(a.hi, 1));
    return _mm_packs_epi16(l, h);
}
// sixteen int32 to int8, truncated (vpmovdb): the low bytes, which unsigned packs keep as they are
inline __m128i cvtepi32_epi8(i32x16 a) {
    const __m256i byte = _mm256_set1_epi32(0xFF);
    const __m256i lo = _mm256_and_si256(a.lo, byte), hi = _mm256_and_si256(a.hi, byte);
    const __m128i l = _mm_packus_epi32(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1));
    const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
    return _mm_packus_epi16(l, h);
}
inline void mask_i32scatter_ps(float* base, __mmask16 m, i32x16 idx, f32x16 v, int scale) {
    alignas(32) int at[16];
    alignas(32) float val[16];
    storeu_si512(at, idx);
    storeu_ps(val, v);
    for (int i = 0; i < 16; i++)
        if (m >> i & 1) *(float*)((char*)base + (ptrdiff_t)at[i] * scale) = val[i];
}

// vpdpbusd: src + the four products of a's u8 and b's s8 in each 32-bit lane, exactly. The even and odd
// bytes widened to 16 bits: each product fits, and vpmaddwd sums two of them into 32 bits exactly. The
// pieces are apart so that the AVX2 products' own loops widen each operand once for several rows.
inline __m256i even_u8(__m256i a) { return _mm256_and_si256(a, _mm256_set1_epi16(0xFF)); }
inline __m256i odd_u8(__m256i a) { return _mm256_srli_epi16(a, 8); }
inline __m256i even_s8(__m256i b) { return _mm256_srai_epi16(_mm256_slli_epi16(b, 8), 8); }
inline __m256i odd_s8(__m256i b) { return _mm256_srai_epi16(b, 8); }
inline __m256i dot_widened(__m256i src, __m256i a_even, __m256i a_odd, __m256i b_even, __m256i b_odd) {
    return _mm256_add_epi32(src, _mm256_add_epi32(_mm256_madd_epi16(a_even, b_even), _mm256_madd_epi16(a_odd, b_odd)));
}
inline __m256i dpbusd8(__m256i src, __m256i a, __m256i b) {
    return dot_widened(src, even_u8(a), odd_u8(a), even_s8(b), odd_s8(b));
}
inline i32x16 dpbusd_epi32(i32x16 src, i32x16 a, i32x16 b) {
    return {dpbusd8(src.lo, a.lo, b.lo), dpbusd8(src.hi, a.hi, b.hi)};
}

// bf16: fp32 with the low 16 bits dropped. vdpbf16ps adds each lane's odd pair's product, then its even
// pair's (both exact in fp32), rounding to nearest each time, as the two FMAs here do; it also treats
// denormal inputs and sums as zero, which these do not (the kernels' own bf16 activations hold no
// denormals: their rounding below flushes them; a sum would differ only below 2^-126).
inline __m256 even_bf16(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
inline __m256 odd_bf16(__m256i v) {
    return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
}
inline __m256 dot_pairs(__m256 src, __m256 a_even, __m256 a_odd, __m256 b_even, __m256 b_odd) {
    return _mm256_fmadd_ps(a_even, b_even, _mm256_fmadd_ps(a_odd, b_odd, src));
}
inline __m256 dpbf16_8(__m256 src, __m256i a, __m256i b) {
    return dot_pairs(src, even_bf16(a), odd_bf16(a), even_bf16(b), odd_bf16(b));
}
inline f32x16 dpbf16_ps(f32x16 src, bf16x32 a, bf16x32 b) {
    return {dpbf16_8(src.lo, a.lo, b.lo), dpbf16_8(src.hi, a.hi, b.hi)};
}
// fp32 to bf16, rounded to nearest even (vcvtneps2bf16): a NaN stays a NaN (quiet), denormals become zero
// of their sign as the instruction's do
inline __m128i cvtneps_pbh8(__m256 v) {
    const __m256i x = _mm256_castps_si256(v);
    const __m256i exponent = _mm256_and_si256(x, _mm256_set1_epi32(0x7F800000));
    const __m256i sign = _mm256_and_si256(x, _mm256_set1_epi32((int)0x80000000u));
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(0x40)), nan);
    const __m256i tiny = _mm256_cmpeq_epi32(exponent, _mm256_setzero_si256());
    r = _mm256_blendv_epi8(r, _mm256_srli_epi32(sign, 16), tiny);
    // sixteen 16-bit results in the low halves of the 32-bit lanes, packed in order
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
inline __m256i cvtneps_pbh(f32x16 a) { return _mm256_set_m128i(cvtneps_pbh8(a.hi), cvtneps_pbh8(a.lo)); }

}  // namespace avx2

// The kernels' names for the above (types, then operations; immediates become template arguments), in
// place of <immintrin.h>'s (some of which are macros).
#define __m512 avx2::f32x16
#define __m512i avx2::i32x16
#define __m512bh avx2::bf16x32
#undef _mm512_set1_ps
#define _mm512_set1_ps avx2::set1_ps
#undef _mm512_setzero_ps
#define _mm512_setzero_ps avx2::setzero_ps
#undef _mm512_loadu_ps
#define _mm512_loadu_ps avx2::loadu_ps
#undef _mm512_storeu_ps
#define _mm512_storeu_ps avx2::storeu_ps
#undef _mm512_add_ps
#define _mm512_add_ps avx2::add_ps
#undef _mm512_sub_ps
#define _mm512_sub_ps avx2::sub_ps
#undef _mm512_mul_ps
#define _mm512_mul_ps avx2::mul_ps
#undef _mm512_div_ps
#define _mm512_div_ps avx2::div_ps
#undef _mm512_max_ps
#define _mm512_max_ps avx2::max_ps
#undef _mm512_min_ps
#define _mm512_min_ps avx2::min_ps
#undef _mm512_fmadd_ps
#define _mm512_fmadd_ps avx2::fmadd_ps
#undef _mm512_fnmadd_ps
#define _mm512_fnmadd_ps avx2::fnmadd_ps
#undef _mm512_abs_ps
#define _mm512_abs_ps avx2::abs_ps
#undef _mm512_roundscale_ps
#define _mm512_roundscale_ps(a, imm) avx2::roundscale_ps<(imm)>(a)
#undef _mm512_scalef_ps
#define _mm512_scalef_ps avx2::scalef_ps
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps avx2::reduce_add_ps
#undef _mm512_reduce_max_ps
#define _mm512_reduce_max_ps avx2::reduce_max_ps
#undef _mm512_reduce_min_ps
#define _mm512_reduce_min_ps avx2::reduce_min_ps
#undef _mm512_cmp_ps_mask
#define _mm512_cmp_ps_mask(a, b, pred) avx2::cmp_ps_mask<(pred)>(a, b)
#undef _mm512_mask_blend_ps
#define _mm512_mask_blend_ps avx2::mask_blend_ps
#undef _mm512_maskz_mov_ps
#define _mm512_maskz_mov_ps avx2::maskz_mov_ps
#undef _mm512_mask_mov_ps
#define _mm512_mask_mov_ps avx2::mask_mov_ps
#undef _mm512_mask_mul_ps
#define _mm512_mask_mul_ps avx2::mask_mul_ps
#undef _mm512_maskz_div_ps
#define _mm512_maskz_div_ps avx2::maskz_div_ps
#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps avx2::maskz_loadu_ps
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps avx2::mask_storeu_ps
#undef _mm512_setzero_si512
#define _mm512_setzero_si512 avx2::setzero_si512
#undef _mm512_set1_epi32
#define _mm512_set1_epi32 avx2::set1_epi32
#undef _mm512_setr_epi32
#define _mm512_setr_epi32 avx2::setr_epi32
#undef _mm512_loadu_si512
#define _mm512_loadu_si512 avx2::loadu_si512
#undef _mm512_storeu_si512
#define _mm512_storeu_si512 avx2::storeu_si512
#undef _mm512_maskz_loadu_epi32
#define _mm512_maskz_loadu_epi32 avx2::maskz_loadu_epi32
#undef _mm512_maskz_loadu_epi8
#define _mm512_maskz_loadu_epi8 avx2::maskz_loadu_epi8
#undef _mm512_mask_storeu_epi8
#define _mm512_mask_storeu_epi8 avx2::mask_storeu_epi8
#undef _mm512_add_epi32
#define _mm512_add_epi32 avx2::add_epi32
#undef _mm512_sub_epi32
#define _mm512_sub_epi32 avx2::sub_epi32
#undef _mm512_mullo_epi32
#define _mm512_mullo_epi32 avx2::mullo_epi32
#undef _mm512_min_epi32
#define _mm512_min_epi32 avx2::min_epi32
#undef _mm512_max_epi32
#define _mm512_max_epi32 avx2::max_epi32
#undef _mm512_and_si512
#define _mm512_and_si512 avx2::and_si512
#undef _mm512_or_si512
#define _mm512_or_si512 avx2::or_si512
#undef _mm512_unpacklo_epi32
#define _mm512_unpacklo_epi32 avx2::unpacklo_epi32
#undef _mm512_unpackhi_epi32
#define _mm512_unpackhi_epi32 avx2::unpackhi_epi32
#undef _mm512_unpacklo_epi64
#define _mm512_unpacklo_epi64 avx2::unpacklo_epi64
#undef _mm512_unpackhi_epi64
#define _mm512_unpackhi_epi64 avx2::unpackhi_epi64
#undef _mm512_slli_epi32
#define _mm512_slli_epi32 avx2::slli_epi32
#undef _mm512_cmpge_epi32_mask
#define _mm512_cmpge_epi32_mask avx2::cmpge_epi32_mask
#undef _mm512_cmplt_epi32_mask
#define _mm512_cmplt_epi32_mask avx2::cmplt_epi32_mask
#undef _mm512_shuffle_i32x4
#define _mm512_shuffle_i32x4(a, b, imm) avx2::shuffle_i32x4<(imm)>(a, b)
#undef _mm512_castsi512_ps
#define _mm512_castsi512_ps avx2::castsi512_ps
#undef _mm512_castps_si512
#define _mm512_castps_si512 avx2::castps_si512
#undef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps avx2::cvtepi32_ps
#undef _mm512_cvtps_epi32
#define _mm512_cvtps_epi32 avx2::cvtps_epi32
#undef _mm512_cvtepu8_epi32
#define _mm512_cvtepu8_epi32 avx2::cvtepu8_epi32
#undef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32 avx2::cvtepu16_epi32
#undef _mm512_cvtsepi32_epi8
#define _mm512_cvtsepi32_epi8 avx2::cvtsepi32_epi8
#undef _mm512_cvtepi32_epi8
#define _mm512_cvtepi32_epi8 avx2::cvtepi32_epi8
#undef _mm512_mask_i32scatter_ps
#define _mm512_mask_i32scatter_ps avx2::mask_i32scatter_ps
#undef _mm512_dpbusd_epi32
#define _mm512_dpbusd_epi32 avx2::dpbusd_epi32
#undef _mm512_dpbf16_ps
#define _mm512_dpbf16_ps avx2::dpbf16_ps
#undef _mm512_cvtneps_pbh
#define _mm512_cvtneps_pbh avx2::cvtneps_pbh
