"""The kvstore daemon for real: daemon processes on loopback, real gRPC, real UCX (tcp), pools in
POSIX shared memory allocated by this test process (standing in for prefill/decode workers).

Nodes: A and B (TTL 30 s) for transfers; C (TTL 1 s, host TTL 3 s, an 8-block host tier, an
8-block prefix tier) for the host and prefix tiers; D only for the SIGTERM test. Every test leaves
every daemon without entries or pools, and no prefix-tier row held by a copy.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from pdserve.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc
from services.common.block_hashes import HASH_BYTES
from services.engine.kv_cache import InstanceKv, KvLayout, KvPool
from services.kvstore.client import KvStoreClient
from services.kvstore.shards import instance_shards, rank_layout
from services.launcher import free_port
from tests.proc_sockets import ipv4_addresses, is_up, listening_sockets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# 64 blocks of 4 KiB: runs of several blocks exceed UCX's 8 KiB rendezvous threshold.
LAYOUT = KvLayout(
    num_blocks=64, num_layers=2, block_size=4, num_kv_heads=2, head_dim=32, dtype="float32", model_id="kvstore-test"
)
BLOCK_BYTES = LAYOUT.block_bytes
HOST_TIER_BLOCKS = 8
PREFIX_TIER_BLOCKS = 8


@dataclass
class Daemon:
    node_id: str
    port: int
    metrics_port: int
    proc: subprocess.Popen
    log_path: str
    host: str = "127.0.0.1"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stats(self) -> kvstore_pb2.KvStoreStats:
        with grpc.insecure_channel(self.address) as channel:
            return kvstore_pb2_grpc.KvStoreStub(channel).Stats(kvstore_pb2.KvStoreStatsRequest(), timeout=5)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metric(self, name: str, default: float | None = None, **labels) -> float:
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        if default is not None:  # a labelled series appears with its first increment
            return default
        raise KeyError(f"{name}{labels} not exported by node {self.node_id}")

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"node {self.node_id} ignored SIGTERM:\n{self.log()}") from None


def launch(
    node_id: str,
    log_dir,
    *extra: str,
    env: dict | None = None,
    port: int | None = None,
    log_name: str | None = None,
    host: str = "127.0.0.1",
) -> Daemon:
    port, metrics_port = port or free_port(), free_port()
    log_path = str(log_dir / f"{log_name or 'kvstore-' + node_id}.log")
    args = [
        sys.executable,
        "-m",
        "services.kvstore",
        "--host",
        host,
        "--port",
        str(port),
        "--metrics-port",
        str(metrics_port),
        "--transfer-host",
        host,
        "--transfer-port",
        "0",
        "--grace-seconds",
        "5",
        *extra,
    ]
    if env is None or "PDSERVE_NODE_ID" not in env:
        args += ["--node-id", node_id]
    # No preexec_fn: it runs Python in a child forked from a process with live gRPC threads, which
    # can abort that child before exec (seen once: "epoll_wait error: Bad file descriptor").
    proc = subprocess.Popen(
        args, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=open(log_path, "w"), stderr=subprocess.STDOUT
    )
    return Daemon(node_id, port, metrics_port, proc, log_path, host)


def ucx_peer(*args: str) -> str:
    """Runs tests/ucx_peer.py (UCX from a process of its own); returns the last line it printed."""
    command = [sys.executable, "-m", "tests.ucx_peer", *args]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True, timeout=60).stdout
    return out.strip().splitlines()[-1]


def wait_until_serving(daemon: Daemon, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.proc.poll() is not None:
            raise AssertionError(f"node {daemon.node_id} exited with {daemon.proc.returncode}:\n{daemon.log()}")
        try:
            daemon.stats()
            return
        except grpc.RpcError:
            time.sleep(0.1)
    raise AssertionError(f"node {daemon.node_id} did not start:\n{daemon.log()}")


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("kvstore")
    daemons = {
        "A": launch("A", log_dir, "--ttl-seconds", "30"),
        "B": launch("B", log_dir, "--ttl-seconds", "30", "--connect-timeout-seconds", "3"),
        "C": launch(
            "C",
            log_dir,
            "--ttl-seconds",
            "1",
            "--host-ttl-seconds",
            "3",
            "--host-tier-bytes",
            str(HOST_TIER_BLOCKS * BLOCK_BYTES),
            "--prefix-store-bytes",
            str(PREFIX_TIER_BLOCKS * BLOCK_BYTES),
        ),
        # D takes its settings from the environment, as in a container.
        "D": launch("D", log_dir, env={"PDSERVE_NODE_ID": "D", "PDSERVE_TTL_SECONDS": "30"}),
    }
    try:
        for daemon in daemons.values():
            wait_until_serving(daemon)
        yield daemons
    finally:
        failures = []
        for daemon in daemons.values():
            rc = daemon.stop() if daemon.proc.poll() is None else daemon.proc.returncode
            if rc != 0 or "Traceback" in daemon.log():
                failures.append(f"node {daemon.node_id} exit code {rc}:\n{daemon.log()}")
        assert not failures, "\n".join(failures)


@pytest.fixture(autouse=True)
def leaves_nothing_behind(nodes, request):
    starts = {daemon.node_id: os.path.getsize(daemon.log_path) for daemon in nodes.values()}

    def logs_of_this_test():  # (shown when the test fails)
        for daemon in nodes.values():
            with open(daemon.log_path, errors="replace") as f:
                f.seek(starts[daemon.node_id])
                yield f"kvstore {daemon.node_id} log during the test", f.read()[-20000:]

    request.node.failure_logs = logs_of_this_test
    yield
    deadline = time.monotonic() + 5
    for daemon in nodes.values():
        if daemon.proc.poll() is not None:
            continue
        while True:
            s = daemon.stats()
            if (
                s.pools == 0
                and s.entries_device == 0
                and s.entries_host == 0
                and s.host_tier_bytes == 0
                and s.prefix_pinned_rows == 0
            ):
                break
            assert time.monotonic() < deadline, f"node {daemon.node_id} kept state after the test:\n{s}"
            time.sleep(0.05)


def run(coro, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Worker:
    """A prefill or decode worker as the daemon sees it: a shared-memory pool per rank of its
    instance (one, by default) plus a client."""

    def __init__(self, node: Daemon, name: str, tp: int = 1, pp: int = 1, layout: KvLayout = LAYOUT):
        self.name = name
        self.shards = instance_shards(layout, tp, pp)
        self.pools = [KvPool.allocate(rank_layout(layout, shard)) for shard in self.shards]
        self.instance = InstanceKv(layout, tuple(pool.descriptor for pool in self.pools), tp, pp)
        self.pool = self.pools[0]
        self.rows = self.pool.block_bytes_view()
        self.client = KvStoreClient(node.address)
        self.released: dict[str, tuple[list[int], str]] = {}
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Worker:
        await self.client.register_pool(self.name, self.instance, self._on_released)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.close()
        for pool in self.pools:
            pool.close()

    def _on_released(self, kv_id: str, block_ids: list[int], reason: str) -> None:
        self.released[kv_id] = (block_ids, reason)
        self._changed.set()

    async def wait_released(self, kv_id: str, timeout: float = 5.0) -> tuple[list[int], str]:
        deadline = time.monotonic() + timeout
        while kv_id not in self.released:
            self._changed.clear()
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{self.name}: no RELEASED event for {kv_id!r}"
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass
        return self.released[kv_id]

    def fill_random(self, blocks: list[int], seed: int) -> torch.Tensor:
        """Random bytes in `blocks`, as a prefill would leave KV there; returns a copy."""
        g = torch.Generator().manual_seed(seed)
        data = torch.randint(0, 256, (len(blocks), BLOCK_BYTES), dtype=torch.uint8, generator=g)
        self.rows[blocks] = data
        return data.clone()

    async def publish(self, kv_id: str, blocks: list[int], seed: int) -> tuple[common_pb2.KvHandle, torch.Tensor]:
        data = self.fill_random(blocks, seed)
        handle = await self.client.publish(kv_id, blocks, num_tokens=(len(blocks) - 1) * LAYOUT.block_size + 1)
        return handle, data


async def expect_rpc_error(code: grpc.StatusCode, coro) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await coro
    assert e.value.code() == code, e.value.details()
    return e.value.details()


# ---- transfers ----------------------------------------------------------------------------------
def test_cross_node_pull_over_ucx_is_byte_exact(nodes):
    a, b = nodes["A"], nodes["B"]
    src, dst = [3, 4, 5, 10, 11, 40, 2], [60, 61, 0, 1, 2, 30, 31]
    before_a, before_b = a.stats(), b.stats()

    async def scenario():
        async with Worker(a, "prefill-a") as prefill, Worker(b, "decode-b") as decode:
            handle, data = await prefill.publish("req-ucx", src, seed=1)
            assert (handle.node_id, handle.kvstore_address) == ("A", a.address)
            assert handle.transfer_address.startswith("ucx:")  # A's UCX worker address
            assert (handle.num_blocks, handle.num_tokens) == (7, 25)
            assert handle.layout_fingerprint == LAYOUT.fingerprint()

            response = await decode.client.pull(dst, handle)
            assert (response.path, response.bytes) == ("ucx", 7 * BLOCK_BYTES)
            assert response.seconds > 0
            assert torch.equal(decode.rows[dst], data)
            others = [i for i in range(LAYOUT.num_blocks) if i not in dst]
            assert int(decode.rows[others].count_nonzero()) == 0  # nothing written elsewhere

            assert await prefill.wait_released("req-ucx") == (src, "pulled")
            await expect_rpc_error(grpc.StatusCode.NOT_FOUND, decode.client.pull(dst, handle))

    run(scenario())
    after_a, after_b = a.stats(), b.stats()
    assert after_a.bytes_ucx_sent - before_a.bytes_ucx_sent == 7 * BLOCK_BYTES
    assert after_b.bytes_ucx_received - before_b.bytes_ucx_received == 7 * BLOCK_BYTES
    assert after_b.pulls - before_b.pulls == 1
    assert after_b.failures - before_b.failures == 1  # the second pull


def test_same_node_pull_is_a_local_copy(nodes):
    a = nodes["A"]
    before = a.stats()

    async def scenario():
        async with Worker(a, "prefill-a") as prefill, Worker(a, "decode-a") as decode:
            handle, data = await prefill.publish("req-local", [7, 8, 9, 20], seed=2)
            response = await decode.client.pull([0, 1, 50, 51], handle)
            assert (response.path, response.bytes) == ("local", 4 * BLOCK_BYTES)
            assert torch.equal(decode.rows[[0, 1, 50, 51]], data)
            assert await prefill.wait_released("req-local") == ([7, 8, 9, 20], "pulled")

    run(scenario())
    after = a.stats()
    assert after.bytes_local - before.bytes_local == 4 * BLOCK_BYTES
    assert after.bytes_ucx_sent == before.bytes_ucx_sent


def test_the_prefix_tier_keeps_offered_blocks_for_every_pool_of_the_node(nodes):
    """A decode worker's finished blocks, offered under their hashes, reach a prefill worker's pool
    byte for byte; a block offered twice is stored once; the least recently used go first when the
    8-block tier is full; bad requests are refused naming the field, before anything is copied."""
    c = nodes["C"]
    hashes = [bytes([i]) * HASH_BYTES for i in range(10)]

    async def scenario():
        async with Worker(c, "decode-c") as decode, Worker(c, "prefill-c") as prefill, Worker(c, "tp2", tp=2) as tp2:
            data = decode.fill_random([3, 4, 5, 6, 7, 8], seed=11)
            response = await decode.client.offer_prefix([3, 4, 5, 6, 7, 8], hashes[:6])
            assert (response.stored, response.present) == (6, 0)
            response = await decode.client.offer_prefix([3, 4], hashes[:2])
            assert (response.stored, response.present) == (0, 2)
            # how much is held (a prefix: it stops at the first missing hash), then a copy of it
            assert (await prefill.client.fetch_prefix(hashes[:4] + hashes[9:] + hashes[4:6])).num_blocks == 4
            response = await prefill.client.fetch_prefix(hashes[:6], [10, 11, 12, 13, 14, 15])
            assert (response.num_blocks, response.bytes) == (6, 6 * BLOCK_BYTES)
            assert torch.equal(prefill.rows[10:16], data)
            # four more blocks: the two least recently used make room, the prefix's tail first
            await decode.client.offer_prefix([20, 21, 22, 23], hashes[6:10])
            assert (await prefill.client.fetch_prefix(hashes)).num_blocks == 4
            assert (await prefill.client.fetch_prefix(hashes[6:])).num_blocks == 4
            # refused, naming the field
            for request, field in (
                ({"block_hashes": [b"short"], "block_ids": [1]}, "block_hashes[0]"),
                ({"block_hashes": hashes[:2], "block_ids": [1]}, "block_ids"),
                ({"block_hashes": [], "block_ids": []}, "block_hashes"),
                ({"block_hashes": hashes[:1], "block_ids": [LAYOUT.num_blocks]}, "block_ids"),
            ):
                details = await expect_rpc_error(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    decode.client.stub().OfferPrefix(
                        kvstore_pb2.OfferPrefixRequest(pool_id=decode.client.pool_id, **request)
                    ),
                )
                assert details.startswith(field), details
            details = await expect_rpc_error(
                grpc.StatusCode.FAILED_PRECONDITION, tp2.client.offer_prefix([1], hashes[:1])
            )
            assert details.startswith("pool_id"), details
            await expect_rpc_error(
                grpc.StatusCode.FAILED_PRECONDITION,
                prefill.client.stub().FetchPrefix(
                    kvstore_pb2.FetchPrefixRequest(pool_id="nobody", block_hashes=hashes[:1])
                ),
            )

    run(scenario())
    stats = c.stats()
    assert (stats.prefix_blocks, stats.prefix_pinned_rows) == (PREFIX_TIER_BLOCKS, 0)
    assert c.metric("pdserve_kvstore_prefix_evicted_blocks_total") == 2
    assert c.metric("pdserve_kvstore_prefix_offered_blocks_total", outcome="present") == 2


def test_concurrent_pulls_across_nodes_are_byte_exact(nodes):
    a, b = nodes["A"], nodes["B"]
    before_a, before_b = a.stats(), b.stats()

    async def scenario():
        async with (
            Worker(a, "prefill-a") as prefill_a,
            Worker(b, "decode-b") as decode_b,
            Worker(b, "prefill-b") as prefill_b,
            Worker(a, "decode-a") as decode_a,
        ):
            g = torch.Generator().manual_seed(3)
            # 16 entries of 4 blocks A -> B and 8 B -> A at the same time, 2 of them local on A,
            # with scattered destination blocks so that runs break up.
            pulls = []
            dst_b = torch.randperm(64, generator=g).tolist()
            for i in range(16):
                handle, data = await prefill_a.publish(f"a-{i}", list(range(4 * i, 4 * i + 4)), seed=100 + i)
                pulls.append((decode_b, dst_b[4 * i : 4 * i + 4], handle, data, prefill_a))
            dst_a = torch.randperm(64, generator=g).tolist()
            for i in range(8):
                src = list(range(8 * i, 8 * i + 4))
                handle, data = await prefill_b.publish(f"b-{i}", src, seed=200 + i)
                pulls.append((decode_a, dst_a[4 * i : 4 * i + 4], handle, data, prefill_b))

            responses = await asyncio.gather(*(w.client.pull(dst, h) for w, dst, h, _, _ in pulls))
            for (worker, dst, handle, data, source), response in zip(pulls, responses):
                assert response.path == "ucx"
                assert torch.equal(worker.rows[dst], data), f"{handle.kv_id} corrupted"
                _, reason = await source.wait_released(handle.kv_id)
                assert reason == "pulled"

    run(scenario())
    after_a, after_b = a.stats(), b.stats()
    assert after_a.bytes_ucx_sent - before_a.bytes_ucx_sent == 16 * 4 * BLOCK_BYTES
    assert after_b.bytes_ucx_received - before_b.bytes_ucx_received == 16 * 4 * BLOCK_BYTES
    assert after_b.bytes_ucx_sent - before_b.bytes_ucx_sent == 8 * 4 * BLOCK_BYTES
    assert after_a.bytes_ucx_received - before_a.bytes_ucx_received == 8 * 4 * BLOCK_BYTES


# ---- lifecycle ----------------------------------------------------------------------------------
def test_release_is_idempotent_and_frees_the_blocks(nodes):
    a, b = nodes["A"], nodes["B"]

    async def scenario():
        async with Worker(a, "prefill-a") as prefill, Worker(b, "decode-b") as decode:
            handle, _ = await prefill.publish("req-cancelled", [5, 6], seed=4)
            # Released from another node's client: it goes to the daemon named in the handle.
            assert await decode.client.release(handle) is True
            assert await prefill.wait_released("req-cancelled") == ([5, 6], "released")
            assert await decode.client.release(handle) is False
            await expect_rpc_error(grpc.StatusCode.NOT_FOUND, decode.client.pull([0, 1], handle))

    run(scenario())


def test_ending_the_watch_drops_the_pool_and_its_entries(nodes):
    a, b = nodes["A"], nodes["B"]
    pools_before = a.stats().pools

    async def scenario():
        async with Worker(b, "decode-b") as decode:
            prefill = Worker(a, "prefill-a")
            await prefill.__aenter__()
            h1, _ = await prefill.publish("orphan-1", [1, 2], seed=5)
            await prefill.publish("orphan-2", [3], seed=6)
            assert (a.stats().pools, a.stats().entries_device) == (pools_before + 1, 2)
            await prefill.__aexit__(None, None, None)  # the worker goes away: its watch stream ends
            deadline = time.monotonic() + 5
            while a.stats().pools != pools_before or a.stats().entries_device != 0:
                assert time.monotonic() < deadline, a.stats()
                await asyncio.sleep(0.05)
            await expect_rpc_error(grpc.StatusCode.NOT_FOUND, decode.client.pull([0, 1], h1))

    run(scenario())


def test_unpulled_entries_move_to_the_host_tier_and_are_pulled_from_there(nodes):
    b, c = nodes["B"], nodes["C"]
    moves_before = c.metric("pdserve_kvstore_ttl_moves_total")

    async def scenario():
        async with (
            Worker(c, "prefill-c") as prefill,
            Worker(c, "decode-c") as decode_c,
            Worker(b, "decode-b") as decode_b,
        ):
            h1, d1 = await prefill.publish("slow-1", [10, 11], seed=7)
            h2, d2 = await prefill.publish("slow-2", [20, 22, 21], seed=8)
            assert await prefill.wait_released("slow-1") == ([10, 11], "moved_to_host")
            assert await prefill.wait_released("slow-2") == ([20, 22, 21], "moved_to_host")
            s = c.stats()
            assert (s.entries_device, s.entries_host, s.host_tier_bytes) == (0, 2, 5 * BLOCK_BYTES)
            prefill.rows.zero_()  # the prefill worker reuses its blocks: the host copy must not care

            local = await decode_c.client.pull([3, 4], h1)
            assert (local.path, local.bytes) == ("host", 2 * BLOCK_BYTES)
            assert torch.equal(decode_c.rows[[3, 4]], d1)

            remote = await decode_b.client.pull([40, 41, 42], h2)  # served from C's host tier over UCX
            assert remote.path == "ucx"
            assert torch.equal(decode_b.rows[[40, 41, 42]], d2)
            assert set(prefill.released) == {"slow-1", "slow-2"}  # no second event after the pulls

    run(scenario())
    assert c.metric("pdserve_kvstore_ttl_moves_total") - moves_before == 2
    assert c.stats().entries_host == 0


def test_host_tier_evicts_the_oldest_and_expires_the_rest(nodes):
    c = nodes["C"]
    expired_before = c.metric("pdserve_kvstore_expired_entries_total")
    evicted_before = c.metric("pdserve_kvstore_host_evictions_total")

    async def scenario():
        async with Worker(c, "prefill-c") as prefill, Worker(c, "decode-c") as decode:
            # Bigger than the whole tier: stays in the pool, then expires (TTL + host TTL).
            await prefill.publish("too-big", list(range(40, 40 + HOST_TIER_BLOCKS + 1)), seed=9)
            h1, _ = await prefill.publish("old", [0, 1, 2, 3], seed=10)
            assert (await prefill.wait_released("old"))[1] == "moved_to_host"
            await prefill.publish("mid", [4, 5, 6, 7], seed=11)
            assert (await prefill.wait_released("mid"))[1] == "moved_to_host"
            await prefill.publish("new", [8, 9, 10, 11], seed=12)  # the tier is full: "old" goes
            assert (await prefill.wait_released("new"))[1] == "moved_to_host"
            await expect_rpc_error(grpc.StatusCode.NOT_FOUND, decode.client.pull([0, 1, 2, 3], h1))
            assert c.stats().host_tier_bytes == HOST_TIER_BLOCKS * BLOCK_BYTES

            assert await prefill.wait_released("too-big", timeout=8) == (list(range(40, 49)), "expired")
            deadline = time.monotonic() + 8
            while c.stats().entries_host:  # "mid" and "new" expire 3 s after their moves
                assert time.monotonic() < deadline, c.stats()
                await asyncio.sleep(0.1)

    run(scenario(), timeout=40)
    assert c.metric("pdserve_kvstore_host_evictions_total") - evicted_before == 1
    assert c.metric("pdserve_kvstore_expired_entries_total") - expired_before == 3


# ---- errors -------------------------------------------------------------------------------------
def test_bad_requests_are_rejected_naming_the_field(nodes):
    a = nodes["A"]

    async def scenario():
        async with Worker(a, "prefill-a") as prefill, Worker(a, "decode-a") as decode:
            stub = prefill.client.stub()
            good = kvstore_pb2.PoolLayout(
                num_blocks=64,
                num_layers=2,
                block_size=4,
                num_kv_heads=2,
                head_dim=32,
                dtype="float32",
                model_id="kvstore-test",
            )
            path, size = prefill.pool.descriptor["path"], LAYOUT.total_bytes

            def register(worker_id="w", layout=good, descriptor=f'{{"kind": "shm", "path": "{path}", "size": {size}}}'):
                return stub.RegisterPool(
                    kvstore_pb2.RegisterPoolRequest(worker_id=worker_id, layout=layout, memory_descriptors=[descriptor])
                )

            three_ranks = kvstore_pb2.PoolLayout()
            three_ranks.CopyFrom(good)
            three_ranks.tensor_parallel = 3  # 2 K/V heads do not split over 3 ranks

            invalid = grpc.StatusCode.INVALID_ARGUMENT
            for call, field in [
                (register(worker_id=""), "worker_id"),
                (register(descriptor="not json"), "memory_descriptors[0]"),
                (register(descriptor='{"kind": "tmpfs"}'), "memory_descriptors[0].kind"),
                (
                    register(descriptor=f'{{"kind": "shm", "path": "/etc/passwd", "size": {size}}}'),
                    "memory_descriptors[0].path",
                ),
                (
                    register(descriptor=f'{{"kind": "shm", "path": "/dev/shm/no-such-pool", "size": {size}}}'),
                    "memory_descriptors[0].path",
                ),
                (register(descriptor=f'{{"kind": "shm", "path": "{path}", "size": 12}}'), "memory_descriptors[0].size"),
                (register(layout=three_ranks), "layout.tensor_parallel"),
                (
                    stub.RegisterPool(
                        kvstore_pb2.RegisterPoolRequest(worker_id="w", layout=good, memory_descriptors=[])
                    ),
                    "memory_descriptors",
                ),
                (register(layout=kvstore_pb2.PoolLayout(num_blocks=0)), "layout.num_blocks"),
                (
                    register(
                        layout=kvstore_pb2.PoolLayout(
                            num_blocks=64, num_layers=2, block_size=4, num_kv_heads=2, head_dim=32, dtype="int3"
                        )
                    ),
                    "layout.dtype",
                ),
            ]:
                details = await expect_rpc_error(invalid, call)
                assert details.startswith(field + ":"), details

            client = prefill.client
            for blocks, tokens, field in [([64], 1, "block_ids"), ([1, 1], 5, "block_ids"), ([1, 2], 3, "num_tokens")]:
                details = await expect_rpc_error(invalid, client.publish("bad", blocks, tokens))
                assert details.startswith(field + ":"), details
            handle, _ = await prefill.publish("good", [1, 2], seed=13)
            assert "already published" in await expect_rpc_error(
                grpc.StatusCode.ALREADY_EXISTS, client.publish("good", [3], 1)
            )
            assert (
                await expect_rpc_error(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    stub.Publish(kvstore_pb2.PublishRequest(pool_id="nope", kv_id="x", block_ids=[1], num_tokens=1)),
                )
            ).startswith("pool_id:")

            # Pulls checked on the pulling node before anything moves.
            assert (await expect_rpc_error(invalid, decode.client.pull([5, 6, 7], handle))).startswith("block_ids:")
            other_model = common_pb2.KvHandle()
            other_model.CopyFrom(handle)
            other_model.layout_fingerprint = "other-model:2x2x4x2x32:float32"
            assert "layout mismatch" in await expect_rpc_error(
                grpc.StatusCode.FAILED_PRECONDITION, decode.client.pull([5, 6], other_model)
            )
            assert await client.release(handle)

    run(scenario())


def test_the_daemon_maps_only_pools_their_registrant_owns_and_serves_entries_only_to_their_handles(nodes):
    """Anyone reaching a daemon could once have it map another worker's 0600 /dev/shm pool by path
    (the daemon reads any file) and copy that worker's KV out over UCX, or release any entry by id."""
    a, b = nodes["A"], nodes["B"]

    async def scenario():
        async with Worker(a, "prefill-a") as victim, Worker(b, "decode-b") as thief:
            descriptor = dict(victim.pool.descriptor)
            stub = thief.client.stub(a.address)
            layout = kvstore_pb2.PoolLayout(**{k: v for k, v in LAYOUT.to_dict().items() if k != "fingerprint"})
            for proof in (None, "00" * 32, descriptor["proof"][:-2] + "ff"):
                forged = {k: v for k, v in descriptor.items() if k != "proof"} | ({"proof": proof} if proof else {})
                details = await expect_rpc_error(
                    grpc.StatusCode.PERMISSION_DENIED,
                    stub.RegisterPool(
                        kvstore_pb2.RegisterPoolRequest(
                            worker_id="thief", layout=layout, memory_descriptors=[json.dumps(forged)]
                        )
                    ),
                )
                assert details.startswith("memory_descriptors[0].proof:"), details
            handle, data = await victim.publish("secret", [1, 2], seed=31)
            forged_handle = common_pb2.KvHandle()
            forged_handle.CopyFrom(handle)
            for token in ("", "guessed-token"):
                forged_handle.access_token = token
                # across nodes (UCX from the victim's daemon) and by Release: as if there were no entry
                await expect_rpc_error(grpc.StatusCode.NOT_FOUND, thief.client.pull([3, 4], forged_handle))
                assert not await thief.client.release(forged_handle)
            assert not await thief.client.release_own("secret")  # not the thief's pool's entry
            await thief.client.pull([3, 4], handle)  # the real handle works
            assert torch.equal(thief.rows[[3, 4]], data)

    run(scenario())


