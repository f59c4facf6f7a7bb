"""Tensor and pipeline parallelism: an instance's ranks, one process each.

An instance of tp x pp ranks splits the model's layers into pp pipeline stages (contiguous, as
kvstore/shards.py lays out their KV) and each stage's layers over tp ranks (Megatron-LM's split,
layers/linear.py). Rank r is stage r // tp, position r % tp.

Rank 0 is the worker process: it owns the scheduler, the block accounting and sampling, and talks
to the router. It starts ranks 1..N-1 as processes of their own (`python -m
services.engine.rank`); each loads its shard of the weights (its stage's layers; of those, its
attention heads and its slice of the MLP; the embeddings on the first stage and the LM head on the
last, whole) and a KV pool of its own with the same blocks as rank 0's, holding its layers' K/V
heads. Every forward pass runs on all ranks: rank 0 lays out the inputs from its sequences
(runner.ForwardInputs, as JSON: data only) and writes them to each rank's stdin as a frame. Within
a stage, the ranks' partial outputs are summed by an all-reduce after attention and after the MLP
(gloo on CPU, NCCL on CUDA); between stages, each rank sends its hidden states to the rank in the
same position of the next stage, and the last stage's first rank sends the logits to rank 0, which
samples. A decode pass may be
cut into micro-batches (runner.py), so that every stage has work while the next computes.

An instance may span several pods (hosts), each holding whole stages (`EngineConfig.pods`): the
worker starts the ranks of its own pod; each other pod runs a follower (follower.py) that connects
to the worker's rendezvous address, gets the model and configuration from it, starts its pod's
ranks and relays them the passes' inputs, which rank 0 writes to its socket in the same frames. The
rendezvous is mutual TLS when the worker has the cluster's certificates; the process group's store
(at the rendezvous port + 1 on rank 0's host) and the collectives are never encrypted: an
instance's pods belong on a trusted network.

A rank that dies takes the instance with it, so that the router fails its requests over as it does
for any dead worker: rank 0 exits when another rank exits, and the others exit when rank 0 does
(the kernel's parent-death signal, or EOF on their stdin). Across pods the same holds through the
follower: rank 0 exits when a follower's connection ends, a follower (and its ranks) when rank 0's
does. Rank 0 exits too if its own part of a
pass fails after the others got its inputs (runner.py): they wait in that pass's all-reduces, and
its next pass would be paired with them.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import logging
import os
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import IO, TYPE_CHECKING

import torch
import torch.distributed as dist

from services.common.net import is_loopback

from .config import EngineConfig, ModelConfig, stage_layers
from .layers.linear import TensorParallel

if TYPE_CHECKING:
    from .runner import ForwardInputs

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
START_TIMEOUT = timedelta(minutes=5)  # the other ranks load their weights meanwhile


@dataclass
class Pipeline:
    """This rank's place in its instance's pipeline, and the point-to-point sends between stages."""

    rank: int = 0  # in the instance
    stages: int = 1
    tp: int = 1  # ranks per stage
    layers: range = range(0)  # this rank's stage's layers (empty: all of them, no pipeline)
    via_host: bool = False  # ranks sharing a GPU: tensors cross through host memory (gloo)
    _sends: list = field(default_factory=list)  # sends in flight: their tensors must live until done

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    def send_on(self, tensor: torch.Tensor) -> None:
        """Hands a stage's output to the same position in the next stage (not waiting for it)."""
        tensor = tensor.cpu() if self.via_host else tensor
        self._sends.append((dist.isend(tensor, self.rank + self.tp), tensor))

    def receive(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The previous stage's output."""
        tensor = torch.empty(shape, dtype=dtype, device="cpu" if self.via_host else device)
        dist.recv(tensor, self.rank - self.tp)
        return tensor.to(device)

    def logits_to_rank0(
        self, logits: torch.Tensor | None, shape: tuple[int, ...], dtype, device
    ) -> torch.Tensor | None:
        """Ends a pass: the last stage's first rank sends the logits to rank 0, which returns them."""
        if self.rank == (self.stages - 1) * self.tp:
            assert logits is not None
            dist.send(logits.cpu() if self.via_host else logits.contiguous(), 0)
        elif self.rank == 0:
            logits = torch.empty(shape, dtype=dtype, device="cpu" if self.via_host else device)
            dist.recv(logits, (self.stages - 1) * self.tp)
            logits = logits.to(device)
        for work, _ in self._sends:
            work.wait()
        self._sends.clear()
        return logits


NO_PP = Pipeline()


def check_split(model_config: ModelConfig, config: EngineConfig) -> None:
    """Raises ValueError, before any rank starts, when the model cannot be split this way here."""
    tp = TensorParallel(size=config.tensor_parallel)
    tp.split(model_config.num_heads, "attention heads")
    tp.kv_heads(model_config.num_kv_heads)
    tp.split(model_config.intermediate_size, "MLP features")
    if config.pipeline_parallel > model_config.num_layers:
        raise ValueError(f"{config.pipeline_parallel} pipeline stages for {model_config.num_layers} layers")
    if config.device.startswith("cuda") and not config.ranks_share_device:
        last = int(rank_device(config.device, config.ranks_per_pod - 1).partition(":")[2])
        if last >= torch.cuda.device_count():
            raise ValueError(
                f"{config.ranks_per_pod} ranks from {config.device} need cuda:{last}; this machine has "
                f"{torch.cuda.device_count()} GPUs"
            )


class Ranks:
    """Rank 0's side of its instance: the other ranks of its pod, each reading the forward passes'
    inputs from a pipe (its stdin), the followers of the other pods (a socket each), and the
    process group they all share for the collectives."""

    def __init__(self, processes: list[subprocess.Popen], threads_before: int):
        self.processes: list[subprocess.Popen] = []
        self.followers: list[socket.socket] = []
        self._threads_before = threads_before
        self._closing = False
        self.tp = TensorParallel()
        self.pipeline = NO_PP
        self._adopt(processes)

    def _adopt(self, processes: list[subprocess.Popen]) -> None:
        self.processes += processes
        for process in processes:
            threading.Thread(
                target=self._watch, args=(process.wait, process.pid), name="rank-watcher", daemon=True
            ).start()

    @classmethod
    def start(
        cls, model_dir: str, config: EngineConfig, model_config: ModelConfig, tls: ssl.SSLContext | None = None
    ) -> Ranks:
        """Starts the other ranks of this pod, waits for the other pods' followers (over TLS with
        `tls`, a server context requiring the cluster's client certificates), and joins them all in
        a process group. Must run on the thread that lives as long as the instance (the main
        thread): the ranks' parent-death signal fires when the thread that started them exits."""
        size, per_pod = config.ranks, config.ranks_per_pod
        listener = None
        if config.pods > 1:  # the store on the port after the followers' (a fixed port others can reach)
            listener = _listen(config.rendezvous)
            host = config.rendezvous.rpartition(":")[0]
            try:
                store_listener = _listen(f"{host}:{listener.getsockname()[1] + 1}")
            except OSError:
                listener.close()
                raise
        else:  # only this pod's ranks join
            store_listener = _listen("127.0.0.1:0")
        store_host, store_port = store_listener.getsockname()[:2]
        if ipaddress.ip_address(store_host).is_unspecified:
            store_host = "127.0.0.1"
        threads_before = torch.get_num_threads()
        # on the CPU the pod's threads are shared out: ranks waiting on each other's all-reduce
        # must not also compete for cores
        torch.set_num_threads(max(1, threads_before // per_pod))
        spec = {"model_dir": model_dir, "config": asdict(config), "store_port": store_port}
        ranks = cls([], threads_before)
        try:
            if listener is not None:  # before this pod's ranks start: they all join within START_TIMEOUT
                ranks._accept_followers(listener, config.pods, spec, tls)
            local = {**spec, "store_host": store_host, "threads": torch.get_num_threads()}
            ranks._adopt(start_pod_ranks(local, range(1, per_pod)))
            address = f"{store_host}:{store_port}"
            ranks.tp, ranks.pipeline = join_group(0, config, address, model_config.num_layers, store_listener)
        except BaseException:
            ranks.abort()
            raise
        finally:
            if listener is not None:
                listener.close()
            store_listener.close()  # (a no-op once the store has taken it)
        log.info(
            "%d ranks: tp %d x pp %d over %d pod(s) (pids here %s)",
            size,
            config.tensor_parallel,
            config.pipeline_parallel,
            config.pods,
            [p.pid for p in ranks.processes],
        )
        return ranks

    def _accept_followers(self, listener: socket.socket, pods: int, spec: dict, tls: ssl.SSLContext | None) -> None:
        """Waits for a follower of each other pod (follower.py) and hands it the instance's spec. A
        peer that is not one (no cluster certificate with TLS, a bad hello, too slow) is dropped."""
        deadline = time.monotonic() + START_TIMEOUT.total_seconds()
        waiting = set(range(1, pods))
        while waiting:
            listener.settimeout(max(0.0, deadline - time.monotonic()))
            try:
                connection, peer = listener.accept()
            except TimeoutError:
                raise RuntimeError(
                    f"pods {sorted(waiting)} of this instance did not join within {START_TIMEOUT}"
                ) from None
            try:
                connection.settimeout(HELLO_TIMEOUT)  # for the handshake and the hello, together
                connection = keepalive(connection)
                if tls is not None:
                    connection = tls.wrap_socket(connection, server_side=True)
                hello = json.loads(read_frame(connection, max_bytes=1024) or b"{}")
                pod = hello.get("pod") if isinstance(hello, dict) else None
                if not isinstance(pod, int) or pod not in waiting:
                    raise ValueError(f"asked to be pod {pod!r}; waiting for {sorted(waiting)}")
                write_frame(connection, json.dumps(spec).encode())
                connection.settimeout(None)
            except Exception as e:  # (ssl.SSLError is an OSError: no client certificate)
                log.warning("refused a peer at %s on the rendezvous: %r", peer, e)
                connection.close()
                continue
            waiting.discard(pod)
            self.followers.append(connection)
            threading.Thread(
                target=self._watch, args=(lambda c=connection: _wait_closed(c), f"pod {pod} at {peer}"), daemon=True
            ).start()
            log.info("pod %d of this instance joined from %s", pod, peer)

    def send(self, inputs: ForwardInputs | None) -> None:
        """Hands a forward pass's inputs to the other ranks (None: stop). A pipe, not a collective:
        a rank waits for the next pass as long as the instance is idle, and sees EOF if rank 0 dies."""
        frame = STOP if inputs is None else inputs.to_bytes()
        for process in self.processes:
            assert process.stdin is not None
            write_frame(process.stdin, frame)
        for follower in self.followers:
            write_frame(follower, frame)

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        for target in (*(p.stdin for p in self.processes), *self.followers):
            try:
                assert target is not None
                write_frame(target, STOP)
            except OSError:  # a rank already gone: the others still stop cleanly (it is killed below)
                pass
        self._end()

    def abort(self) -> None:
        """Stops the ranks at once (rank 0 failed while it built its part of the instance)."""
        self._closing = True
        for process in self.processes:
            process.kill()
        self._end()

    def _end(self) -> None:
        for follower in self.followers:  # a follower stops its ranks when its connection ends
            follower.close()
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self._threads_before)

    def _watch(self, wait: Callable[[], object], what: object) -> None:
        code = wait()
        if not self._closing:
            # its shard of the model is gone: this instance cannot compute another token, and a
            # clean shutdown would wait on collectives that never finish
            log.critical("rank %s exited (%s): stopping this instance", what, code)
            logging.shutdown()
            os._exit(1)


def join_group(
    rank: int, config: EngineConfig, address: str, num_layers: int, store_listener: socket.socket | None = None
) -> tuple[TensorParallel, Pipeline]:
    """Joins the instance's process group (`config` is this rank's: its device is the rank's own):
    this rank's TensorParallel (with its stage's all-reduce) and Pipeline. Rank 0 serves the group's
    store at `address` on `store_listener`, a socket bound where the instance was told to listen:
    a store torch opens itself listens on every interface."""
    tp, pp = config.tensor_parallel, config.pipeline_parallel
    on_cuda = config.device.startswith("cuda")
    if on_cuda:
        torch.cuda.set_device(config.device)  # this rank's own (rank.py: rank_device)
    # NCCL wants a GPU per rank; ranks sharing one go through gloo, their tensors through host memory
    via_host = on_cuda and config.ranks_share_device
    backend, world_size = "nccl" if on_cuda and not via_host else "gloo", tp * pp
    host, _, port = address.rpartition(":")
    if is_loopback(host):  # every rank on this host: so are their sockets
        # (gloo and NCCL otherwise listen on the address the hostname resolves to)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")
    store = dist.TCPStore(
        host,
        int(port),
        world_size,
        is_master=store_listener is not None,
        timeout=START_TIMEOUT,
        wait_for_workers=False,
        # the store's from now on (it closes it)
        master_listen_fd=store_listener.detach() if store_listener is not None else None,
    )
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=START_TIMEOUT)
    # every rank creates every stage's group, in the same order (torch.distributed requires it)
    groups = [dist.new_group(list(range(s * tp, (s + 1) * tp))) if pp > 1 else None for s in range(pp)]
    stage = rank // tp

    def all_reduce(tensor: torch.Tensor) -> None:
        if via_host:
            on_host = tensor.cpu()
            dist.all_reduce(on_host, group=groups[stage])
            tensor.copy_(on_host)
        else:
            dist.all_reduce(tensor, group=groups[stage])

    pipeline = Pipeline(rank, pp, tp, stage_layers(num_layers, pp, stage), via_host) if pp > 1 else NO_PP
    return TensorParallel(rank=rank % tp, size=tp, all_reduce=all_reduce), pipeline


def agreed_min(value: int) -> int:
    """The smallest of the ranks' values (the KV blocks each rank's memory allows)."""
    tensor = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":  # (gloo: on the host)
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())


