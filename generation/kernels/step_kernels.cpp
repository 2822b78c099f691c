// Kernels for one decoding step on a CPU with AVX-512 BF16: what a step spends its time on.
//
// - linear: y = x @ W.T for a few rows of bf16 activations. A step streams every weight
//   once, so its speed is memory bandwidth; oneDNN's kernels reach about 60% of what a plain read of
//   the same bytes does on our 2-core VM. Weights here are packed once into panels of 32 output
//   columns that each thread reads as one sequential stream, and every row of x (up to 8 at once) is
//   computed per panel load, each x pair broadcast into the dot product: at 8 rows the step is bound
//   by the dot products themselves, so the inner loop has nothing but loads and dot products.
//   GELU and the residual add are applied to the sums before they are rounded to bf16.
//   Where the CPU has AMX (Sapphire Rapids and later) the same panels feed tile products instead,
//   which cost the weight stream alone at up to 16 rows: a batch of four requests (8 rows with
//   guidance) then streams the weights no slower than one request does.
// - attend: each row's query heads against its cache of keys and values, the new key and value written
//   first. Reads each cache once, with no copies and no mask (oneDNN's batched product copied every
//   slice it was handed). The caches are position-major (all heads of a position side by side), so a
//   row's keys are one stream: per-head slices of a few kB ran at two thirds of the memory's speed
//   (at 150 positions and 8 rows, 17 against 28 GB/s). The same for cross-attention over the text, with
//   its mask.
//
// - resblock: EnCodec's residual block (ELU, 3-tap convolution, ELU, 1-tap convolution, plus the input)
//   in one pass over tiles of 64 samples, fp32 throughout. At 64 and 128 channels oneDNN ran it as
//   five passes over activations of tens of megabytes (plus the reflect padding and its layout copies),
//   at a fraction of the FMA rate; here a tile's intermediates stay in the L1/L2 caches.
//
// Built on first use by generation/native.py (g++ -O3 -march=native -fopenmp) and called through
// ctypes with raw pointers; every shape check happens on the Python side.

#include <immintrin.h>
#include <omp.h>
#include <cmath>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

// The AMX code is compiled for AMX whatever -march says (so the library builds on every AVX-512 BF16 CPU,
// AMX or not) and runs only where amx_enable() gets the tiles from Linux. A compiler without AMX (g++
// before 11, or -DMUSICBOT_NO_AMX) gets entry points that amx_enable() never lets run.
#if defined(__has_include) && !defined(MUSICBOT_NO_AMX)
#if __has_include(<amxtileintrin.h>)
#define MUSICBOT_AMX 1
#endif
#endif

namespace {

constexpr int kPanel = 32;  // output columns per packed panel: two 16-lane accumulators a row
constexpr int kChunk = 32;  // bf16 values per 64-byte load
// Positions ahead that attention asks for, into L2: at 8 rows the caches (100-200 MB a step) streamed
// at 11-14 GB/s without, 17-19 with (and not from L1: T0 prefetches were slower at 250 positions).
constexpr int kAttendAhead = 8;

inline __m512 bf16_to_f32(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
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

// scores[p] <- exp(scores[p] - best) for p < n; returns 1 / their sum. NaN when best is not finite (a
// NaN score, or nothing but -inf / +inf): the caller then writes NaN, as torch's softmax gives.
inline float softmax_weights(float* scores, int n, float best) {
    if (!std::isfinite(best)) return NAN;
    const __m512 vbest = _mm512_set1_ps(best);
    __m512 vsum = _mm512_setzero_ps();
    int p = 0;
    for (; p + 16 <= n; p += 16) {
        __m512 e = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(scores + p), vbest));
        _mm512_storeu_ps(scores + p, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    if (p < n) {
        __mmask16 tail = (__mmask16)((1u << (n - p)) - 1u);
        __m512 e = exp_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, scores + p), vbest));
        e = _mm512_maskz_mov_ps(tail, e);
        _mm512_mask_storeu_ps(scores + p, tail, e);
        vsum = _mm512_add_ps(vsum, e);
    }
    return 1.0f / _mm512_reduce_add_ps(vsum);
}

// softmax(q . K[p] (+ mask[p]), p < n) . V for heads h0 .. h1 - 1 of one row, scores in fp32, the
// result rounded to bf16. The caches are position-major: position p's keys for all heads are
// kc[p * stride ...], head h at offset h * D. Positions are the outer loop, so each cache is read as one
// stream (per-head slices of a few kB ran at two thirds of the memory's speed).
// scores: (h1 - h0) * n floats; acc: (h1 - h0) * D floats.
inline void attend_heads(const uint16_t* q, const uint16_t* kc, const uint16_t* vc, int n, int stride, int h0,
                         int h1, int D, const float* mask, uint16_t* o, float* scores, float* acc) {
    const int nh = h1 - h0;
    float best[64];
    for (int h = 0; h < nh; h++) best[h] = -INFINITY;
    for (int p = 0; p < n; p++) {
        const uint16_t* kp = kc + (size_t)p * stride;
        const char* kahead = (const char*)(kp + (size_t)kAttendAhead * stride);
        for (int h = 0; h < nh; h++) {
            const int at = (h0 + h) * D;
            for (int line = 0; line < D * 2; line += 64) _mm_prefetch(kahead + at * 2 + line, _MM_HINT_T1);
            __m512 a = _mm512_setzero_ps();
            for (int d = 0; d < D; d += kChunk)
                a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(q + at + d), (__m512bh)_mm512_loadu_si512(kp + at + d));
            const float sc = _mm512_reduce_add_ps(a) + (mask ? mask[p] : 0.0f);
            scores[(size_t)h * n + p] = sc;
            if (!(sc <= best[h]) && best[h] == best[h]) best[h] = sc;  // a NaN score makes best NaN, for good
        }
    }
    float inv[64];
    for (int h = 0; h < nh; h++) inv[h] = softmax_weights(scores + (size_t)h * n, n, best[h]);
    const int lanes = D / 16;
    for (int i = 0; i < nh * lanes; i++) _mm512_storeu_ps(acc + 16 * i, _mm512_setzero_ps());
    for (int p = 0; p < n; p++) {
        const uint16_t* vp = vc + (size_t)p * stride + (size_t)h0 * D;
        const char* vahead = (const char*)(vp + (size_t)kAttendAhead * stride);
        for (int h = 0; h < nh; h++) {
            for (int line = 0; line < D * 2; line += 64) _mm_prefetch(vahead + h * D * 2 + line, _MM_HINT_T1);
            const __m512 w = _mm512_set1_ps(scores[(size_t)h * n + p]);
            float* ah = acc + (size_t)h * D;
            for (int i = 0; i < lanes; i++) {
                const __m512 v = bf16_to_f32(_mm256_loadu_si256((const __m256i*)(vp + h * D + 16 * i)));
                _mm512_storeu_ps(ah + 16 * i, _mm512_fmadd_ps(w, v, _mm512_loadu_ps(ah + 16 * i)));
            }
        }
    }
    for (int h = 0; h < nh; h++) {
        uint16_t* oh = o + (size_t)(h0 + h) * D;
        if (std::isnan(inv[h])) {
            for (int d = 0; d < D; d++) oh[d] = 0x7fc0;
            continue;
        }
        const __m512 vinv = _mm512_set1_ps(inv[h]);
        for (int i = 0; i < lanes; i++)
            _mm256_storeu_si256((__m256i*)(oh + 16 * i),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc + (size_t)h * D + 16 * i), vinv)));
    }
}