def test_failed_remote_pulls_leave_the_entry_pullable(nodes):
    a, b = nodes["A"], nodes["B"]
    failures_before = b.metric("pdserve_kvstore_transfer_failures_total", default=0, reason="unavailable")

    async def scenario():
        async with Worker(a, "prefill-a") as prefill, Worker(b, "decode-b") as decode:
            handle, data = await prefill.publish("fragile", [1, 2, 3], seed=14)
            # The source daemon rejects a pull of the wrong size (the handle was tampered with).
            short = common_pb2.KvHandle()
            short.CopyFrom(handle)
            short.num_blocks = 2
            details = await expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, decode.client.pull([0, 1], short))
            assert "destination blocks for an entry of 3 blocks" in details
            # A source node that cannot be reached.
            gone = common_pb2.KvHandle()
            gone.CopyFrom(handle)
            gone.node_id, gone.transfer_address = "Z", ucx_peer("dead-address")
            started = time.monotonic()
            await expect_rpc_error(grpc.StatusCode.UNAVAILABLE, decode.client.pull([0, 1, 2], gone))
            assert time.monotonic() - started < 3 + 5  # B's --connect-timeout-seconds is 3

            response = await decode.client.pull([10, 11, 12], handle)  # still there, intact
            assert response.path == "ucx" and torch.equal(decode.rows[[10, 11, 12]], data)
            assert (await prefill.wait_released("fragile"))[1] == "pulled"

    run(scenario())
    assert b.metric("pdserve_kvstore_transfer_failures_total", reason="unavailable") - failures_before == 1


