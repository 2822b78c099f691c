// The next tokens of a decoding step, from its bf16 logits in one call: guidance, temperature, the k best
// and an inverse-CDF draw, for every row and codebook at once. The same choice as generation.sampling's
// `choose` (which serves where these kernels don't run, and for top-p), from the same uniform numbers.

#include <algorithm>
#include <cfloat>
#include <functional>

#include "common.h"

namespace {

// Scores are kept in whole vectors: a vocabulary's last vector is padded with -infinity, which no count,
// maximum, minimum of the finite ones or kept token sees, so the loops below need no scalar tails.
inline int padded(int vocab) { return (vocab + 15) / 16 * 16; }

// One row's scores for one codebook into s (padded(vocab)): guided (uncond + (cond - uncond) * guidance, as
// torch computes it in fp32) or the conditional ones, over the temperature, sixteen at a time. False if one
// is NaN or +infinity, or all are -infinity: nothing to draw from.
inline bool row_scores(const uint16_t* cond, const uint16_t* uncond, float guidance, float temperature, int vocab,
                       float* s) {
    const __m512 scale = _mm512_set1_ps(guidance), heat = _mm512_set1_ps(temperature);
    const __m512 inf = _mm512_set1_ps(INFINITY), neg_inf = _mm512_set1_ps(-INFINITY);
    __mmask16 bad = 0, some = 0;
    for (int i = 0; i < vocab; i += 16) {
        const __mmask16 lanes = first_lanes(vocab - i);
        alignas(32) uint16_t tail[2][16] = {};  // a last vector's bf16s, where fewer than sixteen are left
        const uint16_t *c = cond + i, *u = uncond ? uncond + i : nullptr;
        if (lanes != 0xFFFF) {
            std::copy(c, c + (vocab - i), tail[0]);
            if (u) std::copy(u, u + (vocab - i), tail[1]);
            c = tail[0];
            u = u ? tail[1] : nullptr;
        }
        __m512 v = bf16_to_f32(_mm256_loadu_si256((const __m256i*)c));
        if (u) {
            const __m512 un = bf16_to_f32(_mm256_loadu_si256((const __m256i*)u));
            v = _mm512_add_ps(un, _mm512_mul_ps(_mm512_sub_ps(v, un), scale));
        }
        if (temperature != 1.0f) v = _mm512_div_ps(v, heat);
        bad |= lanes & (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v, inf, _CMP_EQ_OQ));
        some |= lanes & _mm512_cmp_ps_mask(v, neg_inf, _CMP_NEQ_OQ);
        _mm512_storeu_ps(s + i, _mm512_mask_blend_ps(lanes, neg_inf, v));
    }
    return bad == 0 && some != 0;
}

// How many of s (n, a multiple of sixteen, no NaN) are at least t.
inline int count_at_least(const float* s, int n, float t) {
    const __m512 v = _mm512_set1_ps(t);
    int count = 0;
    for (int i = 0; i < n; i += 16) count += __builtin_popcount(_mm512_cmp_ps_mask(_mm512_loadu_ps(s + i), v, _CMP_GE_OQ));
    return count;
}

// The k-th largest of s (n scores, a multiple of sixteen, no NaN; 0 < k < the vocabulary), as
// std::nth_element finds it (ties counted), given the largest, hi: the values are bisected, each half's count
// taken sixteen at a time, until at most kSelectFew lie between the bounds, which nth_element orders.
// `work`: n floats. (nth_element over all 2048 took about 14 us a row, most of a step's sampling at four
// requests.)
constexpr int kSelectFew = 32;
inline float kth_largest(const float* s, float* work, int n, int k, float hi) {
    // the smallest finite score, lo, and how many are finite: count(>= lo)
    const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
    __m512 least = _mm512_set1_ps(INFINITY);
    int at_lo = 0;
    for (int i = 0; i < n; i += 16) {
        const __m512 v = _mm512_loadu_ps(s + i);
        const __mmask16 finite = _mm512_cmp_ps_mask(v, neg_inf, _CMP_NEQ_OQ);
        least = _mm512_mask_blend_ps(finite & _mm512_cmp_ps_mask(v, least, _CMP_LT_OQ), least, v);
        at_lo += __builtin_popcount(finite);
    }
    if (at_lo < k) return -INFINITY;  // fewer than k finite scores
    float lo = _mm512_reduce_min_ps(least);
    // count(>= lo) >= k > count(>= above): the k-th largest lies in [lo, above). (hi is finite: row_scores
    // refuses +infinity.)
    float above = std::nextafter(hi, INFINITY);
    int above_count = 0;
    while (at_lo - above_count > kSelectFew) {
        const float mid = lo + (above - lo) * 0.5f;
        if (!(mid > lo && mid < above)) break;  // adjacent floats
        const int c = count_at_least(s, n, mid);
        if (c >= k) {
            lo = mid;
            at_lo = c;
        } else {
            above = mid;
            above_count = c;
        }
    }
    int few = 0;
    const __m512 from = _mm512_set1_ps(lo), to = _mm512_set1_ps(above);
    for (int i = 0; i < n; i += 16) {
        const __m512 v = _mm512_loadu_ps(s + i);
        for (unsigned m = _mm512_cmp_ps_mask(v, from, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v, to, _CMP_LT_OQ); m; m &= m - 1)
            work[few++] = s[i + __builtin_ctz(m)];
    }
    const int rank = k - above_count;  // among the few, descending, 1-based
    std::nth_element(work, work + (rank - 1), work + few, std::greater<float>());
    return work[rank - 1];
}

