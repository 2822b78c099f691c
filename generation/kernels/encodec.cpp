// EnCodec's decoder convolutions, fp32 in and out:
//
// - resblock: EnCodec's residual block (ELU, 3-tap convolution, ELU, 1-tap convolution, plus the input)
//   in one pass over tiles of 64 samples, fp32 throughout: a tile's intermediates stay in the L1/L2
//   caches instead of passing through memory between five operations.
// - upsample: the transposed convolutions of stride S and kernel 2S, over ELU(x) or x.
// - narrow_conv: the last convolution, to at most 4 channels, with its reflect padding.
// - resblock_amx, upsample_amx: the residual block and transposed convolutions of any stride on AMX
//   tiles, in three bf16 products for fp32 accuracy.

#include "common.h"

namespace {

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
                for (int v = 0; v < 4; v++) {
                    ev[v] = _mm512_loadu_ps(ec + j + 16 * v);
                    in_register(ev[v]);
                }
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
            for (int v = 0; v < 4; v++) {
                hv[v] = _mm512_loadu_ps(h + (size_t)o * kTile + 16 * v);
                in_register(hv[v]);
            }
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
// b + sum over c of W[c][r] x[q] + W[c][r + S] x[q - 1]. The lanes hold 16 output channels: for each input
// channel, 2 PB weight vectors (phases r and r + S) and QB + 1 broadcast samples make 2 QB PB FMAs into
// sums of QB q's x PB phases, which a 16 x 16 transposition turns into each channel's consecutive
// samples. (Lanes over 16 q, as before, took a broadcast weight for every FMA and scattered each phase
// to memory: 65-78 G multiply-adds a second on Zen 4, against 116 for its FMAs.)
constexpr int kUpQ = 64;             // input samples q per tile
constexpr int kUpRow = kUpQ + 16;    // a tile's activated input row: x[q0 - 1] .. x[q0 + 64], padded
constexpr int kUpChunk = 32;         // input channels a pass: 16-32 kB of weights, 10 kB of samples
constexpr int kUpSums = (kUpQ + 1) / 2 * 16 * 16;  // floats of a tile's kept sums (blocks of QB >= 2 q's)

// Lanes from .. from + count - 1 of sixteen, those of them at 0 <= start + lane < length.
inline __mmask16 lanes_within(int from, int count, long start, long length) {
    const int lo = start >= 0 ? from : (int)(-start > from ? -start : from);
    const long hi_long = length - start < from + count ? length - start : from + count;
    const int hi = hi_long < 0 ? 0 : (int)hi_long;
    return hi > lo ? (__mmask16)(first_lanes(hi) & ~first_lanes(lo)) : (__mmask16)0;
}

// Output channels 16 ob .. 16 ob + 15 (those below Cout) of one tile: q0 .. q0 + nq - 1, e holding
// x[q0 - 1 + i] (activated) at e[c * kUpRow + i]. W packed [Cout / 16][Cin][2S][16], zeros past Cout.
// The input channels pass in chunks whose weights stay in L1 for all the tile's q's, each block's sums
// kept in `sums` between chunks (streaming a wide layer's weights once per block of q's, from L2, had
// held it to half the FMAs' rate).
template <int S, int PB, int QB>
inline void upsample_block(const float* e, const float* w, const float* b, float* y, int Cin, int Cout, long length,
                           int q0, int nq, int left, int ob, float* sums) {
    static_assert(S % PB == 0 && QB * PB <= 16, "phases in whole passes, a block's sums in one transposition");
    static_assert((kUpQ + QB - 1) / QB * 16 * 16 <= kUpSums, "a tile's blocks' kept sums fit the scratch");
    const int o0 = 16 * ob, outs = Cout - o0 < 16 ? Cout - o0 : 16;
    const __m512 bias = _mm512_maskz_loadu_ps(first_lanes(outs), b + o0);
    const float* wo = w + (size_t)ob * Cin * 2 * S * 16;
    for (int ph0 = 0; ph0 < S; ph0 += PB) {
        for (int c0 = 0; c0 < Cin; c0 += kUpChunk) {
            const int c1 = Cin - c0 < kUpChunk ? Cin : c0 + kUpChunk;
            for (int qs = 0; qs < nq; qs += QB) {
                float* kept = sums + (size_t)(qs / QB) * 16 * 16;
                __m512 acc[QB][PB];
                for (int i = 0; i < QB; i++)
                    for (int p = 0; p < PB; p++)
                        acc[i][p] = c0 == 0 ? bias : _mm512_loadu_ps(kept + 16 * (i * PB + p));
                const float* wc = wo + ((size_t)c0 * 2 * S + ph0) * 16;
                const float* ec = e + (size_t)c0 * kUpRow + qs;
                for (int c = c0; c < c1; c++, wc += 2 * S * 16, ec += kUpRow) {
                    __m512 now[PB], before[PB], xv[QB + 1];
                    for (int p = 0; p < PB; p++) {
                        now[p] = _mm512_loadu_ps(wc + 16 * p);
                        before[p] = _mm512_loadu_ps(wc + 16 * (S + p));
                        in_register(now[p]);
                        in_register(before[p]);
                    }
                    for (int i = 0; i <= QB; i++) {
                        xv[i] = _mm512_set1_ps(ec[i]);
                        in_register(xv[i]);
                    }
                    for (int i = 0; i < QB; i++)
                        for (int p = 0; p < PB; p++) {
                            acc[i][p] = _mm512_fmadd_ps(now[p], xv[i + 1], acc[i][p]);
                            acc[i][p] = _mm512_fmadd_ps(before[p], xv[i], acc[i][p]);
                        }
                }
                if (c1 < Cin) {
                    for (int i = 0; i < QB; i++)
                        for (int p = 0; p < PB; p++) _mm512_storeu_ps(kept + 16 * (i * PB + p), acc[i][p]);
                    continue;
                }
                const int nb = nq - qs < QB ? nq - qs : QB;  // the block's q's
                __m512i r[16];  // slot s = i PB + p, then transposed: r[channel], lane s
                for (int t = 0; t < 16; t++) r[t] = t < QB * PB ? _mm512_castps_si512(acc[t / PB][t % PB]) : _mm512_setzero_si512();
                transpose16(r);
                const long base = (long)(q0 + qs) * S + ph0 - left;  // slot 0's output sample
                for (int o = 0; o < outs; o++) {
                    float* yo = y + (size_t)(o0 + o) * length;
                    const __m512 v = _mm512_castsi512_ps(r[o]);
                    if constexpr (PB == S) {
                        _mm512_mask_storeu_ps(yo + base, lanes_within(0, nb * S, base, length), v);
                    } else {
                        for (int i = 0; i < nb; i++) {  // lane i PB + p is sample base + i S + p
                            const long start = base + (long)i * (S - PB);
                            _mm512_mask_storeu_ps(yo + start, lanes_within(i * PB, PB, start, length), v);
                        }
                    }
                }
            }
        }
    }
}

// (phases a pass, q's a block) for each stride: sums, weights and samples within 31 registers
template <int S, int PB, int QB>
inline void upsample_tile(const float* e, const float* w, const float* b, float* y, int Cin, int Cout, long length,
                          int q0, int nq, int left, int ob_from, int ob_to, float* sums) {
    for (int ob = ob_from; ob < ob_to; ob++) upsample_block<S, PB, QB>(e, w, b, y, Cin, Cout, length, q0, nq, left, ob, sums);
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
// 2^-16 relative against fp32's 2^-24, far below what 16-bit audio keeps, at a sixth of AMX's bf16
// rate, which is still well above the fp32 FMA kernels'.
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

}  // namespace

extern "C" {

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


// EnCodec's transposed convolution of stride S (2, 3, 4, 5, 6 or 8) and kernel 2S (non-causal, `left`
// samples of its S of padding trimmed at the start) over ELU(x) (or x): x (rows, Cin, T) -> y (rows, Cout,
// S T) fp32, W (Cin, Cout, 2S) packed [ceil(Cout / 16)][Cin][2S][16] by the caller (zeros past Cout).
// scratch: threads * upsample_scratch(Cin) floats.
int upsample_scratch(int Cin) { return Cin * kUpRow + kUpSums; }

void upsample_f32(const float* x, float* y, const float* w, const float* b, float* scratch, int rows, int Cin,
                  int Cout, int T, int S, int left, int activate, int threads) {
    const int tiles = (T + 1 + kUpQ - 1) / kUpQ;  // q runs to T: its x[q - 1] tap is the last sample's
    const int blocks = (Cout + 15) / 16;
    // a tile's output channels split into groups where tiles alone would leave a thread idle
    int groups = (2 * threads + rows * tiles - 1) / (rows * tiles);
    groups = groups < 1 ? 1 : groups > blocks ? blocks : groups;
    const long length = (long)T * S;
#pragma omp parallel num_threads(threads)
    {
        float* e = scratch + (size_t)omp_get_thread_num() * upsample_scratch(Cin);
        float* sums = e + (size_t)Cin * kUpRow;
#pragma omp for schedule(static)
        for (int job = 0; job < rows * tiles * groups; job++) {
            const int g = job % groups, tile = job / groups % tiles, r = job / groups / tiles;
            const int q0 = tile * kUpQ, nq = T + 1 - q0 < kUpQ ? T + 1 - q0 : kUpQ;
            const int ob_from = blocks * g / groups, ob_to = blocks * (g + 1) / groups;
            activated_rows(x + (size_t)r * Cin * T, e, Cin, T, q0 - 1, nq + 1, kUpRow, activate != 0);
            float* yr = y + (size_t)r * Cout * length;
            switch (S) {
                case 2: upsample_tile<2, 2, 8>(e, w, b, yr, Cin, Cout, length, q0, nq, left, ob_from, ob_to, sums); break;
                case 3: upsample_tile<3, 3, 5>(e, w, b, yr, Cin, Cout, length, q0, nq, left, ob_from, ob_to, sums); break;
                case 4: upsample_tile<4, 4, 4>(e, w, b, yr, Cin, Cout, length, q0, nq, left, ob_from, ob_to, sums); break;
                case 5: upsample_tile<5, 5, 3>(e, w, b, yr, Cin, Cout, length, q0, nq, left, ob_from, ob_to, sums); break;
                case 6: upsample_tile<6, 3, 5>(e, w, b, yr, Cin, Cout, length, q0, nq, left, ob_from, ob_to, sums); break;
                case 8: upsample_tile<8, 4, 4>(e, w, b, yr, Cin, Cout, length, q0, nq, left, ob_from, ob_to, sums); break;
                default: break;
            }
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

// EnCodec's convolutions on AMX (after amx_enable() gave 1): weights packed by pack_amx_weights (W in
// (taps, M, K) fp32: hi and lo of taps * M * K bf16 each), x and y as for resblock_f32 / upsample_f32.
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
    const int tiles = (T + 1 + kAmxConvTile - 1) / kAmxConvTile;  // q runs to T, as in upsample_f32
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
#else  // no AMX in this compiler: entry points that amx_enable() never lets run

void pack_amx_conv(const float*, uint16_t*, uint16_t*, int, int, int) {}
int resblock_amx_scratch(int, int) { return 0; }
void resblock_amx(const float*, float*, const uint16_t*, const uint16_t*, const float*, const uint16_t*,
                  const uint16_t*, const float*, float*, int, int, int, int, int) {}
int upsample_amx_scratch(int, int, int) { return 0; }
void upsample_amx(const float*, float*, const uint16_t*, const uint16_t*, const float*, float*, int, int, int, int,
                  int, int, int, int) {}

#endif  // MUSICBOT_AMX

}  // extern "C"

// EnCodec's LSTM: the recurrence of each layer, fp32, every row of the batch per weight load.
//
// torch runs a batch of one as matrix-vector products that stream the recurrent weights (16 MB a layer
// at 1024 wide) once a step, and any larger batch on a path twice as slow: 0.18 s for one 5 s track, 0.33 s
// for two to eight (the Xeon). Here the weights stream once a step for up to eight rows at a time, so a
// batch costs about what one row does. The input's
// products, which need no recurrence, are one matrix product over the whole sequence beforehand.
namespace {

constexpr int kGateUnits = 16;  // hidden units a panel: 16 lanes of each of the four gates

// 1 / (1 + exp(-x)), from exp(-|x|) so that it never overflows; NaN stays NaN.
inline __m512 sigmoid(__m512 x) {
    const __m512 e = exp_neg(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
    const __m512 r = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    const __m512 s = _mm512_mask_mul_ps(r, _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ), e, r);
    return _mm512_mask_mov_ps(s, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}

// tanh x = sign(x) (1 - e) / (1 + e), e = exp(-2|x|): within about 1e-7 of it; NaN stays NaN.
inline __m512 tanh_ps(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f), ax = _mm512_abs_ps(x);
    const __m512 e = exp_neg(_mm512_mul_ps(ax, _mm512_set1_ps(-2.0f)));
    const __m512 t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
    const __m512 signed_t = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_castps_si512(t), _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u))));
    return _mm512_mask_mov_ps(signed_t, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), x);
}