# ---- operations ---------------------------------------------------------------------------------
def test_a_pull_abandoned_mid_transfer_frees_the_entry_for_the_next_at_once(nodes):
    """A puller that drops its connection once the source has begun sending (its Pull cancelled)
    says goodbye: the source stops at once and the entry is pullable again, not after the source's
    30 s transfer timeout (each side has its own UCX endpoint: closing one tells the other
    nothing, tests/ucx_peer.py)."""
    a, b = nodes["A"], nodes["B"]

    async def scenario():
        async with Worker(a, "prefill-a") as prefill, Worker(b, "decode-b") as decode:
            blocks = [0, 1, 2, 3, 4, 5, 6]
            handle, data = await prefill.publish("abandoned", blocks, seed=41)
            fetch = {
                "kv_id": handle.kv_id,
                "access_token": handle.access_token,
                "fingerprint": LAYOUT.fingerprint(),
                "dst_blocks": blocks,
            }
            command = [sys.executable, "-m", "tests.ucx_peer", "abandon", handle.transfer_address, json.dumps(fetch)]
            peer = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:  # the peer stays alive: only its goodbye can tell the source
                assert peer.stdout is not None
                assert (await asyncio.to_thread(peer.stdout.readline)).strip() == "abandoned"
                started = time.monotonic()
                response = await decode.client.pull([10, 11, 12, 13, 14, 15, 16], handle)
                assert time.monotonic() - started < 5
            finally:
                try:
                    peer.communicate(timeout=30)  # (closes its stdin: it exits)
                finally:
                    peer.kill()
            assert response.path == "ucx" and torch.equal(decode.rows[[10, 11, 12, 13, 14, 15, 16]], data)
            assert (await prefill.wait_released("abandoned"))[1] == "pulled"

    run(scenario())