def all_ranks(value: object) -> list:
    """Every rank's `value` (picklable), in rank order."""
    values: list = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def start_pod_ranks(spec: dict, ranks: range, first_on_pod: int = 0) -> list[subprocess.Popen]:
    """Starts these ranks of the instance on this pod, whose first rank is `first_on_pod` (`python
    -m services.engine.rank`), each reading its passes from its stdin and dying with this process."""
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.engine.rank",
                json.dumps({**spec, "rank": rank, "local_rank": rank - first_on_pod, "parent": os.getpid()}),
            ],
            stdin=subprocess.PIPE,
        )
        for rank in ranks
    ]


def config_fields(spec: dict) -> dict:
    fields = dict(spec["config"])
    fields["cuda_graph_batch_sizes"] = tuple(fields["cuda_graph_batch_sizes"])
    return fields


# ---- frames: rank 0 to its ranks' stdin and to the followers' sockets ------------------------------
# An 8-byte length, then the bytes: a pass's inputs as JSON (ForwardInputs.to_bytes), or STOP.
STOP = b"stop"
HELLO_TIMEOUT = 10.0  # seconds a peer of the rendezvous has for its TLS handshake and hello
MAX_FRAME_BYTES = 1 << 30


def write_frame(target: socket.socket | IO[bytes], payload: bytes) -> None:
    header = struct.pack("!Q", len(payload))
    if isinstance(target, socket.socket):
        target.sendall(header + payload)
    else:
        target.write(header + payload)
        target.flush()


