// The decoder's kernels: weight products, self- and cross-attention, layer norms, and one whole
// decoding step in one call.
//
// - linear: y = x @ W.T for a few rows of bf16 activations. A step streams every weight once, so its
//   speed is memory bandwidth. Weights are packed once into panels of 32 output columns that each thread
//   reads as one sequential stream, and every row of x (up to 8 at once) is computed per panel load, each
//   x pair broadcast into the dot product: the inner loop has nothing but loads and dot products.
//   GELU and the residual add are applied to the sums before they are rounded to bf16. Where the CPU has
//   AMX the same panels feed tile products instead, which cost the weight stream alone at up to 16 rows.
// - attend: each row's query heads against its cache of keys and values, the new key and value written
//   first. Reads each cache once, with no copies and no mask. The caches are position-major (all heads
//   of a position side by side), so a row's keys are one stream. The same for cross-attention over the
//   text, with its mask.
// - decoder_step: embeddings, every layer and the LM heads on the kernels above, in the same operations,
//   order and precision as the step in Python: bf16 activations, fp32 sums, the embedding sum and layer
//   norms rounded to bf16 where torch rounds them.

#include <sys/syscall.h>
#include <unistd.h>

#include "common.h"

namespace {

constexpr int kPanel = 32;  // output columns per packed panel: two 16-lane accumulators a row
constexpr int kChunk = 32;  // bf16 values per 64-byte load
// Positions ahead that attention asks for, into L2 (not L1: the caches are streamed once).
constexpr int kAttendAhead = 8;

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

// Each head's scores turned into softmax weights (inv[h]: 1 / their sum, NaN for a head gone NaN) and
// its fp32 sums of weighted values (acc: nh * D) set to zero.
inline void begin_weighted_sums(float* scores, const float* best, int n, int nh, int D, float* inv, float* acc) {
    for (int h = 0; h < nh; h++) inv[h] = softmax_weights(scores + (size_t)h * n, n, best[h]);
    for (int i = 0; i < nh * D / 16; i++) _mm512_storeu_ps(acc + 16 * i, _mm512_setzero_ps());
}

// Heads h0 .. h0 + nh - 1 of the output row: each head's weighted sum over its weights' sum, rounded to bf16
// (NaN throughout for a head whose sum is NaN).
inline void write_heads(const float* acc, const float* inv, int nh, int h0, int D, uint16_t* o) {
    for (int h = 0; h < nh; h++) {
        uint16_t* oh = o + (size_t)(h0 + h) * D;
        if (std::isnan(inv[h])) {
            for (int d = 0; d < D; d++) oh[d] = 0x7fc0;
            continue;
        }
        const __m512 vinv = _mm512_set1_ps(inv[h]);
        for (int i = 0; i < D / 16; i++)
            _mm256_storeu_si256((__m256i*)(oh + 16 * i),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc + (size_t)h * D + 16 * i), vinv)));
    }
}

// softmax(q . K[p] (+ mask[p]), p < n) . V for heads h0 .. h1 - 1 of one row, scores in fp32, the
// result rounded to bf16. The caches are position-major: position p's keys for all heads are
// kc[p * stride ...], head h at offset h * D. Positions are the outer loop, so each cache is read as one
// stream rather than as per-head slices.
// scores: (h1 - h0) * n floats; acc: (h1 - h0) * D floats.
inline void attend_heads(const uint16_t* q, const uint16_t* kc, const uint16_t* vc, int n, int stride, int h0,
                         int h1, int D, const float* mask, uint16_t* o, float* scores, float* acc) {
    const int nh = h1 - h0;
    float best[kMaxHeads];
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
    float inv[kMaxHeads];
    begin_weighted_sums(scores, best, n, nh, D, inv, acc);
    const int lanes = D / 16;
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
    write_heads(acc, inv, nh, h0, D, o);
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

#ifndef __AVX512F__
// On AVX2, one or two rows take a loop of their own (more rows' sums would not fit sixteen registers):
// each 32-byte vector of the panel (8 columns x 2 k) is split once into its even and odd k as fp32, each
// row's pair of x broadcast as two fp32, and the odd k's product is added before the even's, as
// vdpbf16ps adds them, so the sums are the AVX-512 build's. These loops (and the int8 one below) take
// about half as long as the memory takes to bring their bytes, but the hardware's prefetching alone
// brought them at 20 GB/s of the memory's 30; asking for them 4 kB ahead, 23-24 (int8, 2 rows, a 4 MB
// matrix, a 2-core AMD EPYC with AVX2).
constexpr int kPairAhead = 4096;

template <int MB>
inline void panel_pair(const uint16_t* panel, const uint16_t* x, const uint16_t* residual, uint16_t* y, int m0, int N,
                       int K, int n0, int act) {
    static_assert(MB == 1 || MB == 2, "one or two rows");
    const uint16_t* x0 = x + (size_t)m0 * K;
    const uint16_t* x1 = x0 + (size_t)(MB - 1) * K;  // one row: paired with itself
    __m256 acc[2][4];
    for (int v = 0; v < 4; v++) acc[0][v] = acc[1][v] = _mm256_setzero_ps();
    for (int kk = 0; kk < K / 2; kk++) {
        const uint16_t* p = panel + (size_t)kk * 2 * kPanel;
        _mm_prefetch((const char*)p + kPairAhead, _MM_HINT_T0);
        _mm_prefetch((const char*)p + kPairAhead + 64, _MM_HINT_T0);
        const __m256 e0 = _mm256_set1_ps(from_bf16(x0[2 * kk])), o0 = _mm256_set1_ps(from_bf16(x0[2 * kk + 1]));
        const __m256 e1 = _mm256_set1_ps(from_bf16(x1[2 * kk])), o1 = _mm256_set1_ps(from_bf16(x1[2 * kk + 1]));
        for (int v = 0; v < 4; v++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i*)(p + 16 * v));
            const __m256 we = avx2::even_bf16(wv), wo = avx2::odd_bf16(wv);
            acc[0][v] = avx2::dot_pairs(acc[0][v], e0, o0, we, wo);
            acc[1][v] = avx2::dot_pairs(acc[1][v], e1, o1, we, wo);
        }
    }
    for (int m = 0; m < MB; m++)
        for (int h = 0; h < 2; h++)
            finish16(avx2::f32x16{acc[m][2 * h], acc[m][2 * h + 1]}, residual, y, (size_t)(m0 + m) * N + n0 + 16 * h,
                     act);
}
#endif  // __AVX512F__

