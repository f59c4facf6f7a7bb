// pdserve's CPU decode kernels (float32, AVX-512); their interface is cpu_kernels.h. Built and
// loaded by cpu.py; the torch backend (backends/reference.py) is the reference they are tested against.
// Compiled with -ffp-contract=off, so the elementwise kernels round like torch (a multiply, then an
// add), not like a fused multiply-add.
#include "cpu_kernels.h"

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

// ---- linear: y[M, N] = x[M, K] @ W^T + bias, for decode-sized M ---------------------------------
//
// W is packed as [ceil(N/16)][K][16] (16 output columns per tile, zero padded), so a tile is one
// contiguous stream. Each step of k loads one 64-byte row of the tile and does R fused
// multiply-adds with x[r, k] broadcast from L1: the weights are read once whatever R is, which is
// what makes decode memory bound. The software prefetch runs PREFETCH_BYTES ahead of the loads so
// that the next cache lines arrive while this one's FMAs run (oneDNN's kernel for these shapes
// leaves the two serialised; docs/engine.md has the measurements).
// The sum over k runs in blocks of K_BLOCK, each block's partial sums added to a running total: one
// serial chain over all of K loses an order of magnitude of precision at Llama-3-8B's K = 14336
// (docs/engine.md), and float32 output is meant to stay within 1e-4 of transformers.
#define PREFETCH_BYTES 4096
#define K_BLOCK 256

static inline __attribute__((always_inline)) void linear_tile(
    const float* restrict x, int64_t ldx, const float* restrict w, const float* restrict bias,
    float* restrict y, int64_t ldy, int K, const int R, __mmask16 mask) {
    __m512 acc[16];
    float total[16][16] __attribute__((aligned(64)));  // [row][column], in L1
    for (int k0 = 0; k0 < K; k0 += K_BLOCK) {
        int k1 = k0 + K_BLOCK < K ? k0 + K_BLOCK : K;
#pragma GCC unroll 16
        for (int r = 0; r < 16; r++)
            if (r < R) acc[r] = _mm512_setzero_ps();
        for (int k = k0; k < k1; k++) {
            _mm_prefetch((const char*)(w + (int64_t)k * 16) + PREFETCH_BYTES, _MM_HINT_T0);
            __m512 wk = _mm512_load_ps(w + (int64_t)k * 16);
#pragma GCC unroll 16
            for (int r = 0; r < 16; r++)
                if (r < R) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k]), wk, acc[r]);
        }
#pragma GCC unroll 16
        for (int r = 0; r < 16; r++)
            if (r < R) _mm512_store_ps(total[r], k0 == 0 ? acc[r] : _mm512_add_ps(_mm512_load_ps(total[r]), acc[r]));
    }
    __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias) : _mm512_setzero_ps();
#pragma GCC unroll 16
    for (int r = 0; r < 16; r++)
        if (r < R) _mm512_mask_storeu_ps(y + r * ldy, mask, _mm512_add_ps(_mm512_load_ps(total[r]), b));
}

#define ROWS_CASE(R) case R: linear_tile(x, ldx, w, bias, y, ldy, K, R, mask); break;
static void linear_rows(const float* x, int64_t ldx, const float* w, const float* bias, float* y,
                        int64_t ldy, int K, int R, __mmask16 mask) {
    switch (R) {  // R as a constant, so that each case keeps its accumulators in registers
        ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4) ROWS_CASE(5) ROWS_CASE(6) ROWS_CASE(7)
        ROWS_CASE(8) ROWS_CASE(9) ROWS_CASE(10) ROWS_CASE(11) ROWS_CASE(12) ROWS_CASE(13)
        ROWS_CASE(14) ROWS_CASE(15) ROWS_CASE(16)
    }
}

void pd_linear(const struct pd_linear_args* a) {
    const float *x = a->x, *packed = a->packed, *bias = a->bias;
    float* y = a->y;
    int64_t ldx = a->x_stride;
    int M = a->rows, K = a->k, N = a->n, threads = a->threads;
    int tiles = (N + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < tiles; t++) {
        int n0 = t * 16, width = N - n0 < 16 ? N - n0 : 16;
        __mmask16 mask = (__mmask16)((1u << width) - 1);
        const float* w = packed + (int64_t)t * K * 16;
        for (int m = 0; m < M; m += 16)  // the next 16 rows re-read the tile from L1/L2, not memory
            linear_rows(x + m * ldx, ldx, w, bias ? bias + n0 : 0, y + (int64_t)m * N + n0, N, K,
                        M - m < 16 ? M - m : 16, mask);
    }
}

// ---- exp: Cephes' expf polynomial, ~1 ulp on [-87, 88] --------------------------------------------
static inline __m512 exp_ps(__m512 x) {
    // clamped with x as the second operand, which max/min return when it is NaN: a NaN propagates
    // (as in torch) instead of turning into e^-87
    x = _mm512_min_ps(_mm512_set1_ps(88.7f), _mm512_max_ps(_mm512_set1_ps(-87.3f), x));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // x - n*ln2, ln2 in two parts
    x = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), x);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline __mmask16 tail_mask(int remaining) {
    return remaining >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << remaining) - 1);
}

