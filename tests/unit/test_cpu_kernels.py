"""pdserve's CPU decode kernels (services/engine/kernels/cpu_kernels.c) against the torch ops they
replace, their interface (the header-built ctypes structures and the argument checks), and an
engine on the cpu-kernels backend against one on the torch backend, K/V pool included.
(The whole-model check against transformers is test_engine_exact.py, which runs both backends.)"""

import random
import shutil

import pytest
import torch
import torch.nn.functional as F

from services.engine.backends import choose_backend
from services.engine.config import EngineConfig, SamplingParams
from services.engine.engine import Engine
from services.engine.kernels import cpu
from services.engine.layers.rotary import apply_rope
from services.engine.sequence import Sequence
from services.tiny_models import get_model

KERNELS = cpu.load()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="the CPU kernels cannot be built here")


def test_kernels_build_wherever_they_can():
    """On an AVX-512 machine with a C compiler (CI's), the kernels must build and load: a build
    error would otherwise only show as a slower engine."""
    if cpu.unavailable_reason() is not None or cpu.compiler() is None:
        pytest.skip(f"not buildable here: {cpu.unavailable_reason() or 'no C compiler'}")
    assert KERNELS is not None
    assert KERNELS.path.exists() and KERNELS.path.parent.name == "kernels"


@needs_kernels
@pytest.mark.parametrize("rows", [1, 3, 15, 16, 17, 31, 32])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_f_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(100, 72, generator=g)  # 100 outputs: the last tile is partly padding
    b = torch.randn(100, generator=g) if bias else None
    wide = torch.randn(rows, 90, generator=g)
    x = wide[:, 5:77]  # rows not contiguous with each other: the kernel honours the row stride
    out = KERNELS.linear(weight, b)(x)
    torch.testing.assert_close(out, F.linear(x, weight, b), atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("with_residual", [False, True])
def test_add_rms_norm_matches_torch(with_residual):
    g = torch.Generator().manual_seed(0)
    x, residual, weight = torch.randn(9, 72, generator=g), torch.randn(9, 72, generator=g), torch.randn(72, generator=g)
    total = x + residual if with_residual else x
    out, new_residual = KERNELS.rms_norm(weight, 1e-6)(x, residual.clone() if with_residual else None)
    torch.testing.assert_close(out, F.rms_norm(total, (72,), weight, 1e-6), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(new_residual, total, atol=0, rtol=0)


@needs_kernels
def test_silu_mul_matches_torch_including_saturation():
    g = torch.Generator().manual_seed(0)
    gate_up = torch.randn(5, 2 * 40, generator=g) * 4
    gate_up[0, :6] = torch.tensor([-200.0, -90.0, -20.0, 20.0, 90.0, 200.0])
    gate, up = gate_up.split(40, dim=-1)
    torch.testing.assert_close(KERNELS.silu_mul(gate_up), F.silu(gate) * up, atol=1e-6, rtol=1e-5)


def _reference_step(qkv, cos, sin, pool, layer, tables, lens, heads, kv_heads, head_dim):
    """What the kernel must do, in torch: RoPE, write K/V at position len-1 of the paged pool
    [blocks, layers, 2, block_size, KVH, D], attend over [0, len)."""
    batch, block_size = qkv.shape[0], pool.shape[3]
    q = qkv[:, : heads * head_dim].view(batch, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(batch, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(batch, kv_heads, head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    pool = pool.clone()
    outs = []
    for b, n in enumerate(lens.tolist()):
        block, row = tables[b][(n - 1) // block_size], (n - 1) % block_size
        pool[block, layer, 0, row], pool[block, layer, 1, row] = k[b], v[b]
        blocks = tables[b][: -(-n // block_size)]
        kv = pool[blocks, layer].transpose(0, 1).flatten(1, 2)[:, :n]  # [2, n, KVH, D]
        o = F.scaled_dot_product_attention(
            q[b].unsqueeze(1), kv[0].transpose(0, 1), kv[1].transpose(0, 1), scale=head_dim**-0.5, enable_gqa=True
        )
        outs.append(o.reshape(-1))
    return torch.stack(outs), pool, q


@needs_kernels
@pytest.mark.parametrize("batch", [6, 1])  # 1: the sequence is split over KV-head ranges between threads
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 16), (8, 2, 64), (8, 1, 32), (4, 2, 128)])
def test_paged_decode_attention_matches_sdpa(heads, kv_heads, head_dim, batch):
    """Sequences in scattered blocks of the pool, of lengths from 1 (only the token written now)
    to several blocks and past the kernel's softmax chunk (600 positions: 3 chunks, rescaled as the
    running maximum grows), on the middle one of 3 layers."""
    g = torch.Generator().manual_seed(heads * head_dim)
    lens = torch.tensor([600, 1, 33, 257, 17, 2][:batch], dtype=torch.int32)
    block_size, layers, layer, width = 16, 3, 1, 38
    pool = torch.randn(6 * width, layers, 2, block_size, kv_heads, head_dim, generator=g)
    order = torch.randperm(6 * width, generator=g).tolist()
    tables = [order[i * width : (i + 1) * width] for i in range(len(lens))]
    qkv = torch.randn(len(lens), (heads + 2 * kv_heads) * head_dim, generator=g)
    cos, sin = torch.randn(len(lens), head_dim, generator=g), torch.randn(len(lens), head_dim, generator=g)
    expected, expected_pool, q = _reference_step(qkv, cos, sin, pool, layer, tables, lens, heads, kv_heads, head_dim)

    step = KERNELS.attention_step(
        cos,
        sin,
        torch.tensor(tables, dtype=torch.int32),
        lens,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        scale=head_dim**-0.5,
    )
    out = step(qkv, pool[:, layer, 0], pool[:, layer, 1])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool, expected_pool, atol=0, rtol=0)  # K/V written, nothing else touched
    torch.testing.assert_close(qkv[:, : heads * head_dim].view(len(lens), heads, head_dim), q, atol=0, rtol=0)


def test_engine_with_kernels_equals_torch_path_including_the_kv_pool():
    """Sequences join and leave a decode batch on two engines, one per path: the same tokens, logits
    within 1e-4, and the same K/V in the paged pool (which transfers and preemption read)."""
    if KERNELS is None:
        pytest.skip("the CPU kernels cannot be built here")
    engines = [
        Engine(
            get_model("qwen3"), EngineConfig(dtype="float32", block_size=8, kv_cache_bytes=16 << 20, backend=backend)
        )
        for backend in ("cpu-kernels", "torch")
    ]
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 1000) for _ in range(n)] for n in (5, 40, 1, 23, 60, 9)]
    running: list[list[Sequence]] = [[], []]
    for step in range(30):
        if step % 5 == 0 and prompts:
            prompt = prompts.pop()
            for engine, batch in zip(engines, running):
                seq = Sequence.from_prompt(f"s{step}", list(prompt), SamplingParams(max_tokens=100, temperature=0))
                engine.prefill([seq])
                batch.append(seq)
        if step == 17:  # one leaves mid-way
            for engine, batch in zip(engines, running):
                engine.free(batch.pop(1))
        outs = [engine.decode_step(batch) for engine, batch in zip(engines, running)]
        assert [o.token_id for o in outs[0]] == [o.token_id for o in outs[1]]
        torch.testing.assert_close(engines[0].last_logits, engines[1].last_logits, atol=1e-4, rtol=0)

    def kv_of(engine, seq):  # pool [blocks, layers, 2, block_size, KVH, D] -> [layers, 2, tokens, KVH, D]
        n = len(seq.token_ids) - 1  # written so far (the last token's K/V comes with the next step)
        return engine.kv_pool.tensor[seq.block_table].permute(1, 2, 0, 3, 4, 5).flatten(2, 3)[:, :, :n]

    for a, b in zip(*running):
        assert a.block_table == b.block_table
        torch.testing.assert_close(kv_of(engines[0], a), kv_of(engines[1], b), atol=1e-5, rtol=1e-5)
    for engine in engines:
        engine.close()


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("PDSERVE_CPU_KERNELS", "0")
    assert cpu.unavailable_reason() == "disabled by PDSERVE_CPU_KERNELS=0"


def test_missing_compiler_is_reported_not_raised(monkeypatch, caplog):
    """No compiler: load() says why and returns None; "auto" then chooses the torch backend, and
    asking for the kernels by name is an error that says why."""
    if cpu.unavailable_reason() is not None:
        pytest.skip(cpu.unavailable_reason())
    monkeypatch.setenv("CC", "/nonexistent/cc")
    cpu.load.cache_clear()
    try:
        assert shutil.which("/nonexistent/cc") is None
        assert cpu.load() is None
        assert "no C compiler" in caplog.text
        assert choose_backend(EngineConfig(), head_dim=64) == "torch"
        with pytest.raises(ValueError, match="'cpu-kernels' cannot run here"):
            choose_backend(EngineConfig(backend="cpu-kernels"), head_dim=64)
    finally:
        monkeypatch.undo()
        cpu.load.cache_clear()


@needs_kernels
def test_linear_keeps_float32_precision_over_a_long_k():
    """K = 14336 (Llama-3-8B's down_proj): against float64, no worse than a few times F.linear's
    error (one serial sum over all of K was ~12x worse)."""
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(64, 14336, generator=g) * 0.02, torch.randn(16, 14336, generator=g)
    exact = x.double() @ weight.double().T
    ours = (KERNELS.linear(weight, None)(x).double() - exact).abs().max().item()
    torch_error = (F.linear(x, weight).double() - exact).abs().max().item()
    assert ours <= 3 * torch_error, f"kernel error {ours:.2e}, F.linear's {torch_error:.2e}"


@needs_kernels
def test_nan_propagates_like_torch():
    """A NaN in a score or a gate must come out as NaN (a numerical fault shows), not as e^-87."""
    gate_up = torch.ones(1, 32)
    gate_up[0, 3] = float("nan")
    assert torch.isnan(KERNELS.silu_mul(gate_up)[0, 3])
    heads, kv_heads, head_dim = 2, 1, 16
    pool = torch.randn(2, 1, 2, 16, kv_heads, head_dim)
    pool[1, 0, 0, 2, 0, 5] = float("nan")  # one key position
    qkv = torch.randn(1, (heads + 2 * kv_heads) * head_dim)
    cos, sin = torch.ones(1, head_dim), torch.zeros(1, head_dim)
    step = KERNELS.attention_step(
        cos,
        sin,
        torch.tensor([[1]], dtype=torch.int32),
        torch.tensor([5], dtype=torch.int32),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        scale=0.25,
    )
    out = step(qkv, pool[:, 0, 0], pool[:, 0, 1])
    assert torch.isnan(out).all()


def test_compiler_from_cc_with_arguments(monkeypatch):
    """CC="ccache gcc" or "gcc -O2" names a compiler plus arguments, as in make."""
    monkeypatch.setenv("CC", "sh -e")
    assert cpu.compiler() == [shutil.which("sh"), "-e"]
    monkeypatch.setenv("CC", "/nonexistent/cc -O2")
    assert cpu.compiler() is None


def test_the_argument_structs_come_from_the_header():
    """cpu.py builds its ctypes structures from cpu_kernels.h; the loaded library confirms their
    sizes (CpuKernels raises on a mismatch). A type the reader cannot map is refused by name."""
    structs, constants = cpu.read_header(cpu.HEADER.read_text())
    assert set(structs) == {"pd_linear_args", "pd_add_rms_norm_args", "pd_silu_mul_args", "pd_decode_attention_args"}
    fields = [name for name, _ in structs["pd_decode_attention_args"]._fields_]
    assert fields[:3] == ["qkv", "qkv_stride", "cos"] and len(fields) == 19
    assert constants["PD_ATTENTION_CHUNK"] == cpu.ATTENTION_CHUNK == 256
    with pytest.raises(ValueError, match=r"pd_x_args.n has type 'double'"):
        cpu.read_header("struct pd_x_args {\n    double n;\n};")
    with pytest.raises(ValueError, match=r"cannot read 'int32_t a, b;'"):  # not silently skipped
        cpu.read_header("struct pd_x_args {\n    int32_t a, b;  // two at once\n};")


@needs_kernels
def test_wrong_arguments_raise_before_the_call():
    """The wrappers check dtype, shape and layout: a mismatch is a ValueError, not a wild read."""
    linear = KERNELS.linear(torch.randn(32, 64), None)
    with pytest.raises(ValueError, match="x must be float32"):
        linear(torch.randn(4, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x must be float32 \[rows, 64\]"):
        linear(torch.randn(4, 48))
    with pytest.raises(ValueError, match="bias must be contiguous float32"):
        KERNELS.linear(torch.randn(32, 64), torch.randn(31))
    with pytest.raises(ValueError, match="x and residual must be contiguous"):
        KERNELS.rms_norm(torch.ones(64), 1e-6)(torch.randn(3, 64), torch.randn(3, 32))
    pool = torch.randn(4, 1, 2, 16, 2, 32)
    qkv = torch.randn(2, (4 + 2 * 2) * 32)
    step_args = dict(
        cos=torch.ones(2, 32),
        sin=torch.zeros(2, 32),
        block_tables=torch.zeros(2, 1, dtype=torch.int32),
        context_lens=torch.ones(2, dtype=torch.int32),
    )
    heads = dict(num_heads=4, num_kv_heads=2, head_dim=32, scale=0.1)
    step = KERNELS.attention_step(**step_args, **heads)
    step(qkv, pool[:, 0, 0], pool[:, 0, 1])  # well-formed
    with pytest.raises(ValueError, match="block_tables must be int32"):
        KERNELS.attention_step(**{**step_args, "block_tables": torch.zeros(2, 1, dtype=torch.int64)}, **heads)
    with pytest.raises(ValueError, match="qkv must be float32"):
        step(qkv[:, :-32], pool[:, 0, 0], pool[:, 0, 1])
    with pytest.raises(ValueError, match="k_cache/v_cache"):
        step(qkv, pool[:, 0, 0, :, :1], pool[:, 0, 1])
