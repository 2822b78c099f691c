// What the decoder's and EnCodec's kernels share: bf16 conversions, lane masks, exp, and AMX's tile
// configuration. Every entry point and struct is declared in interface.h, generated at build time from
// generation/native_api.py (the one declaration of the interface; a definition that disagrees with it
// does not compile). Built by generation/native.py with g++ -O3 -march=native -fopenmp; the calls are
// checked against the declarations before they cross from Python.
#pragma once

#include <immintrin.h>
#include <omp.h>
#include <cmath>
#include <stdint.h>
#include <string.h>

#include "interface.h"

// Built for a CPU without AVX-512 (-march=native on AVX2), the kernels' AVX-512 operations are pairs of
// AVX2 ones (avx2.h), and the code compiled for VNNI or AMX below is left out.
#ifndef __AVX512F__
#include "avx2.h"
#endif

// The AMX code is compiled for AMX whatever -march says (so the library builds on every AVX-512 BF16 CPU,
// AMX or not) and runs only where amx_enable() gets the tiles from Linux. A compiler without AMX (g++
// before 11, or -DMUSICBOT_NO_AMX) gets entry points that amx_enable() never lets run.
#if defined(__has_include) && !defined(MUSICBOT_NO_AMX) && defined(__AVX512F__)
#if __has_include(<amxtileintrin.h>)
#define MUSICBOT_AMX 1
#endif
#endif

// The VNNI loops: compiled for VNNI on every AVX-512 CPU (the library runs them only where it is there),
// as plain code on AVX2, whose dot products avx2.h makes of widened bytes.
#ifdef __AVX512F__
#define MUSICBOT_VNNI_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx512vnni\")")
#define MUSICBOT_VNNI_END _Pragma("GCC pop_options")
#else
#define MUSICBOT_VNNI_BEGIN
#define MUSICBOT_VNNI_END
#endif

namespace {

constexpr int kMaxHeads = MUSICBOT_MAX_HEADS;  // self-attention's per-head state lives on the stack
constexpr int kMaxHeadSize = MUSICBOT_MAX_HEAD_SIZE;

inline __m512 bf16_to_f32(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// v held in a register from here on: the compiler may not fold its load into each instruction that reads
// it. GCC folded a tile's four input vectors into all sixteen FMAs that share them, loading each vector
// four times (twice as many loads as FMAs, unaligned ones split across lines), which made EnCodec's
// convolutions load-bound at half the FMAs' rate on Zen 4.
inline void in_register(__m512& v) {
#ifdef __AVX512F__
    asm("" : "+v"(v));
#else
    asm("" : "+x"(v.lo), "+x"(v.hi));
#endif
}

// A 16 x 16 matrix of 32-bit values, one row a vector, transposed in place. Interleaving single values,
// then pairs, leaves in u[4g + c]'s 128-bit lane L the four rows 4g .. 4g + 3 of column 4L + c; a 4 x 4
// transposition of 128-bit lanes across u[c], u[4 + c], u[8 + c], u[12 + c] then gives columns c, 4 + c,
// 8 + c and 12 + c whole.
inline void transpose16(__m512i* r) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int c = 0; c < 4; c++) {  // 0x88: 128-bit lanes 0 and 2 of each operand; 0xDD: lanes 1 and 3
        const __m512i p = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), q = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xDD);
        const __m512i u = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88), v = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xDD);
        t[c] = _mm512_shuffle_i32x4(p, u, 0x88);
        t[8 + c] = _mm512_shuffle_i32x4(p, u, 0xDD);
        t[4 + c] = _mm512_shuffle_i32x4(q, v, 0x88);
        t[12 + c] = _mm512_shuffle_i32x4(q, v, 0xDD);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

// Lanes 0 .. left - 1 of sixteen (all for left >= 16, none for left <= 0): a tile's tail.
inline __mmask16 first_lanes(int left) {
    return left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1) : (__mmask16)0;
}

// exp for x <= 0 (softmax after subtracting the max): 2^(x log2 e), split into 2^i * 2^f, f in [-0.5, 0.5]
inline __m512 exp_neg(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 t = _mm512_mul_ps(x, log2e);
    __m512 i = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, i);
    // 2^f on [-0.5, 0.5], degree-6 polynomial (relative error < 2e-7)
    __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, i);
}

inline uint16_t to_bf16(float f) {
#ifdef __AVX512F__
    return (uint16_t)_mm_cvtsi128_si32((__m128i)_mm_cvtneps_pbh(_mm_set1_ps(f)));
#else
    return (uint16_t)_mm_cvtsi128_si32(avx2::cvtneps_pbh8(_mm256_set1_ps(f)));
#endif
}

inline float from_bf16(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

#ifdef MUSICBOT_AMX
// AMX's tile configuration (palette 1): per tile its rows and bytes a row.
struct TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t bytes[16] = {};
    uint8_t rows[16] = {};
};
#endif  // MUSICBOT_AMX

}  // namespace