def test_garbage_hellos_and_addresses_leave_the_daemon_serving(nodes):
    """UCX trusts a worker address's bytes (garbage can fail an assertion and end the process): a
    stranger's hellos (not JSON, no address, another format's address, random bytes, oversized)
    and handles with garbage addresses are refused, and the daemon goes on serving pulls."""
    a, b = nodes["A"], nodes["B"]

    async def scenario():
        async with Worker(a, "prefill-a") as prefill, Worker(b, "decode-b") as decode:
            handle, data = await prefill.publish("after-garbage", [1, 2], seed=42)
            assert await asyncio.to_thread(ucx_peer, "garbage", handle.transfer_address) == "sent 11"
            for address in ["ucx:" + "B" * 300, "ucx:" + "A" * 12, "10.0.0.1:7101"]:
                forged = common_pb2.KvHandle()
                forged.CopyFrom(handle)
                forged.node_id, forged.transfer_address = "Z", address
                details = await expect_rpc_error(grpc.StatusCode.INVALID_ARGUMENT, decode.client.pull([3, 4], forged))
                assert "transfer_address" in details
            await decode.client.pull([3, 4], handle)
            assert torch.equal(decode.rows[[3, 4]], data)

    run(scenario())
    for daemon in (a, b):
        assert daemon.proc.poll() is None and "Traceback" not in daemon.log()


