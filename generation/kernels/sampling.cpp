// The next tokens of a decoding step, from its bf16 logits in one call: guidance, temperature, the k best
// and an inverse-CDF draw, for every row and codebook at once. The same choice as generation.sampling's
// `choose` (which serves where these kernels don't run, and for top-p), from the same uniform numbers.

#include <algorithm>
#include <cfloat>
#include <functional>

#include "common.h"

namespace {

// One row's scores for one codebook: guided (uncond + (cond - uncond) * guidance, as torch computes it in
// fp32) or the conditional ones, over the temperature. False if one is NaN or +infinity, or all are
// -infinity: nothing to draw from.
inline bool row_scores(const uint16_t* cond, const uint16_t* uncond, float guidance, float temperature, int vocab,
                       float* s) {
    bool fine = true, some = false;
    for (int i = 0; i < vocab; i++) {
        float v = from_bf16(cond[i]);
        if (uncond) {
            const float u = from_bf16(uncond[i]);
            const float spread = (v - u) * guidance;
            v = u + spread;
        }
        if (temperature != 1.0f) v = v / temperature;
        fine &= !std::isnan(v) && v != INFINITY;
        some |= v != -INFINITY;
        s[i] = v;
    }
    return fine && some;
}

// The token of scores s (vocab) whose cumulative weight, in vocabulary order over the tokens kept (the k
// best and any tied with the k-th; all for k 0), first reaches `draw` times the total. `work`: vocab floats.
inline int64_t draw_token(const float* s, float* work, int vocab, int k, float draw) {
    float kth = -INFINITY;
    if (k > 0 && k < vocab) {
        std::copy(s, s + vocab, work);
        std::nth_element(work, work + (k - 1), work + vocab, std::greater<float>());
        kth = work[k - 1];
    }
    const float best = *std::max_element(s, s + vocab);
    double total = 0.0;  // weights summed in double, each partial sum rounded to fp32 as torch's cumsum
    int last = 0;
    for (int i = 0; i < vocab; i++) {
        work[i] = s[i] >= kth ? std::exp(s[i] - best) : 0.0f;
        total += work[i];
        if (work[i] > 0.0f) last = i;
    }
    const float target = std::max(draw * (float)total, FLT_MIN);
    double sum = 0.0;
    for (int i = 0; i < vocab; i++) {
        sum += work[i];
        if (work[i] > 0.0f && (float)sum >= target) return i;
    }
    return last;  // the draw times the total rounded up past the sum: the last token kept
}

}  // namespace

extern "C" {

int sample_scratch(int vocab) { return 2 * vocab; }

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
        tokens[item] = draw_token(s, s + vocab, vocab, k, draws[item]);
    }
    return broken;
}

}  // extern "C"
