// Kernels for one decoding step on a CPU with AVX-512 BF16: the two things a step spends its time on.
//
// - linear: y = x @ W.T (+ residual) for a few rows of bf16 activations. A step streams every weight
//   once, so its speed is memory bandwidth; oneDNN's kernels reach about 60% of what a plain read of
//   the same bytes does on our 2-core VM. Weights here are packed once into panels of 32 output
//   columns that each thread reads as one sequential stream, and every row of x (up to 8 at once) is
//   computed per panel load, each x pair broadcast into the dot product: at 8 rows the step is bound
//   by the dot products themselves, so the inner loop has nothing but loads and dot products.
// - attend: one query row per (batch row, head) against its cache of keys and values, the new key and
//   value written first. Reads each cache once, with no copies and no mask (oneDNN's batched product
//   copied every slice it was handed).
//
// Built on first use by generation/native.py (g++ -O3 -march=native -fopenmp) and called through
// ctypes with raw pointers; every shape check happens on the Python side.

#include <immintrin.h>
#include <omp.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

namespace {

constexpr int kPanel = 32;  // output columns per packed panel: two 16-lane accumulators a row
constexpr int kChunk = 32;  // bf16 values per 64-byte load

inline __m512 bf16_to_f32(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// One panel of kPanel output columns for MB rows of x: acc[m][h] holds columns h*16 .. h*16+15.
// x32 holds x as bf16 pairs (row stride K/2); each pair is broadcast into the dot product's operand.
template <int MB>
inline void panel_rows(const uint16_t* panel, const uint32_t* x32, const uint16_t* residual, uint16_t* y,
                       int m0, int N, int K, int n0) {
    __m512 acc[MB][2];
    for (int m = 0; m < MB; m++) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
    const int pairs = K / 2;
    const uint32_t* xm = x32 + (size_t)m0 * pairs;
    for (int kk = 0; kk < pairs; kk++) {
        const uint16_t* p = panel + (size_t)kk * 2 * kPanel;
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(p);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(p + 32);
        for (int m = 0; m < MB; m++) {
            const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)xm[(size_t)m * pairs + kk]);
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xb);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xb);
        }
    }
    for (int m = 0; m < MB; m++) {
        for (int h = 0; h < 2; h++) {
            const size_t at = (size_t)(m0 + m) * N + n0 + 16 * h;
            __m512 v = acc[m][h];
            if (residual) v = _mm512_add_ps(v, bf16_to_f32(_mm256_loadu_si256((const __m256i*)(residual + at))));
            _mm256_storeu_si256((__m256i*)(y + at), (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
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

// y (M, N) = x (M, K) @ W.T [+ residual (M, N)], all bf16, fp32 sums. W packed by pack_linear_weight.
void linear_bf16(const uint16_t* packed, const uint16_t* x, const uint16_t* residual, uint16_t* y, int M,
                 int N, int K, int threads) {
    const int panels = N / kPanel;
    const uint32_t* x32 = (const uint32_t*)x;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < panels; b++) {
        const uint16_t* panel = packed + (size_t)b * K * kPanel;
        const int n0 = b * kPanel;
        int m0 = 0;
        for (; m0 + 8 <= M; m0 += 8) panel_rows<8>(panel, x32, residual, y, m0, N, K, n0);
        switch (M - m0) {
            case 7: panel_rows<7>(panel, x32, residual, y, m0, N, K, n0); break;
            case 6: panel_rows<6>(panel, x32, residual, y, m0, N, K, n0); break;
            case 5: panel_rows<5>(panel, x32, residual, y, m0, N, K, n0); break;
            case 4: panel_rows<4>(panel, x32, residual, y, m0, N, K, n0); break;
            case 3: panel_rows<3>(panel, x32, residual, y, m0, N, K, n0); break;
            case 2: panel_rows<2>(panel, x32, residual, y, m0, N, K, n0); break;
            case 1: panel_rows<1>(panel, x32, residual, y, m0, N, K, n0); break;
            default: break;
        }
    }
}

// One decoding step of self-attention for rows x heads query rows, head size D (D % 32 == 0).
// qkv (rows, 3 * heads * D) bf16: the fused projection, q already scaled by 1/sqrt(D).
// keys / values (rows * heads, capacity, D) bf16: position `pos` is written from qkv, then each query
// attends over positions 0..pos. out (rows, heads * D) bf16.
void attend_bf16(const uint16_t* qkv, uint16_t* keys, uint16_t* values, uint16_t* out, int rows, int heads,
                 int D, int capacity, int pos, int threads) {
    const int hidden = heads * D;
    const int n = pos + 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < rows * heads; b++) {
        const int r = b / heads, h = b % heads;
        const uint16_t* q = qkv + (size_t)r * 3 * hidden + (size_t)h * D;
        uint16_t* kc = keys + (size_t)b * capacity * D;
        uint16_t* vc = values + (size_t)b * capacity * D;
        memcpy(kc + (size_t)pos * D, q + hidden, D * sizeof(uint16_t));
        memcpy(vc + (size_t)pos * D, q + 2 * hidden, D * sizeof(uint16_t));

        float scores[n + 16];
        float best = -INFINITY;
        for (int p = 0; p < n; p++) {
            const uint16_t* kp = kc + (size_t)p * D;
            __m512 acc = _mm512_setzero_ps();
            for (int d = 0; d < D; d += kChunk)
                acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + d),
                                       (__m512bh)_mm512_loadu_si512(kp + d));
            float s = _mm512_reduce_add_ps(acc);
            scores[p] = s;
            best = s > best ? s : best;
        }
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
        const float inv = 1.0f / _mm512_reduce_add_ps(vsum);

        // out = sum_p softmax[p] * V[p], D / 16 accumulators of 16 lanes (D <= 256)
        __m512 acc[16];
        const int lanes = D / 16;
        for (int i = 0; i < lanes; i++) acc[i] = _mm512_setzero_ps();
        for (int p2 = 0; p2 < n; p2++) {
            const __m512 wgt = _mm512_set1_ps(scores[p2]);
            const uint16_t* vp = vc + (size_t)p2 * D;
            for (int i = 0; i < lanes; i++)
                acc[i] = _mm512_fmadd_ps(wgt, bf16_to_f32(_mm256_loadu_si256((const __m256i*)(vp + 16 * i))),
                                         acc[i]);
        }
        uint16_t* o = out + (size_t)r * hidden + (size_t)h * D;
        const __m512 vinv = _mm512_set1_ps(inv);
        for (int i = 0; i < lanes; i++) {
            __m512 v = _mm512_mul_ps(acc[i], vinv);
            _mm256_storeu_si256((__m256i*)(o + 16 * i), (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}

}  // extern "C"
