// `musicbot bench --parts`: the int8 decoding step's parts timed apart, at a few batch sizes. Not part
// of the kernels' library: a program linked against it (step_parts.py builds and runs it).
//
// For a real shape (random weights and caches) and each row count it times, best of `reps`:
// - products: every layer's Q/K/V, out, cross Q and out (over the conditional half of the rows), fc1
//   (GELU) and fc2, then the LM heads: the weight stream that one request's step is bound by;
// - self-attention: its calls' own time, each layer's attention over int8 caches filled to `position`
//   run between the products where the step runs it (after Q/K/V), so it finds the caches as it would;
// - reading: the same place, the attention's caches only read, byte by byte, in the attention's order:
//   the memory's floor for the self-attention;
// - text: the text's attention (int8 caches of `text` positions) after cross Q, as in the step.
// Printed as one JSON object. Arguments: layers hidden heads ffn outputs text position reps amx threads
// rows... (amx: 1 to run the products on AMX tiles, as the step does where the CPU has them).

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "interface.h"

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Deterministic values, so that runs compare: xorshift, as floats in [-1, 1).
struct Random {
    uint64_t state = 0x9E3779B97F4A7C15ULL;
    float next() {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        return (float)((state >> 40) & 0xFFFFFF) / (float)(1 << 23) - 1.0f;
    }
};

uint16_t bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    return (uint16_t)(bits >> 16);
}

std::vector<uint16_t> bf16_values(size_t n, float scale, Random& random) {
    std::vector<uint16_t> v(n);
    for (auto& x : v) x = bf16(scale * random.next());
    return v;
}

struct Matrix {
    std::vector<int8_t> packed;
    int N, K;
};

Matrix int8_matrix(int N, int K, Random& random) {
    std::vector<int8_t> ints((size_t)N * K);
    for (auto& w : ints) w = (int8_t)std::lround(127.0f * random.next());
    std::vector<float> scales(N, 1.0f / (127.0f * std::sqrt((float)K)));
    Matrix m{std::vector<int8_t>((size_t)N * K + 8 * (size_t)N), N, K};
    pack_linear_int8(ints.data(), scales.data(), m.packed.data(), N, K);
    return m;
}

struct Layer {
    Matrix qkv, out, cross_q, cross_out, fc1, fc2;
    std::vector<int8_t> keys, values, text_keys, text_values;
};

// The row counts' largest: every buffer is sized for it.
struct Shape {
    int layers, hidden, heads, ffn, outputs, text, position, reps, amx, threads, rows;
};

}  // namespace