def test_metrics_endpoint_exposes_the_kvstore_metrics(nodes):
    a, b = nodes["A"], nodes["B"]

    async def scenario():
        async with Worker(a, "prefill-a") as prefill, Worker(b, "decode-b") as decode:
            handle, _ = await prefill.publish("scraped", [1], seed=15)
            await decode.client.pull([2], handle)

    run(scenario())
    text = b.metrics_text()
    for name in [
        "pdserve_kvstore_transferred_bytes_total",
        "pdserve_kvstore_transfer_duration_seconds_bucket",
        "pdserve_kvstore_entries",
        "pdserve_kvstore_host_tier_bytes",
        "pdserve_kvstore_ttl_moves_total",
        "pdserve_kvstore_pools",
        "pdserve_kvstore_pulls_total",
        "pdserve_kvstore_expired_entries_total",
        "pdserve_kvstore_served_bytes_total",
        "pdserve_grpc_largest_message_bytes",
    ]:
        assert name in text, name
    assert "# HELP pdserve_kvstore_transfer_failures_total" in text
    assert b.metric("pdserve_kvstore_transferred_bytes_total", path="ucx") >= BLOCK_BYTES
    assert b.metric("pdserve_kvstore_pulls_total", path="ucx") >= 1
    assert b.metric("pdserve_kvstore_transfer_duration_seconds_count", path="ucx") >= 1
    assert a.metric("pdserve_kvstore_served_bytes_total") >= BLOCK_BYTES
    assert a.metric("pdserve_kvstore_entries", tier="device") == 0
    # KV bytes never travel over gRPC: the largest Pull message is a tiny control message.
    assert b.metric("pdserve_grpc_largest_message_bytes", method="Pull", direction="request") < BLOCK_BYTES