// Exact GELU, x * (1 + erf(x / sqrt 2)) / 2, with erf by Abramowitz & Stegun 7.1.26: absolute error
// below 1.5e-7, far below the bf16 rounding that follows for all but tiny results (x < -4.5, where
// GELU itself is under 1e-5 and comes out as about 0).
inline __m512 gelu(__m512 x) {
    const __m512 z = _mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f));
    const __m512 a = _mm512_abs_ps(z);
    const __m512 t = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_fmadd_ps(a, _mm512_set1_ps(0.3275911f), _mm512_set1_ps(1.0f)));
    __m512 poly = _mm512_set1_ps(1.061405429f);
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-1.453152027f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(1.421413741f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(-0.284496736f));
    poly = _mm512_fmadd_ps(poly, t, _mm512_set1_ps(0.254829592f));
    poly = _mm512_mul_ps(poly, t);
    const __m512 e = exp_neg(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(a, a)));
    __m512 erf_abs = _mm512_fnmadd_ps(poly, e, _mm512_set1_ps(1.0f));  // 1 - poly * e
    // erf is odd: take the sign of z
    const __m512 sign = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(z), _mm512_set1_epi32(0x80000000)));
    const __m512 erf_z = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(erf_abs), _mm512_castps_si512(sign)));
    return _mm512_mul_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.5f)), _mm512_add_ps(_mm512_set1_ps(1.0f), erf_z));
}

// Sixteen finished fp32 sums: [GELU], [+ residual], rounded to bf16 into y at `at`.
inline void finish16(__m512 v, const uint16_t* residual, uint16_t* y, size_t at, int act) {
    if (act == 1) v = gelu(v);
    if (residual) v = _mm512_add_ps(v, bf16_to_f32(_mm256_loadu_si256((const __m256i*)(residual + at))));
    _mm256_storeu_si256((__m256i*)(y + at), (__m256i)_mm512_cvtneps_pbh(v));
}

// One panel of kPanel output columns for MB rows of x: acc[m][h] holds columns h*16 .. h*16+15.
// Each pair of x's bf16 values (k, k+1) is broadcast into the dot product's operand.
template <int MB>
inline void panel_rows(const uint16_t* panel, const uint16_t* x, const uint16_t* residual, uint16_t* y,
                       int m0, int N, int K, int n0, int act) {
    __m512 acc[MB][2];
    for (int m = 0; m < MB; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    const int pairs = K / 2;
    const uint16_t* xm = x + (size_t)m0 * K;
    for (int kk = 0; kk < pairs; kk++) {
        const uint16_t* p = panel + (size_t)kk * 2 * kPanel;
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(p);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(p + 32);
        for (int m = 0; m < MB; m++) {
            int32_t pair;
            memcpy(&pair, xm + (size_t)m * K + 2 * kk, sizeof pair);
            const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xb);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xb);
        }
    }
    for (int m = 0; m < MB; m++)
        for (int h = 0; h < 2; h++) finish16(acc[m][h], residual, y, (size_t)(m0 + m) * N + n0 + 16 * h, act);
}

#ifdef MUSICBOT_AMX
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16")

// AMX (Sapphire Rapids and later): one tile product takes 16 rows x 32 k x 16 columns, so at up to 16
// rows a panel costs two products per 2 kB of weights and the step is bound by the weight stream alone
// (the AVX-512 loop above is bound by its dot products from about 4 rows on: on a 2-core Xeon, 8 rows
// took 63 ms a step against 29 here). The packed panels are already the tiles' pair-interleaved layout:
// columns 0-15 and 16-31 of a panel are two B tiles, 64 bytes a k pair at a stride of 128.
// Tiles: 0 and 1 the sums of a panel's two halves, 2 the rows of x, 3 and 4 the weights.
struct TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t bytes[16] = {};
    uint8_t rows[16] = {};
};

constexpr int kAmxRows = 16;        // rows of x per tile
constexpr int kPrefetchBytes = 1024;  // how far ahead in its panel stream a thread asks for weights

inline void amx_configure(int rows) {
    TileConfig config;
    for (int t = 0; t < 5; t++) {
        config.rows[t] = t < 3 ? rows : 16;
        config.bytes[t] = 64;
    }
    _tile_loadconfig(&config);
}

// rows m0 .. m0 + MC - 1 of x (MC <= 16, the tiles configured for MC rows) against one panel; K % 32 == 0.
inline void panel_rows_amx(const uint16_t* panel, const uint16_t* x, const uint16_t* residual, uint16_t* y,
                           int m0, int MC, int N, int K, int n0, int act, float* sums) {
    _tile_zero(0);
    _tile_zero(1);
    const uint16_t* xm = x + (size_t)m0 * K;
    for (int k0 = 0; k0 < K; k0 += 32) {
        const uint16_t* p = panel + (size_t)k0 * kPanel;  // 16 k pairs x 32 columns x 2
        const char* ahead = (const char*)p + kPrefetchBytes;
        for (int line = 0; line < 32 * kPanel * 2; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
        _tile_loadd(2, xm + k0, K * 2);
        _tile_loadd(3, p, kPanel * 4);
        _tile_loadd(4, p + 32, kPanel * 4);
        _tile_dpbf16ps(0, 2, 3);
        _tile_dpbf16ps(1, 2, 4);
    }
    _tile_stored(0, sums, kPanel * 4);
    _tile_stored(1, sums + 16, kPanel * 4);
    for (int m = 0; m < MC; m++)
        for (int h = 0; h < 2; h++)
            finish16(_mm512_loadu_ps(sums + m * kPanel + 16 * h), residual, y, (size_t)(m0 + m) * N + n0 + 16 * h, act);
}

#pragma GCC pop_options
#endif  // MUSICBOT_AMX

// ELU with alpha 1: x > 0 (or NaN) ? x : exp(x) - 1
inline __m512 elu(__m512 x) {
    const __m512 zero = _mm512_setzero_ps();
    const __m512 neg = _mm512_sub_ps(exp_neg(_mm512_min_ps(x, zero)), _mm512_set1_ps(1.0f));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, zero, _CMP_NLE_UQ), neg, x);
}

// e[c][i] = ELU(x[c][t0 + i]) (or x itself) for i < count, zero for count <= i < width (a multiple of 16):
// a tile's input, activated once for all its outputs. Where t0 + i falls outside 0 .. T - 1 the sample is
// zero, or with `reflect` the one reflected at the track's ends (T > the reach outside).
inline void activated_rows(const float* x, float* e, int C, int T, int t0, int count, int width, bool activate,
                           bool reflect = false) {
    const bool inside = t0 >= 0 && t0 + count <= T;  // all but a track's first and last tiles
    for (int c = 0; c < C; c++) {
        const float* xc = x + (size_t)c * T;
        float* ec = e + (size_t)c * width;
        if (inside) {
            for (int i = 0; i < width; i += 16) {
                const __mmask16 m = first_lanes(count - i);
                const __m512 v = _mm512_maskz_loadu_ps(m, xc + t0 + i);
                _mm512_storeu_ps(ec + i, activate ? _mm512_maskz_mov_ps(m, elu(v)) : v);
            }
            continue;
        }
        for (int i = 0; i < width; i++) {
            int t = t0 + i;
            if (reflect) t = t < 0 ? -t : t >= T ? 2 * (T - 1) - t : t;
            ec[i] = i < count && t >= 0 && t < T ? xc[t] : 0.0f;
        }
        if (activate)
            for (int i = 0; i < width; i += 16) _mm512_storeu_ps(ec + i, elu(_mm512_loadu_ps(ec + i)));
    }
}

