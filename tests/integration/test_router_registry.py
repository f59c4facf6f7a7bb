"""Worker discovery: static addresses and a DNS name resolving to several workers (a Kubernetes
headless service), health from real gRPC Stats servers, and the dispatch policies."""

import asyncio
import time

import grpc
import pytest

from pdserve.v1 import common_pb2, common_pb2_grpc
from services.common.certs import new_cluster_ca
from services.common.grpc_client import use_tls
from services.common.tls import channel_credentials, channel_options, server_credentials
from services.launcher import free_port
from services.router.policies import pick_decode, pick_prefill
from services.router.registry import WorkerRegistry


class FakeWorkerStats(common_pb2_grpc.WorkerServicer):
    """A real gRPC server answering Stats, standing in for a worker's load report."""

    def __init__(self, **fields):
        self.stats = common_pb2.WorkerStats(**fields)

    async def Stats(self, request, context):
        return self.stats


async def _serve(address: str, servicer) -> grpc.aio.Server:
    server = grpc.aio.server()
    common_pb2_grpc.add_WorkerServicer_to_server(servicer, server)
    assert server.add_insecure_port(address)
    await server.start()
    return server


def test_dns_name_resolving_to_many_workers_and_churn():
    async def run():
        port = free_port()
        ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        fakes = {
            ip: FakeWorkerStats(role="decode", kv_blocks_free=100 * (i + 1), kv_blocks_total=400)
            for i, ip in enumerate(ips)
        }
        servers = {ip: await _serve(f"{ip}:{port}", fakes[ip]) for ip in ips}
        answer = list(ips)

        async def resolve(host, p):
            assert (host, p) == ("decode.pdserve.svc", port)
            return list(answer)

        registry = WorkerRegistry(
            {}, {"decode": [f"decode.pdserve.svc:{port}"]}, poll_interval=0.1, resolve_host=resolve
        )
        await registry.start()
        try:
            assert sorted(ep.address for ep in registry.eligible("decode")) == [f"{ip}:{port}" for ip in ips]
            # most free blocks wins; what the router dispatched since the last poll counts against it
            best = pick_decode(registry.eligible("decode"))
            assert best.address == f"127.0.0.3:{port}"
            best.reserved_blocks = 250
            assert pick_decode(registry.eligible("decode")).address == f"127.0.0.2:{port}"
            # a pod goes away: it leaves DNS, and the registry drops it
            answer.remove("127.0.0.2")
            await servers["127.0.0.2"].stop(None)
            await registry.refresh()
            assert sorted(ep.address for ep in registry.endpoints.values()) == [
                f"127.0.0.1:{port}",
                f"127.0.0.3:{port}",
            ]
            # a pod dies without leaving DNS yet: it turns unhealthy after failed polls
            await servers["127.0.0.3"].stop(None)
            await registry.refresh()
            await registry.refresh()
            assert [ep.address for ep in registry.eligible("decode")] == [f"127.0.0.1:{port}"]
            # draining workers take no new work
            fakes["127.0.0.1"].stats.draining = True
            await registry.refresh()
            assert registry.eligible("decode") == []
        finally:
            await registry.close()
            for server in servers.values():
                await server.stop(None)

    asyncio.run(run())


def test_prefill_policy_least_estimated_queue_delay():
    async def run():
        ports = [free_port(), free_port()]
        slow_busy = FakeWorkerStats(role="prefill", queued_prompt_tokens=2000, prefill_seconds_per_token=1e-4)
        fast_idle = FakeWorkerStats(role="prefill", queued_prompt_tokens=300, prefill_seconds_per_token=2e-4)
        servers = [await _serve(f"127.0.0.1:{p}", f) for p, f in zip(ports, (slow_busy, fast_idle))]
        registry = WorkerRegistry({"prefill": [f"127.0.0.1:{p}" for p in ports]}, {}, poll_interval=10)
        await registry.start()
        try:
            eligible = registry.eligible("prefill")
            assert pick_prefill(eligible).address == f"127.0.0.1:{ports[1]}"  # 0.06 s of queue against 0.2 s
            eligible[1].inflight_prompt_tokens = 1500  # the router just sent it a burst
            assert pick_prefill(registry.eligible("prefill")).address == f"127.0.0.1:{ports[0]}"
        finally:
            await registry.close()
            for server in servers:
                await server.stop(None)

    asyncio.run(run())


def test_a_stats_poll_clears_only_the_reservations_it_can_reflect():
    """Blocks the router reserved on a decode worker before a Stats poll are in the poll's answer
    and cleared; blocks reserved while the poll was in flight may not be, and are kept."""

    class SlowStats(FakeWorkerStats):
        def __init__(self, **fields):
            super().__init__(**fields)
            self.answer = None  # an Event: the next Stats waits for it

        async def Stats(self, request, context):
            if self.answer is not None:
                await self.answer.wait()
            return self.stats

    async def run():
        port = free_port()
        worker = SlowStats(role="decode", kv_blocks_free=100, kv_blocks_total=100)
        server = await _serve(f"127.0.0.1:{port}", worker)
        registry = WorkerRegistry({"decode": [f"127.0.0.1:{port}"]}, {}, poll_interval=3600)
        await registry.start()
        try:
            (ep,) = registry.eligible("decode")
            ep.reserved_blocks = 3  # dispatched before the poll
            worker.answer = asyncio.Event()
            poll = asyncio.create_task(registry.refresh())
            await asyncio.sleep(0.3)  # the poll is waiting for its answer
            ep.reserved_blocks += 5  # dispatched meanwhile
            worker.answer.set()
            await poll
            assert ep.reserved_blocks == 5
        finally:
            await registry.close()
            await server.stop(None)

    asyncio.run(run())


