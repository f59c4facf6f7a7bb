"""Tensor parallelism: an instance's ranks, one process each (Megatron-LM's split, layers/linear.py).

Rank 0 is the worker process: it owns the scheduler, the block accounting and sampling, and talks
to the router. It starts ranks 1..N-1 as processes of their own (`python -m
services.engine.rank`); each loads its shard of the weights (its attention heads, its slice
of the MLP; the embeddings and the LM head whole) and a KV pool of its own with the same blocks as
rank 0's, holding its K/V heads. Every forward pass runs on all ranks: rank 0 lays out the inputs
from its sequences (runner.ForwardInputs) and writes them to each rank's stdin; the ranks' partial
outputs are summed by an all-reduce after attention and after the MLP (gloo on CPU, NCCL on CUDA),
so every rank ends a pass with the same hidden states and rank 0 samples from its logits.

A rank that dies takes the instance with it, so that the router fails its requests over as it does
for any dead worker: rank 0 exits when another rank exits, and the others exit when rank 0 does
(the kernel's parent-death signal, or EOF on their stdin). Rank 0 exits too if its own part of a
pass fails after the others got its inputs (runner.py): they wait in that pass's all-reduces, and
its next pass would be paired with them.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import asdict
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import EngineConfig, ModelConfig
from .layers.linear import TensorParallel
from .runner import ForwardInputs

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
START_TIMEOUT = timedelta(minutes=5)  # the other ranks load their weights meanwhile


def check_split(model_config: ModelConfig, config: EngineConfig) -> None:
    """Raises ValueError, before any rank starts, when the model cannot be split this way here."""
    tp = TensorParallel(size=config.tensor_parallel)
    tp.split(model_config.num_heads, "attention heads")
    tp.kv_heads(model_config.num_kv_heads)
    tp.split(model_config.intermediate_size, "MLP features")
    if config.device.startswith("cuda"):
        last = int(rank_device(config.device, tp.size - 1).partition(":")[2])
        if last >= torch.cuda.device_count():
            raise ValueError(
                f"{tp.size} ranks from {config.device} need cuda:{last}; this machine has "
                f"{torch.cuda.device_count()} GPUs"
            )


class Ranks:
    """Rank 0's side of its instance: the other ranks' processes, each reading the forward passes'
    inputs from a pipe (its stdin), and the process group they all share for the all-reduces."""

    def __init__(self, processes: list[subprocess.Popen], threads_before: int):
        self.processes = processes
        self._threads_before = threads_before
        self._closing = False
        self.tp = TensorParallel()
        for process in processes:
            threading.Thread(target=self._watch, args=(process,), name="rank-watcher", daemon=True).start()

    @classmethod
    def start(cls, model_dir: str, config: EngineConfig) -> Ranks:
        """Starts ranks 1..N-1 with the same model and config and joins them in a process group.
        Must run on the thread that lives as long as the instance (the main thread): the ranks'
        parent-death signal fires when the thread that started them exits."""
        size = config.tensor_parallel
        address = f"127.0.0.1:{_free_port()}"
        threads_before = torch.get_num_threads()
        # on the CPU the instance's threads are shared out: ranks waiting on each other's all-reduce
        # must not also compete for cores
        torch.set_num_threads(max(1, threads_before // size))
        spec = {
            "model_dir": model_dir,
            "config": asdict(config),
            "size": size,
            "address": address,
            "threads": torch.get_num_threads(),
            "parent": os.getpid(),
        }
        ranks = cls(
            [
                subprocess.Popen(
                    [sys.executable, "-m", "services.engine.rank", json.dumps({**spec, "rank": rank})],
                    stdin=subprocess.PIPE,
                )
                for rank in range(1, size)
            ],
            threads_before,
        )
        try:
            ranks.tp = join_group(0, size, address, config.device)
        except BaseException:
            ranks.abort()
            raise
        log.info("tensor parallel: %d ranks (pids %s)", size, [p.pid for p in ranks.processes])
        return ranks

    def send(self, inputs: ForwardInputs | None) -> None:
        """Hands a forward pass's inputs to the other ranks (None: stop). A pipe, not a collective:
        a rank waits for the next pass as long as the instance is idle, and sees EOF if rank 0 dies."""
        frame = pickle.dumps(inputs, protocol=pickle.HIGHEST_PROTOCOL)
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(frame)
            process.stdin.flush()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        try:
            self.send(None)
        except OSError:  # a rank already gone: the others are killed below
            pass
        self._end()

    def abort(self) -> None:
        """Stops the ranks at once (rank 0 failed while it built its part of the instance)."""
        self._closing = True
        for process in self.processes:
            process.kill()
        self._end()

    def _end(self) -> None:
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self._threads_before)

    def _watch(self, process: subprocess.Popen) -> None:
        code = process.wait()
        if not self._closing:
            # its shard of every layer is gone: this instance cannot compute another token, and a
            # clean shutdown would wait on collectives that never finish
            log.critical("tensor-parallel rank (pid %d) exited with %s: stopping this instance", process.pid, code)
            logging.shutdown()
            os._exit(1)


def join_group(rank: int, size: int, address: str, device: str) -> TensorParallel:
    """Joins the instance's process group; this rank's TensorParallel, with its all-reduce."""
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

    def all_reduce(tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor)

    return TensorParallel(rank=rank, size=size, all_reduce=all_reduce)


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
