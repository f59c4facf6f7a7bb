"""The workers' gRPC services, in this process with the real interceptor and, for the prefill
worker, a real kvstore daemon: a worker whose engine step raises fails that step's requests with
INTERNAL, frees their blocks and goes on serving; requests that share a request id are served apart.

The fault is injected: a device error cannot happen on a CPU, so the engine's model runner is made
to raise, as a lost GPU would make it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from prometheus_client import CollectorRegistry

from pdserve.v1 import common_pb2, common_pb2_grpc, worker_pb2, worker_pb2_grpc
from pdserve.v1.worker_pb2 import DecodeStreamRequest, GenerateStreamRequest
from services.colocated.server import ColocatedService
from services.common.enums import Role
from services.common.grpc_client import aio_channel
from services.common.latency_profile import DecodeLatency, LatencyProfile, PrefillLatency
from services.common.server import COLUMNS_METADATA, ServiceRunner
from services.decode.server import DecodeService
from services.engine.config import EngineConfig
from services.engine.emulated import EmulatedEngine
from services.engine.engine import Engine, EngineBase
from services.kvstore.client import KvStoreClient
from services.launcher import free_port, health_status
from services.prefill.server import PrefillService
from services.router.worker_calls import WorkerCall
from services.runtime.worker import add_worker_servicers
from services.tiny_models import get_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVING, NOT_SERVING = 1, 2


def _engine() -> Engine:
    return Engine(get_model("llama"), EngineConfig(kv_cache_bytes=4 << 20, max_model_len=256))


async def _serve(role: Role, service) -> tuple[ServiceRunner, str]:
    port = free_port()
    runner = ServiceRunner(role, "127.0.0.1", port, -1, CollectorRegistry(), grace_seconds=5)
    await service.start()
    await runner.start(lambda server: add_worker_servicers(server, role, service))
    return runner, f"127.0.0.1:{port}"


async def _stop(runner: ServiceRunner, service) -> None:
    runner.request_stop()
    await runner.wait_and_drain(service.drain)


def _device_lost(*_):
    raise RuntimeError("device lost")


async def _stats(channel) -> common_pb2.WorkerStats:
    return await common_pb2_grpc.WorkerStub(channel).Stats(common_pb2.StatsRequest(), timeout=5)


def test_a_failing_batch_step_fails_its_streams_frees_their_blocks_and_the_worker_goes_on(monkeypatch):
    """Colocated worker (the decode worker runs the same continuous-batch code): three streams get
    their first token from the prefill step, then the decode step raises."""
    engine = _engine()

    async def scenario():
        metrics = CollectorRegistry()
        service = ColocatedService(engine, node_id="n", model_name="m", registry=metrics)
        runner, address = await _serve(Role.COLOCATED, service)
        async with aio_channel(address) as channel:
            call = WorkerCall(address, worker_pb2_grpc.ColocatedWorkerStub(channel).Generate, GenerateStreamRequest)

            async def generate(i: int, max_tokens: int) -> tuple[list[int], grpc.aio.AioRpcError | None]:
                request = worker_pb2.GenerateTokensRequest(
                    request_id=f"r{i}",
                    token_ids=[5 + i] * (10 + i),
                    sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                )
                tokens: list[int] = []
                try:
                    async for chunk in call.open(request, timeout=30):
                        tokens.extend(chunk.token_ids)
                except grpc.aio.AioRpcError as exc:
                    return tokens, exc
                return tokens, None

            monkeypatch.setattr(engine.runner, "decode", _device_lost)
            results = await asyncio.gather(*(generate(i, 20) for i in range(3)))
            for tokens, error in results:
                assert len(tokens) == 1 and error is not None
                assert error.code() == grpc.StatusCode.INTERNAL and "device lost" in error.details()
            stats = await _stats(channel)
            assert stats.kv_blocks_free == stats.kv_blocks_total and stats.running == stats.waiting == 0
            monkeypatch.undo()
            tokens, error = await generate(9, 6)
            assert error is None and len(tokens) == 6
            stats = await _stats(channel)
            assert stats.kv_blocks_free == stats.kv_blocks_total
            assert metrics.get_sample_value("pdserve_decode_failed_steps_total") == 1
            # a retired call (the router opens another after a certificate renewal): the request on
            # it runs to its end, then the worker ends the call
            on_retired = asyncio.ensure_future(generate(10, 6))
            await asyncio.sleep(0)  # (it has opened its stream)
            call.retire()
            tokens, error = await on_retired
            assert error is None and len(tokens) == 6
            reader = call._reader
            assert reader is not None
            await asyncio.wait_for(reader, 5)
            # the last request cancelled mid-stream, then the call retired at once (its cancel and
            # the close of the router's side back to back): the call ends, the blocks are freed
            call = WorkerCall(address, worker_pb2_grpc.ColocatedWorkerStub(channel).Generate, GenerateStreamRequest)
            request = worker_pb2.GenerateTokensRequest(
                request_id="long",
                token_ids=[7] * 12,
                sampling=common_pb2.SamplingParams(max_tokens=200, temperature=0, ignore_eos=True),
            )
            stream = call.open(request, timeout=30)
            await stream.__anext__()
            stream.cancel()
            call.retire()
            reader = call._reader
            assert reader is not None
            await asyncio.wait_for(reader, 5)
            for _ in range(100):  # (the cancel reaches the engine thread between steps)
                stats = await _stats(channel)
                if stats.kv_blocks_free == stats.kv_blocks_total:
                    break
                await asyncio.sleep(0.05)
            assert stats.kv_blocks_free == stats.kv_blocks_total and stats.running == 0
        await _stop(runner, service)

    asyncio.run(scenario())
    engine.close()


@pytest.fixture
def kvstore(kvstore_daemon):
    return kvstore_daemon[0]


@pytest.fixture
def kvstore_daemon(tmp_path):
    """A kvstore daemon: its address and its process."""
    port = free_port()
    proc = _start_kvstore(tmp_path, port)
    address = f"127.0.0.1:{port}"
    _wait_serving(address, proc, tmp_path / f"kvstore-{port}.log")
    yield address, proc
    proc.terminate()
    assert proc.wait(timeout=20) == 0


def _start_kvstore(tmp_path, port: int, node_id: str = "n") -> subprocess.Popen:
    with open(tmp_path / f"kvstore-{port}.log", "a") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "services.kvstore", "--host", "127.0.0.1", "--port", str(port)]
            + ["--metrics-port", "-1", "--node-id", node_id, "--transfer-host", "127.0.0.1"],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _wait_serving(address: str, proc: subprocess.Popen, log_path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while health_status(address) != SERVING and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert health_status(address) == SERVING, log_path.read_text()


async def _prefill(stub, request_id: str, prompt: list[int]) -> worker_pb2.PrefillResponse:
    """The worker's two messages (the first token, then the KV handle) as one."""
    merged = worker_pb2.PrefillResponse()
    request = worker_pb2.PrefillRequest(
        request_id=request_id,
        token_ids=prompt,
        sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
    )
    async for response in stub.Prefill(request, timeout=30):
        merged.MergeFrom(response)
    return merged