// Gates g0 and g0 + 1 of rows b0 .. b0 + RB - 1 for one panel's 16 units: pre + h_prev W_hh^T (no h_prev
// at the first step, where h starts at zero). Two gates at a time keep eight rows' sums in 16 registers.
template <int RB>
inline void lstm_gates(const float* pre, const float* panel, const float* h_prev, int b0, int H, int j0, int g0,
                       __m512 (*sums)[4]) {
    __m512 acc[RB][2];
    for (int r = 0; r < RB; r++)
        for (int g = 0; g < 2; g++)
            acc[r][g] = _mm512_loadu_ps(pre + (size_t)(b0 + r) * 4 * H + (size_t)(g0 + g) * H + j0);
    if (h_prev) {
        for (int k = 0; k < H; k++) {
            const float* w = panel + (size_t)(g0 / 2) * H * 2 * kGateUnits + (size_t)k * 2 * kGateUnits;
            const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + kGateUnits);
            for (int r = 0; r < RB; r++) {
                const __m512 hk = _mm512_set1_ps(h_prev[(size_t)(b0 + r) * H + k]);
                acc[r][0] = _mm512_fmadd_ps(w0, hk, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(w1, hk, acc[r][1]);
            }
        }
    }
    for (int r = 0; r < RB; r++) sums[r][g0] = acc[r][0], sums[r][g0 + 1] = acc[r][1];
}