// One panel of kPanel output columns for MB rows of x: acc[m][h] holds columns h*16 .. h*16+15.
// Each pair of x's bf16 values (k, k+1) is broadcast into the dot product's operand.
template <int MB>
inline void panel_rows(const uint16_t* panel, const uint16_t* x, const uint16_t* residual, uint16_t* y,
                       int m0, int N, int K, int n0, int act) {
#ifndef __AVX512F__
    if constexpr (MB <= 2) return panel_pair<MB>(panel, x, residual, y, m0, N, K, n0, act);
#endif
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
// (the AVX-512 loop above is bound by its dot products at a few rows). The packed panels are already the
// tiles' pair-interleaved layout:
// columns 0-15 and 16-31 of a panel are two B tiles, 64 bytes a k pair at a stride of 128.
// Tiles: 0 and 1 the sums of a panel's two halves, 2 the rows of x, 3 and 4 the weights.
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

// A panel's sums (a tile store of MC rows x 32 columns) waiting to be turned into outputs, sixteen columns
// of a row (an item) at a time: AMX's products finish a panel while the next one's tiles load (see
// panel_rows_amx_int8).
template <typename Sum>
struct PendingPanel {
    const Sum* sums = nullptr;
    int b = 0, items = 0, done = 0;
};

// Up to `count` more of a pending bf16 panel's items finished (rows m0.., as finish16).
inline void finish_pending(PendingPanel<float>& f, int count, const uint16_t* residual, uint16_t* y, int m0, int N,
                           int act) {
    const int end = f.done + count < f.items ? f.done + count : f.items;
    for (; f.done < end; f.done++) {
        const int m = f.done / 2, h = f.done % 2, n = f.b * kPanel + 16 * h;
        finish16(_mm512_loadu_ps(f.sums + m * kPanel + 16 * h), residual, y, (size_t)(m0 + m) * N + n, act);
    }
}

// rows m0 .. m0 + MC - 1 of x (MC <= 16, the tiles configured for MC rows) against one panel, its sums
// stored to `sums`; K % 32 == 0. The previous panel is finished meanwhile, one item a group of k.
inline void panel_rows_amx(const uint16_t* panel, const uint16_t* x, int m0, int MC, int K, int b, float* sums,
                           PendingPanel<float>& previous, const uint16_t* residual, uint16_t* y, int N, int act) {
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
        finish_pending(previous, 1, residual, y, m0, N, act);
    }
    finish_pending(previous, previous.items, residual, y, m0, N, act);
    _tile_stored(0, sums, kPanel * 4);
    _tile_stored(1, sums + 16, kPanel * 4);
    previous = {sums, b, 2 * MC, 0};
}

#pragma GCC pop_options
#endif  // MUSICBOT_AMX

// int8 weights (MUSICBOT_DTYPE=int8): half the bytes of bf16 to stream a step, which is what bounds a
// step at a few rows. A packed int8 matrix (pack_linear_int8) is N * K bytes of panels, [N/32][K/4][32][4]:
// for each group of four k, the panel's 32 columns side by side, so each 64-byte load is 16 columns x 4 k,
// the operand of VNNI's vpdpbusd and AMX's B tiles alike. After the panels: fp32 scales[N] (a column's
// ints times its scale are its weights) and int32 sums[N] (a column's ints summed, for the activations'
// zero point). Activations are quantized per row to u8 with a zero point (quantize_rows), the products
// summed exactly in int32, and the sums turned back into fp32 once per output.
constexpr int kQuad = 4;  // k per int32 lane of a dot product

struct Int8Matrix {
    const int8_t* panels;
    const float* scales;
    const int32_t* sums;
};

inline Int8Matrix int8_matrix(const void* packed, int N, int K) {
    const int8_t* p = (const int8_t*)packed;
    const size_t at = (size_t)N * K;
    return {p, (const float*)(p + at), (const int32_t*)(p + at + sizeof(float) * N)};
}

// Rows of bf16 x as u8 with a zero point, x ~ scale * (q - zero), over each row's range with 0 in it.
// params[2r] = scale (NaN for a row holding NaN or infinity, so that its outputs are NaN, as bf16's
// would be), params[2r + 1] = zero. K % 16 == 0.
inline void quantize_rows(const uint16_t* x, uint8_t* q, float* params, int M, int K) {
    for (int r = 0; r < M; r++) {
        const uint16_t* xr = x + (size_t)r * K;
        __m512 lo = _mm512_setzero_ps(), hi = _mm512_setzero_ps(), bad = _mm512_setzero_ps();
        for (int k = 0; k < K; k += 16) {
            const __m512 v = bf16_to_f32(_mm256_loadu_si256((const __m256i*)(xr + k)));
            lo = _mm512_min_ps(lo, v);
            hi = _mm512_max_ps(hi, v);
            bad = _mm512_add_ps(bad, _mm512_mul_ps(v, _mm512_setzero_ps()));  // NaN if any is NaN or infinite
        }
        const float mn = _mm512_reduce_min_ps(lo), mx = _mm512_reduce_max_ps(hi);
        float scale = (mx - mn) / 255.0f, zero = 0.0f;
        if (std::isnan(_mm512_reduce_add_ps(bad))) {
            scale = NAN;
        } else if (scale > 0.0f) {
            zero = std::nearbyint(-mn / scale);
        } else {
            scale = 1.0f;  // a row of zeros: every q is 0
        }
        params[2 * r] = scale;
        params[2 * r + 1] = zero;
        const __m512 inv = _mm512_set1_ps(std::isnan(scale) ? 0.0f : 1.0f / scale), vzero = _mm512_set1_ps(zero);
        uint8_t* qr = q + (size_t)r * K;
        for (int k = 0; k < K; k += 16) {
            const __m512 v = bf16_to_f32(_mm256_loadu_si256((const __m256i*)(xr + k)));
            __m512i n = _mm512_cvtps_epi32(_mm512_fmadd_ps(v, inv, vzero));  // rounded to nearest
            n = _mm512_min_epi32(_mm512_max_epi32(n, _mm512_setzero_si512()), _mm512_set1_epi32(255));
            _mm_storeu_si128((__m128i*)(qr + k), _mm512_cvtepi32_epi8(n));
        }
    }
}

// Sixteen columns' int32 sums of row r back to fp32: scale_x * scale_w * (sum - zero_x * colsum), then
// finished as the bf16 sums are.
inline void finish16_int8(__m512i acc, const float* params, int r, const Int8Matrix& w, int n, const uint16_t* residual,
                          uint16_t* y, size_t at, int act) {
    const __m512i zero = _mm512_set1_epi32((int)params[2 * r + 1]);
    const __m512i exact = _mm512_sub_epi32(acc, _mm512_mullo_epi32(zero, _mm512_loadu_si512(w.sums + n)));
    const __m512 scale = _mm512_mul_ps(_mm512_set1_ps(params[2 * r]), _mm512_loadu_ps(w.scales + n));
    finish16(_mm512_mul_ps(_mm512_cvtepi32_ps(exact), scale), residual, y, at, act);
}

// At four rows and more the VNNI loop spends long enough on each 128 bytes of its panel stream that the
// hardware's own prefetching falls behind: asking for the weights 16 kB ahead (into L2; a thread's
// panels lie one after the other, so this runs on into its next panel) overlaps the stream with the
// dot products. Four requests' step on the EPYC (8 rows; timed inside decoder_step, two builds in one
// process): its products 11.3 -> 9.4-9.9 ms while the memory ran at its fast 55 GB/s, unchanged at its
// slow 34 GB/s. 2 kB ahead was slower than none; at one or two rows, where the stream alone bounds the
// loop, and in bf16's loop (stream-bound at 8 rows too), asking ahead only cost.
constexpr int kStreamAhead = 16384;
constexpr int kAskAheadRows = 4;

MUSICBOT_VNNI_BEGIN

#ifndef __AVX512F__
// On AVX2, one or two rows (one request) take a loop of their own, as the 512-bit one's sums for more rows
// would not fit AVX2's sixteen registers: each 32-byte vector of the panel (8 columns x 4 k) has its even
// and odd bytes widened to 16 bits once for both rows, and each row's four u8 values are split the same
// way, so two vpmaddwd a row give exactly vpdpbusd's sums. The panel is asked for kPairAhead ahead, as in
// the bf16 loop.