def _prefill_service(engine: EngineBase, kvstore: str) -> PrefillService:
    return PrefillService(
        engine,
        KvStoreClient(kvstore),
        worker_id="prefill-test",
        node_id="n",
        model_name="m",
        registry=CollectorRegistry(),
    )


async def _release_and_wait_until_free(kvstore: str, channel, handles) -> None:
    """Releases the published entries (nobody will pull them); their blocks come back on the
    daemon's RELEASED events."""
    client = KvStoreClient(kvstore)
    for handle in handles:
        assert await client.release(handle)
    await client.close()
    for _ in range(100):
        stats = await _stats(channel)
        if stats.kv_blocks_free == stats.kv_blocks_total:
            break
        await asyncio.sleep(0.05)
    assert stats.kv_blocks_free == stats.kv_blocks_total and stats.published_entries == 0


def test_a_failing_prefill_fails_its_prompts_frees_their_blocks_and_the_worker_goes_on(monkeypatch, kvstore):
    engine = _engine()

    async def scenario():
        service = _prefill_service(engine, kvstore)
        runner, address = await _serve(Role.PREFILL, service)
        async with aio_channel(address) as channel:
            stub = worker_pb2_grpc.PrefillWorkerStub(channel)

            def prefill(i: int):
                return _prefill(stub, f"p{i}", [5 + i] * (10 + i))

            monkeypatch.setattr(engine.runner, "prefill", _device_lost)
            failures = await asyncio.gather(*(prefill(i) for i in range(3)), return_exceptions=True)
            for error in failures:
                assert isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.INTERNAL
                assert "device lost" in error.details()
            stats = await _stats(channel)
            assert stats.kv_blocks_free == stats.kv_blocks_total and stats.waiting == 0
            monkeypatch.undo()
            response = await prefill(5)
            assert response.kv.kv_id and response.kv.num_tokens == 15  # computed and published
            assert (await _stats(channel)).published_entries == 1
            await _release_and_wait_until_free(kvstore, channel, [response.kv])
        await _stop(runner, service)

    asyncio.run(scenario())
    engine.close()


