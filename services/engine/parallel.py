"""Tensor parallelism: an instance's ranks, one process each (Megatron-LM's split, layers/linear.py).

Rank 0 is the worker process: it owns the scheduler, the block accounting and sampling, and talks
to the router. It starts ranks 1..N-1 as processes of their own (`python -m
services.engine.rank`); each loads its shard of the weights (its attention heads, its slice
of the MLP; the embeddings and the LM head whole) and a KV pool of its own with the same blocks as
rank 0's, holding its K/V heads. Every forward pass runs on all ranks: rank 0 lays out the inputs
from its sequences (runner.ForwardInputs) and broadcasts them; the ranks' partial outputs are
summed by an all-reduce after attention and after the MLP (gloo on CPU, NCCL on CUDA), so every
rank ends a pass with the same hidden states and rank 0 samples from its logits.

A rank that dies takes the instance with it, so that the router fails its requests over as it does
for any dead worker: rank 0 exits when another rank exits, and the others exit when rank 0 does
(the kernel's parent-death signal) or when its group breaks.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import asdict
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import EngineConfig
from .layers.linear import TensorParallel
from .runner import ForwardInputs

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
START_TIMEOUT = timedelta(minutes=5)  # the other ranks load their weights meanwhile


class Ranks:
    """Rank 0's side of its instance: the other ranks' processes, and the group they share."""

    def __init__(self, tp: TensorParallel, processes: list[subprocess.Popen], control: dist.ProcessGroup | None):
        self.tp = tp
        self.processes = processes
        self._control = control
        self._closing = False
        for process in processes:
            threading.Thread(target=self._watch, args=(process,), name="rank-watcher", daemon=True).start()

    @classmethod
    def start(cls, model_dir: str, config: EngineConfig) -> Ranks:
        """Starts ranks 1..N-1 with the same model and config and joins them in a process group."""
        size = config.tensor_parallel
        address = f"127.0.0.1:{_free_port()}"
        # on the CPU the instance's threads are shared out: ranks waiting on each other's all-reduce
        # must not also compete for cores
        torch.set_num_threads(max(1, torch.get_num_threads() // size))
        spec = {
            "model_dir": model_dir,
            "config": asdict(config),
            "size": size,
            "address": address,
            "threads": torch.get_num_threads(),
            "parent": os.getpid(),
        }
        processes = [
            subprocess.Popen([sys.executable, "-m", "services.engine.rank", json.dumps({**spec, "rank": rank})])
            for rank in range(1, size)
        ]
        try:
            tp, control = join_group(0, size, address, config.device)
        except BaseException:
            for process in processes:
                process.kill()
            raise
        log.info("tensor parallel: %d ranks (pids %s)", size, [p.pid for p in processes])
        return cls(tp, processes, control)

    def send(self, inputs: ForwardInputs | None) -> None:
        """Hands a forward pass's inputs to the other ranks (None: stop)."""
        dist.broadcast_object_list([inputs], src=0, group=self._control)

    def close(self) -> None:
        self._closing = True
        try:
            self.send(None)
        except Exception:  # a rank already gone: the others are killed below
            pass
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        dist.destroy_process_group()

    def _watch(self, process: subprocess.Popen) -> None:
        code = process.wait()
        if not self._closing:
            # its shard of every layer is gone: this instance cannot compute another token, and a
            # clean shutdown would wait on collectives that never finish
            log.critical("tensor-parallel rank (pid %d) exited with %s: stopping this instance", process.pid, code)
            logging.shutdown()
            os._exit(1)


def join_group(rank: int, size: int, address: str, device: str) -> tuple[TensorParallel, dist.ProcessGroup | None]:
    """Joins the instance's process group; this rank's TensorParallel (its all-reduce), and the gloo
    group that carries the step inputs (None: the default group is gloo already)."""
    on_cuda = device.startswith("cuda")
    if on_cuda:
        torch.cuda.set_device(rank_device(device, rank))
    dist.init_process_group(
        "nccl" if on_cuda else "gloo",
        init_method=f"tcp://{address}",
        rank=rank,
        world_size=size,
        timeout=START_TIMEOUT,
    )
    control = dist.new_group(backend="gloo") if on_cuda else None

    def all_reduce(tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor)

    return TensorParallel(rank=rank, size=size, all_reduce=all_reduce), control


def agreed_min(value: int) -> int:
    """The smallest of the ranks' values (the KV blocks each rank's memory allows)."""
    tensor = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def rank_device(device: str, rank: int) -> str:
    """Rank r of an instance on cuda:k runs on cuda:k+r; on the CPU, every rank on the CPU."""
    if not device.startswith("cuda"):
        return device
    first = int(device.partition(":")[2] or 0)
    return f"cuda:{first + rank}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent(parent: int) -> None:
    """This rank is SIGKILLed when its rank 0 exits (or now, if it already has)."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the broken group ends this rank instead
        pass
    if os.getppid() != parent:  # it died before the signal was armed
        os._exit(1)