template <int MB>
inline void panel_pair_int8(const Int8Matrix& w, int b, const uint8_t* xq, const float* params,
                            const uint16_t* residual, uint16_t* y, int m0, int N, int K, int act) {
    static_assert(MB == 1 || MB == 2, "one or two rows");
    const int8_t* panel = w.panels + (size_t)b * K * kPanel;
    const uint8_t* x0 = xq + (size_t)m0 * K;
    const uint8_t* x1 = x0 + (size_t)(MB - 1) * K;  // one row: paired with itself
    __m256i acc[2][4];
    for (int v = 0; v < 4; v++) acc[0][v] = acc[1][v] = _mm256_setzero_si256();
    for (int kq = 0; kq < K / kQuad; kq++) {
        const int8_t* p = panel + (size_t)kq * kQuad * kPanel;
        _mm_prefetch((const char*)p + kPairAhead, _MM_HINT_T0);
        _mm_prefetch((const char*)p + kPairAhead + 64, _MM_HINT_T0);
        int32_t q0, q1;
        memcpy(&q0, x0 + kQuad * kq, sizeof q0);
        memcpy(&q1, x1 + kQuad * kq, sizeof q1);
        const __m256i b0 = _mm256_set1_epi32(q0), b1 = _mm256_set1_epi32(q1);
        const __m256i e0 = avx2::even_u8(b0), o0 = avx2::odd_u8(b0), e1 = avx2::even_u8(b1), o1 = avx2::odd_u8(b1);
        for (int v = 0; v < 4; v++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i*)(p + 32 * v));
            const __m256i we = avx2::even_s8(wv), wo = avx2::odd_s8(wv);
            acc[0][v] = avx2::dot_widened(acc[0][v], e0, o0, we, wo);
            acc[1][v] = avx2::dot_widened(acc[1][v], e1, o1, we, wo);
        }
    }
    const int n0 = b * kPanel;
    for (int m = 0; m < MB; m++)
        for (int h = 0; h < 2; h++)
            finish16_int8(avx2::i32x16{acc[m][2 * h], acc[m][2 * h + 1]}, params, m0 + m, w, n0 + 16 * h, residual, y,
                          (size_t)(m0 + m) * N + n0 + 16 * h, act);
}
#endif  // __AVX512F__

// One int8 panel for MB rows of quantized x (VNNI): each group of four of a row's u8 values is broadcast
// against 16 columns x 4 k of weights. On AVX2 (more than two rows) the same code shares each vector's
// widened weights among the rows, which beat taking them two at a time at eight rows (13 GB/s against 10).
template <int MB>
inline void panel_rows_int8(const Int8Matrix& w, int b, const uint8_t* xq, const float* params, const uint16_t* residual,
                            uint16_t* y, int m0, int N, int K, int act) {
#ifndef __AVX512F__
    if constexpr (MB <= 2) return panel_pair_int8<MB>(w, b, xq, params, residual, y, m0, N, K, act);
#endif
    __m512i acc[MB][2];
    for (int m = 0; m < MB; m++) acc[m][0] = acc[m][1] = _mm512_setzero_si512();
    const int8_t* panel = w.panels + (size_t)b * K * kPanel;
    const uint8_t* xm = xq + (size_t)m0 * K;
    for (int kq = 0; kq < K / kQuad; kq++) {
        const int8_t* p = panel + (size_t)kq * kQuad * kPanel;
        const __m512i w0 = _mm512_loadu_si512(p), w1 = _mm512_loadu_si512(p + 64);
        if constexpr (MB >= kAskAheadRows) {
            _mm_prefetch((const char*)p + kStreamAhead, _MM_HINT_T1);
            _mm_prefetch((const char*)p + kStreamAhead + 64, _MM_HINT_T1);
        }
        for (int m = 0; m < MB; m++) {
            int32_t quad;
            memcpy(&quad, xm + (size_t)m * K + kQuad * kq, sizeof quad);
            const __m512i xb = _mm512_set1_epi32(quad);
            acc[m][0] = _mm512_dpbusd_epi32(acc[m][0], xb, w0);
            acc[m][1] = _mm512_dpbusd_epi32(acc[m][1], xb, w1);
        }
    }
    const int n0 = b * kPanel;
    for (int m = 0; m < MB; m++)
        for (int h = 0; h < 2; h++)
            finish16_int8(acc[m][h], params, m0 + m, w, n0 + 16 * h, residual, y, (size_t)(m0 + m) * N + n0 + 16 * h, act);
}

MUSICBOT_VNNI_END

#ifdef MUSICBOT_AMX
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8")

// Up to `count` more of a pending int8 panel's items finished (rows m0.., as finish16_int8).
inline void finish_pending(PendingPanel<int32_t>& f, int count, const Int8Matrix& w, const float* params,
                           const uint16_t* residual, uint16_t* y, int m0, int N, int act) {
    const int end = f.done + count < f.items ? f.done + count : f.items;
    for (; f.done < end; f.done++) {
        const int m = f.done / 2, h = f.done % 2, n = f.b * kPanel + 16 * h;
        finish16_int8(_mm512_loadu_si512(f.sums + m * kPanel + 16 * h), params, m0 + m, w, n, residual, y,
                      (size_t)(m0 + m) * N + n, act);
    }
}

// rows m0 .. m0 + MC - 1 of quantized x (MC <= 16, the tiles configured for MC rows by amx_configure: the
// same bytes a row as bf16's) against one int8 panel, its sums stored to `sums`; K % 64 == 0. Tile 2 holds
// 64 u8 of each row, tiles 3 and 4 the panel's two halves, 16 groups of four k. The previous panel's
// outputs are finished meanwhile, one item a group of k: the tile loads keep the weight stream going while
// the vector units finish, where finishing after the tile products had left the stream idle (8 rows'
// finishing, 2 rows x 32 columns a panel, had cost the products 1.2 ms a step in a C program over the
// kernels: 14.3-14.9 ms, 13.0-13.7 without it; 2 rows' 0.4-0.5; the Xeon).
inline void panel_rows_amx_int8(const Int8Matrix& w, int b, const uint8_t* xq, int m0, int MC, int K,
                                int32_t* sums, PendingPanel<int32_t>& previous, const float* params,
                                const uint16_t* residual, uint16_t* y, int N, int act) {
    _tile_zero(0);
    _tile_zero(1);
    const int8_t* panel = w.panels + (size_t)b * K * kPanel;
    const uint8_t* xm = xq + (size_t)m0 * K;
    for (int k0 = 0; k0 < K; k0 += 64) {
        const int8_t* p = panel + (size_t)k0 * kPanel;  // 16 groups of four k x 32 columns
        const char* ahead = (const char*)p + kPrefetchBytes;
        for (int line = 0; line < 64 * kPanel; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
        _tile_loadd(2, xm + k0, K);
        _tile_loadd(3, p, kQuad * kPanel);
        _tile_loadd(4, p + 64, kQuad * kPanel);
        _tile_dpbusd(0, 2, 3);
        _tile_dpbusd(1, 2, 4);
        finish_pending(previous, 1, w, params, residual, y, m0, N, act);
    }
    finish_pending(previous, previous.items, w, params, residual, y, m0, N, act);
    _tile_stored(0, sums, kPanel * 4);
    _tile_stored(1, sums + 16, kPanel * 4);
    previous = {sums, b, 2 * MC, 0};
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

// floats a thread's attention needs: scores for whole blocks of sixteen heads (int8 caches), then sums (two
// int32 a value over int8 caches)
inline int attention_scratch(int heads, int D, int capacity) {
    return ((heads + 15) / 16 * 16) * capacity + 2 * heads * D;
}

// rows x heads queries q (row r at q + r * q_stride) over position-major caches (rows, capacity, heads * D),
// attending positions 0 .. n - 1 (with `lengths`, row r positions 0 .. lengths[r] - 1: the text's attention
// over each row's own prompt, no mask). With `fresh` (self-attention) position n - 1 is first written from
// it: keys at fresh + r * q_stride, values heads * D further. Work is shared out as head_groups says.
void attend_rows(const uint16_t* q, size_t q_stride, const uint16_t* fresh, uint16_t* keys, uint16_t* values,
                 const float* mask, const int32_t* lengths, uint16_t* out, float* scratch, int rows, int heads, int D,
                 int capacity, int n, int threads) {
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
            attend_heads(q + (size_t)r * q_stride, kc, vc, lengths ? lengths[r] : n, hidden, h0, h1, D,
                         mask ? mask + (size_t)r * n : nullptr, out + (size_t)r * hidden, scores, acc);
        }
    }
}