int main(int argc, char** argv) {
    if (argc < 12) {
        fprintf(stderr, "usage: %s layers hidden heads ffn outputs text position reps amx threads rows...\n", argv[0]);
        return 2;
    }
    Shape s{};
    int* fields[] = {&s.layers, &s.hidden, &s.heads, &s.ffn, &s.outputs, &s.text, &s.position, &s.reps, &s.amx, &s.threads};
    for (int i = 0; i < 10; i++) *fields[i] = atoi(argv[i + 1]);
    std::vector<int> row_counts;
    for (int i = 11; i < argc; i++) row_counts.push_back(atoi(argv[i]));
    s.rows = *std::max_element(row_counts.begin(), row_counts.end());
    if (s.amx && amx_enable() != 1) s.amx = 0;
    const int H = s.hidden, D = H / s.heads, F = s.ffn;
    const int capacity = (s.position + 1 + 3) / 4 * 4, text_capacity = (s.text + 3) / 4 * 4;
    const size_t width = (size_t)H + 4 * (size_t)s.heads;
    Random random;

    std::vector<Layer> layers(s.layers);
    for (auto& L : layers) {
        L.qkv = int8_matrix(3 * H, H, random);
        L.out = int8_matrix(H, H, random);
        L.cross_q = int8_matrix(H, H, random);
        L.cross_out = int8_matrix(H, H, random);
        L.fc1 = int8_matrix(F, H, random);
        L.fc2 = int8_matrix(H, F, random);
        // caches as the step quantizes them, from values of a model's size
        L.keys.resize((size_t)s.rows * capacity * width);
        L.values.resize(L.keys.size());
        L.text_keys.resize((size_t)s.rows * text_capacity * width);
        L.text_values.resize(L.text_keys.size());
        for (int r = 0; r < s.rows; r++) {
            const auto k = bf16_values((size_t)s.position * H, 2.0f, random), v = bf16_values((size_t)s.position * H, 2.0f, random);
            if (s.position > 0) {
                quantize_cache(k.data(), L.keys.data() + (size_t)r * capacity * width, s.position, s.heads, D, 1);
                quantize_cache(v.data(), L.values.data() + (size_t)r * capacity * width, s.position, s.heads, D, 0);
            }
            const auto tk = bf16_values((size_t)s.text * H, 2.0f, random), tv = bf16_values((size_t)s.text * H, 2.0f, random);
            quantize_cache(tk.data(), L.text_keys.data() + (size_t)r * text_capacity * width, s.text, s.heads, D, 1);
            quantize_cache(tv.data(), L.text_values.data() + (size_t)r * text_capacity * width, s.text, s.heads, D, 0);
        }
    }
    const Matrix lm = int8_matrix(s.outputs, H, random);

    const int widest = std::max({3 * H, F, s.outputs});
    const auto x = bf16_values((size_t)s.rows * std::max(H, F), 1.0f, random);
    // the attention's fresh Q/K/V: queries scaled by 1 / sqrt(D) as the model's come, so scores spread
    // as a model's do (not so far apart that softmax's smallest terms fall among fp32's denormals)
    auto qkv = bf16_values((size_t)s.rows * 3 * H, 2.0f, random);
    for (int r = 0; r < s.rows; r++)
        for (int i = 0; i < H; i++) qkv[(size_t)r * 3 * H + i] = bf16(2.0f * random.next() / std::sqrt((float)D));
    std::vector<uint16_t> query((size_t)s.rows * H);  // the text's attention's queries, scaled the same way
    for (auto& q : query) q = bf16(2.0f * random.next() / std::sqrt((float)D));
    std::vector<uint16_t> y((size_t)s.rows * widest), attn((size_t)s.rows * H);
    std::vector<uint8_t> quantized((size_t)s.rows * (std::max(H, F) + 8));
    const int scratch_floats = attend_scratch(s.heads, D, std::max(capacity, text_capacity));
    std::vector<float> scratch((size_t)s.threads * scratch_floats);
    std::vector<int32_t> lengths(s.rows, s.text);

    auto product = [&](const Matrix& m, int M, int act) {
        if (s.amx)
            linear_amx_int8(m.packed.data(), x.data(), nullptr, y.data(), quantized.data(), M, m.N, m.K, act, s.threads);
        else
            linear_int8(m.packed.data(), x.data(), nullptr, y.data(), quantized.data(), M, m.N, m.K, act, s.threads);
    };
    volatile uint64_t sink = 0;
    auto read = [&](Layer& L, int rows) {
        const size_t bytes = (size_t)(s.position + 1) * width;
        uint64_t total = 0;
#pragma omp parallel for num_threads(s.threads) schedule(static) reduction(+ : total)
        for (int r = 0; r < rows; r++) {
            for (const int8_t* cache : {L.keys.data(), L.values.data()}) {
                const uint64_t* words = (const uint64_t*)(cache + (size_t)r * capacity * width);
                uint64_t sum = 0;
                for (size_t i = 0; i < bytes / 8; i++) sum += words[i];
                total += sum;
            }
        }
        sink = sink + total;
    };
    // one pass over the layers, in the step's order: the products with, after Q/K/V, the self-attention
    // (`after` 1) or the reading of its caches (2), and after cross Q the text's attention (3); then the
    // LM heads
    auto pass = [&](int rows, int after) {
        const int conditional = rows > 1 ? rows / 2 : 1;
        const double started = now();
        double part = 0.0;  // the part's own calls, timed where they run (between the products)
        for (auto& L : layers) {
            product(L.qkv, rows, 0);
            const double before = now();
            if (after == 1)
                attend_int8(qkv.data(), L.keys.data(), L.values.data(), attn.data(), scratch.data(), rows, s.heads, D,
                            capacity, s.position, s.threads);
            else if (after == 2)
                read(L, rows);
            part += now() - before;
            product(L.out, rows, 0);
            product(L.cross_q, conditional, 0);
            if (after == 3) {
                const double text_before = now();
                cross_attend_int8(query.data(), L.text_keys.data(), L.text_values.data(), lengths.data(), attn.data(),
                                  scratch.data(), conditional, s.heads, D, text_capacity, s.threads);
                part += now() - text_before;
            }
            product(L.cross_out, conditional, 0);
            product(L.fc1, rows, 1);
            product(L.fc2, rows, 0);
        }
        product(lm, rows, 0);
        return after ? part : now() - started;
    };

    size_t weight_bytes = lm.packed.size();
    for (const auto& L : layers)
        for (const Matrix* m : {&L.qkv, &L.out, &L.cross_q, &L.cross_out, &L.fc1, &L.fc2}) weight_bytes += m->packed.size();
    printf("{\"amx\": %d, \"threads\": %d, \"position\": %d, \"text\": %d, \"weight_bytes\": %zu, \"results\": [", s.amx,
           s.threads, s.position, s.text, weight_bytes);
    for (size_t i = 0; i < row_counts.size(); i++) {
        const int rows = row_counts[i];
        double best[4] = {1e30, 1e30, 1e30, 1e30};
        pass(rows, 0);  // warm-up
        for (int rep = 0; rep < s.reps; rep++)
            for (int after = 0; after < 4; after++) best[after] = std::min(best[after], pass(rows, after));
        const size_t cache_bytes = (size_t)s.layers * rows * 2 * (s.position + 1) * width;
        printf("%s{\"rows\": %d, \"products_ms\": %.4f, \"self_attention_ms\": %.4f, \"reading_ms\": %.4f, "
               "\"text_attention_ms\": %.4f, \"cache_bytes\": %zu}",
               i ? ", " : "", rows, 1e3 * best[0], 1e3 * best[1], 1e3 * best[2], 1e3 * best[3], cache_bytes);
    }
    printf("], \"checksum\": %llu}\n", (unsigned long long)(sink & 1));
    return 0;
}