def test_sigterm_ends_watch_streams_and_the_client_frees_its_blocks(nodes):
    b, d = nodes["B"], nodes["D"]
    assert d.stats().node_id == "D"  # from PDSERVE_NODE_ID

    async def scenario():
        async with Worker(d, "prefill-d") as prefill, Worker(b, "decode-b") as decode:
            handle, _ = await prefill.publish("before-stop", [5], seed=16)
            await decode.client.pull([5], handle)  # B now keeps an idle UCX endpoint to D
            h1, _ = await prefill.publish("in-flight-1", [1, 2], seed=17)
            await prefill.publish("in-flight-2", [3], seed=18)
            d.proc.send_signal(signal.SIGTERM)
            assert await prefill.wait_released("in-flight-1", timeout=10) == ([1, 2], "daemon_lost")
            assert await prefill.wait_released("in-flight-2", timeout=10) == ([3], "daemon_lost")
            assert d.proc.wait(timeout=20) == 0
            # B's pooled endpoint to D is dead now: the pull fails fast instead of hanging.
            await expect_rpc_error(grpc.StatusCode.UNAVAILABLE, decode.client.pull([1, 2], h1))

    run(scenario())
    assert "Traceback" not in d.log()


def test_a_restarted_daemon_gets_the_pool_registered_again(tmp_path):
    """SIGKILL of the node's daemon, then a new one on the same port (a DaemonSet pod restarting):
    the client hands back the blocks of its published entries, registers the pool again by
    itself, and publishing and pulling work again."""
    first = launch("E", tmp_path, "--ttl-seconds", "30", log_name="kvstore-E-first")
    wait_until_serving(first)
    second = None
    try:

        async def scenario():
            nonlocal second
            async with Worker(first, "prefill-e") as prefill, Worker(first, "decode-e") as decode:
                assert prefill.client.registered and prefill.client.registrations == 1
                await prefill.publish("before-crash", [1, 2], seed=21)
                first.proc.kill()
                first.proc.wait(timeout=10)
                assert await prefill.wait_released("before-crash", timeout=10) == ([1, 2], "daemon_lost")
                assert not prefill.client.registered
                await expect_rpc_error(grpc.StatusCode.UNAVAILABLE, prefill.publish("while-down", [3], seed=22))
                second = launch("E", tmp_path, "--ttl-seconds", "30", port=first.port, log_name="kvstore-E-second")
                deadline = time.monotonic() + 30
                while not (prefill.client.registered and decode.client.registered):
                    assert time.monotonic() < deadline, f"pools not registered again:\n{second.log()}"
                    await asyncio.sleep(0.1)
                assert prefill.client.registrations == 2 and decode.client.registrations == 2
                assert second.stats().pools == 2
                handle, data = await prefill.publish("after-restart", [4, 5], seed=23)
                await decode.client.pull([6, 7], handle)
                assert torch.equal(decode.rows[[6, 7]], data)
                assert await prefill.wait_released("after-restart") == ([4, 5], "pulled")

        run(scenario(), timeout=60)
        assert second.stats().pools == 0  # the clients closed: their pools were dropped
    finally:
        for daemon in (first, second):
            if daemon is not None and daemon.proc.poll() is None:
                daemon.stop()
    assert "Traceback" not in second.log()