// int8 self-attention caches (the int8 steps): a position holds heads * D int8 values (head h at h * D),
// then heads fp32 scales (a head's values are its ints times its scale), each head quantized on its own,
// symmetrically over its largest magnitude. Keys are stored offset by 128 (u8 bit patterns): the unsigned
// operand of vpdpbusd, against the query quantized the same way per head, so a head's scores are one
// exact integer dot product a position. Values are signed, four positions together (below), and summed
// as integer dot products too, against the softmax weights as two 8-bit digits (attend_heads_int8).
// Attention reads every cache once a step, so it streams half the bytes of bf16 caches: at four requests'
// eight rows and a few hundred positions that is most of what each added request costs a step.
inline size_t int8_position(int heads, int D) { return (size_t)heads * D + sizeof(float) * heads; }

// Values are kept four positions together (capacity % 4 == 0): a quad of positions is 4 * int8_position
// bytes, first each head's D values with the four positions' bytes of a value side by side ([h][d][4]),
// then the four positions' scales ([4][heads] fp32). So the four positions' bytes of sixteen values are one
// 64-byte operand of vpdpbusd against four u8 weights: the weighted sum over the values is integer dot
// products, a quarter of the instructions of turning each value into fp32 (keys stay a position at a time).
constexpr int kQuadPositions = 4;

inline int8_t* value_quad(int8_t* vc, int p, size_t stride) {
    return vc + (size_t)(p / kQuadPositions) * kQuadPositions * stride;
}

// Position p's scale of head h in a row's value cache.
inline float* value_scale(int8_t* vc, int p, size_t stride, int hidden, int heads) {
    return (float*)(value_quad(vc, p, stride) + (size_t)kQuadPositions * hidden) + (size_t)(p % kQuadPositions) * heads;
}

// One head's D ints (q) into its place at position p of a row's value cache: byte p % 4 of each value's
// four.
inline void store_value_head(int8_t* vc, int p, size_t stride, int h, int D, const int8_t* q) {
    int8_t* at = value_quad(vc, p, stride) + (size_t)h * D * kQuadPositions;
    const int slot = p % kQuadPositions;
    const __mmask64 bytes = 0x1111111111111111ULL << slot;
    for (int d = 0; d < D; d += 16) {
        const __m512i v = _mm512_slli_epi32(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(q + d))), 8 * slot);
        _mm512_mask_storeu_epi8(at + (size_t)d * kQuadPositions, bytes, v);
    }
}

// One head's D bf16 values as int8 (bit patterns offset by 128 with `offset`); returns the scale. A NaN or
// infinite value gives a NaN scale, so that everything read through it is NaN, as bf16 would give.
inline float quantize_head(const uint16_t* x, int8_t* q, int D, bool offset) {
    __m512 top = _mm512_setzero_ps(), bad = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 16) {
        const __m512 v = bf16_to_f32(_mm256_loadu_si256((const __m256i*)(x + d)));
        top = _mm512_max_ps(top, _mm512_abs_ps(v));
        bad = _mm512_add_ps(bad, _mm512_mul_ps(v, _mm512_setzero_ps()));  // NaN if any is NaN or infinite
    }
    const float most = _mm512_reduce_max_ps(top);
    const bool broken = std::isnan(_mm512_reduce_add_ps(bad));
    const __m512 inv = _mm512_set1_ps(broken || most == 0.0f ? 0.0f : 127.0f / most);
    const __m128i flip = _mm_set1_epi8(offset ? (char)0x80 : 0);
    for (int d = 0; d < D; d += 16) {
        const __m512 v = bf16_to_f32(_mm256_loadu_si256((const __m256i*)(x + d)));
        const __m512i n = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));  // rounded to nearest, within +-127
        _mm_storeu_si128((__m128i*)(q + d), _mm_xor_si128(_mm512_cvtsepi32_epi8(n), flip));
    }
    return broken ? NAN : most / 127.0f;
}

MUSICBOT_VNNI_BEGIN

// Asks for heads h0.. of an int8 cache position (`span` bytes from `heads`, head h0's first byte) and their
// fp32 scales (`hidden` bytes into the position), into L2.
inline void prefetch_heads_int8(const char* heads, size_t span, int hidden, int h0, int D) {
    for (size_t line = 0; line < span; line += 64) _mm_prefetch(heads + line, _MM_HINT_T1);
    _mm_prefetch(heads - (size_t)h0 * D + hidden + sizeof(float) * h0, _MM_HINT_T1);
}

// Sixteen vectors of int32 summed lane by lane into one: lane h of the result is the sum of a[h]'s lanes
// (pairs interleaved and added, then 64-bit pairs, then 128-bit lanes): 45 operations where sixteen
// horizontal sums take about 130.
inline __m512i sum_each16(const __m512i* a) {
    __m512i b[8], c[4];
    for (int i = 0; i < 8; i++)
        b[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_epi32(a[2 * i], a[2 * i + 1]));
    for (int j = 0; j < 4; j++)
        c[j] = _mm512_add_epi32(_mm512_unpacklo_epi64(b[2 * j], b[2 * j + 1]), _mm512_unpackhi_epi64(b[2 * j], b[2 * j + 1]));
    // 128-bit lane L of c[j] holds heads 4j .. 4j + 3 summed over that lane of their vectors
    const __m512i f0 = _mm512_add_epi32(_mm512_shuffle_i32x4(c[0], c[1], 0x88), _mm512_shuffle_i32x4(c[0], c[1], 0xDD));
    const __m512i f1 = _mm512_add_epi32(_mm512_shuffle_i32x4(c[2], c[3], 0x88), _mm512_shuffle_i32x4(c[2], c[3], 0xDD));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(f0, f1, 0x88), _mm512_shuffle_i32x4(f0, f1, 0xDD));
}

constexpr int kHeadBlock = 16;   // heads scored together, one vector lane each
constexpr int kValueQuads = 4;  // quads of positions over which one head's sums stay in registers

inline int head_blocks(int heads) { return (heads + kHeadBlock - 1) / kHeadBlock; }

// One head's weighted sums over quads j0 .. j1 - 1, LANES groups of sixteen of its values: each quad's four
// u8 weights (words[j * 2 * kHeadBlock] the hi digits, kHeadBlock further the lo ones, one int32 each)
// against the quad's four positions of sixteen values; the int32 sums accumulate in acc (2 * LANES: hi's,
// then lo's), held in registers over the quads.
template <int LANES>
inline void weigh_head(const int8_t* vh, size_t quad_stride, const uint32_t* words, int j0, int j1, int32_t* acc) {
    __m512i a[2 * LANES];
    for (int i = 0; i < 2 * LANES; i++) a[i] = _mm512_loadu_si512(acc + 16 * i);
    for (int j = j0; j < j1; j++) {
        const uint32_t* w = words + (size_t)j * 2 * kHeadBlock;
        const __m512i wh = _mm512_set1_epi32((int)w[0]), wl = _mm512_set1_epi32((int)w[kHeadBlock]);
        const int8_t* v = vh + (size_t)j * quad_stride;
        for (int i = 0; i < LANES; i++) {
            const __m512i x = _mm512_loadu_si512(v + 64 * i);
            a[i] = _mm512_dpbusd_epi32(a[i], wh, x);
            a[LANES + i] = _mm512_dpbusd_epi32(a[LANES + i], wl, x);
        }
    }
    for (int i = 0; i < 2 * LANES; i++) _mm512_storeu_si512(acc + 16 * i, a[i]);
}

