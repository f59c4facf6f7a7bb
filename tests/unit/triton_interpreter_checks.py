"""Checks of the CUDA Triton kernels against the torch reference ops, run on CPU by Triton's
interpreter (TRITON_INTERPRET=1) from test_engine_parts.py. Prints {check: [error, scale]} as JSON."""

import json

import torch

from services.engine.backends.reference import decode_attention, write_kv
from services.engine.kernels import triton_fused as tf
from services.engine.kernels.triton_attention import paged_decode_attention
from services.engine.layers.norm import RMSNorm
from services.engine.layers.rotary import apply_rope


def slot_indices(slots: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    return slots // block_size, slots % block_size


def check_paged_attention():
    worst = 0.0
    for heads, kv_heads, dim, bs in [(4, 2, 16, 16), (8, 1, 32, 16), (32, 8, 128, 16), (6, 2, 80, 8)]:
        pool = torch.randn(40, 2, 2, bs, kv_heads, dim)
        k, v = pool[:, 1, 0], pool[:, 1, 1]
        ctx = torch.tensor([1, 17, 63, 100, 5], dtype=torch.int32)
        perm, tables, used = torch.randperm(40), torch.zeros(5, 13, dtype=torch.int32), 0
        for b in range(5):
            n = -(-int(ctx[b]) // bs)
            tables[b, :n] = perm[used : used + n]
            used += n
        q = torch.randn(5, heads, dim)
        out = paged_decode_attention(q, k, v, tables, ctx, dim**-0.5)
        ref = decode_attention(q, k, v, tables, ctx, int(ctx.max()), dim**-0.5)
        worst = max(worst, (out - ref).abs().max().item())
    return {"paged_attention float32": (worst, 1.0)}


def _diff(a, b):
    return ((a.float() - b.float()).abs().max().item(), b.float().abs().max().item())


def check_fused():
    """Each fused kernel against the torch ops it replaces, in float32 and bfloat16."""
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[-1]
        norm = RMSNorm(96, 1e-6).to(dtype)
        norm.weight.data = torch.randn(96).to(dtype)
        x, r = torch.randn(5, 96).to(dtype), torch.randn(5, 96).to(dtype)
        ref_residual = x + r
        residual = r.clone()
        out = tf.add_rms_norm(x, residual, norm.weight, 1e-6)
        results[f"add_rms_norm {name}"] = _diff(out, norm(ref_residual))
        results[f"add_rms_norm residual {name}"] = _diff(residual, ref_residual)
        results[f"rms_norm {name}"] = _diff(tf.add_rms_norm(x, None, norm.weight, 1e-6), norm(x))

        # q/k/v are strided views of one qkv projection, as in the model
        tokens, heads, kv_heads, dim, block_size = 7, 6, 2, 32, 4
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim).to(dtype)
        q, k, v = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        q, k, v = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim), v.view(tokens, kv_heads, dim)
        positions = torch.tensor([0, 1, 2, 3, 10, 11, 50])
        slots = torch.tensor([4, 5, 6, 7, 20, 21, 33])
        cos, sin = torch.randn(64, dim), torch.randn(64, dim)
        cos[:, dim // 2 :], sin[:, dim // 2 :] = cos[:, : dim // 2], sin[:, : dim // 2]
        pool = torch.zeros(12, 2, 2, block_size, kv_heads, dim, dtype=dtype)
        pool_ref = pool.clone()
        c, s = cos[positions].to(dtype), sin[positions].to(dtype)
        q_ref, k_ref = apply_rope(q.clone(), c, s), apply_rope(k.clone(), c, s)
        write_kv(pool_ref[:, 1, 0], pool_ref[:, 1, 1], k_ref, v, *slot_indices(slots, block_size))
        tf.rope_and_write_kv(q, k, v, cos, sin, positions, slots, pool[:, 1, 0], pool[:, 1, 1])
        results[f"rope q {name}"] = _diff(q, q_ref)
        results[f"rope k {name}"] = _diff(k, k_ref)
        results[f"kv write {name}"] = _diff(pool, pool_ref)

        gate_up = torch.randn(3, 2 * 80).to(dtype)
        gate, up = gate_up.split(80, -1)
        results[f"silu_and_mul {name}"] = _diff(tf.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up)
    return results


if __name__ == "__main__":
    torch.manual_seed(0)
    results = {**check_paged_attention(), **check_fused()}
    print(json.dumps(results))