def test_daemons_on_another_address_listen_there_only_and_pull_over_it(tmp_path):
    """Daemons given this machine's non-loopback address (--host and --transfer-host, as the Helm
    chart passes the node's IP) listen on that address only: gRPC, metrics, and UCX's TCP transport
    (at --transfer-port), with no sockaddr listener on every interface; a pull between two of them
    goes over that transport (UCX_TLS=tcp,self: not shared memory, though both are on this host)."""
    ip = next((address for name, address in ipv4_addresses() if not address.startswith("127.") and is_up(name)), "")
    if not ip:
        pytest.skip("this machine has no non-loopback IPv4 address")
    ucx_port, tcp_only = free_port(), {"UCX_TLS": "tcp,self"}
    source = launch("G", tmp_path, "--transfer-port", str(ucx_port), env=tcp_only, host=ip)
    puller = launch("H", tmp_path, env=tcp_only, host=ip)
    try:
        for daemon in (source, puller):
            wait_until_serving(daemon)
        listening = {  # (an IPv4-mapped IPv6 address is the IPv4 one)
            daemon.node_id: [(a.removeprefix("::ffff:"), port) for a, port in listening_sockets(daemon.proc.pid)]
            for daemon in (source, puller)
        }
        for node, sockets in listening.items():
            assert sockets and all(address == ip for address, _ in sockets), (node, sockets)
        assert any(address == ip and ucx_port <= port < ucx_port + 16 for address, port in listening["G"])

        async def scenario():
            async with Worker(source, "prefill-g") as prefill, Worker(puller, "decode-h") as decode:
                handle, data = await prefill.publish("over-eth", [1, 2, 3], seed=31)
                response = await decode.client.pull([7, 8, 9], handle)
                assert response.path == "ucx" and torch.equal(decode.rows[[7, 8, 9]], data)
                assert await prefill.wait_released("over-eth") == ([1, 2, 3], "pulled")

        run(scenario())
    finally:
        for daemon in (source, puller):
            if daemon.proc.poll() is None:
                daemon.stop()
    for daemon in (source, puller):
        assert "Traceback" not in daemon.log()


def test_a_daemon_killed_after_transfers_restarts_at_once_on_its_fixed_ports(tmp_path):
    """SIGKILL of a daemon whose UCX port (--transfer-port, fixed as in the Helm chart) carried a
    pull: its connections linger in TIME_WAIT for a minute, which a new bind to that port fails
    on (UCX binds without SO_REUSEADDR). The restarted daemon takes another port of its range and
    serves pulls again at once."""
    ucx_port, tcp_only = free_port(), {"UCX_TLS": "tcp,self"}
    first = launch("I", tmp_path, "--transfer-port", str(ucx_port), env=tcp_only, log_name="kvstore-I-first")
    puller = launch("J", tmp_path, env=tcp_only)
    second = None

    async def pull_from(source: Daemon) -> None:
        async with Worker(source, "prefill-i") as prefill, Worker(puller, "decode-j") as decode:
            handle, data = await prefill.publish("over-tcp", [1, 2], seed=51)
            response = await decode.client.pull([3, 4], handle)
            assert response.path == "ucx" and torch.equal(decode.rows[[3, 4]], data)

    try:
        for daemon in (first, puller):
            wait_until_serving(daemon)
        run(pull_from(first))
        first.proc.kill()
        first.proc.wait(timeout=10)
        second = launch(
            "I", tmp_path, "--transfer-port", str(ucx_port), env=tcp_only, port=first.port, log_name="kvstore-I-second"
        )
        wait_until_serving(second)
        run(pull_from(second))
    finally:
        for daemon in (second, puller):
            if daemon is not None and daemon.proc.poll() is None:
                daemon.stop()
    assert second is not None and "Traceback" not in second.log()


def test_cpu_affinity_flag_pins_every_thread(tmp_path):
    """--cpu-affinity (a flag of every service) pins all the process's threads, including those
    that imports and the gRPC server started before or after the flag was applied."""
    daemon = launch("node-pinned", tmp_path, "--cpu-affinity", "0")
    try:
        wait_until_serving(daemon)
        tids = os.listdir(f"/proc/{daemon.proc.pid}/task")
        assert len(tids) > 1
        assert {int(t): os.sched_getaffinity(int(t)) for t in tids} == {int(t): {0} for t in tids}
    finally:
        assert daemon.stop() == 0


# ---- pulls between instances of different parallelism ---------------------------------------------
# 4 layers and 4 K/V heads: pipeline stages of 2 layers, tensor-parallel shares of 1, 2 or 4 heads,
# and 8 ranks replicate every head twice.
SHARDED = KvLayout(
    num_blocks=16, num_layers=4, block_size=4, num_kv_heads=4, head_dim=8, dtype="float32", model_id="kvstore-test"
)
LAYOUT_PAIRS = [  # (source tp, pp) -> (destination tp, pp)
    ((2, 1), (1, 1)),
    ((1, 1), (2, 1)),
    ((4, 1), (2, 1)),
    ((1, 2), (2, 1)),
    ((2, 2), (1, 1)),
    ((8, 1), (1, 2)),
    ((1, 1), (8, 1)),
]


def fill_shards(worker: Worker, blocks: list[int], whole: torch.Tensor) -> None:
    """Writes each rank's layers and heads of `whole` ([len(blocks), *SHARDED.block_shape]) into
    its pool, as the ranks of a prefill instance would leave their KV."""
    for pool, shard in zip(worker.pools, worker.shards, strict=True):
        pool.tensor[blocks] = whole[:, shard.layers][:, :, :, :, shard.heads]


