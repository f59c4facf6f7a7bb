"""The paged KV pool: one shareable allocation per worker.

Pool layout (this is the wire format of KV transfer):

    pool[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]   (dtype of the model)

Block-major: one block holds K (index 0) and V (index 1) of `block_size` consecutive tokens for
every layer, contiguously, `block_bytes` long. Moving a block between two pools of the same
`KvLayout` is therefore one contiguous copy, and the kvstore daemon can treat pools as
`[num_blocks, block_bytes]` byte arrays without knowing anything about the model. Attention reads
one layer's K or V as a strided view `[num_blocks, block_size, num_kv_heads, head_dim]` whose block
stride is `block_bytes`.

Token t of a sequence lives in block `block_table[t // block_size]`, row `t % block_size`.

The memory is shareable so that the node-local kvstore daemon can map it: on CPU a POSIX
shared-memory file under /dev/shm; on CUDA a device allocation exported with a CUDA IPC handle.

A /dev/shm file outlives a process killed by SIGKILL or the OOM killer (and, with the host's IPC
namespace, its pod): hundreds of MB of the node's memory each time. So the owner holds an
exclusive flock on its pool file for as long as it lives (the kernel drops it when the process dies,
however it dies), and every new CPU pool first removes the `pdserve-kv-*` files that nobody holds
(`remove_stale_pools`). The daemon maps files without locking them.
"""

from __future__ import annotations

import atexit
import base64
import fcntl
import hashlib
import logging
import mmap
import os
import secrets
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

SHM_DIR = "/dev/shm"
OWNER_PROOF_BYTES = 32  # a random secret after a /dev/shm pool (allocate)
POOL_FILE_PREFIX = "pdserve-kv-"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KvLayout:
    num_blocks: int
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # "float32" | "bfloat16" | "float16"
    model_id: str = ""  # identifies the weights; pools of different models must not exchange KV

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=getattr(torch, self.dtype)).element_size()

    @property
    def head_bytes(self) -> int:
        return self.head_dim * self.element_size

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        n = 1
        for d in self.block_shape:
            n *= d
        return n * self.element_size

    @property
    def total_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def fingerprint(self) -> str:
        """Equal for two pools whose blocks can be copied into each other byte for byte."""
        shape = "x".join(map(str, self.block_shape))
        return f"{self.model_id}:{shape}:{self.dtype}"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class InstanceKv:
    """What a worker registers with its node's kvstore daemon: its instance's KV geometry as a
    whole (`layout` has the model's layers and K/V heads) and each rank's pool, in rank order. Rank
    r's pool holds its shard (services/kvstore/shards.py) with the same block ids as every other
    rank's. One pool, for an instance of one rank."""

    layout: KvLayout
    descriptors: tuple[dict, ...]
    tensor_parallel: int = 1
    pipeline_parallel: int = 1


def model_id_for(model_dir_or_name: str, config_dict: dict) -> str:
    digest = hashlib.sha256(repr(sorted(config_dict.items())).encode()).hexdigest()[:12]
    return f"{os.path.basename(os.path.normpath(model_dir_or_name))}-{digest}"


class KvPool:
    """A worker's KV blocks in shareable memory, plus per-layer views for attention."""

    def __init__(
        self,
        layout: KvLayout,
        tensor: torch.Tensor,
        descriptor: dict,
        owner: bool,
        closer: Callable[[], None] | None = None,
        mapping: mmap.mmap | None = None,
    ):
        self.layout = layout
        self.tensor = tensor  # [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]
        self.descriptor = descriptor  # how another process on this node maps the same memory
        self._owner = owner
        self._closer = closer
        self._mapping = mapping  # a shared-memory pool's mapping, kept alive with the tensor over it

    # ---- creation -------------------------------------------------------------------------
    @classmethod
    def allocate(cls, layout: KvLayout, device: str = "cpu", name: str | None = None) -> KvPool:
        dtype = getattr(torch, layout.dtype)
        shape = (layout.num_blocks, *layout.block_shape)
        if device == "cpu":
            remove_stale_pools()
            name = name or f"{POOL_FILE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            path = os.path.join(SHM_DIR, name)
            fd = _create_locked(path)
            proof = secrets.token_bytes(OWNER_PROOF_BYTES)
            try:
                # after the pool, a secret only readers of this 0600 file can know: registering the
                # pool with a kvstore daemon proves ownership with it (kvstore/daemon.py map_pool)
                os.ftruncate(fd, layout.total_bytes + OWNER_PROOF_BYTES)
                os.pwrite(fd, proof, layout.total_bytes)
                mm = mmap.mmap(fd, layout.total_bytes)
            except BaseException:
                os.close(fd)
                _unlink_quietly(path)
                raise
            flat = torch.frombuffer(mm, dtype=torch.uint8, count=layout.total_bytes)
            tensor = flat.view(dtype).view(shape)
            tensor.zero_()

            held = [fd]  # closed once: at exit the number may belong to another file by then

            def close(path=path, held=held):
                _unlink_quietly(path)
                if held:
                    os.close(held.pop())  # releases the lock

            atexit.register(close)
            descriptor = {"kind": "shm", "path": path, "size": layout.total_bytes, "proof": proof.hex()}
            return cls(layout, tensor, descriptor, owner=True, closer=close, mapping=mm)
        tensor = torch.zeros(shape, dtype=dtype, device=device)
        return cls(layout, tensor, _cuda_ipc_descriptor(tensor), owner=True)

    @classmethod
    def attach(cls, layout: KvLayout, descriptor: dict) -> KvPool:
        """Maps a pool another process allocated on this node (used by the kvstore daemon)."""
        kind = descriptor.get("kind")
        if kind == "shm":
            path = descriptor["path"]
            if not os.path.realpath(path).startswith(SHM_DIR + "/"):
                raise ValueError(f"shared-memory path must be under {SHM_DIR}, got {path!r}")
            size = int(descriptor["size"])
            if size != layout.total_bytes:
                raise ValueError(f"pool size {size} does not match layout ({layout.total_bytes} bytes)")
            fd = os.open(path, os.O_RDWR)
            try:
                if os.fstat(fd).st_size < size:
                    raise ValueError(f"shared-memory file {path} is smaller than {size} bytes")
                mm = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            flat = torch.frombuffer(mm, dtype=torch.uint8, count=size)
            tensor = flat.view(getattr(torch, layout.dtype)).view(layout.num_blocks, *layout.block_shape)
            return cls(layout, tensor, descriptor, owner=False, mapping=mm)
        if kind == "cuda_ipc":
            device = local_cuda_index(descriptor)
            torch.cuda.set_device(device)  # opening a handle needs a live context on the owning GPU
            storage = torch.UntypedStorage._new_shared_cuda(*_decode_cuda_ipc({**descriptor, "device": device}))
            flat = torch.empty(0, dtype=torch.uint8, device=f"cuda:{device}")
            flat.set_(storage, 0, (layout.total_bytes,), (1,))
            tensor = flat.view(getattr(torch, layout.dtype)).view(layout.num_blocks, *layout.block_shape)
            return cls(layout, tensor, descriptor, owner=False)
        raise ValueError(f"unknown pool memory kind {kind!r}; known: shm, cuda_ipc")

    # ---- views ------------------------------------------------------------------------------
    def key_cache(self, layer: int) -> torch.Tensor:
        return self.tensor[:, layer, 0]

    def value_cache(self, layer: int) -> torch.Tensor:
        return self.tensor[:, layer, 1]

    def block_bytes_view(self) -> torch.Tensor:
        """The pool as [num_blocks, block_bytes] raw bytes, for transfers."""
        return self.tensor.view(torch.uint8).view(self.layout.num_blocks, self.layout.block_bytes)

    def close(self) -> None:
        if self._closer is not None:
            self._closer()
            self._closer = None