def test_router_readiness_follows_its_workers_for_the_server_and_the_service_name(tmp_path):
    """A real router process: the server's status ("", the readiness probe's) is NOT_SERVING until a
    prefill and a decode worker answer Stats polls, SERVING while they do, NOT_SERVING when they go;
    pdserve.v1.Router (the startup and liveness probes') stays SERVING throughout: a router waiting
    for workers must not be restarted."""
    import os
    import subprocess
    import sys
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    router_port, prefill_port, decode_port = free_port(), free_port(), free_port()
    log_path = tmp_path / "router.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.router",
            "--host",
            "127.0.0.1",
            "--port",
            str(router_port),
            "--metrics-port",
            "-1",
            "--http-port",
            "-1",
            "--prefill",
            f"127.0.0.1:{prefill_port}",
            "--decode",
            f"127.0.0.1:{decode_port}",
            "--poll-interval",
            "0.2",
        ],
        cwd=root,
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
    )

    def statuses() -> tuple[int, int] | None:
        try:
            with grpc.insecure_channel(f"127.0.0.1:{router_port}") as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                return tuple(
                    stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=2).status
                    for name in ("", "pdserve.v1.Router")
                )
        except grpc.RpcError:
            return None  # not up yet

    def wait_for(want, timeout=60.0):
        deadline = time.monotonic() + timeout
        while (got := statuses()) != want:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"health {got}, wanted {want}:\n{log_path.read_text()}"
            time.sleep(0.1)

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    try:
        wait_for((not_serving, serving))

        async def with_workers():
            servers = [
                await _serve(f"127.0.0.1:{prefill_port}", FakeWorkerStats(role="prefill", kv_blocks_total=10)),
                await _serve(f"127.0.0.1:{decode_port}", FakeWorkerStats(role="decode", kv_blocks_total=10)),
            ]
            try:
                await asyncio.to_thread(wait_for, (serving, serving))
            finally:
                for server in servers:
                    await server.stop(None)
            await asyncio.to_thread(wait_for, (not_serving, serving))  # workers gone: not ready, still live

        asyncio.run(with_workers())
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_channels_follow_a_renewed_certificate_through_a_ca_rotation(tmp_path):
    """The router's channels present this process's certificate as renewed on disk. A CA rotation:
    both CAs trusted, every certificate renewed by the new one, then the old CA dropped; a worker
    restarted after that accepts only the new CA's certificates, and the router reaches it again. A
    channel opened before the renewal presents the old certificate on every connection it makes:
    it is refused (checked too)."""
    old_ca, new_ca = new_cluster_ca(str(tmp_path / "old")), new_cluster_ca(str(tmp_path / "new"))
    worker_files, router_files = old_ca.issue("worker", "127.0.0.1"), old_ca.issue("router", "127.0.0.1")
    stale = channel_credentials(router_files)  # what a channel opened now keeps
    address = f"127.0.0.1:{free_port()}"

    async def serve() -> grpc.aio.Server:
        server = grpc.aio.server()
        common_pb2_grpc.add_WorkerServicer_to_server(FakeWorkerStats(role="prefill"), server)
        assert server.add_secure_port(address, server_credentials(worker_files, require_client_cert=True))
        await server.start()
        return server

    def rewrite(path: str, data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)

    async def run():
        server = await serve()
        use_tls(router_files)
        registry = WorkerRegistry({"prefill": [address]}, {}, poll_interval=0.1)
        try:
            await registry.start()
            assert [ep.address for ep in registry.eligible("prefill")] == [address]
            old_pem, new_pem = (open(ca.ca, "rb").read() for ca in (old_ca, new_ca))
            rewrite(old_ca.ca, old_pem + new_pem)  # (the path both files name) both CAs trusted
            for files, name in ((worker_files, "worker"), (router_files, "router")):
                renewed = new_ca.issue(name, "127.0.0.1")
                rewrite(files.cert, open(renewed.cert, "rb").read())
                rewrite(files.key, open(renewed.key, "rb").read())
            rewrite(old_ca.ca, new_pem)  # the old CA dropped
            await asyncio.sleep(1.1)  # (a process looks at its files at most once a second)
            await server.stop(None)  # the worker restarts: new connections, new CA only
            server = await serve()
            restarted = time.monotonic()
            deadline = restarted + 10
            while not [ep for ep in registry.eligible("prefill") if ep.last_ok > restarted]:  # a Stats answer
                assert time.monotonic() < deadline, "the router did not reach the restarted worker"
                await registry.refresh()
                await asyncio.sleep(0.1)
            options = channel_options(router_files)
            async with grpc.aio.secure_channel(address, stale, options=options) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await common_pb2_grpc.WorkerStub(channel).Stats(common_pb2.StatsRequest(), timeout=5)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            use_tls(None)
            await registry.close()
            await server.stop(None)

    asyncio.run(run())