def rank_share_bytes(worker: Worker, num_blocks: int) -> int:
    return num_blocks * sum(pool.layout.block_bytes for pool in worker.pools)


@pytest.mark.parametrize("src_layout,dst_layout", LAYOUT_PAIRS, ids=lambda p: f"tp{p[0]}pp{p[1]}")
@pytest.mark.parametrize("where", ["same-node", "across-nodes", "from-host-tier"])
def test_a_pull_between_layouts_moves_each_destination_rank_exactly_its_share(nodes, src_layout, dst_layout, where):
    src_node, dst_node = {
        "same-node": (nodes["A"], nodes["A"]),
        "across-nodes": (nodes["A"], nodes["B"]),
        "from-host-tier": (nodes["C"], nodes["B"]),  # C moves it to its host tier after 1 s
    }[where]
    src_blocks, dst_blocks = [3, 4, 9, 1], [0, 1, 12, 7]  # (8 replicas of 4 blocks fill C's host tier)
    whole = torch.randn(len(src_blocks), *SHARDED.block_shape, generator=torch.Generator().manual_seed(5))
    counters = ("bytes_local", "bytes_ucx_sent", "bytes_ucx_received")
    involved = {src_node.node_id: src_node, dst_node.node_id: dst_node}
    before = {name: n.stats() for name, n in involved.items()}

    async def scenario() -> int:
        async with (
            Worker(src_node, "prefill", *src_layout, layout=SHARDED) as prefill,
            Worker(dst_node, "decode", *dst_layout, layout=SHARDED) as decode,
        ):
            fill_shards(prefill, src_blocks, whole)
            handle = await prefill.client.publish("sharded", src_blocks, num_tokens=len(src_blocks) * 4)
            assert (handle.tensor_parallel, handle.pipeline_parallel) == src_layout
            if where == "from-host-tier":
                assert (await prefill.wait_released("sharded"))[1] == "moved_to_host"
                for pool in prefill.pools:
                    pool.tensor.zero_()  # its blocks are free again: the host copy must not care
            response = await decode.client.pull(dst_blocks, handle)
            expected = rank_share_bytes(decode, len(dst_blocks))
            assert response.bytes == expected
            others = [b for b in range(SHARDED.num_blocks) if b not in dst_blocks]
            for rank, (pool, shard) in enumerate(zip(decode.pools, decode.shards, strict=True)):
                want = whole[:, shard.layers][:, :, :, :, shard.heads]
                assert torch.equal(pool.tensor[dst_blocks], want), f"destination rank {rank}"
                assert int(pool.tensor[others].count_nonzero()) == 0, f"rank {rank} written outside its blocks"
            return expected

    expected = run(scenario())
    moved = {
        name: {c: getattr(n.stats(), c) - getattr(before[name], c) for c in counters} for name, n in involved.items()
    }
    if where == "same-node":
        assert moved[src_node.node_id] == {"bytes_local": expected, "bytes_ucx_sent": 0, "bytes_ucx_received": 0}
    else:
        assert moved[src_node.node_id]["bytes_ucx_sent"] == expected
        assert moved[dst_node.node_id]["bytes_ucx_received"] == expected
        assert moved[dst_node.node_id]["bytes_local"] == 0


def test_a_handle_that_misstates_its_layout_is_refused_and_the_entry_stays_pullable(nodes):
    """The puller plans the pieces from the handle's tp and pp: a handle altered to another layout
    (or an absurd one) is refused before any byte moves, on the pulling node or by the source."""
    a, b = nodes["A"], nodes["B"]

    async def scenario():
        async with (
            Worker(a, "prefill", 2, 1, layout=SHARDED) as prefill,
            Worker(b, "decode", 1, 1, layout=SHARDED) as decode,
        ):
            whole = torch.randn(2, *SHARDED.block_shape, generator=torch.Generator().manual_seed(9))
            fill_shards(prefill, [1, 2], whole)
            handle = await prefill.client.publish("misstated", [1, 2], num_tokens=8)
            for tp, code, field in [
                (4, grpc.StatusCode.FAILED_PRECONDITION, "handle.tensor_parallel"),  # the source says no
                (2**31, grpc.StatusCode.INVALID_ARGUMENT, "handle.tensor_parallel"),
                (3, grpc.StatusCode.INVALID_ARGUMENT, "handle.tensor_parallel"),
            ]:
                forged = common_pb2.KvHandle()
                forged.CopyFrom(handle)
                forged.tensor_parallel = tp
                details = await expect_rpc_error(code, decode.client.pull([5, 6], forged))
                assert field in details, details
            await decode.client.pull([5, 6], handle)
            assert torch.equal(decode.pools[0].tensor[[5, 6]], whole)

    run(scenario())


def test_the_kv_throughput_bench_moves_exact_bytes_through_the_kvstore_and_raw(tmp_path):
    """bench.kv_throughput (the GPU acceptance figures of the serving-path issue, run here on CPU
    pools): two real daemons, a pull on one node and one over UCX, a raw copy and a raw ucxx
    transfer, the pulled bytes checked; it reports each path's GB/s and the kvstore's over raw."""
    bench = subprocess.Popen(
        [sys.executable, "-m", "bench.kv_throughput", "--mib", "4", "--rounds", "2", "--out", str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its daemons and receiver go with it if it hangs
    )
    try:
        output, _ = bench.communicate(timeout=300)
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.wait()
    assert bench.returncode == 0, output
    results = json.loads((tmp_path / "kv-throughput.json").read_text())
    assert results["bytes"] == 4 << 20 and results["device"] == "cpu"
    assert set(results["gb_per_s"]) == {"kvstore local", "kvstore UCX", "raw copy", "raw UCX"}
    assert all(len(trials) == 2 for trials in results["trials"].values())
    assert all(v > 0 for v in results["gb_per_s"].values()) and all(v > 0 for v in results["over_raw"].values())
    assert (tmp_path / "kv-throughput.png").stat().st_size > 0