// One step of rows b0 .. b0 + RB - 1 (RB <= 8) for the 16 hidden units of one panel: the gates, then the
// cell and the new h. Each weight is read once for all RB rows.
template <int RB>
inline void lstm_panel(const float* pre, const float* panel, const float* h_prev, float* h, float* cell, int b0,
                       int H, int j0) {
    __m512 sums[RB][4];
    lstm_gates<RB>(pre, panel, h_prev, b0, H, j0, 0, sums);
    lstm_gates<RB>(pre, panel, h_prev, b0, H, j0, 2, sums);
    for (int r = 0; r < RB; r++) {
        const size_t at = (size_t)(b0 + r) * H + j0;
        const __m512 i = sigmoid(sums[r][0]), f = sigmoid(sums[r][1]), g = tanh_ps(sums[r][2]), o = sigmoid(sums[r][3]);
        const __m512 kept = h_prev ? _mm512_mul_ps(f, _mm512_loadu_ps(cell + at)) : _mm512_setzero_ps();
        const __m512 c = _mm512_add_ps(kept, _mm512_mul_ps(i, g));
        _mm512_storeu_ps(cell + at, c);
        _mm512_storeu_ps(h + at, _mm512_mul_ps(o, tanh_ps(c)));
    }
}

}  // namespace