constexpr int kTile = 64;             // samples per residual-block tile: four 16-lane vectors
constexpr int kTileRow = kTile + 16;  // a tile's ELU(x) row: 64 samples and the 2 around them, padded

// One tile of the residual block for one row: samples t0 .. t0 + n - 1 (n <= kTile).
void resblock_tile(const float* x, float* y, const float* w1, const float* b1, const float* w2,
                   const float* b2, int C, int H, int T, int t0, int n, float* e, float* h) {
    // e[c][i] = ELU(x[c][t0 - 1 + i]), i = 0 .. n + 1, reflected at both ends of the track; 0 after
    activated_rows(x, e, C, T, t0 - 1, n + 2, kTileRow, true, true);
    // h[o][i] = ELU(b1[o] + sum over c, j of w1[o][c][j] e[c][i + j]); w1 packed [H/4][C][3][4]
    for (int o = 0; o < H; o += 4) {
        __m512 acc[4][4];
        for (int k = 0; k < 4; k++)
            for (int v = 0; v < 4; v++) acc[k][v] = _mm512_set1_ps(b1[o + k]);
        const float* wp = w1 + (size_t)o * C * 3;
        for (int c = 0; c < C; c++) {
            const float* ec = e + (size_t)c * kTileRow;
            for (int j = 0; j < 3; j++, wp += 4) {
                __m512 ev[4];
                for (int v = 0; v < 4; v++) ev[v] = _mm512_loadu_ps(ec + j + 16 * v);
                for (int k = 0; k < 4; k++) {
                    const __m512 w = _mm512_set1_ps(wp[k]);
                    for (int v = 0; v < 4; v++) acc[k][v] = _mm512_fmadd_ps(w, ev[v], acc[k][v]);
                }
            }
        }
        for (int k = 0; k < 4; k++)
            for (int v = 0; v < 4; v++) _mm512_storeu_ps(h + (size_t)(o + k) * kTile + 16 * v, elu(acc[k][v]));
    }
    // y[c][t] = x[c][t] + b2[c] + sum over o of w2[c][o] h[o][t - t0]; w2 packed [C/4][H][4]
    for (int c = 0; c < C; c += 4) {
        __m512 acc[4][4];
        for (int k = 0; k < 4; k++)
            for (int v = 0; v < 4; v++) acc[k][v] = _mm512_set1_ps(b2[c + k]);
        const float* wp = w2 + (size_t)c * H;
        for (int o = 0; o < H; o++, wp += 4) {
            __m512 hv[4];
            for (int v = 0; v < 4; v++) hv[v] = _mm512_loadu_ps(h + (size_t)o * kTile + 16 * v);
            for (int k = 0; k < 4; k++) {
                const __m512 w = _mm512_set1_ps(wp[k]);
                for (int v = 0; v < 4; v++) acc[k][v] = _mm512_fmadd_ps(w, hv[v], acc[k][v]);
            }
        }
        for (int v = 0; v < 4 && 16 * v < n; v++) {
            const __mmask16 m = first_lanes(n - 16 * v);
            for (int k = 0; k < 4; k++) {
                const size_t at = (size_t)(c + k) * T + t0 + 16 * v;
                const __m512 r = _mm512_add_ps(acc[k][v], _mm512_maskz_loadu_ps(m, x + at));
                _mm512_mask_storeu_ps(y + at, m, r);
            }
        }
    }
}

// EnCodec's upsampling: a transposed convolution of stride S and kernel 2S over ELU(x), non-causal (the
// S samples of padding trimmed, `left` of them at the start). Output sample m = q S + r - left is
// b + sum over c of W[c][r] x[q] + W[c][r + S] x[q - 1]: one phase r at a time, 16 q in the lanes, both
// taps a broadcast weight each; the S phases are interleaved by a scatter. OB output channels x S
// phases of sums stay in registers (16 at S = 4) while the input channels pass once.
constexpr int kUpTile = 16;  // input samples q per tile
constexpr int kUpRow = 32;   // a tile's activated input row: x[q0 - 1] .. x[q0 + 15], padded

template <int S, int OB>
inline void upsample_tile(const float* e, const float* w, const float* b, float* y, int Cin, int Cout, int T,
                          int q0, int left) {
    const int length = T * S;
    __m512i idx[S];
    __mmask16 valid[S];
    for (int r = 0; r < S; r++) {
        const __m512i m = _mm512_add_epi32(
            _mm512_mullo_epi32(_mm512_add_epi32(_mm512_set1_epi32(q0), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)),
                               _mm512_set1_epi32(S)),
            _mm512_set1_epi32(r - left));
        valid[r] = _mm512_cmpge_epi32_mask(m, _mm512_setzero_si512()) & _mm512_cmplt_epi32_mask(m, _mm512_set1_epi32(length));
        idx[r] = m;
    }
    for (int o0 = 0; o0 < Cout; o0 += OB) {
        __m512 acc[OB][S];
        for (int k = 0; k < OB; k++)
            for (int r = 0; r < S; r++) acc[k][r] = _mm512_set1_ps(b[o0 + k]);
        const float* wp = w + (size_t)o0 * Cin * 2 * S;  // packed [Cout / OB][Cin][OB][2S]
        for (int c = 0; c < Cin; c++, wp += OB * 2 * S) {
            const __m512 now = _mm512_loadu_ps(e + (size_t)c * kUpRow + 1), before = _mm512_loadu_ps(e + (size_t)c * kUpRow);
            for (int k = 0; k < OB; k++)
                for (int r = 0; r < S; r++) {
                    acc[k][r] = _mm512_fmadd_ps(_mm512_set1_ps(wp[k * 2 * S + r]), now, acc[k][r]);
                    acc[k][r] = _mm512_fmadd_ps(_mm512_set1_ps(wp[k * 2 * S + S + r]), before, acc[k][r]);
                }
        }
        for (int k = 0; k < OB; k++)
            for (int r = 0; r < S; r++) _mm512_mask_i32scatter_ps(y + (size_t)(o0 + k) * length, valid[r], idx[r], acc[k][r], 4);
    }
}

// EnCodec's last convolution (to O <= 4 channels, K <= 17 taps) over ELU(x) reflect-padded by `left`
// samples before and K - 1 - left after: y[o][t] = b[o] + sum over c, j of W[o][c][j] x[c][t + j - left],
// 64 samples a tile, the input padded and activated once a tile (no padded copy of the track).
constexpr int kNarrowTile = 64;
constexpr int kNarrowRow = kNarrowTile + 16;