def test_prefill_requests_sharing_a_request_id_are_served_apart(kvstore):
    """Request ids come from clients and may repeat: concurrent prefills with the same id each get
    their own first token and their own KV entry, in one batch or several."""
    engine = _engine()

    async def scenario():
        service = _prefill_service(engine, kvstore)
        runner, address = await _serve(Role.PREFILL, service)
        async with aio_channel(address) as channel:
            stub = worker_pb2_grpc.PrefillWorkerStub(channel)
            prompts = [[5 + i] * (8 + 3 * i) for i in range(6)]
            responses = await asyncio.gather(*(_prefill(stub, "same", prompt) for prompt in prompts))
            assert [r.kv.num_tokens for r in responses] == [len(p) for p in prompts]
            assert len({r.kv.kv_id for r in responses}) == len(prompts)
            alone = [await _prefill(stub, "other", prompt) for prompt in prompts]
            assert [r.first_token_id for r in responses] == [r.first_token_id for r in alone]  # each its own prompt's
            await _release_and_wait_until_free(kvstore, channel, [r.kv for r in responses + alone])
        await _stop(runner, service)

    asyncio.run(scenario())
    engine.close()


def test_the_first_token_comes_before_the_kv_handle_and_a_cancel_between_releases_the_kv(kvstore_daemon):
    """Prefill streams the first token as soon as its batch is computed, then the handle once the KV
    is published; a caller that goes away after the first token leaves no entry and no held block."""
    kvstore, daemon_process = kvstore_daemon
    engine = _engine()

    async def scenario():
        service = _prefill_service(engine, kvstore)
        runner, address = await _serve(Role.PREFILL, service)
        async with aio_channel(address) as channel:
            stub = worker_pb2_grpc.PrefillWorkerStub(channel)
            request = worker_pb2.PrefillRequest(
                request_id="r", token_ids=[7] * 40, sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0)
            )
            messages = [m async for m in stub.Prefill(request, timeout=30)]
            assert len(messages) == 2 and not messages[0].HasField("kv") and messages[0].compute_seconds > 0
            assert messages[1].kv.num_tokens == 40 and not messages[1].compute_seconds
            await _release_and_wait_until_free(kvstore, channel, [messages[1].kv])
            # Cancelled after the first token, while the publish is still on its way: the daemon is
            # paused so that it is (a handle written before the cancel arrives would be the
            # caller's to release, as the router does).
            daemon_process.send_signal(signal.SIGSTOP)
            try:
                for _ in range(5):
                    call = stub.Prefill(request, timeout=30)
                    assert not (await call.read()).HasField("kv")
                    call.cancel()
                await asyncio.sleep(0.2)
            finally:
                daemon_process.send_signal(signal.SIGCONT)
            for _ in range(100):
                stats = await _stats(channel)
                if stats.kv_blocks_free == stats.kv_blocks_total and stats.published_entries == 0:
                    break
                await asyncio.sleep(0.05)
            assert stats.kv_blocks_free == stats.kv_blocks_total and stats.published_entries == 0
            daemon = KvStoreClient(kvstore)
            entries = await daemon.stats()
            await daemon.close()
            assert entries.entries_device + entries.entries_host == 0
        await _stop(runner, service)

    asyncio.run(scenario())
    engine.close()