// ---- residual add + RMSNorm, as transformers: out = weight * (r * rsqrt(mean(r^2) + eps)) --------
// With `residual`, r = x + residual, written back to `residual`; without, r = x.
void pd_add_rms_norm(const struct pd_add_rms_norm_args* a) {
    const float *x = a->x, *weight = a->weight;
    float *residual = a->residual, *out = a->out;
    int M = a->rows, H = a->hidden;
    float eps = a->eps;
    for (int m = 0; m < M; m++) {
        const float* xr = x + (int64_t)m * H;
        float* rr = residual ? residual + (int64_t)m * H : 0;
        __m512 ss = _mm512_setzero_ps();
        for (int i = 0; i < H; i += 16) {
            __mmask16 k = tail_mask(H - i);
            __m512 v = _mm512_maskz_loadu_ps(k, xr + i);
            if (rr) {
                v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, rr + i));
                _mm512_mask_storeu_ps(rr + i, k, v);
            }
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        const float* r = rr ? rr : xr;
        __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)H + eps));
        for (int i = 0; i < H; i += 16) {
            __mmask16 k = tail_mask(H - i);
            __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, r + i), inv);
            _mm512_mask_storeu_ps(out + (int64_t)m * H + i, k, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, weight + i), v));
        }
    }
}

// ---- SiLU(gate) * up over [M, 2I] (gate | up) -> [M, I]; silu(g) = g / (1 + exp(-g)) as torch ---
void pd_silu_mul(const struct pd_silu_mul_args* a) {
    const float* gate_up = a->gate_up;
    float* out = a->out;
    int M = a->rows, I = a->width;
    for (int m = 0; m < M; m++) {
        const float* g = gate_up + (int64_t)m * 2 * I;
        const float* u = g + I;
        float* o = out + (int64_t)m * I;
        for (int i = 0; i < I; i += 16) {
            __mmask16 k = tail_mask(I - i);
            __m512 gv = _mm512_maskz_loadu_ps(k, g + i);
            __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
            _mm512_mask_storeu_ps(o + i, k, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(k, u + i)));
        }
    }
}