// The token of scores s (padded(vocab)) whose cumulative weight, in vocabulary order over the tokens kept
// (the k best and any tied with the k-th; all for k 0), first reaches `draw` times the total. `work`: 2 *
// padded(vocab) floats. The weights exp(s - best) sixteen at a time (exp_neg, within 2e-7 of exp; 0 below
// e^-87, where the weight is under fp32's smallest normal number); the sums, in double rounded to fp32 as
// torch's cumsum, over the kept tokens alone (250 of 2048 with the bot's top_k), gathered once in
// vocabulary order.
inline int64_t draw_token(const float* s, float* work, int vocab, int k, float draw) {
    const int n = padded(vocab);
    __m512 most = _mm512_set1_ps(-INFINITY);
    for (int i = 0; i < n; i += 16) most = _mm512_max_ps(most, _mm512_loadu_ps(s + i));
    const float best = _mm512_reduce_max_ps(most);
    const float kth = k > 0 && k < vocab ? kth_largest(s, work, n, k, best) : -INFINITY;
    // work: the kept tokens' weights, then (as int32) their indices, `kept` of each
    int* index = (int*)(work + n);
    int kept = 0;
    const __m512 top = _mm512_set1_ps(best), floor = _mm512_set1_ps(kth), low = _mm512_set1_ps(-87.0f);
    for (int i = 0; i < n; i += 16) {
        const __m512 v = _mm512_loadu_ps(s + i), x = _mm512_sub_ps(v, top);
        unsigned keep = _mm512_cmp_ps_mask(v, floor, _CMP_GE_OQ) & _mm512_cmp_ps_mask(x, low, _CMP_GE_OQ);
        if (!keep) continue;
        alignas(64) float e[16];
        _mm512_storeu_ps(e, exp_neg(x));
        for (; keep; keep &= keep - 1) {
            const int lane = __builtin_ctz(keep);
            work[kept] = e[lane];
            index[kept++] = i + lane;
        }
    }
    double total = 0.0;
    for (int j = 0; j < kept; j++) total += work[j];
    const float target = std::max(draw * (float)total, FLT_MIN);
    double sum = 0.0;
    for (int j = 0; j < kept; j++) {
        sum += work[j];
        if ((float)sum >= target) return index[j];
    }
    return kept ? index[kept - 1] : 0;  // the draw times the total rounded up past the sum: the last kept
}

}  // namespace

extern "C" {

int sample_scratch(int vocab) { return 3 * padded(vocab); }

// tokens (rows, codebooks) int64 from logits ((guided ? 2 : 1) * rows, codebooks, vocab) bf16, the
// unconditional rows after the conditional ones, and draws (rows, codebooks) fp32 uniform in [0, 1).
// k: the k best are kept (0: all). scratch: threads * sample_scratch(vocab) floats. Returns how many
// (row, codebook) had scores row_scores refuses: their tokens are 0, and the caller must not use them.
int sample_tokens(const uint16_t* logits, const float* draws, int64_t* tokens, float* scratch, int rows, int guided,
                  int codebooks, int vocab, float guidance, float temperature, int k, int threads) {
    int broken = 0;
    const size_t row = (size_t)codebooks * vocab;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(+ : broken)
    for (int item = 0; item < rows * codebooks; item++) {
        const int r = item / codebooks, c = item % codebooks;
        float* s = scratch + (size_t)omp_get_thread_num() * sample_scratch(vocab);
        const uint16_t* cond = logits + (size_t)r * row + (size_t)c * vocab;
        const uint16_t* uncond = guided ? cond + (size_t)rows * row : nullptr;
        if (!row_scores(cond, uncond, guidance, temperature, vocab, s)) {
            tokens[item] = 0;
            broken++;
            continue;
        }
        tokens[item] = draw_token(s, s + padded(vocab), vocab, k, draws[item]);
    }
    return broken;
}

}  // extern "C"
