"""pdserve's CPU decode kernels (cpu_kernels.c, interface cpu_kernels.h): built on first use with
the machine's C compiler, loaded with ctypes.

A float32 decode step on CPU is memory bound, and the library kernels leave bandwidth unused at
decode shapes (docs/engine.md has the measurements). The kernels here are a prefetching skinny
GEMM (`linear`), one fused call per layer for RoPE + K/V write + attention reading each sequence's
exact context from the paged pool in place (`attention_step`), and fused residual-add + RMSNorm
and SiLU-and-multiply.

Every kernel takes one argument struct declared in cpu_kernels.h; this module builds the ctypes
structures from that header (so the field lists exist once) and compares their sizes with the C
compiler's when it loads the library. The wrappers check their tensors' dtype, shape and layout
before the call, so a caller's mix-up raises here; the values (block ids, context lengths) are the
runner's and are trusted.

They are float32 only, need AVX-512 (x86-64) and a C compiler with OpenMP (`cc`, or $CC), and
compile in about a second into $PDSERVE_CACHE/kernels (keyed by source, header, flags and CPU).
Where any of that is missing, or with PDSERVE_CPU_KERNELS=0, `load()` returns None and the engine
runs the torch backend, which stays the reference: tests check the kernels against it and against
transformers. OpenMP: the library links `libgomp.so.1`, which resolves to the copy torch already
loaded, so both share one thread pool (two pools spinning on two cores would halve both); a torch
built on another OpenMP runtime would bring a second pool.

Limits: attention splits a sequence over at most its KV heads, so a single sequence with one KV
head attends on one core: right for two cores, wasteful on many.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from services.common.arith import ceil_div
from services.common.paths import cache_dir

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
HEADER = Path(__file__).with_name("cpu_kernels.h")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
# At most this many rows use the skinny GEMM; prefill-sized inputs use oneDNN, which blocks for
# reuse (the crossover, measured, is between 32 and 64 rows).
MAX_LINEAR_ROWS = 32
TILE = 16  # output columns per packed weight tile


# ---- the interface, read from cpu_kernels.h ------------------------------------------------------
_C_TYPES = {
    "float*": ctypes.c_void_p,
    "const float*": ctypes.c_void_p,
    "const int32_t*": ctypes.c_void_p,
    "int64_t": ctypes.c_int64,
    "int32_t": ctypes.c_int32,
    "float": ctypes.c_float,
}
_STRUCT = re.compile(r"struct (pd_\w+_args) \{(.*?)\};", re.S)
_FIELD = re.compile(r"((?:const )?\w+\*?) (\w+);")
_DEFINE = re.compile(r"#define (PD_\w+) (\d+)")


def read_header(text: str) -> tuple[dict[str, type[ctypes.Structure]], dict[str, int]]:
    """The argument structs of cpu_kernels.h as ctypes structures, and its integer constants."""
    structs = {}
    for name, body in _STRUCT.findall(text):
        fields = []
        for line in re.sub(r"//.*", "", body).splitlines():
            if not line.strip():
                continue
            match = _FIELD.fullmatch(line.strip())  # one field per line, as `type name;`
            if match is None:
                raise ValueError(f"cpu_kernels.h: {name}: cannot read {line.strip()!r} (one `type name;` a line)")
            c_type, field = match.groups()
            if c_type not in _C_TYPES:
                raise ValueError(
                    f"cpu_kernels.h: {name}.{field} has type {c_type!r}; cpu.py maps {', '.join(_C_TYPES)}"
                )
            fields.append((field, _C_TYPES[c_type]))
        structs[name] = type(name, (ctypes.Structure,), {"_fields_": fields})
    return structs, {name: int(value) for name, value in _DEFINE.findall(text)}


_ARGS, _CONSTANTS = read_header(HEADER.read_text())
ATTENTION_CHUNK = _CONSTANTS["PD_ATTENTION_CHUNK"]


def _fail(message: str) -> None:
    raise ValueError(f"cpu kernels: {message}")


def _check_rows(name: str, t: torch.Tensor, width: int) -> None:
    """float32 [rows, width] with contiguous rows."""
    if t.dtype is not torch.float32 or t.dim() != 2 or t.shape[1] != width or t.stride(1) != 1:
        _fail(
            f"{name} must be float32 [rows, {width}] with contiguous rows, got {t.dtype} {tuple(t.shape)} "
            f"strides {t.stride()}"
        )


class CpuKernels:
    """The loaded library; one instance per process (`load()`).

    What stays the same from call to call is checked and written into a kernel's argument struct
    once: a linear layer's packed weight (`linear`), a norm's weight (`rms_norm`), a decode step's
    positions and block tables (`attention_step`). Each call then checks only the tensors it brings.
    These prepared kernels reuse their struct: one call at a time (the engine thread's)."""

    def __init__(self, lib: ctypes.CDLL, path: Path):
        self.path = path
        self._fns = {}
        for name in ("pd_linear", "pd_add_rms_norm", "pd_silu_mul", "pd_decode_attention"):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = [ctypes.POINTER(_ARGS[name + "_args"])], None
            self._fns[name] = fn
        size_of = lib.pd_args_size
        size_of.argtypes, size_of.restype = [ctypes.c_char_p], ctypes.c_int64
        for struct_name, struct in _ARGS.items():
            c_size, py_size = size_of(struct_name.encode()), ctypes.sizeof(struct)
            if c_size != py_size:
                raise OSError(f"{path}: struct {struct_name} is {c_size} bytes in C, {py_size} in ctypes")

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearKernel:
        return LinearKernel(self._fns["pd_linear"], weight, bias)

    def rms_norm(self, weight: torch.Tensor, eps: float) -> RmsNormKernel:
        return RmsNormKernel(self._fns["pd_add_rms_norm"], weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """SiLU(gate) * up of gate_up [M, 2I] = (gate | up) -> [M, I]."""
        if (
            gate_up.dtype is not torch.float32
            or gate_up.dim() != 2
            or gate_up.shape[1] % 2
            or not gate_up.is_contiguous()
        ):
            _fail(f"gate_up must be contiguous float32 [rows, 2 * width], got {gate_up.dtype} {tuple(gate_up.shape)}")
        rows, width = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(rows, width, dtype=torch.float32)
        self._fns["pd_silu_mul"](_ARGS["pd_silu_mul_args"](gate_up.data_ptr(), out.data_ptr(), rows, width))
        return out

    def attention_step(
        self,
        cos: torch.Tensor,
        sin: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
    ) -> AttentionStep:
        return AttentionStep(
            self._fns["pd_decode_attention"],
            cos,
            sin,
            block_tables,
            context_lens,
            num_heads,
            num_kv_heads,
            head_dim,
            scale,
        )

    @staticmethod
    def supports_attention(head_dim: int) -> bool:
        return head_dim % 16 == 0


class LinearKernel:
    """x [M, K] -> x @ weight.T + bias [M, N] (pd_linear), the weight packed once into 16-column
    tiles ([ceil(N/16), K, 16], zero padded) so that each tile is one contiguous stream."""

    def __init__(self, fn, weight: torch.Tensor, bias: torch.Tensor | None):
        n, k = weight.shape
        if bias is not None and (bias.dtype is not torch.float32 or bias.shape != (n,) or not bias.is_contiguous()):
            _fail(f"bias must be contiguous float32 [{n}], got {bias.dtype} {tuple(bias.shape)}")
        tiles = ceil_div(n, TILE)
        padded = torch.zeros(tiles * TILE, k, dtype=torch.float32)
        padded[:n] = weight.detach().float()
        self.tiles = padded.view(tiles, TILE, k).transpose(1, 2).contiguous()
        self.bias = bias
        self.in_features, self.out_features = k, n
        self._fn = fn
        self._args = _ARGS["pd_linear_args"](
            k=k, packed=self.tiles.data_ptr(), n=n, bias=None if bias is None else bias.data_ptr()
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.stride(-1) != 1:
            x = x.contiguous()
        _check_rows("x", x, self.in_features)
        y = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
        args = self._args
        args.x, args.x_stride, args.rows, args.y = x.data_ptr(), x.stride(0), x.shape[0], y.data_ptr()
        args.threads = torch.get_num_threads()
        self._fn(args)
        return y


class RmsNormKernel:
    """(x, residual) -> (RMSNorm(x + residual), x + residual), the sum written into `residual` in
    place (pd_add_rms_norm); with residual None, (RMSNorm(x), x). Rounds as transformers does."""

    def __init__(self, fn, weight: torch.Tensor, eps: float):
        if weight.dtype is not torch.float32 or weight.dim() != 1 or not weight.is_contiguous():
            _fail(f"the norm's weight must be contiguous float32 [hidden], got {weight.dtype} {tuple(weight.shape)}")
        self.weight = weight
        self.hidden = weight.shape[0]
        self._fn = fn
        self._args = _ARGS["pd_add_rms_norm_args"](weight=weight.data_ptr(), hidden=self.hidden, eps=eps)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        _check_rows("x", x, self.hidden)
        if not x.is_contiguous() or (
            residual is not None
            and (residual.shape != x.shape or not residual.is_contiguous() or residual.dtype is not torch.float32)
        ):
            _fail(f"x and residual must be contiguous float32 {tuple(x.shape)}")
        out = torch.empty_like(x)
        args = self._args
        args.x, args.out, args.rows = x.data_ptr(), out.data_ptr(), x.shape[0]
        args.residual = None if residual is None else residual.data_ptr()
        self._fn(args)
        return out, (x if residual is None else residual)


class AttentionStep:
    """One decode step's attention over the paged pool, for every layer (pd_decode_attention): the
    step's RoPE tables, block tables and context lengths checked once; then per layer
    `step(qkv, k_cache, v_cache)` ropes q and k in place in qkv [B, (H + 2*KVH) * D], writes this
    step's K/V at position context_lens[b]-1 and attends over [0, context_lens[b]), returning
    [B, H * D]. k_cache/v_cache are the layer's [num_blocks, block_size, KVH, D] views of the pool."""

    def __init__(
        self,
        fn,
        cos: torch.Tensor,
        sin: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
    ):
        batch = block_tables.shape[0]
        if head_dim % 16 or num_heads % num_kv_heads:
            _fail(
                f"head_dim must be a multiple of 16 and heads of kv_heads, got {head_dim}, {num_heads}/{num_kv_heads}"
            )
        for name, t in (("cos", cos), ("sin", sin)):
            if t.dtype is not torch.float32 or t.shape != (batch, head_dim) or not t.is_contiguous():
                _fail(f"{name} must be contiguous float32 [{batch}, {head_dim}], got {t.dtype} {tuple(t.shape)}")
        if (
            block_tables.dtype is not torch.int32
            or block_tables.dim() != 2
            or block_tables.stride(1) != 1
            or context_lens.dtype is not torch.int32
            or context_lens.shape != (batch,)
            or not context_lens.is_contiguous()
        ):
            _fail(f"block_tables must be int32 [{batch}, blocks] and context_lens int32 [{batch}]")
        self.batch, self.num_heads, self.num_kv_heads, self.head_dim = batch, num_heads, num_kv_heads, head_dim
        self.width = (num_heads + 2 * num_kv_heads) * head_dim
        self._keep = (cos, sin, block_tables, context_lens)  # the struct points into them
        threads = torch.get_num_threads()
        self._scores = torch.empty(threads, num_heads, ATTENTION_CHUNK, dtype=torch.float32)
        self._fn = fn
        self._args = _ARGS["pd_decode_attention_args"](
            cos=cos.data_ptr(),
            sin=sin.data_ptr(),
            block_tables=block_tables.data_ptr(),
            table_stride=block_tables.stride(0),
            context_lens=context_lens.data_ptr(),
            batch=batch,
            heads=num_heads,
            kv_heads=num_kv_heads,
            head_dim=head_dim,
            scale=scale,
            scores=self._scores.data_ptr(),
            threads=threads,
        )

    def __call__(self, qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        _check_rows("qkv", qkv, self.width)
        rows = self.num_kv_heads * self.head_dim
        if (
            qkv.shape[0] != self.batch
            or k_cache.dtype is not torch.float32
            or v_cache.dtype is not torch.float32
            or k_cache.dim() != 4
            or k_cache.stride()[1:] != (rows, self.head_dim, 1)
            or k_cache.shape[2:] != (self.num_kv_heads, self.head_dim)
            or v_cache.stride() != k_cache.stride()
            or v_cache.shape != k_cache.shape
        ):
            _fail(
                f"qkv must be [{self.batch}, ...] and k_cache/v_cache float32 [blocks, block_size, "
                f"{self.num_kv_heads}, {self.head_dim}] views with dense blocks, got {tuple(k_cache.shape)} "
                f"strides {k_cache.stride()}"
            )
        out = torch.empty(self.batch, self.num_heads * self.head_dim, dtype=torch.float32)
        args = self._args
        args.qkv, args.qkv_stride, args.out = qkv.data_ptr(), qkv.stride(0), out.data_ptr()
        args.k_cache, args.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
        args.block_stride, args.block_size = k_cache.stride(0), k_cache.shape[1]
        self._fn(args)
        return out


# ---- building and loading ----------------------------------------------------------------------
def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.processor()
    model = next((line for line in info.splitlines() if line.startswith("model name")), "")
    flags = next((line for line in info.splitlines() if line.startswith("flags")), "")
    return model + flags


def unavailable_reason() -> str | None:
    """Why the kernels cannot be used on this machine, or None."""
    if os.environ.get("PDSERVE_CPU_KERNELS", "1") == "0":
        return "disabled by PDSERVE_CPU_KERNELS=0"
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"needs x86-64, this is {platform.machine()}"
    if " avx512f" not in _cpu_signature():
        return "this CPU has no AVX-512"
    return None


def compiler() -> list[str] | None:
    """$CC split like a shell would ("ccache gcc" is two words), or cc; None when not found."""
    words = shlex.split(os.environ.get("CC", "cc")) or ["cc"]
    found = shutil.which(words[0])
    return [found, *words[1:]] if found else None


BUILDING_PREFIX = "building-"
STALE_BUILD_SECONDS = 600


def _build(cc: list[str]) -> Path:
    sources = SOURCE.read_bytes() + HEADER.read_bytes()
    key = hashlib.sha256(sources + " ".join([*cc, *FLAGS]).encode() + _cpu_signature().encode()).hexdigest()[:16]
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
        subprocess.run(
            [*cc, *FLAGS, f"-I{HEADER.parent}", str(SOURCE), "-o", tmp],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
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
    reason = unavailable_reason()
    cc = compiler() if reason is None else None
    if reason is None and cc is None:
        reason = "no C compiler (install gcc, or set CC)"
    if reason is None:
        assert cc is not None
        try:
            path = _build(cc)
            return CpuKernels(ctypes.CDLL(str(path)), path)
        except subprocess.CalledProcessError as e:
            reason = f"building them failed: {e.stderr.strip()[-500:]}"
        except (OSError, subprocess.TimeoutExpired) as e:
            reason = f"building or loading them failed: {e}"
    log.warning("CPU decode kernels unavailable (%s); using the torch backend, which is slower", reason)
    return None