// ---- rotate-half RoPE in place on one head: x*cos + rotate_half(x)*sin ----------------------------
static void rope_head(float* x, const float* cos, const float* sin, int D) {
    int half = D / 2;
    float rotated[D];
    for (int i = 0; i < half; i++) {
        rotated[i] = x[i] * cos[i] + (-x[i + half]) * sin[i];
        rotated[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
    }
    for (int i = 0; i < D; i++) x[i] = rotated[i];
}

static inline float dot_ps(const float* a, const float* b, int D) {
    __m512 acc = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
    return _mm512_reduce_add_ps(acc);
}

// ---- one decode step of one layer's attention, reading the paged KV pool in place ------------------
//
// qkv [B, (H + 2*KVH) * D] is this step's projection (row stride qkv_stride). For sequence b: RoPE
// on its q and k heads, in place; k and v written to the pool at position ctx[b]-1; then each q
// head attends over positions [0, ctx[b]) of its KV head into out [B, H*D]. The layer's K and V are
// [num_blocks][block_size][KVH][D] views of the pool (k_cache, v_cache: block_stride floats between
// blocks); position j of sequence b is row j % block_size of block block_tables[b][j / block_size].
// Each sequence reads exactly its own context, K and V once, no copy, no padding, no mask.
// A task is one sequence and a range of its KV heads, so that it reads each position's row for
// those heads as one contiguous piece (a task per head would read 1/KVH of every row, strided:
// slower, docs/engine.md); sequences are split into head ranges only when there are fewer of them than
// twice the threads. D must be a multiple of 16 (cpu.py checks).
#define CHUNK PD_ATTENTION_CHUNK
void pd_decode_attention(const struct pd_decode_attention_args* a) {
    float *qkv = a->qkv, *k_cache = a->k_cache, *v_cache = a->v_cache, *scores = a->scores, *out = a->out;
    const float *cos = a->cos, *sin = a->sin;
    const int32_t *block_tables = a->block_tables, *ctx = a->context_lens;
    int64_t qkv_stride = a->qkv_stride, block_stride = a->block_stride, table_stride = a->table_stride;
    int block_size = a->block_size, B = a->batch, H = a->heads, KVH = a->kv_heads, D = a->head_dim;
    int threads = a->threads;
    float scale = a->scale;
    int G = H / KVH;
    int64_t row_stride = (int64_t)KVH * D;
    int splits = B >= 2 * threads ? 1 : (2 * threads + B - 1) / B;
    if (splits > KVH) splits = KVH;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int task = 0; task < B * splits; task++) {
        int b = task / splits, part = task % splits, n = ctx[b];
        int g0 = (int)((int64_t)KVH * part / splits), g1 = (int)((int64_t)KVH * (part + 1) / splits);
        int h0 = g0 * G, heads = (g1 - g0) * G, width = (g1 - g0) * D;
        const int32_t* table = block_tables + b * table_stride;
        float* row = qkv + b * qkv_stride;
        float* q = row + (int64_t)h0 * D;
        const float* c = cos + (int64_t)b * D;
        const float* s = sin + (int64_t)b * D;
        for (int h = 0; h < heads; h++) rope_head(q + (int64_t)h * D, c, s, D);
        for (int g = g0; g < g1; g++) rope_head(row + (int64_t)(H + g) * D, c, s, D);
#define AT(cache, j) ((cache) + table[(j) / block_size] * block_stride + ((j) % block_size) * row_stride + (int64_t)g0 * D)
        float* k_slot = AT(k_cache, n - 1);
        float* v_slot = AT(v_cache, n - 1);
        const float* k_new = row + (int64_t)(H + g0) * D;
        const float* v_new = row + (int64_t)(H + KVH + g0) * D;
        for (int i = 0; i < width; i++) {
            k_slot[i] = k_new[i];
            v_slot[i] = v_new[i];
        }
        // Online softmax over chunks of CHUNK positions (as flash-decoding does), so the scratch is
        // [H][CHUNK] per thread whatever the context: running max m, running sum l, and the
        // outputs o rescaled whenever the max grows.
        float* sc = scores + (int64_t)omp_get_thread_num() * H * CHUNK;
        float m[heads], l[heads];
        float* o = out + (int64_t)b * H * D + (int64_t)h0 * D;  // accumulated in place: [heads][D]
        for (int h = 0; h < heads; h++) m[h] = -INFINITY, l[h] = 0.0f;
        for (int i = 0; i < heads * D; i++) o[i] = 0.0f;
        for (int j0 = 0; j0 < n; j0 += CHUNK) {
            int len = n - j0 < CHUNK ? n - j0 : CHUNK;
            for (int j = 0; j < len; j++) {
                const float* kj = AT(k_cache, j0 + j);
                if (j0 + j + 2 < n) _mm_prefetch((const char*)AT(k_cache, j0 + j + 2), _MM_HINT_T0);
                for (int h = 0; h < heads; h++)
                    sc[h * CHUNK + j] = dot_ps(q + (int64_t)h * D, kj + (int64_t)(h / G) * D, D) * scale;
            }
            for (int h = 0; h < heads; h++) {
                float* p = sc + h * CHUNK;
                __m512 vmax = _mm512_set1_ps(-INFINITY);
                for (int j = 0; j < len; j += 16)
                    vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(vmax, tail_mask(len - j), p + j));
                float m_new = fmaxf(m[h], _mm512_reduce_max_ps(vmax));
                float alpha = m[h] == -INFINITY ? 0.0f : expf(m[h] - m_new);
                __m512 mx = _mm512_set1_ps(m_new);
                __m512 vsum = _mm512_setzero_ps();
                for (int j = 0; j < len; j += 16) {
                    __mmask16 k = tail_mask(len - j);
                    __m512 e = _mm512_maskz_mov_ps(k, exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, p + j), mx)));
                    vsum = _mm512_add_ps(vsum, e);
                    _mm512_mask_storeu_ps(p + j, k, e);
                }
                l[h] = l[h] * alpha + _mm512_reduce_add_ps(vsum);
                m[h] = m_new;
                if (alpha != 1.0f)
                    for (int d = 0; d < D; d++) o[h * D + d] *= alpha;
            }
            for (int j = 0; j < len; j++) {
                const float* vj = AT(v_cache, j0 + j);
                if (j0 + j + 2 < n) _mm_prefetch((const char*)AT(v_cache, j0 + j + 2), _MM_HINT_T0);
                for (int h = 0; h < heads; h++) {
                    __m512 pj = _mm512_set1_ps(sc[h * CHUNK + j]);
                    const float* vh = vj + (int64_t)(h / G) * D;
                    float* oh = o + (int64_t)h * D;
                    for (int d = 0; d < D; d += 16)
                        _mm512_storeu_ps(oh + d, _mm512_fmadd_ps(pj, _mm512_loadu_ps(vh + d), _mm512_loadu_ps(oh + d)));
                }
            }
        }
        for (int h = 0; h < heads; h++) {
            float inv = 1.0f / l[h];
            for (int d = 0; d < D; d++) o[h * D + d] *= inv;
        }
#undef AT
    }
}

int64_t pd_args_size(const char* name) {
    if (!strcmp(name, "pd_linear_args")) return sizeof(struct pd_linear_args);
    if (!strcmp(name, "pd_add_rms_norm_args")) return sizeof(struct pd_add_rms_norm_args);
    if (!strcmp(name, "pd_silu_mul_args")) return sizeof(struct pd_silu_mul_args);
    if (!strcmp(name, "pd_decode_attention_args")) return sizeof(struct pd_decode_attention_args);
    return -1;
}