def test_a_colocated_worker_grouping_tokens_sends_the_first_one_at_once():
    """--stream-interval groups tokens into messages, but never holds the first token back (it
    is the request's TTFT) nor the last."""
    engine = _engine()

    async def scenario():
        service = ColocatedService(engine, node_id="n", model_name="m", registry=CollectorRegistry(), stream_interval=8)
        runner, address = await _serve(Role.COLOCATED, service)
        async with aio_channel(address) as channel:
            call = WorkerCall(address, worker_pb2_grpc.ColocatedWorkerStub(channel).Generate, GenerateStreamRequest)
            request = worker_pb2.GenerateTokensRequest(
                request_id="r",
                token_ids=[5] * 20,
                sampling=common_pb2.SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
            )
            sizes = [len(chunk.token_ids) async for chunk in call.open(request, timeout=30)]
            await call.close()
        await _stop(runner, service)
        return sizes

    sizes = asyncio.run(scenario())
    engine.close()
    assert sizes[0] == 1 and sum(sizes) == 20
    assert max(sizes) <= 8 and len(sizes) <= 1 + 3  # the rest grouped: 8, 8 and the last 3


def test_an_emulated_prefill_pipeline_takes_the_next_batch_once_its_first_stage_is_free(kvstore):
    """A pp-2 emulated prefill instance (the planner simulates pipelines so, and picks them for
    prefill): a batch's first token comes the whole prefill time after it started, and the next
    batch starts half that time after it, not when the first is done."""
    batch = 0.2  # seconds per prefill batch, whatever its size
    profile = LatencyProfile(
        prefill=PrefillLatency(a=batch, b=0.0, c=0.0),
        decode=DecodeLatency(a=0.01, b=0.0, c=0.0),
        kv_bytes_per_token=4096,
        kv_capacity_tokens=16 * 256,
        block_size=16,
        max_batched_tokens=64,  # one prompt per batch
        max_num_seqs=8,
        model="llama-3-8b",
        device="H100-80G",
        source="analytic",
        pipeline_parallel=2,
    )
    engine = EmulatedEngine(get_model("llama"), EngineConfig(device="emulated"), profile)

    async def scenario():
        service = _prefill_service(engine, kvstore)
        runner, address = await _serve(Role.PREFILL, service)
        async with aio_channel(address) as channel:
            stub = worker_pb2_grpc.PrefillWorkerStub(channel)
            await _release_and_wait_until_free(kvstore, channel, [(await _prefill(stub, "warm", [5] * 40)).kv])

            async def timed(request_id: str, delay: float):
                await asyncio.sleep(delay)
                response = await _prefill(stub, request_id, [6] * 40)
                return response, time.monotonic()

            started = time.monotonic()
            (first, first_done), (second, second_done) = await asyncio.gather(timed("a", 0), timed("b", 0.02))
            assert first.compute_seconds >= batch and second.compute_seconds >= batch  # each batch's latency
            assert batch <= first_done - started < batch + 0.05
            # b entered when a left the first stage (0.1 s), so its token came at 0.3 s, not 0.4 s
            assert 1.5 * batch <= second_done - started < 1.5 * batch + 0.05
            assert second.queue_seconds == pytest.approx(batch / 2 - 0.02, abs=0.02)
            await _release_and_wait_until_free(kvstore, channel, [first.kv, second.kv])
        await _stop(runner, service)

    asyncio.run(scenario())
    engine.close()