// weigh_head for a head of D values (D % 32 == 0, D <= 256, as the attention requires).
inline void weigh_head_of(int D, const int8_t* vh, size_t quad_stride, const uint32_t* words, int j0, int j1,
                          int32_t* acc) {
    switch (D / 16) {
        case 2: weigh_head<2>(vh, quad_stride, words, j0, j1, acc); break;
        case 4: weigh_head<4>(vh, quad_stride, words, j0, j1, acc); break;
        case 6: weigh_head<6>(vh, quad_stride, words, j0, j1, acc); break;
        case 8: weigh_head<8>(vh, quad_stride, words, j0, j1, acc); break;
        case 10: weigh_head<10>(vh, quad_stride, words, j0, j1, acc); break;
        case 12: weigh_head<12>(vh, quad_stride, words, j0, j1, acc); break;
        case 14: weigh_head<14>(vh, quad_stride, words, j0, j1, acc); break;
        default: weigh_head<16>(vh, quad_stride, words, j0, j1, acc); break;
    }
}

// attend_heads over int8 caches: q holds the row's query heads as int8 (head h at h * D) with their
// scales and sums of ints; key positions `stride` bytes apart, a position's scales `hidden` bytes in;
// values four positions together (value_quad).
//
// Keys: heads go sixteen to a vector, so a position's scores are one vector (its sixteen dot products
// summed lane by lane at once), and so are its softmax's terms; each block of sixteen heads keeps its
// scores position-major (scores: head_blocks(nh) * kHeadBlock * n floats, n rounded up to whole quads).
// Values: each term times its value's scale is a weight w >= 0, which the sum over the values takes as
// two u8 digits, w ~ hi * s + lo * s / 256 with s = max(w) / 255 (hi = floor(w / s)): within s / 512 of w,
// 2^-17 of the largest weight, where the output's bf16 rounding is 2^-9 of it. The sums of hi and of lo
// times the int8 values are exact int32 dot products over each quad of positions, taken a head at a time
// over blocks of quads with the head's sums in registers (acc: 2 * nh * D int32).
// Scoring a head at a time with a horizontal sum each, and turning every value into fp32 for an FMA, had
// taken four requests' step 3.2 ms of attention streamed from memory where reading the caches alone takes
// 1.9 (a C program over the kernels, 24 layers of 8 rows at 125 positions, the Xeon).
inline void attend_heads_int8(const int8_t* q, const float* q_scales, const int32_t* q_sums, const int8_t* kc,
                              const int8_t* vc, int n, size_t stride, int hidden, int h0, int h1, int D, uint16_t* o,
                              float* scores, int32_t* acc) {
    const int nh = h1 - h0, blocks = head_blocks(nh), row_heads = hidden / D;
    const int quads = (n + kQuadPositions - 1) / kQuadPositions, block_n = quads * kQuadPositions;  // <= capacity
    const char* first = (const char*)kc + (size_t)h0 * D;
    const size_t span = (size_t)nh * D;
    constexpr int kBlocks = kMaxHeads / kHeadBlock + 1;
    __m512 best[kBlocks], qscale[kBlocks];
    __m512i offset[kBlocks];
    __mmask16 broken[kBlocks], heads[kBlocks];
    for (int b = 0; b < blocks; b++) {
        heads[b] = first_lanes(nh - b * kHeadBlock);
        best[b] = _mm512_set1_ps(-INFINITY);
        broken[b] = 0;
        qscale[b] = _mm512_maskz_loadu_ps(heads[b], q_scales + h0 + b * kHeadBlock);
        // the keys' offset of 128 taken out of each dot product
        offset[b] = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(heads[b], q_sums + h0 + b * kHeadBlock), 7);
    }
    int8_t* values = const_cast<int8_t*>(vc);
    for (int p = 0; p < n; p++) {
        const int8_t* kp = kc + (size_t)p * stride;
        prefetch_heads_int8(first + (size_t)(p + kAttendAhead) * stride, span, hidden, h0, D);
        if (p % kQuadPositions == 0 && p + kAttendAhead < n)  // the values' scales, for the weights below
            _mm_prefetch((const char*)value_scale(values, p + kAttendAhead, stride, hidden, row_heads), _MM_HINT_T1);
        const float* ks = (const float*)(kp + hidden) + h0;
        for (int b = 0; b < blocks; b++) {
            __m512i dots[kHeadBlock];
            for (int h = 0; h < kHeadBlock; h++) {
                dots[h] = _mm512_setzero_si512();
                const int head = h0 + b * kHeadBlock + h;
                if (b * kHeadBlock + h >= nh) continue;
                for (int d = 0; d < D; d += 64) {
                    const __mmask64 lanes = D - d >= 64 ? ~0ULL : (1ULL << (D - d)) - 1;
                    dots[h] = _mm512_dpbusd_epi32(dots[h], _mm512_maskz_loadu_epi8(lanes, kp + (size_t)head * D + d),
                                                  _mm512_maskz_loadu_epi8(lanes, q + (size_t)head * D + d));
                }
            }
            const __m512i dot = _mm512_sub_epi32(sum_each16(dots), offset[b]);
            const __m512 scale = _mm512_mul_ps(qscale[b], _mm512_maskz_loadu_ps(heads[b], ks + b * kHeadBlock));
            const __m512 sc = _mm512_mul_ps(scale, _mm512_cvtepi32_ps(dot));
            _mm512_storeu_ps(scores + ((size_t)b * block_n + p) * kHeadBlock, sc);
            broken[b] |= _mm512_cmp_ps_mask(sc, sc, _CMP_UNORD_Q);  // a NaN score makes its head NaN, for good
            best[b] = _mm512_max_ps(best[b], sc);
        }
    }
    // the values' first block of quads, for the sums below
    const size_t quad_stride = (size_t)kQuadPositions * stride, head_bytes = (size_t)D * kQuadPositions;
    auto prefetch_quads = [&](int j0) {
        for (int j = j0; j < j0 + kValueQuads && j < quads; j++) {
            const char* at = (const char*)values + (size_t)j * quad_stride + (size_t)h0 * head_bytes;
            for (size_t line = 0; line < (size_t)nh * head_bytes; line += 64) _mm_prefetch(at + line, _MM_HINT_T1);
        }
    };
    prefetch_quads(0);
    // softmax's terms exp(score - best), times the values' scales: the weights; their sums and maxima per
    // head. 1 / sum is NaN where a head's scores held NaN or its best is not finite (as torch's softmax
    // gives), or a weight is NaN (a value's scale, for a head of values holding NaN or infinity).
    float inv[kMaxHeads + kHeadBlock], digit[kMaxHeads + kHeadBlock];
    uint32_t* words = (uint32_t*)scores;  // each block's quads' digits, over its consumed weights (below)
    for (int b = 0; b < blocks; b++) {
        const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_sub_ps(best[b], best[b]), _mm512_setzero_ps(), _CMP_EQ_OQ);
        __mmask16 bad = broken[b] | ~finite;
        const __m512 top = _mm512_mask_blend_ps(bad, best[b], _mm512_setzero_ps());
        __m512 sum = _mm512_setzero_ps(), most = _mm512_setzero_ps();
        float* block = scores + (size_t)b * block_n * kHeadBlock;
        for (int p = 0; p < n; p++) {
            const __m512 e = exp_neg(_mm512_sub_ps(_mm512_loadu_ps(block + (size_t)p * kHeadBlock), top));
            sum = _mm512_add_ps(sum, e);
            const float* vs = value_scale(values, p, stride, hidden, row_heads) + h0 + b * kHeadBlock;
            const __m512 w = _mm512_mul_ps(e, _mm512_maskz_loadu_ps(heads[b], vs));
            bad |= _mm512_cmp_ps_mask(w, w, _CMP_UNORD_Q);
            most = _mm512_max_ps(most, w);
            _mm512_storeu_ps(block + (size_t)p * kHeadBlock, w);
        }
        const __m512 r = _mm512_div_ps(_mm512_set1_ps(1.0f), sum);
        _mm512_storeu_ps(inv + b * kHeadBlock, _mm512_mask_blend_ps(bad, r, _mm512_set1_ps(NAN)));
        // the digits: s = max / 255 (0 for a head of zero weights), hi = floor(w / s), lo = round((w - hi
        // s) * 256 / s), both clamped to 0..255; a quad's four positions' digits are one word a head
        // (positions past n weigh nothing). Quad j's words (hi's sixteen, then lo's) overwrite positions
        // 2j and 2j + 1 of the block's weights, which quad j has already read.
        const __m512 s = _mm512_mul_ps(most, _mm512_set1_ps(1.0f / 255.0f));
        const __mmask16 some = _mm512_cmp_ps_mask(most, _mm512_setzero_ps(), _CMP_GT_OQ) & ~bad;
        const __m512 to_hi = _mm512_maskz_div_ps(some, _mm512_set1_ps(1.0f), s);
        const __m512 to_lo = _mm512_mul_ps(to_hi, _mm512_set1_ps(256.0f));
        _mm512_storeu_ps(digit + b * kHeadBlock, s);
        const __m512i low = _mm512_setzero_si512(), high = _mm512_set1_epi32(255);
        uint32_t* block_words = words + (size_t)b * block_n * kHeadBlock;
        for (int j = 0; j < quads; j++) {
            __m512i hi = _mm512_setzero_si512(), lo = _mm512_setzero_si512();
            __m512 w[kQuadPositions];
            for (int t = 0; t < kQuadPositions; t++) {
                const int pos = kQuadPositions * j + t;
                w[t] = pos < n ? _mm512_loadu_ps(block + (size_t)pos * kHeadBlock) : _mm512_setzero_ps();
            }
            for (int t = 0; t < kQuadPositions; t++) {
                const __m512 f = _mm512_roundscale_ps(_mm512_mul_ps(w[t], to_hi), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
                const __m512i h = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(f), low), high);
                const __m512 rest = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(h), s, w[t]);
                const __m512i l = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(rest, to_lo)), low), high);
                hi = _mm512_or_si512(hi, _mm512_slli_epi32(h, 8 * t));
                lo = _mm512_or_si512(lo, _mm512_slli_epi32(l, 8 * t));
            }
            _mm512_storeu_si512(block_words + (size_t)j * 2 * kHeadBlock, hi);
            _mm512_storeu_si512(block_words + (size_t)j * 2 * kHeadBlock + kHeadBlock, lo);
        }
    }
    for (int i = 0; i < 2 * nh * D / 16; i++) _mm512_storeu_si512(acc + 16 * i, _mm512_setzero_si512());
    for (int j0 = 0; j0 < quads; j0 += kValueQuads) {
        const int j1 = j0 + kValueQuads < quads ? j0 + kValueQuads : quads;
        prefetch_quads(j1);
        for (int h = 0; h < nh; h++) {
            const int8_t* vh = vc + (size_t)(h0 + h) * head_bytes;
            const uint32_t* w = words + (size_t)(h / kHeadBlock) * block_n * kHeadBlock + h % kHeadBlock;
            weigh_head_of(D, vh, quad_stride, w, j0, j1, acc + (size_t)h * 2 * D);
        }
    }
    // each head: (s * hi sums + s / 256 * lo sums) / sum of terms, rounded to bf16 (NaN for a broken head)
    for (int h = 0; h < nh; h++) {
        uint16_t* oh = o + (size_t)(h0 + h) * D;
        if (std::isnan(inv[h])) {
            for (int d = 0; d < D; d++) oh[d] = 0x7fc0;
            continue;
        }
        const __m512 s_hi = _mm512_set1_ps(digit[h] * inv[h]), s_lo = _mm512_set1_ps(digit[h] / 256.0f * inv[h]);
        const int32_t* ah = acc + (size_t)h * 2 * D;
        for (int i = 0; i < D / 16; i++) {
            const __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(ah + 16 * i)), s_hi,
                                             _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(ah + D + 16 * i)), s_lo));
            _mm256_storeu_si256((__m256i*)(oh + 16 * i), (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}

MUSICBOT_VNNI_END

// Heads h0 .. h1 - 1 of a row's bf16 query (at q) as int8, each on its own scale, with each head's sum
// of ints (for the keys' offset of 128): what attend_heads_int8 takes.
inline void quantize_query(const uint16_t* q, int h0, int h1, int D, int8_t* ints, float* scales, int32_t* sums) {
    for (int h = h0; h < h1; h++) {
        scales[h] = quantize_head(q + (size_t)h * D, ints + (size_t)h * D, D, false);
        int32_t sum = 0;
        for (int d = 0; d < D; d++) sum += ints[(size_t)h * D + d];
        sums[h] = sum;
    }
}

// attend_rows over int8 caches (rows, capacity, int8_position(heads, D)) bytes. With `fresh` (self-
// attention: q is the fused Q/K/V row) position n - 1 is first written from the fresh keys and values,
// quantized; with `lengths` (the text's attention) row r attends positions 0 .. lengths[r] - 1.
void attend_rows_int8(const uint16_t* q, size_t q_stride, bool fresh, int8_t* keys, int8_t* values,
                      const int32_t* lengths, uint16_t* out, float* scratch, int rows, int heads, int D, int capacity,
                      int n, int threads) {
    const int hidden = heads * D, groups = head_groups(rows, heads, threads);
    const size_t stride = int8_position(heads, D);
#pragma omp parallel num_threads(threads)
    {
        float* scores = scratch + (size_t)omp_get_thread_num() * attention_scratch(heads, D, capacity);
        int32_t* acc = (int32_t*)(scores + (size_t)head_blocks(heads) * kHeadBlock * capacity);
        alignas(64) int8_t qi[kMaxHeads * kMaxHeadSize], value[kMaxHeadSize];
        float q_scales[kMaxHeads];
        int32_t q_sums[kMaxHeads];
#pragma omp for schedule(static)
        for (int task = 0; task < rows * groups; task++) {
            const int r = task / groups, g = task % groups;
            const int h0 = g * heads / groups, h1 = (g + 1) * heads / groups;
            const uint16_t* qr = q + (size_t)r * q_stride;
            int8_t* kc = keys + (size_t)r * capacity * stride;
            int8_t* vc = values + (size_t)r * capacity * stride;
            if (fresh) {
                int8_t* kn = kc + (size_t)(n - 1) * stride;
                float* vs = value_scale(vc, n - 1, stride, hidden, heads);
                for (int h = h0; h < h1; h++) {
                    ((float*)(kn + hidden))[h] = quantize_head(qr + hidden + (size_t)h * D, kn + (size_t)h * D, D, true);
                    vs[h] = quantize_head(qr + 2 * (size_t)hidden + (size_t)h * D, value, D, false);
                    store_value_head(vc, n - 1, stride, h, D, value);
                }
            }
            quantize_query(qr, h0, h1, D, qi, q_scales, q_sums);
            attend_heads_int8(qi, q_scales, q_sums, kc, vc, lengths ? lengths[r] : n, stride, hidden, h0, h1, D,
                              out + (size_t)r * hidden, scores, acc);
        }
    }
}

// torch's layer norm of bf16 rows: mean and variance in fp32 (biased), y = (x - mean) * rstd * w + b
// rounded to bf16 once.
void layer_norm(const uint16_t* x, uint16_t* y, const uint16_t* w, const uint16_t* b, float eps, int rows,
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

}  // namespace

extern "C" {

// W (N, K) bf16 row-major -> packed panels [N/32][K/2][32][2]: for each pair of k, the 32 columns of a
// panel side by side, so a panel is one sequential stream and each 64-byte load is 16 columns x 2 k.
// N % 32 == 0, K % 2 == 0. A panel depends on its own 32 rows alone, so a matrix stacked from parts of
// whole panels packs as its parts packed one after the other. 16 k pairs of 16 rows at a time are one
// 16 x 16 transposition of words (a word at a time had been a quarter of a bf16 model's preparation).
void pack_linear_weight(const uint16_t* W, uint16_t* packed, int N, int K) {
#pragma omp parallel for schedule(static)
    for (int b = 0; b < N / kPanel; b++) {
        uint32_t* panel = (uint32_t*)(packed + (size_t)b * K * kPanel);  // one k pair of a column a word
        const uint32_t* rows = (const uint32_t*)(W + (size_t)b * kPanel * K);
        int kk = 0;
        for (; kk + 16 <= K / 2; kk += 16) {
            for (int half = 0; half < 2; half++) {
                __m512i r[16];
                for (int c = 0; c < 16; c++) r[c] = _mm512_loadu_si512(rows + (size_t)(16 * half + c) * (K / 2) + kk);
                transpose16(r);
                for (int i = 0; i < 16; i++) _mm512_storeu_si512(panel + (size_t)(kk + i) * kPanel + 16 * half, r[i]);
            }
        }
        for (; kk < K / 2; kk++)
            for (int c = 0; c < kPanel; c++) memcpy(panel + (size_t)kk * kPanel + c, rows + (size_t)c * (K / 2) + kk, sizeof(uint32_t));
    }
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

// W (N, K) int8 row-major with its per-column fp32 scales -> the packed int8 matrix described at
// Int8Matrix: panels, scales, column sums. N % 32 == 0, K % 64 == 0.
void pack_linear_int8(const int8_t* W, const float* scales, int8_t* packed, int N, int K) {
    float* packed_scales = (float*)(packed + (size_t)N * K);
    int32_t* sums = (int32_t*)(packed_scales + N);
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        int32_t sum = 0;
        const int8_t* row = W + (size_t)n * K;
        uint32_t* column = (uint32_t*)(packed + (size_t)(n / kPanel) * K * kPanel) + n % kPanel;  // four k a word
        for (int kq = 0; kq < K / kQuad; kq++) memcpy(column + (size_t)kq * kPanel, row + kQuad * kq, sizeof(uint32_t));
        for (int k = 0; k < K; k++) sum += row[k];
        packed_scales[n] = scales[n];
        sums[n] = sum;
    }
}

// y (M, N) = act(x (M, K) @ W.T) [+ residual (M, N)] as linear_bf16 does, with W a packed int8 matrix and
// x quantized per row first (scratch: M * (K + 8) bytes). K % 64 == 0.
void linear_int8(const int8_t* packed, const uint16_t* x, const uint16_t* residual, uint16_t* y, uint8_t* scratch,
                 int M, int N, int K, int act, int threads) {
    const Int8Matrix w = int8_matrix(packed, N, K);
    float* params = (float*)(scratch + (size_t)M * K);
    quantize_rows(x, scratch, params, M, K);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < N / kPanel; b++) {
        int m0 = 0;
        for (; m0 + 8 <= M; m0 += 8) panel_rows_int8<8>(w, b, scratch, params, residual, y, m0, N, K, act);
        switch (M - m0) {
            case 7: panel_rows_int8<7>(w, b, scratch, params, residual, y, m0, N, K, act); break;
            case 6: panel_rows_int8<6>(w, b, scratch, params, residual, y, m0, N, K, act); break;
            case 5: panel_rows_int8<5>(w, b, scratch, params, residual, y, m0, N, K, act); break;
            case 4: panel_rows_int8<4>(w, b, scratch, params, residual, y, m0, N, K, act); break;
            case 3: panel_rows_int8<3>(w, b, scratch, params, residual, y, m0, N, K, act); break;
            case 2: panel_rows_int8<2>(w, b, scratch, params, residual, y, m0, N, K, act); break;
            case 1: panel_rows_int8<1>(w, b, scratch, params, residual, y, m0, N, K, act); break;
            default: break;
        }
    }
}

// One decoding step of self-attention for rows x heads query rows, head size D (D % 32 == 0),
// heads <= MUSICBOT_MAX_HEADS.
// qkv (rows, 3 * heads * D) bf16: the fused projection, q already scaled by 1/sqrt(D).
// keys / values (rows, capacity, heads * D) bf16, position-major: position `pos` is written from qkv,
// then each query attends over positions 0..pos. out (rows, heads * D) bf16.
// scratch: threads * attend_scratch(heads, D, capacity) floats.
int attend_scratch(int heads, int D, int capacity) { return attention_scratch(heads, D, capacity); }

void attend_bf16(const uint16_t* qkv, uint16_t* keys, uint16_t* values, uint16_t* out, float* scratch, int rows,
                 int heads, int D, int capacity, int pos, int threads) {
    const size_t hidden = (size_t)heads * D;
    attend_rows(qkv, 3 * hidden, qkv + hidden, keys, values, nullptr, nullptr, out, scratch, rows, heads, D, capacity,
                pos + 1, threads);
}

// attend_bf16 over int8 caches (rows, capacity, heads * D + 4 * heads) bytes, laid out as at int8_position.
void attend_int8(const uint16_t* qkv, int8_t* keys, int8_t* values, uint16_t* out, float* scratch, int rows, int heads,
                 int D, int capacity, int pos, int threads) {
    attend_rows_int8(qkv, 3 * (size_t)heads * D, true, keys, values, nullptr, out, scratch, rows, heads, D, capacity,
                     pos + 1, threads);
}

// n positions of bf16 keys (keys != 0) or values, (n, heads * D), into an int8 cache's positions
// (n, heads * D + 4 * heads) bytes, quantized as the step quantizes the positions it adds.
void quantize_cache(const uint16_t* x, int8_t* cache, int n, int heads, int D, int keys) {
    const int hidden = heads * D;
    const size_t stride = int8_position(heads, D);
    int8_t fresh[kMaxHeadSize];
    for (int p = 0; p < n; p++) {
        int8_t* at = cache + (size_t)p * stride;
        for (int h = 0; h < heads; h++) {
            const uint16_t* from = x + (size_t)p * hidden + (size_t)h * D;
            if (keys) {
                ((float*)(at + hidden))[h] = quantize_head(from, at + (size_t)h * D, D, true);
            } else {
                value_scale(cache, p, stride, hidden, heads)[h] = quantize_head(from, fresh, D, false);
                store_value_head(cache, p, stride, h, D, fresh);
            }
        }
    }
}

// Cross-attention of one step: q (rows, heads * D) bf16 (scaled), keys / values (rows, n, heads * D) bf16,
// position-major as above, mask (rows, n) fp32 added to the scores, or null. out (rows, heads * D) bf16.
// scratch: threads * attend_scratch(heads, D, n) floats.
void cross_attend_bf16(const uint16_t* q, const uint16_t* keys, const uint16_t* values, const float* mask,
                       uint16_t* out, float* scratch, int rows, int heads, int D, int n, int threads) {
    // read only: without `fresh` nothing is written to the caches
    attend_rows(q, (size_t)heads * D, nullptr, const_cast<uint16_t*>(keys), const_cast<uint16_t*>(values), mask, nullptr,
                out, scratch, rows, heads, D, n, n, threads);
}

// Cross-attention of one step over the text's int8 caches: q (rows, heads * D) bf16 (scaled); keys /
// values (rows, capacity, heads * D + 4 * heads) bytes as quantize_cache fills them (keys with keys=1);
// row r attends positions 0 .. lengths[r] - 1, its prompt (the rest is the padding a mask would hide:
// the masked attention over half the bytes of bf16 keys and values, the padding not read). out (rows,
// heads * D) bf16. scratch as cross_attend_bf16's for n = capacity.
void cross_attend_int8(const uint16_t* q, const int8_t* keys, const int8_t* values, const int32_t* lengths,
                       uint16_t* out, float* scratch, int rows, int heads, int D, int capacity, int threads) {
    // read only: without `fresh` nothing is written to the caches
    attend_rows_int8(q, (size_t)heads * D, false, const_cast<int8_t*>(keys), const_cast<int8_t*>(values), lengths, out,
                     scratch, rows, heads, D, capacity, capacity, threads);
}

#ifdef __AVX512F__
int vector_bits() { return 512; }
#else
int vector_bits() { return 256; }
#endif

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
        alignas(64) float sums[2][kAmxRows * kPanel];  // a panel's sums, and the previous one's
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int b0 = (int)((long)panels * t / nt), b1 = (int)((long)panels * (t + 1) / nt);  // this thread's
        for (int m0 = 0; m0 < M; m0 += kAmxRows) {
            const int rows = M - m0 < kAmxRows ? M - m0 : kAmxRows;
            amx_configure(rows);  // per thread: tile state is the thread's own
            PendingPanel<float> previous;
            for (int b = b0; b < b1; b++)
                panel_rows_amx(packed + (size_t)b * K * kPanel, x, m0, rows, K, b, sums[b & 1], previous, residual, y, N,
                               act);
            finish_pending(previous, previous.items, residual, y, m0, N, act);
        }
        _tile_release();  // leave no tile state behind for the OS to save at every switch
    }
}