inline void narrow_tile(const float* x, float* y, const float* w, const float* b, int C, int O, int K, int T,
                        int left, int t0, int n, float* e, bool activate) {
    activated_rows(x, e, C, T, t0 - left, n + K - 1, kNarrowRow, activate, true);
    for (int o = 0; o < O; o++) {
        __m512 acc[4];
        for (int v = 0; v < 4; v++) acc[v] = _mm512_set1_ps(b[o]);
        const float* wo = w + (size_t)o * C * K;
        for (int c = 0; c < C; c++) {
            const float* ec = e + (size_t)c * kNarrowRow;
            for (int j = 0; j < K; j++) {
                const __m512 wv = _mm512_set1_ps(wo[c * K + j]);
                for (int v = 0; v < 4; v++) acc[v] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(ec + j + 16 * v), acc[v]);
            }
        }
        for (int v = 0; v < 4 && 16 * v < n; v++) {
            const __mmask16 m = first_lanes(n - 16 * v);
            _mm512_mask_storeu_ps(y + (size_t)o * T + t0 + 16 * v, m, acc[v]);
        }
    }
}

#ifdef MUSICBOT_AMX
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16")

// --- EnCodec's convolutions on AMX tiles, in three bf16 products for fp32 accuracy ---
//
// An fp32 value v is split into hi = bf16(v) and lo = bf16(v - hi); a product of two is taken as
// hi.hi + hi.lo + lo.hi (the lo.lo term is 2^-16 of it), each on the tiles with fp32 sums: about
// 2^-16 relative against fp32's 2^-24, far below what 16-bit audio keeps, at a sixth of AMX's rate
// (3.6 TFLOPS bf16 a core here, where the fp32 FMA kernels above reach 70-85 GFLOPS a core).
// A convolution is a sum over its taps j of W_j (M x K) times the input shifted by off[j] samples.

// W (taps, M, K) fp32 -> hi and lo, each [taps][M / 16][K / 32][16][32] bf16: one 1 kB tile per block.
inline void pack_amx_weights(const float* W, uint16_t* hi, uint16_t* lo, int taps, int M, int K) {
    for (int j = 0; j < taps; j++)
        for (int m = 0; m < M; m++)
            for (int k = 0; k < K; k++) {
                const float v = W[((size_t)j * M + m) * K + k];
                const size_t at = ((((size_t)j * (M / 16) + m / 16) * (K / 32) + k / 32) * 16 + m % 16) * 32 + k % 32;
                const uint16_t h = (uint16_t)_mm_cvtsi128_si32((__m128i)_mm_cvtneps_pbh(_mm_set1_ps(v)));
                const uint32_t hb = (uint32_t)h << 16;
                float hv;
                memcpy(&hv, &hb, sizeof hv);
                hi[at] = h;
                lo[at] = (uint16_t)_mm_cvtsi128_si32((__m128i)_mm_cvtneps_pbh(_mm_set1_ps(v - hv)));
            }
}

// Rows 2p and 2p + 1 of e (K rows of `width` fp32, width % 16 == 0) as the tiles' pairs: hi and lo, each
// [K / 2][width] 32-bit words of (row 2p, row 2p + 1) bf16.
inline void split_rows(const float* e, int K, int width, uint32_t* hi, uint32_t* lo) {
    for (int kp = 0; kp < K / 2; kp++) {
        const float *r0 = e + (size_t)2 * kp * width, *r1 = r0 + width;
        uint32_t *h = hi + (size_t)kp * width, *l = lo + (size_t)kp * width;
        for (int t = 0; t < width; t += 16) {
            const __m512 a = _mm512_loadu_ps(r0 + t), b = _mm512_loadu_ps(r1 + t);
            const __m256i ah = (__m256i)_mm512_cvtneps_pbh(a), bh = (__m256i)_mm512_cvtneps_pbh(b);
            const __m256i al = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(a, bf16_to_f32(ah)));
            const __m256i bl = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(b, bf16_to_f32(bh)));
            _mm512_storeu_si512(h + t, _mm512_or_si512(_mm512_cvtepu16_epi32(ah), _mm512_slli_epi32(_mm512_cvtepu16_epi32(bh), 16)));
            _mm512_storeu_si512(l + t, _mm512_or_si512(_mm512_cvtepu16_epi32(al), _mm512_slli_epi32(_mm512_cvtepu16_epi32(bl), 16)));
        }
    }
}

inline void amx_configure_conv() {
    TileConfig config;
    for (int t = 0; t < 8; t++) {
        config.rows[t] = 16;
        config.bytes[t] = 64;
    }
    _tile_loadconfig(&config);
}

// C[m][n] (row stride ldc) = sum over taps j, k of A_j[m][k] B[k][n + off[j]] for m < M, n < N, with A
// packed by pack_amx_weights and B split by split_rows (`width` words a pair row). M % 16 == 0, K % 32
// == 0, N % 32 == 0, off[j] + N <= width. Tiles: 0-1 the sums of two 16-column blocks, 2-3 A's hi and
// lo, 4-7 B's hi and lo for each block; six products a load of both operands.
inline void amx_conv(const uint16_t* Ahi, const uint16_t* Alo, const uint32_t* Bhi, const uint32_t* Blo, int width,
                     const int* off, int taps, int M, int K, int N, float* C, int ldc) {
    const int mb = M / 16, kb = K / 32;
    for (int m = 0; m < mb; m++)
        for (int n0 = 0; n0 < N; n0 += 32) {
            _tile_zero(0);
            _tile_zero(1);
            for (int j = 0; j < taps; j++)
                for (int k = 0; k < kb; k++) {
                    const size_t a = (((size_t)j * mb + m) * kb + k) * 512;
                    const size_t b = (size_t)k * 16 * width + n0 + off[j];
                    _tile_loadd(2, Ahi + a, 64);
                    _tile_loadd(3, Alo + a, 64);
                    _tile_loadd(4, Bhi + b, width * 4);
                    _tile_loadd(5, Blo + b, width * 4);
                    _tile_loadd(6, Bhi + b + 16, width * 4);
                    _tile_loadd(7, Blo + b + 16, width * 4);
                    _tile_dpbf16ps(0, 2, 4);
                    _tile_dpbf16ps(0, 2, 5);
                    _tile_dpbf16ps(0, 3, 4);
                    _tile_dpbf16ps(1, 2, 6);
                    _tile_dpbf16ps(1, 2, 7);
                    _tile_dpbf16ps(1, 3, 6);
                }
            _tile_stored(0, C + (size_t)m * 16 * ldc + n0, ldc * 4);
            _tile_stored(1, C + (size_t)m * 16 * ldc + n0 + 16, ldc * 4);
        }
}

constexpr int kAmxConvTile = 64;                     // samples per tile of the AMX convolutions
constexpr int kAmxConvRow = kAmxConvTile + 16;       // a tile's input row and the samples around it

// per thread, in floats (the 32-bit pair words count as floats)
inline size_t resblock_amx_floats(int C, int H) {
    return (size_t)C * kAmxConvRow * 2 + (size_t)H * kAmxConvTile * 2 + (size_t)C * kAmxConvTile;
}