def _create_locked(path: str) -> int:
    """Creates `path` (failing if it exists) already flock-ed by this process: the file is made
    under a name the sweep ignores, locked, then linked to its real name, so that no other
    process's `remove_stale_pools` can see it unlocked."""
    folder, name = os.path.split(path)
    hidden = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}")
    fd = os.open(hidden, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.link(hidden, path)
    except BaseException:
        os.close(fd)
        raise
    finally:
        _unlink_quietly(hidden)
    return fd


def remove_stale_pools(folder: str = SHM_DIR) -> list[str]:
    """Removes the pool files whose owner has died (no flock held on them); returns their paths.
    Files this user cannot open are left alone."""
    removed: list[str] = []
    try:
        names = [n for n in os.listdir(folder) if n.startswith(POOL_FILE_PREFIX)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its owner is alive
        except OSError:
            continue
        else:
            # Only if the name still is the file we locked: between our open and our lock, another
            # sweep may have removed it and an owner created a new (locked) pool of the same name.
            try:
                same = _same_file(os.fstat(fd), os.stat(path, follow_symlinks=False))
            except FileNotFoundError:
                same = False
            if same:
                _unlink_quietly(path)
                removed.append(path)
        finally:
            os.close(fd)
    if removed:
        log.warning(
            "removed %d KV pool file(s) left in %s by processes that died: %s%s",
            len(removed),
            folder,
            ", ".join(removed[:5]),
            ", ..." if len(removed) > 5 else "",
        )
    return removed


def _same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def local_cuda_index(descriptor: dict) -> int:
    """This process's index of the GPU a descriptor names. Processes number GPUs differently (a
    worker sees its one GPU as cuda:0, the node's kvstore daemon sees them all), so the GPU is
    identified by UUID; the index is the fallback for descriptors without one."""
    uuid_ = descriptor.get("uuid")
    if uuid_:
        for index in range(torch.cuda.device_count()):
            if str(torch.cuda.get_device_properties(index).uuid) == uuid_:
                return index
        raise ValueError(f"GPU {uuid_} of the pool is not visible to this process")
    return int(descriptor["device"])


def _cuda_ipc_descriptor(tensor: torch.Tensor) -> dict:
    (device, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync) = (
        tensor.untyped_storage()._share_cuda_()
    )
    b64 = lambda b: base64.b64encode(b).decode() if b else ""
    return {
        "kind": "cuda_ipc",
        "uuid": str(torch.cuda.get_device_properties(device).uuid),
        "device": device,
        "handle": b64(handle),
        "size": size,
        "offset": offset,
        "ref_handle": b64(ref_handle),
        "ref_offset": ref_offset,
        "event_handle": b64(event_handle),
        "event_sync": bool(event_sync),
    }


def _decode_cuda_ipc(d: dict) -> tuple:
    unb64 = lambda s: base64.b64decode(s) if s else b""
    return (
        d["device"],
        unb64(d["handle"]),
        d["size"],
        d["offset"],
        unb64(d["ref_handle"]),
        d["ref_offset"],
        unb64(d["event_handle"]),
        d["event_sync"],
    )