#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-int8")

// linear_int8 on AMX tiles: the same arguments and results, after amx_enable() gave 1.
void linear_amx_int8(const int8_t* packed, const uint16_t* x, const uint16_t* residual, uint16_t* y,
                     uint8_t* scratch, int M, int N, int K, int act, int threads) {
    const Int8Matrix w = int8_matrix(packed, N, K);
    float* params = (float*)(scratch + (size_t)M * K);
    quantize_rows(x, scratch, params, M, K);
    const int panels = N / kPanel;
#pragma omp parallel num_threads(threads)
    {
        alignas(64) int32_t sums[2][kAmxRows * kPanel];  // a panel's sums, and the previous one's
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        const int b0 = (int)((long)panels * t / nt), b1 = (int)((long)panels * (t + 1) / nt);  // this thread's
        for (int m0 = 0; m0 < M; m0 += kAmxRows) {
            const int rows = M - m0 < kAmxRows ? M - m0 : kAmxRows;
            amx_configure(rows);  // 64 bytes a row: 64 u8 of x, 16 int32 sums, 16 columns x 4 k
            PendingPanel<int32_t> previous;
            for (int b = b0; b < b1; b++)
                panel_rows_amx_int8(w, b, scratch, m0, rows, K, sums[b & 1], previous, params, residual, y, N, act);
            finish_pending(previous, previous.items, w, params, residual, y, m0, N, act);
        }
        _tile_release();
    }
}