// EnCodec's residual block as resblock_tile computes it, on AMX: W1 (3 taps, H x C) and W2 (1 tap, C x H)
// packed by pack_amx_weights. C % 32 == 0, H % 32 == 0.
void resblock_amx_tile(const float* x, float* y, const uint16_t* w1hi, const uint16_t* w1lo, const float* b1,
                       const uint16_t* w2hi, const uint16_t* w2lo, const float* b2, int C, int H, int T, int t0, int n,
                       float* scratch) {
    float* e = scratch;                                        // C x kAmxConvRow, then reused for the output
    uint32_t* ehi = (uint32_t*)(e + (size_t)C * kAmxConvRow);  // C / 2 x kAmxConvRow words, twice
    uint32_t* elo = ehi + (size_t)C / 2 * kAmxConvRow;
    float* h = (float*)(elo + (size_t)C / 2 * kAmxConvRow);    // H x kAmxConvTile
    uint32_t* hhi = (uint32_t*)(h + (size_t)H * kAmxConvTile);  // H / 2 x kAmxConvTile words, twice
    uint32_t* hlo = hhi + (size_t)H / 2 * kAmxConvTile;
    activated_rows(x, e, C, T, t0 - 1, n + 2, kAmxConvRow, true, true);
    split_rows(e, C, kAmxConvRow, ehi, elo);
    static const int taps3[3] = {0, 1, 2}, tap1[1] = {0};
    amx_conv(w1hi, w1lo, ehi, elo, kAmxConvRow, taps3, 3, H, C, kAmxConvTile, h, kAmxConvTile);
    for (int o = 0; o < H; o++) {
        const __m512 bias = _mm512_set1_ps(b1[o]);
        float* ho = h + (size_t)o * kAmxConvTile;
        for (int t = 0; t < kAmxConvTile; t += 16) _mm512_storeu_ps(ho + t, elu(_mm512_add_ps(_mm512_loadu_ps(ho + t), bias)));
    }
    split_rows(h, H, kAmxConvTile, hhi, hlo);
    float* out = e;  // C x kAmxConvTile: e is no longer needed
    amx_conv(w2hi, w2lo, hhi, hlo, kAmxConvTile, tap1, 1, C, H, kAmxConvTile, out, kAmxConvTile);
    for (int c = 0; c < C; c++) {
        const __m512 bias = _mm512_set1_ps(b2[c]);
        for (int t = 0; t < n; t += 16) {
            const __mmask16 m = first_lanes(n - t);
            const size_t at = (size_t)c * T + t0 + t;
            const __m512 r = _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(out + (size_t)c * kAmxConvTile + t), bias),
                                           _mm512_maskz_loadu_ps(m, x + at));
            _mm512_mask_storeu_ps(y + at, m, r);
        }
    }
}

inline size_t upsample_amx_floats(int Cin, int Cout, int S) {
    return (size_t)Cin * kAmxConvRow * 2 + (size_t)S * Cout * kAmxConvTile;
}

// EnCodec's transposed convolutions of stride S (kernel 2S) as upsample_tile computes them, on AMX: phase
// r of kAmxConvTile input samples q0 .. is W[r] x[q] + W[r + S] x[q - 1], two taps over the tile's input
// (offsets 1 and 0 from x[q0 - 1]); the S phases are then interleaved (four: sixteen samples at a time in
// registers; others by scatters). W packed by pack_amx_weights as 2S taps (r, then r + S, for each r)
// of (Cout x Cin). Cin % 32 == 0, Cout % 16 == 0.
void upsample_amx_tile(const float* x, float* y, const uint16_t* whi, const uint16_t* wlo, const float* b, int Cin,
                       int Cout, int T, int S, int left, int q0, bool activate, float* scratch) {
    float* e = scratch;
    uint32_t* ehi = (uint32_t*)(e + (size_t)Cin * kAmxConvRow);
    uint32_t* elo = ehi + (size_t)Cin / 2 * kAmxConvRow;
    float* phases = (float*)(elo + (size_t)Cin / 2 * kAmxConvRow);  // S x Cout x kAmxConvTile
    activated_rows(x, e, Cin, T, q0 - 1, kAmxConvTile + 1, kAmxConvRow, activate);
    split_rows(e, Cin, kAmxConvRow, ehi, elo);
    static const int taps[2] = {1, 0};
    const size_t per_tap = (size_t)Cout * Cin;
    for (int r = 0; r < S; r++)
        amx_conv(whi + 2 * r * per_tap, wlo + 2 * r * per_tap, ehi, elo, kAmxConvRow, taps, 2, Cout, Cin, kAmxConvTile,
                 phases + (size_t)r * Cout * kAmxConvTile, kAmxConvTile);
    const long length = (long)T * S;
    if (S != 4) {
        for (int r = 0; r < S; r++)
            for (int q = 0; q < kAmxConvTile; q += 16) {
                const __m512i m = _mm512_add_epi32(
                    _mm512_mullo_epi32(_mm512_add_epi32(_mm512_set1_epi32(q0 + q), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)),
                                       _mm512_set1_epi32(S)),
                    _mm512_set1_epi32(r - left));
                const __mmask16 keep = _mm512_cmpge_epi32_mask(m, _mm512_setzero_si512()) &
                                       _mm512_cmplt_epi32_mask(m, _mm512_set1_epi32((int)length));
                for (int o = 0; o < Cout; o++) {
                    const __m512 v = _mm512_add_ps(_mm512_loadu_ps(phases + ((size_t)r * Cout + o) * kAmxConvTile + q),
                                                   _mm512_set1_ps(b[o]));
                    _mm512_mask_i32scatter_ps(y + (size_t)o * length, keep, m, v, 4);
                }
            }
        return;
    }
    // (p0, p1, p2, p3)[q] -> y[4 q + r - left]: two interleaves of pairs, then of pairs of pairs
    const __m512i pair_lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i pair_hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512i quad_lo = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11), quad_hi = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
    for (int o = 0; o < Cout; o++) {
        const __m512 bias = _mm512_set1_ps(b[o]);
        float* yo = y + (size_t)o * length;
        for (int q = 0; q < kAmxConvTile; q += 16) {
            __m512 p[4];
            for (int r = 0; r < 4; r++) p[r] = _mm512_add_ps(_mm512_loadu_ps(phases + ((size_t)r * Cout + o) * kAmxConvTile + q), bias);
            const __m512 a0 = _mm512_permutex2var_ps(p[0], pair_lo, p[1]), a1 = _mm512_permutex2var_ps(p[0], pair_hi, p[1]);
            const __m512 c0 = _mm512_permutex2var_ps(p[2], pair_lo, p[3]), c1 = _mm512_permutex2var_ps(p[2], pair_hi, p[3]);
            const __m512 out[4] = {
                _mm512_castpd_ps(_mm512_permutex2var_pd(_mm512_castps_pd(a0), quad_lo, _mm512_castps_pd(c0))),
                _mm512_castpd_ps(_mm512_permutex2var_pd(_mm512_castps_pd(a0), quad_hi, _mm512_castps_pd(c0))),
                _mm512_castpd_ps(_mm512_permutex2var_pd(_mm512_castps_pd(a1), quad_lo, _mm512_castps_pd(c1))),
                _mm512_castpd_ps(_mm512_permutex2var_pd(_mm512_castps_pd(a1), quad_hi, _mm512_castps_pd(c1))),
            };
            for (int v = 0; v < 4; v++) {  // output samples m0 .. m0 + 15
                const long m0 = (long)(q0 + q + 4 * v) * 4 - left;
                __mmask16 keep = 0xFFFF;
                if (m0 < 0) keep &= (__mmask16)(0xFFFFu << -m0);
                if (m0 + 16 > length) keep &= m0 >= length ? (__mmask16)0 : (__mmask16)((1u << (length - m0)) - 1);
                if (keep) _mm512_mask_storeu_ps(yo + m0, keep, out[v]);
            }
        }
    }
}

#pragma GCC pop_options
#endif  // MUSICBOT_AMX

