// pdserve's CPU decode kernels (float32, AVX-512): their interface. cpu_kernels.c implements it;
// kernels/cpu.py reads this file to build the matching ctypes structures and checks their sizes
// against pd_args_size at load, so the two sides cannot drift apart. Every kernel takes one
// argument struct. Field types are limited to what cpu.py maps: float*, const float*,
// const int32_t*, int64_t, int32_t and float.
#ifndef PDSERVE_CPU_KERNELS_H
#define PDSERVE_CPU_KERNELS_H
#include <stdint.h>

// y[rows, n] = x[rows, k] @ W^T + bias, W packed by pack_linear as [ceil(n/16)][k][16].
struct pd_linear_args {
    const float* x;  // rows of k floats, x_stride floats apart
    int64_t x_stride;
    int32_t rows;
    int32_t k;
    const float* packed;
    int32_t n;
    const float* bias;  // [n], or NULL
    float* y;  // [rows, n], contiguous
    int32_t threads;
};

// out = weight * (r * rsqrt(mean(r^2) + eps)) per row, r = x + residual (written back to residual)
// or r = x when residual is NULL.
struct pd_add_rms_norm_args {
    const float* x;  // [rows, hidden], contiguous
    float* residual;  // [rows, hidden], or NULL
    const float* weight;  // [hidden]
    float* out;  // [rows, hidden]
    int32_t rows;
    int32_t hidden;
    float eps;
};

// out[rows, width] = silu(gate) * up, gate_up [rows, 2 * width] = (gate | up).
struct pd_silu_mul_args {
    const float* gate_up;
    float* out;
    int32_t rows;
    int32_t width;
};

// One decode step of one layer: RoPE on q and k in place in qkv, this step's K/V written to the
// paged pool at position context_lens[b] - 1, attention of each query head over positions
// [0, context_lens[b]) of its KV head.
struct pd_decode_attention_args {
    float* qkv;  // [batch, (heads + 2 * kv_heads) * head_dim], rows qkv_stride floats apart
    int64_t qkv_stride;
    const float* cos;  // [batch, head_dim]: RoPE of each sequence's position
    const float* sin;
    float* k_cache;  // the layer's K: [num_blocks][block_size][kv_heads][head_dim], block_stride apart
    float* v_cache;
    int64_t block_stride;
    int32_t block_size;
    const int32_t* block_tables;  // [batch, table_stride]
    int64_t table_stride;
    const int32_t* context_lens;  // [batch], >= 1
    int32_t batch;
    int32_t heads;
    int32_t kv_heads;
    int32_t head_dim;  // a multiple of 16
    float scale;
    float* scores;  // scratch: [threads][heads][PD_ATTENTION_CHUNK]
    float* out;  // [batch, heads * head_dim]
    int32_t threads;
};

#define PD_ATTENTION_CHUNK 256  // positions per step of the online softmax

void pd_linear(const struct pd_linear_args* a);
void pd_add_rms_norm(const struct pd_add_rms_norm_args* a);
void pd_silu_mul(const struct pd_silu_mul_args* a);
void pd_decode_attention(const struct pd_decode_attention_args* a);
int64_t pd_args_size(const char* struct_name);  // sizeof the named struct, -1 if unknown

#endif