#pragma GCC pop_options
#else  // no AMX in this compiler: entry points that amx_enable() never lets run

int amx_enable() { return 0; }
void linear_amx_bf16(const uint16_t*, const uint16_t*, const uint16_t*, uint16_t*, int, int, int, int, int) {}
void linear_amx_int8(const int8_t*, const uint16_t*, const uint16_t*, uint16_t*, uint8_t*, int, int, int, int, int) {}

#endif  // MUSICBOT_AMX

// bf16s: the step's activations, then (int8 weights) one row set quantized for a product and its params
int step_work(int rows, int hidden, int ffn) {
    const int widest = hidden > ffn ? hidden : ffn;
    return rows * (hidden + 3 * hidden + hidden + ffn) + (rows * (widest + 8) + 1) / 2;
}

// x (rows, hidden) bf16 is overwritten by the step's hidden states; logits (rows, codebooks * vocab) bf16.
// tokens (rows, codebooks) int64: this column's codes; position: its index in the caches.
// work: step_work(rows, hidden, ffn) bf16; scratch: threads * attend_scratch(heads, D, capacity) floats,
// enough for cross-attention over the text too (sized for the larger of capacity and text).
void decoder_step(const StepModel* m, const StepLayer* layers, const int64_t* tokens, uint16_t* x, uint16_t* logits,
                  uint16_t* work, float* scratch, int rows, int cross_rows, int position, int threads) {
    const int H = m->hidden, D = H / m->heads;
    uint8_t* quantized = (uint8_t*)(work + (size_t)rows * (5 * H + m->ffn));  // int8 weights: a product's x as u8
    auto linear = [&](const void* w, const uint16_t* in, const uint16_t* residual, uint16_t* y, int M, int N, int K,
                      int act) {
        if (m->int8 && m->amx)
            linear_amx_int8((const int8_t*)w, in, residual, y, quantized, M, N, K, act, threads);
        else if (m->int8)
            linear_int8((const int8_t*)w, in, residual, y, quantized, M, N, K, act, threads);
        else if (m->amx && K % 32 == 0)
            linear_amx_bf16((const uint16_t*)w, in, residual, y, M, N, K, act, threads);
        else
            linear_bf16((const uint16_t*)w, in, residual, y, M, N, K, act, threads);
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
        if (m->int8)
            attend_rows_int8(qkv, 3 * (size_t)H, true, (int8_t*)L.keys, (int8_t*)L.values, nullptr, attn, scratch, rows,
                             m->heads, D, m->capacity, position + 1, threads);
        else
            attend_rows(qkv, 3 * (size_t)H, qkv + H, (uint16_t*)L.keys, (uint16_t*)L.values, nullptr, nullptr, attn,
                        scratch, rows, m->heads, D, m->capacity, position + 1, threads);
        linear(L.out, attn, x, x, rows, H, H, 0);  // residual in place: each sum reads its own element first
        if (L.cross_keys && cross_rows > 0) {
            layer_norm(x, h, L.ln2_w, L.ln2_b, L.eps2, cross_rows, H);
            linear(L.cross_q, h, nullptr, qkv, cross_rows, H, H, 0);
            if (m->int8 && m->cross_lengths)  // the text's caches are int8 (cross_attend_int8's)
                cross_attend_int8(qkv, static_cast<const int8_t*>(L.cross_keys), static_cast<const int8_t*>(L.cross_values),
                                  m->cross_lengths, attn, scratch, cross_rows, m->heads, D, m->text, threads);
            else  // bf16 text, under the mask or each row over its length; read only without `fresh`
                attend_rows(qkv, (size_t)H, nullptr, const_cast<uint16_t*>(static_cast<const uint16_t*>(L.cross_keys)),
                            const_cast<uint16_t*>(static_cast<const uint16_t*>(L.cross_values)), m->cross_mask,
                            m->cross_lengths, attn, scratch, cross_rows, m->heads, D, m->text, m->text, threads);
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