@pytest.mark.parametrize("columns", [True, False], ids=["router-reads-columns", "older-router"])
def test_one_call_carries_many_requests_and_a_bad_one_fails_alone(columns):
    """A colocated worker's call (the router's one call per worker, raw here): each step's tokens
    for every request come in one StreamUpdate; a request that fails validation, or that reuses a
    stream id in progress, gets its status on its own stream while the others go on; cancelling
    one and then ending the call frees every block. Plain tokens come in the update's columns only
    to a caller that said it reads them (an older router, during a rolling upgrade, does not)."""
    engine = _engine()

    def start(stream_id: int, token_ids: list[int], max_tokens: int) -> GenerateStreamRequest:
        sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        request = worker_pb2.GenerateTokensRequest(request_id=f"r{stream_id}", token_ids=token_ids, sampling=sampling)
        return GenerateStreamRequest(stream_id=stream_id, start=request)

    async def scenario():
        service = ColocatedService(engine, node_id="n", model_name="m", registry=CollectorRegistry())
        runner, address = await _serve(Role.COLOCATED, service)
        async with aio_channel(address) as channel:
            outbox: asyncio.Queue = asyncio.Queue()

            async def requests():
                while (item := await outbox.get()) is not None:
                    yield item

            metadata = (COLUMNS_METADATA,) if columns else ()
            call = worker_pb2_grpc.ColocatedWorkerStub(channel).Generate(requests(), metadata=metadata)
            for i in (1, 2, 3):
                outbox.put_nowait(start(i, [5 + i] * 12, 30))
            outbox.put_nowait(start(4, [5, 99999], 30))  # past the vocabulary
            tokens: dict[int, list[int]] = {i: [] for i in (1, 2, 3, 4, 5)}
            status: dict[int, tuple[int, str]] = {}
            most_per_update, second_batch_sent, closed, in_columns = 0, False, False, 0
            async for update in call:
                in_columns += len(update.token_ids)
                news = set(update.stream_ids) | {item.stream_id for item in update.chunks}
                most_per_update = max(most_per_update, len(news))
                offset = 0  # requests' plain tokens in the columns, before their chunks' (worker.proto)
                for stream_id, count in zip(update.stream_ids, update.token_counts, strict=True):
                    tokens[stream_id].extend(update.token_ids[offset : offset + count])
                    offset += count
                assert offset == len(update.token_ids)
                for item in update.chunks:
                    tokens[item.stream_id].extend(item.chunk.token_ids)
                    if item.status_code:
                        status[item.stream_id] = (item.status_code, item.details)
                if not second_batch_sent and len(tokens[1]) >= 5:
                    second_batch_sent = True
                    outbox.put_nowait(start(5, [9] * 12, 200))
                    outbox.put_nowait(start(5, [9] * 12, 200))  # the same id again: both end
                    outbox.put_nowait(GenerateStreamRequest(stream_id=3, cancel=True))
                if not closed and second_batch_sent and 5 in status and all(len(tokens[i]) == 30 for i in (1, 2)):
                    closed = True
                    outbox.put_nowait(None)  # the caller is done: the call ends when its requests have
            stats = await _stats(channel)
        await _stop(runner, service)
        return tokens, status, most_per_update, stats, in_columns

    tokens, status, most_per_update, stats, in_columns = asyncio.run(scenario())
    engine.close()
    assert (in_columns > 0) == columns
    assert len(tokens[1]) == len(tokens[2]) == 30 and 0 < len(tokens[3]) < 30  # 3 was cancelled
    assert status[4][0] == grpc.StatusCode.INVALID_ARGUMENT.value[0] and status[4][1].startswith("token_ids")
    assert status[5][0] == grpc.StatusCode.INVALID_ARGUMENT.value[0] and status[5][1].startswith("stream_id")
    assert most_per_update >= 2  # several requests' tokens in one message
    assert stats.kv_blocks_free == stats.kv_blocks_total and stats.running == stats.waiting == 0