def read_frame(source: socket.socket | IO[bytes], max_bytes: int = MAX_FRAME_BYTES) -> bytes | None:
    """The next frame, or None at the end of the stream."""
    header = _read_exactly(source, 8)
    if header is None:
        return None
    (length,) = struct.unpack("!Q", header)
    if length > max_bytes:
        raise ValueError(f"a frame of {length} bytes (at most {max_bytes})")
    payload = _read_exactly(source, length)
    if payload is None:
        raise ConnectionError("the stream ended inside a frame")
    return payload


def _read_exactly(source: socket.socket | IO[bytes], n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = source.recv(min(left, 1 << 20)) if isinstance(source, socket.socket) else source.read(left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def keepalive(sock: socket.socket) -> socket.socket:
    """A peer whose host vanished (no FIN, no RST) is noticed within about 25 s."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    return sock


def _wait_closed(sock: socket.socket) -> str:
    """Blocks until the peer closes (a follower sends nothing after its hello). Polls the descriptor
    instead of reading: with TLS, reading here while the engine thread writes frames would use one
    SSL connection from two threads at once."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
    while not poller.poll():
        pass
    return "connection closed"


def _listen(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    listener = socket.create_server((host.strip("[]") or "0.0.0.0", int(port)), reuse_port=False)
    return listener


def rank_device(device: str, rank: int) -> str:
    """Rank r of an instance on cuda:k runs on cuda:k+r; on the CPU, every rank on the CPU (r: the
    rank's index on its pod)."""
    if not device.startswith("cuda"):
        return device
    first = int(device.partition(":")[2] or 0)
    return f"cuda:{first + rank}"


def die_with_parent(parent: int) -> None:
    """This rank is SIGKILLed when its rank 0 exits (or now, if it already has)."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the broken group ends this rank instead
        pass
    if os.getppid() != parent:  # it died before the signal was armed
        os._exit(1)