// Tasks per row: a row's heads, or a share of them when the rows are fewer than a multiple of the
// threads (one request without guidance: one row, two threads).
inline int head_groups(int rows, int heads, int threads) {
    int a = rows, b = threads;
    while (b) {
        const int t = a % b;
        a = b;
        b = t;
    }
    const int groups = threads / a;
    return groups > heads ? heads : groups;
}

inline int attention_scratch(int heads, int D, int capacity) { return heads * (capacity + D); }

// rows x heads queries q (row r at q + r * q_stride) over position-major caches (rows, capacity, heads * D),
// attending positions 0 .. n - 1. With `fresh` (self-attention) position n - 1 is first written from it:
// keys at fresh + r * q_stride, values heads * D further. Work is shared out as head_groups says.
void attend_rows(const uint16_t* q, size_t q_stride, const uint16_t* fresh, uint16_t* keys, uint16_t* values,
                 const float* mask, uint16_t* out, float* scratch, int rows, int heads, int D, int capacity,
                 int n, int threads) {
    const int hidden = heads * D, groups = head_groups(rows, heads, threads);
#pragma omp parallel num_threads(threads)
    {
        float* scores = scratch + (size_t)omp_get_thread_num() * attention_scratch(heads, D, capacity);
        float* acc = scores + (size_t)heads * capacity;
#pragma omp for schedule(static)
        for (int task = 0; task < rows * groups; task++) {
            const int r = task / groups, g = task % groups;
            const int h0 = g * heads / groups, h1 = (g + 1) * heads / groups;
            uint16_t* kc = keys + (size_t)r * capacity * hidden;
            uint16_t* vc = values + (size_t)r * capacity * hidden;
            if (fresh) {
                const uint16_t* k = fresh + (size_t)r * q_stride + (size_t)h0 * D;
                const size_t at = (size_t)(n - 1) * hidden + (size_t)h0 * D, count = (size_t)(h1 - h0) * D;
                memcpy(kc + at, k, count * sizeof(uint16_t));
                memcpy(vc + at, k + hidden, count * sizeof(uint16_t));
            }
            attend_heads(q + (size_t)r * q_stride, kc, vc, n, hidden, h0, h1, D, mask ? mask + (size_t)r * n : nullptr,
                         out + (size_t)r * hidden, scores, acc);
        }
    }
}

}  // namespace

extern "C" {

// W (N, K) bf16 row-major -> packed panels [N/32][K/2][32][2]: for each pair of k, the 32 columns of a
// panel side by side, so a panel is one sequential stream and each 64-byte load is 16 columns x 2 k.
// N % 32 == 0, K % 2 == 0.
void pack_linear_weight(const uint16_t* W, uint16_t* packed, int N, int K) {
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++)
            packed[(((size_t)(n / kPanel) * (K / 2) + k / 2) * kPanel + n % kPanel) * 2 + k % 2] =
                W[(size_t)n * K + k];
}

// y (M, N) = act(x (M, K) @ W.T) [+ residual (M, N)], all bf16, fp32 sums; act 0: none, 1: exact GELU.
// W packed by pack_linear_weight.
void linear_bf16(const uint16_t* packed, const uint16_t* x, const uint16_t* residual, uint16_t* y, int M,
                 int N, int K, int act, int threads) {
    const int panels = N / kPanel;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < panels; b++) {
        const uint16_t* panel = packed + (size_t)b * K * kPanel;
        const int n0 = b * kPanel;
        int m0 = 0;
        for (; m0 + 8 <= M; m0 += 8) panel_rows<8>(panel, x, residual, y, m0, N, K, n0, act);
        switch (M - m0) {
            case 7: panel_rows<7>(panel, x, residual, y, m0, N, K, n0, act); break;
            case 6: panel_rows<6>(panel, x, residual, y, m0, N, K, n0, act); break;
            case 5: panel_rows<5>(panel, x, residual, y, m0, N, K, n0, act); break;
            case 4: panel_rows<4>(panel, x, residual, y, m0, N, K, n0, act); break;
            case 3: panel_rows<3>(panel, x, residual, y, m0, N, K, n0, act); break;
            case 2: panel_rows<2>(panel, x, residual, y, m0, N, K, n0, act); break;
            case 1: panel_rows<1>(panel, x, residual, y, m0, N, K, n0, act); break;
            default: break;
        }
    }
}

// One decoding step of self-attention for rows x heads query rows, head size D (D % 32 == 0), heads <= 64.
// qkv (rows, 3 * heads * D) bf16: the fused projection, q already scaled by 1/sqrt(D).
// keys / values (rows, capacity, heads * D) bf16, position-major: position `pos` is written from qkv,
// then each query attends over positions 0..pos. out (rows, heads * D) bf16.
// scratch: threads * attend_scratch(heads, D, capacity) floats.
int attend_scratch(int heads, int D, int capacity) { return attention_scratch(heads, D, capacity); }

void attend_bf16(const uint16_t* qkv, uint16_t* keys, uint16_t* values, uint16_t* out, float* scratch, int rows,
                 int heads, int D, int capacity, int pos, int threads) {
    const size_t hidden = (size_t)heads * D;
    attend_rows(qkv, 3 * hidden, qkv + hidden, keys, values, nullptr, out, scratch, rows, heads, D, capacity,
                pos + 1, threads);
}

// Cross-attention of one step: q (rows, heads * D) bf16 (scaled), keys / values (rows, n, heads * D) bf16,
// position-major as above, mask (rows, n) fp32 added to the scores, or null. out (rows, heads * D) bf16.
// scratch: threads * attend_scratch(heads, D, n) floats.
void cross_attend_bf16(const uint16_t* q, const uint16_t* keys, const uint16_t* values, const float* mask,
                       uint16_t* out, float* scratch, int rows, int heads, int D, int n, int threads) {
    // read only: without `fresh` nothing is written to the caches
    attend_rows(q, (size_t)heads * D, nullptr, const_cast<uint16_t*>(keys), const_cast<uint16_t*>(values), mask,
                out, scratch, rows, heads, D, n, n, threads);
}

// EnCodec's residual block: y = x + b2 + W2 . ELU(b1 + W1 * pad(ELU(x))), x and y (rows, C, T) fp32
// (not the same memory), W1 a 3-tap convolution C -> H over x reflect-padded by one sample on each
// side, packed [H/4][C][3][4]; W2 a 1-tap convolution H -> C packed [C/4][H][4]. C % 4 == 0,
// H % 4 == 0, T >= 2. scratch: threads * resblock_scratch(C, H) floats, 64-byte aligned.
int resblock_scratch(int C, int H) { return C * kTileRow + H * kTile; }

void resblock_f32(const float* x, float* y, const float* w1, const float* b1, const float* w2,
                  const float* b2, float* scratch, int rows, int C, int H, int T, int threads) {
    const int tiles = (T + kTile - 1) / kTile;
#pragma omp parallel num_threads(threads)
    {
        float* e = scratch + (size_t)omp_get_thread_num() * resblock_scratch(C, H);
        float* h = e + (size_t)C * kTileRow;
#pragma omp for schedule(static)
        for (int job = 0; job < rows * tiles; job++) {
            const int r = job / tiles, t0 = (job % tiles) * kTile;
            const size_t offset = (size_t)r * C * T;
            const int n = T - t0 < kTile ? T - t0 : kTile;
            resblock_tile(x + offset, y + offset, w1, b1, w2, b2, C, H, T, t0, n, e, h);
        }
    }
}