def test_a_request_past_its_deadline_gets_its_tokens_then_deadline_exceeded_and_frees_its_blocks():
    """The router's stream of one request on a shared worker call (WorkerCall.open with a timeout):
    at its deadline the worker stops it and frees its blocks, its reader first takes the tokens that
    came before (also when it was not reading), then DEADLINE_EXCEEDED; the call's other request,
    without a deadline, runs to its end."""
    step = 0.02  # seconds per emulated decode step
    profile = LatencyProfile(
        prefill=PrefillLatency(a=step, b=0.0, c=0.0),
        decode=DecodeLatency(a=step, b=0.0, c=0.0),
        kv_bytes_per_token=4096,
        kv_capacity_tokens=16 * 256,
        block_size=16,
        max_batched_tokens=256,
        max_num_seqs=8,
        model="llama-3-8b",
        device="H100-80G",
        source="analytic",
    )
    engine = EmulatedEngine(get_model("llama"), EngineConfig(device="emulated"), profile)

    def request(request_id: str, max_tokens: int) -> worker_pb2.GenerateTokensRequest:
        sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        return worker_pb2.GenerateTokensRequest(request_id=request_id, token_ids=[7] * 12, sampling=sampling)

    async def read(stream, pause: float = 0.0) -> tuple[int, grpc.aio.AioRpcError | None]:
        tokens = 0
        try:
            async for chunk in stream:
                tokens += len(chunk.token_ids)
                await asyncio.sleep(pause)
        except grpc.aio.AioRpcError as exc:
            return tokens, exc
        return tokens, None

    async def scenario():
        service = ColocatedService(engine, node_id="n", model_name="m", registry=CollectorRegistry())
        runner, address = await _serve(Role.COLOCATED, service)
        async with aio_channel(address) as channel:
            call = WorkerCall(address, worker_pb2_grpc.ColocatedWorkerStub(channel).Generate, GenerateStreamRequest)
            started = time.monotonic()
            results = await asyncio.gather(
                read(call.open(request("reads", 1000), timeout=0.3)),
                read(call.open(request("sleeps", 1000), timeout=0.3), pause=0.6),  # asleep at its deadline
                read(call.open(request("no-deadline", 40), timeout=None)),
            )
            elapsed = time.monotonic() - started
            for _ in range(100):  # (the cancels reach the engine thread between steps)
                stats = await _stats(channel)
                if stats.kv_blocks_free == stats.kv_blocks_total and stats.running == 0:
                    break
                await asyncio.sleep(0.02)
        await _stop(runner, service)
        return results, elapsed, stats

    (reads, sleeps, other), elapsed, stats = asyncio.run(scenario())
    engine.close()
    for tokens, error in (reads, sleeps):
        assert error is not None and error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert 0 < tokens < 0.3 / step + 5  # what came before the deadline, nothing after
    assert sleeps[0] >= 2  # its first chunk, then the tokens that came while it slept, merged
    assert other == (40, None)
    assert elapsed < 1.5
    assert stats.kv_blocks_free == stats.kv_blocks_total and stats.running == stats.waiting == 0


