"""pdserve's CPU decode kernels (cpu_kernels.c): built on first use with the machine's C compiler,
loaded with ctypes.

Why: a float32 decode step on CPU is memory bound, and the library kernels leave bandwidth unused
at decode shapes. Measured on the CI machine (2 Sapphire Rapids cores, llama-50m, batch 16):
oneDNN's packed GEMM runs the model's 33 linear layers in ~11 ms where the weights alone would
stream in ~6; SDPA spends ~0.7 ms a layer on 9.5 MB of K/V; and each RMSNorm, RoPE or SiLU is a
few small torch ops at several microseconds apiece. The kernels here are a prefetching skinny GEMM
(`linear`), one fused call per layer for RoPE + K/V write + attention reading each sequence's
exact context from the paged pool in place (`paged_decode_attention`), and fused residual-add +
RMSNorm and SiLU-and-multiply. Reading the pool in place (rather than a dense copy of the batch's
K/V, as the torch path's cpu_kv_mirror.py keeps) costs the same per step and needs no extra memory,
no gather when a sequence joins, and no size limit.

They are float32 only, need AVX-512 (x86-64) and a C compiler with OpenMP (`cc`, or $CC), and
compile in about a second into $PDSERVE_CACHE/kernels (keyed by source, flags and CPU). Where any
of that is missing, or with PDSERVE_CPU_KERNELS=0 or EngineConfig(cpu_kernels=False), the engine
runs the torch path, which stays the reference: tests check the kernels against it and against
transformers. OpenMP: the library links `libgomp.so.1`, which resolves to the copy torch already
loaded, so both share one thread pool (two pools spinning on two cores would halve both); a torch
built on another OpenMP runtime would bring a second pool.

Limits: the wrappers trust their callers (float32, contiguous rows, head_dim a multiple of 16: the
model checks these once, not per call). Attention splits a sequence over at most its KV heads, so
a single sequence with one KV head attends on one core: right for two cores, wasteful on many.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
# At most this many rows use the skinny GEMM; prefill-sized inputs use oneDNN, which blocks for
# reuse (measured crossover between 32 and 64 rows on the 50M model's layers).
MAX_LINEAR_ROWS = 32
ATTENTION_CHUNK = 256  # CHUNK in cpu_kernels.c: positions per step of the online softmax

_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_I = ctypes.c_int
_F = ctypes.c_float


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class CpuKernels:
    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        self._linear = lib.pd_linear
        self._linear.argtypes = [_P, _I64, _I, _I, _P, _I, _P, _P, _I]
        self._add_rms_norm = lib.pd_add_rms_norm
        self._add_rms_norm.argtypes = [_P, _P, _P, _P, _I, _I, _F]
        self._silu_mul = lib.pd_silu_mul
        self._silu_mul.argtypes = [_P, _P, _I, _I]
        self._attention = lib.pd_paged_decode_attention
        self._attention.argtypes = [_P, _I64, _P, _P, _P, _P, _I64, _I, _P, _I64, _P,
                                    _I, _I, _I, _I, _F, _P, _P, _I]
        for f in (self._linear, self._add_rms_norm, self._silu_mul, self._attention):
            f.restype = None

    @staticmethod
    def pack_linear(weight: torch.Tensor) -> torch.Tensor:
        """[N, K] -> [ceil(N/16), K, 16]: 16 output columns per tile, zero padded."""
        n, k = weight.shape
        tiles = -(-n // 16)
        padded = torch.zeros(tiles * 16, k, dtype=torch.float32)
        padded[:n] = weight.detach().float()
        return padded.view(tiles, 16, k).transpose(1, 2).contiguous()

    def linear(self, x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
        """x [M, K] (rows contiguous, M <= MAX_LINEAR_ROWS) -> [M, out_features]."""
        if x.stride(-1) != 1:
            x = x.contiguous()
        rows, k = x.shape
        y = torch.empty(rows, out_features, dtype=torch.float32)
        self._linear(x.data_ptr(), x.stride(0), rows, k, packed.data_ptr(), out_features, _ptr(bias),
                     y.data_ptr(), torch.get_num_threads())
        return y

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual), the sum written into `residual` in place; with
        residual None, (RMSNorm(x), x). x and residual are contiguous [M, H]."""
        out = torch.empty_like(x)
        self._add_rms_norm(x.data_ptr(), _ptr(residual), weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps)
        return out, (x if residual is None else residual)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        rows, width = gate_up.shape
        out = torch.empty(rows, width // 2, dtype=torch.float32)
        self._silu_mul(gate_up.data_ptr(), out.data_ptr(), rows, width // 2)
        return out

    def paged_decode_attention(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                               v_cache: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                               num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> torch.Tensor:
        """One layer's decode attention over the paged pool (pd_paged_decode_attention in
        cpu_kernels.c): RoPE on q and k in place in qkv [B, (H + 2*KVH) * D], this step's K/V
        written at position context_lens[b]-1, attention over [0, context_lens[b]).
        k_cache/v_cache: the layer's [num_blocks, block_size, KVH, D] views of the pool;
        block_tables int32 [B, >= max blocks]; context_lens int32 [B]. Returns [B, H * D]."""
        batch = qkv.shape[0]
        threads = torch.get_num_threads()
        scores = torch.empty(threads, num_heads, ATTENTION_CHUNK, dtype=torch.float32)
        out = torch.empty(batch, num_heads * head_dim, dtype=torch.float32)
        self._attention(qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(),
                        k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0), k_cache.shape[1],
                        block_tables.data_ptr(), block_tables.stride(0), context_lens.data_ptr(),
                        batch, num_heads, num_kv_heads, head_dim, scale, scores.data_ptr(), out.data_ptr(), threads)
        return out

    @staticmethod
    def supports_attention(head_dim: int) -> bool:
        return head_dim % 16 == 0


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor()
    model = next((line for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    return model + flags


def _unavailable_reason() -> str | None:
    if os.environ.get("PDSERVE_CPU_KERNELS", "1") == "0":
        return "disabled by PDSERVE_CPU_KERNELS=0"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"needs x86-64, this is {platform.machine()}"
    if " avx512f" not in _cpu_signature():
        return "this CPU has no AVX-512"
    return None


def _compiler() -> list[str] | None:
    """$CC split like a shell would ("ccache gcc" is two words), or cc; None when not found."""
    words = shlex.split(os.environ.get("CC", "cc")) or ["cc"]
    found = shutil.which(words[0])
    return [found, *words[1:]] if found else None


BUILDING_PREFIX = "building-"
STALE_BUILD_SECONDS = 600


def _build(cc: list[str]) -> Path:
    from .testmodels import cache_dir

    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join([*cc, *FLAGS]).encode() + _cpu_signature().encode()).hexdigest()[:16]
    folder = Path(cache_dir()) / "kernels"
    path = folder / f"cpu_kernels-{key}.so"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(BUILDING_PREFIX + "*"):  # left by a process killed while building
        try:
            if time.time() - old.stat().st_mtime > STALE_BUILD_SECONDS:
                old.unlink()
        except OSError:
            pass
    fd, tmp = tempfile.mkstemp(prefix=BUILDING_PREFIX, suffix=".so", dir=folder)
    os.close(fd)
    try:
        subprocess.run([*cc, *FLAGS, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True, timeout=120)
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would keep other users of a shared cache out
        os.replace(tmp, path)  # atomic: workers building at once each load a whole library
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@functools.cache
def load() -> CpuKernels | None:
    """The kernels, or None (logged once, with the reason) when they cannot be used here. Decided
    once per process: PDSERVE_CPU_KERNELS and CC are read at the first call."""
    reason = _unavailable_reason()
    cc = _compiler() if reason is None else None
    if reason is None and cc is None:
        reason = "no C compiler (install gcc, or set CC)"
    if reason is None:
        try:
            path = _build(cc)
            return CpuKernels(ctypes.CDLL(str(path)), path)
        except subprocess.CalledProcessError as e:
            reason = f"building them failed: {e.stderr.strip()[-500:]}"
        except (OSError, subprocess.TimeoutExpired) as e:
            reason = f"building or loading them failed: {e}"
    log.warning("CPU decode kernels unavailable (%s); using the torch path, which is slower", reason)
    return None