// EnCodec's transposed convolution of stride 4 and kernel 8 (non-causal, `left` samples of its 4 of
// padding trimmed at the start) over ELU(x) (or x): x (rows, Cin, T) -> y (rows, Cout, 4 T) fp32, W (Cin,
// Cout, 8) packed [Cout / 4][Cin][4][8] by the caller, Cout % 4 == 0. scratch: threads *
// upsample_scratch(Cin) floats.
int upsample_scratch(int Cin) { return Cin * kUpRow; }

void upsample4_f32(const float* x, float* y, const float* w, const float* b, float* scratch, int rows, int Cin,
                   int Cout, int T, int left, int activate, int threads) {
    const int tiles = (T + 1 + kUpTile - 1) / kUpTile;  // q runs to T: its x[q - 1] tap is the last sample's
#pragma omp parallel num_threads(threads)
    {
        float* e = scratch + (size_t)omp_get_thread_num() * upsample_scratch(Cin);
#pragma omp for schedule(static)
        for (int job = 0; job < rows * tiles; job++) {
            const int r = job / tiles, q0 = (job % tiles) * kUpTile;
            const float* xr = x + (size_t)r * Cin * T;
            activated_rows(xr, e, Cin, T, q0 - 1, kUpTile + 1, kUpRow, activate != 0);
            upsample_tile<4, 4>(e, w, b, y + (size_t)r * Cout * T * 4, Cin, Cout, T, q0, left);
        }
    }
}

// EnCodec's last convolution: y (rows, O, T) = b + W * reflect_pad(ELU(x)) (or of x), x (rows, C, T) fp32,
// `left` samples of padding before and K - 1 - left after (T > both), W (O, C, K) as is, O <= 4, K <= 17.
// scratch: threads * narrow_scratch(C) floats.
int narrow_scratch(int C) { return C * kNarrowRow; }

void narrow_conv_f32(const float* x, float* y, const float* w, const float* b, float* scratch, int rows, int C,
                     int O, int K, int T, int left, int activate, int threads) {
    const int tiles = (T + kNarrowTile - 1) / kNarrowTile;
#pragma omp parallel num_threads(threads)
    {
        float* e = scratch + (size_t)omp_get_thread_num() * narrow_scratch(C);
#pragma omp for schedule(static)
        for (int job = 0; job < rows * tiles; job++) {
            const int r = job / tiles, t0 = (job % tiles) * kNarrowTile;
            const int n = T - t0 < kNarrowTile ? T - t0 : kNarrowTile;
            narrow_tile(x + (size_t)r * C * T, y + (size_t)r * O * T, w, b, C, O, K, T, left, t0, n, e, activate != 0);
        }
    }
}


#ifdef MUSICBOT_AMX
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16")

// Asks the kernel for the AMX tile state (Linux gives it to a process only on request); 1 if granted.
int amx_enable() {
    const long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0 ? 1 : 0;
}

// linear_bf16 on AMX tiles: the same arguments and results, K % 32 == 0, after amx_enable() gave 1.
void linear_amx_bf16(const uint16_t* packed, const uint16_t* x, const uint16_t* residual, uint16_t* y, int M,
                     int N, int K, int act, int threads) {
    const int panels = N / kPanel;
#pragma omp parallel num_threads(threads)
    {
        alignas(64) float sums[kAmxRows * kPanel];
        for (int m0 = 0; m0 < M; m0 += kAmxRows) {
            const int rows = M - m0 < kAmxRows ? M - m0 : kAmxRows;
            amx_configure(rows);  // per thread: tile state is the thread's own
#pragma omp for schedule(static)
            for (int b = 0; b < panels; b++)
                panel_rows_amx(packed + (size_t)b * K * kPanel, x, residual, y, m0, rows, N, K, b * kPanel, act, sums);
        }
        _tile_release();  // leave no tile state behind for the OS to save at every switch
    }
}

// EnCodec's convolutions on AMX (after amx_enable() gave 1): weights packed by pack_amx_weights (W in
// (taps, M, K) fp32: hi and lo of taps * M * K bf16 each), x and y as for resblock_f32 / upsample4_f32.
void pack_amx_conv(const float* W, uint16_t* hi, uint16_t* lo, int taps, int M, int K) {
    pack_amx_weights(W, hi, lo, taps, M, K);
}

int resblock_amx_scratch(int C, int H) { return (int)resblock_amx_floats(C, H); }

void resblock_amx(const float* x, float* y, const uint16_t* w1hi, const uint16_t* w1lo, const float* b1,
                  const uint16_t* w2hi, const uint16_t* w2lo, const float* b2, float* scratch, int rows, int C, int H,
                  int T, int threads) {
    const int tiles = (T + kAmxConvTile - 1) / kAmxConvTile;
#pragma omp parallel num_threads(threads)
    {
        float* mine = scratch + (size_t)omp_get_thread_num() * resblock_amx_floats(C, H);
        amx_configure_conv();
#pragma omp for schedule(static)
        for (int job = 0; job < rows * tiles; job++) {
            const int r = job / tiles, t0 = (job % tiles) * kAmxConvTile;
            const size_t offset = (size_t)r * C * T;
            const int n = T - t0 < kAmxConvTile ? T - t0 : kAmxConvTile;
            resblock_amx_tile(x + offset, y + offset, w1hi, w1lo, b1, w2hi, w2lo, b2, C, H, T, t0, n, mine);
        }
        _tile_release();
    }
}

int upsample_amx_scratch(int Cin, int Cout, int S) { return (int)upsample_amx_floats(Cin, Cout, S); }

// stride S, kernel 2S, `left` of the S samples of padding trimmed at the start: x (rows, Cin, T) -> y
// (rows, Cout, S T). scratch: threads * upsample_amx_scratch(Cin, Cout, S) floats.
void upsample_amx(const float* x, float* y, const uint16_t* whi, const uint16_t* wlo, const float* b, float* scratch,
                  int rows, int Cin, int Cout, int T, int S, int left, int activate, int threads) {
    const int tiles = (T + 1 + kAmxConvTile - 1) / kAmxConvTile;  // q runs to T, as in upsample4_f32
#pragma omp parallel num_threads(threads)
    {
        float* mine = scratch + (size_t)omp_get_thread_num() * upsample_amx_floats(Cin, Cout, S);
        amx_configure_conv();
#pragma omp for schedule(static)
        for (int job = 0; job < rows * tiles; job++) {
            const int r = job / tiles, q0 = (job % tiles) * kAmxConvTile;
            upsample_amx_tile(x + (size_t)r * Cin * T, y + (size_t)r * Cout * T * S, whi, wlo, b, Cin, Cout, T, S, left,
                              q0, activate != 0, mine);
        }
        _tile_release();
    }
}

#pragma GCC pop_options
#else  // no AMX in this compiler: the entry points ctypes binds, never let run

int amx_enable() { return 0; }
void linear_amx_bf16(const uint16_t*, const uint16_t*, const uint16_t*, uint16_t*, int, int, int, int, int) {}
void pack_amx_conv(const float*, uint16_t*, uint16_t*, int, int, int) {}
int resblock_amx_scratch(int, int) { return 0; }
void resblock_amx(const float*, float*, const uint16_t*, const uint16_t*, const float*, const uint16_t*,
                  const uint16_t*, const float*, float*, int, int, int, int, int) {}