def test_a_worker_started_before_its_kvstore_daemon_waits_for_it(tmp_path):
    """A prefill worker whose node's daemon is not up yet serves NOT_SERVING, its Stats saying why,
    instead of exiting (it used to exit with code 1 after 5 s, burning the launcher's restarts);
    it turns SERVING within a second of the daemon's arrival."""
    kvstore_port, port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    log_path = tmp_path / "prefill.log"
    with open(log_path, "w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "services.prefill", "--host", "127.0.0.1", "--port", str(port)]
            + ["--metrics-port", "-1", "--kvstore", f"127.0.0.1:{kvstore_port}", "--model", get_model("llama")]
            + ["--kv-cache-gb", "0.01", "--threads", "1"],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    daemon = None
    try:
        deadline = time.monotonic() + 60
        while health_status(address) != NOT_SERVING:
            assert worker.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        time.sleep(6)
        assert worker.poll() is None, log_path.read_text()
        with grpc.insecure_channel(address) as channel:
            stats = common_pb2_grpc.WorkerStub(channel).Stats(common_pb2.StatsRequest(), timeout=5)
        assert "waiting to register with the kvstore daemon" in stats.not_serving_reason
        assert health_status(address) == NOT_SERVING

        daemon = _start_kvstore(tmp_path, kvstore_port)
        _wait_serving(f"127.0.0.1:{kvstore_port}", daemon, tmp_path / f"kvstore-{kvstore_port}.log")
        daemon_up = time.monotonic()
        while health_status(address) != SERVING:
            assert time.monotonic() - daemon_up < 2.0, log_path.read_text()
            time.sleep(0.05)
        with grpc.insecure_channel(address) as channel:
            stats = common_pb2_grpc.WorkerStub(channel).Stats(common_pb2.StatsRequest(), timeout=5)
            assert stats.not_serving_reason == ""
            first = asyncio.run(_prefill_address(address, "after-the-daemon", [3] * 20))
            assert first.kv.num_tokens == 20
        worker.terminate()
        assert worker.wait(timeout=30) == 0, log_path.read_text()
    finally:
        for proc in (worker, daemon):
            if proc is not None and proc.poll() is None:
                proc.kill()
        if daemon is not None:
            daemon.wait()


async def _prefill_address(address: str, request_id: str, prompt: list[int]) -> worker_pb2.PrefillResponse:
    async with aio_channel(address) as channel:
        return await _prefill(worker_pb2_grpc.PrefillWorkerStub(channel), request_id, prompt)


def test_a_failed_pull_releases_the_entry_it_could_not_pull(tmp_path):
    """The decode node's daemon is gone, so the pull fails and the decode worker recomputes the KV;
    the entry at the prefill node is released at once instead of waiting out its TTLs."""
    prefill_port, decode_port = free_port(), free_port()
    daemons = {
        "a": _start_kvstore(tmp_path, prefill_port, node_id="a"),
        "b": _start_kvstore(tmp_path, decode_port, node_id="b"),
    }
    for name, port in (("a", prefill_port), ("b", decode_port)):
        _wait_serving(f"127.0.0.1:{port}", daemons[name], tmp_path / f"kvstore-{port}.log")
    prefill_engine, decode_engine = _engine(), _engine()

    async def scenario():
        prefill = _prefill_service(prefill_engine, f"127.0.0.1:{prefill_port}")
        decode = DecodeService(
            decode_engine,
            KvStoreClient(f"127.0.0.1:{decode_port}"),
            worker_id="decode-test",
            node_id="b",
            model_name="m",
            registry=CollectorRegistry(),
        )
        prefill_runner, prefill_address = await _serve(Role.PREFILL, prefill)
        decode_runner, decode_address = await _serve(Role.DECODE, decode)
        prompt = [11] * 30
        async with aio_channel(prefill_address) as channel:
            first = await _prefill(worker_pb2_grpc.PrefillWorkerStub(channel), "r", prompt)
        daemons["b"].kill()
        daemons["b"].wait()
        async with aio_channel(decode_address) as channel:
            call = WorkerCall(decode_address, worker_pb2_grpc.DecodeWorkerStub(channel).Decode, DecodeStreamRequest)
            request = worker_pb2.DecodeRequest(
                request_id="r",
                prompt_token_ids=prompt,
                output_token_ids=[first.first_token_id],
                sampling=common_pb2.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                kv=first.kv,
            )
            tokens = [t async for chunk in call.open(request, timeout=30) for t in chunk.token_ids]
            assert len(tokens) == 3  # recomputed: the request went on without its KV
            await call.close()
        source = KvStoreClient(f"127.0.0.1:{prefill_port}")
        deadline = time.monotonic() + 2
        while (stats := await source.stats()).entries_device + stats.entries_host:
            assert time.monotonic() < deadline, "the entry nobody could pull is still held"
            await asyncio.sleep(0.05)
        await source.close()
        await _stop(prefill_runner, prefill)
        await _stop(decode_runner, decode)

    try:
        asyncio.run(scenario())
    finally:
        prefill_engine.close()
        decode_engine.close()
        for proc in daemons.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=20)