extern "C" {

// W (4H, H) fp32, torch's weight_hh (gates i, f, g, o) -> panels [H/16][H][4][16]: for each k, the four
// gates' 16 units of a panel side by side. H % 16 == 0.
void pack_lstm(const float* W, float* packed, int H) {
#pragma omp parallel for schedule(static)
    for (int p = 0; p < H / kGateUnits; p++)
        for (int k = 0; k < H; k++)
            for (int g = 0; g < 4; g++)
                for (int u = 0; u < kGateUnits; u++)
                    packed[((((size_t)p * 2 + g / 2) * H + k) * 2 + g % 2) * kGateUnits + u] =
                        W[((size_t)g * H + p * kGateUnits + u) * H + k];
}

// One LSTM layer over a sequence, from zero state: pre (T, B, 4H) the input's products plus both biases
// (gates i, f, g, o), W_hh packed by pack_lstm; out (T, B, H) the hidden states; cell (B, H) working
// memory. H % 16 == 0.
void lstm_f32(const float* pre, const float* packed, float* out, float* cell, int T, int B, int H, int threads) {
    const int panels = H / kGateUnits;
#pragma omp parallel num_threads(threads)
    for (int t = 0; t < T; t++) {
        const float* pre_t = pre + (size_t)t * B * 4 * H;
        const float* h_prev = t ? out + (size_t)(t - 1) * B * H : nullptr;
        float* h = out + (size_t)t * B * H;
#pragma omp for schedule(static)
        for (int p = 0; p < panels; p++) {  // the barrier after it: step t done before t + 1 reads it
            const float* panel = packed + (size_t)p * H * 4 * kGateUnits;
            const int j0 = p * kGateUnits;
            int b0 = 0;
            for (; b0 + 8 <= B; b0 += 8) lstm_panel<8>(pre_t, panel, h_prev, h, cell, b0, H, j0);
            switch (B - b0) {
                case 7: lstm_panel<7>(pre_t, panel, h_prev, h, cell, b0, H, j0); break;
                case 6: lstm_panel<6>(pre_t, panel, h_prev, h, cell, b0, H, j0); break;
                case 5: lstm_panel<5>(pre_t, panel, h_prev, h, cell, b0, H, j0); break;
                case 4: lstm_panel<4>(pre_t, panel, h_prev, h, cell, b0, H, j0); break;
                case 3: lstm_panel<3>(pre_t, panel, h_prev, h, cell, b0, H, j0); break;
                case 2: lstm_panel<2>(pre_t, panel, h_prev, h, cell, b0, H, j0); break;
                case 1: lstm_panel<1>(pre_t, panel, h_prev, h, cell, b0, H, j0); break;
                default: break;
            }
        }
    }
}

}  // extern "C"