int upsample_amx_scratch(int, int, int) { return 0; }
void upsample_amx(const float*, float*, const uint16_t*, const uint16_t*, const float*, float*, int, int, int, int,
                  int, int, int, int) {}

#endif  // MUSICBOT_AMX

// --- one whole decoding step in one call ---
//
// The step as the Python loop ran it, on the kernels above: per step about 150 calls from Python and
// 100 small torch operations (layer norms, embedding sums, views), 5-6 ms of a 40 ms step on the 2-core
// VM, now none. Same operations in the same order and precision: bf16 activations, fp32 sums, the
// embedding sum and layer norms rounded to bf16 where torch rounds them.

struct StepLayer {  // one decoder layer: weights packed by pack_linear_weight, norms as (weight, bias, eps)
    const uint16_t *ln1_w, *ln1_b, *qkv, *out, *ln2_w, *ln2_b, *cross_q, *cross_out, *ln3_w, *ln3_b, *fc1, *fc2;
    float eps1, eps2, eps3;
    uint16_t *keys, *values;                    // self-attention caches (rows, capacity, hidden)
    const uint16_t *cross_keys, *cross_values;  // (cross_rows, text, hidden), or null: no cross-attention
};

struct StepModel {
    int layers, hidden, heads, ffn, codebooks, vocab, capacity, text, amx;
    const uint16_t* const* embeddings;  // codebooks tables (vocab + 1, hidden)
    const uint16_t* positions;          // (positions, hidden)
    const uint16_t *final_w, *final_b;
    float final_eps;
    const uint16_t* lm_head;  // (codebooks * vocab, hidden) packed
    const float* cross_mask;  // (cross_rows, text) or null
};

static inline uint16_t to_bf16(float f) {
    return (uint16_t)_mm_cvtsi128_si32((__m128i)_mm_cvtneps_pbh(_mm_set1_ps(f)));
}

static inline float from_bf16(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

// torch's layer norm of bf16 rows: mean and variance in fp32 (biased), y = (x - mean) * rstd * w + b
// rounded to bf16 once.
static void layer_norm(const uint16_t* x, uint16_t* y, const uint16_t* w, const uint16_t* b, float eps, int rows,
                       int n) {
    for (int r = 0; r < rows; r++) {
        const uint16_t* xr = x + (size_t)r * n;
        uint16_t* yr = y + (size_t)r * n;
        __m512 sum = _mm512_setzero_ps();
        for (int i = 0; i < n; i += 16) sum = _mm512_add_ps(sum, bf16_to_f32(_mm256_loadu_si256((const __m256i*)(xr + i))));
        const float mean = _mm512_reduce_add_ps(sum) / n;
        const __m512 vmean = _mm512_set1_ps(mean);
        __m512 sq = _mm512_setzero_ps();
        for (int i = 0; i < n; i += 16) {
            const __m512 d = _mm512_sub_ps(bf16_to_f32(_mm256_loadu_si256((const __m256i*)(xr + i))), vmean);
            sq = _mm512_fmadd_ps(d, d, sq);
        }
        const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(sq) / n + eps));
        for (int i = 0; i < n; i += 16) {
            const __m512 d = _mm512_sub_ps(bf16_to_f32(_mm256_loadu_si256((const __m256i*)(xr + i))), vmean);
            const __m512 wv = bf16_to_f32(_mm256_loadu_si256((const __m256i*)(w + i)));
            const __m512 bv = bf16_to_f32(_mm256_loadu_si256((const __m256i*)(b + i)));
            _mm256_storeu_si256((__m256i*)(yr + i), (__m256i)_mm512_cvtneps_pbh(_mm512_fmadd_ps(_mm512_mul_ps(d, rstd), wv, bv)));
        }
    }
}

int step_work(int rows, int hidden, int ffn) { return rows * (hidden + 3 * hidden + hidden + ffn); }  // bf16s

// x (rows, hidden) bf16 is overwritten by the step's hidden states; logits (rows, codebooks * vocab) bf16.
// tokens (rows, codebooks) int64: this column's codes; position: its index in the caches.
// work: step_work(rows, hidden, ffn) bf16; scratch: threads * attend_scratch(heads, D, capacity) floats,
// enough for cross-attention over the text too (text <= capacity).
void decoder_step(const StepModel* m, const StepLayer* layers, const int64_t* tokens, uint16_t* x, uint16_t* logits,
                  uint16_t* work, float* scratch, int rows, int cross_rows, int position, int threads) {
    const int H = m->hidden, D = H / m->heads;
    auto linear = [&](const uint16_t* w, const uint16_t* in, const uint16_t* residual, uint16_t* y, int M, int N, int K,
                      int act) {
        if (m->amx && K % 32 == 0)
            linear_amx_bf16(w, in, residual, y, M, N, K, act, threads);
        else
            linear_bf16(w, in, residual, y, M, N, K, act, threads);
    };
    // the column's embeddings summed (bf16 after each add, as torch's bf16 sum), then its position
    for (int r = 0; r < rows; r++) {
        uint16_t* xr = x + (size_t)r * H;
        for (int i = 0; i < H; i++) {
            float v = from_bf16(m->embeddings[0][(size_t)tokens[(size_t)r * m->codebooks] * H + i]);
            for (int k = 1; k < m->codebooks; k++)
                v = from_bf16(to_bf16(v + from_bf16(m->embeddings[k][(size_t)tokens[(size_t)r * m->codebooks + k] * H + i])));
            xr[i] = to_bf16(v + from_bf16(m->positions[(size_t)position * H + i]));
        }
    }
    uint16_t *h = work, *qkv = h + (size_t)rows * H, *attn = qkv + (size_t)rows * 3 * H, *inner = attn + (size_t)rows * H;
    for (int l = 0; l < m->layers; l++) {
        const StepLayer& L = layers[l];
        layer_norm(x, h, L.ln1_w, L.ln1_b, L.eps1, rows, H);
        linear(L.qkv, h, nullptr, qkv, rows, 3 * H, H, 0);
        attend_rows(qkv, 3 * (size_t)H, qkv + H, L.keys, L.values, nullptr, attn, scratch, rows, m->heads, D, m->capacity,
                    position + 1, threads);
        linear(L.out, attn, x, x, rows, H, H, 0);  // residual in place: each sum reads its own element first
        if (L.cross_keys && cross_rows > 0) {
            layer_norm(x, h, L.ln2_w, L.ln2_b, L.eps2, cross_rows, H);
            linear(L.cross_q, h, nullptr, qkv, cross_rows, H, H, 0);
            attend_rows(qkv, (size_t)H, nullptr, const_cast<uint16_t*>(L.cross_keys), const_cast<uint16_t*>(L.cross_values),
                        m->cross_mask, attn, scratch, cross_rows, m->heads, D, m->text, m->text, threads);
            linear(L.cross_out, attn, x, x, cross_rows, H, H, 0);
        }
        layer_norm(x, h, L.ln3_w, L.ln3_b, L.eps3, rows, H);
        linear(L.fc1, h, nullptr, inner, rows, m->ffn, H, 1);
        linear(L.fc2, inner, x, x, rows, H, m->ffn, 0);
    }
    layer_norm(x, h, m->final_w, m->final_b, m->final_eps, rows, H);
    linear(m->lm_head, h, nullptr, logits, rows, m->codebooks * m->vocab, H, 0);
}

}  // extern "C"
