"""The serving path at token rates (issue 16): the router keeps one call per decode worker, carrying
all its requests to that worker, each engine step's tokens in one message
(services/router/worker_calls.py, services/runtime/streaming.py). Through a real cluster (router,
2 decode workers, a prefill worker, a kvstore daemon) of emulated engines with short steps, so that
thousands of tokens take seconds, and two routers over the same workers (`pdserve up --routers 2`):
- many concurrent requests, some cancelled by their clients midway: the others get exactly the
  emulator's tokens, and every block comes back;
- the requests on a decode worker killed mid-stream all resume elsewhere, identical;
- a client that stops reading holds up nobody, and is cancelled after --client-stall-seconds,
  its blocks freed;
- both routers serve at once over the same workers, exact, each counting its own requests;
- bench.serving_tpot (TPOT through the router against the engine alone) runs, emulated and on
  the CPU's model."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.common.latency_profile import DecodeLatency, LatencyProfile, PrefillLatency
from services.engine.config import ModelConfig
from services.engine.emulated import emulated_token, prompt_hash

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STALL_SECONDS = 5.0


@pytest.fixture(scope="module")
def cluster(cluster_factory, model_dir, tmp_path_factory):
    profile = LatencyProfile.load(os.path.join(ROOT, "profiles", "llama-3-8b-H100-80G-analytic.json"))
    fast = replace(profile, prefill=PrefillLatency(a=0.004, b=1e-6, c=0.0), decode=DecodeLatency(a=0.008, b=0, c=0))
    path = str(tmp_path_factory.mktemp("profile") / "fast.json")
    fast.save(path)
    return cluster_factory(
        "--model",
        model_dir,
        "--emulate",
        path,
        "--decode",
        "2",
        "--routers",
        "2",
        f"--router-arg=--client-stall-seconds {STALL_SECONDS}",
    )


def _expected(model_dir: str, prompt: list[int], max_tokens: int) -> list[int]:
    config = ModelConfig.from_pretrained(model_dir)
    key = prompt_hash(prompt)
    return [emulated_token(key, i, 0, config.vocab_size, config.eos_token_ids) for i in range(max_tokens)]


def _request(prompt: list[int], max_tokens: int) -> router_pb2.GenerateRequest:
    return router_pb2.GenerateRequest(
        token_ids=prompt, sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0)
    )


def _prompt(i: int, n: int = 40) -> list[int]:
    return [3 + (i * 31 + 7 * k) % 997 for k in range(n)]


async def _read(stub, prompt: list[int], max_tokens: int, stop_after: int | None = None) -> list[int]:
    call = stub.Generate(_request(prompt, max_tokens), timeout=60)
    tokens: list[int] = []
    async for response in call:
        tokens.extend(response.token_ids)
        if stop_after is not None and len(tokens) >= stop_after:
            call.cancel()
            break
    return tokens


def _metric(cluster, service: dict, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(cluster.metrics_text(service)):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return sample.value
    raise KeyError(name)


def _routers_metric(cluster, name: str, **labels: str) -> float:
    return sum(_metric(cluster, router, name, **labels) for router in cluster.services("router"))


def test_concurrent_requests_some_cancelled_share_the_call_and_free_every_block(cluster, model_dir):
    async def run():
        async with grpc.aio.insecure_channel(cluster.router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            jobs = [_read(stub, _prompt(i), 200, stop_after=20 + i if i % 3 == 0 else None) for i in range(48)]
            return await asyncio.gather(*jobs)

    results = asyncio.run(run())
    for i, tokens in enumerate(results):
        expected = _expected(model_dir, _prompt(i), 200)
        if i % 3 == 0:
            assert tokens == expected[: len(tokens)] and len(tokens) < 200, i
        else:
            assert tokens == expected, i
    cluster.wait_idle()
    # each step's tokens went to the router in one message: the decode workers' largest response
    # carried many requests' tokens (an update for one request alone is ~12 bytes, each more adds
    # 3-5 in the columns)
    sizes = [
        _metric(cluster, svc, "pdserve_grpc_largest_message_bytes", method="Decode", direction="response")
        for svc in cluster.services("decode")
    ]
    assert max(sizes) > 64


def test_requests_on_a_decode_worker_killed_mid_stream_all_resume_identically(cluster, model_dir):
    async def run():
        async with grpc.aio.insecure_channel(cluster.router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            calls = [stub.Generate(_request(_prompt(100 + i), 400), timeout=60) for i in range(12)]
            streams = [[] for _ in calls]

            async def read(k: int) -> None:
                async for response in calls[k]:
                    streams[k].extend(response.token_ids)

            readers = [asyncio.create_task(read(k)) for k in range(len(calls))]
            while min(len(s) for s in streams) < 30:
                await asyncio.sleep(0.01)
            stats = cluster.worker_stats("decode")
            busiest = max(range(len(stats)), key=lambda k: stats[k].running)
            assert stats[busiest].running >= 2  # several requests on the call that breaks
            os.kill(cluster.services("decode")[busiest]["pid"], signal.SIGKILL)
            await asyncio.gather(*readers)
            return streams

    streams = asyncio.run(run())
    for i, tokens in enumerate(streams):
        assert tokens == _expected(model_dir, _prompt(100 + i), 400), i
    assert _routers_metric(cluster, "pdserve_request_retries_total") >= 2
    deadline = time.monotonic() + 60  # the launcher restarts the killed worker
    while True:
        try:
            if all(s.kv_blocks_free == s.kv_blocks_total for s in cluster.worker_stats("decode")):
                break
        except grpc.RpcError:
            pass
        assert time.monotonic() < deadline, "the restarted decode worker did not come back"
        time.sleep(0.5)
    cluster.wait_idle()


def test_a_client_that_stops_reading_stalls_nobody_and_is_cancelled_after_the_bound(cluster, model_dir):
    stalls_before = _routers_metric(cluster, "pdserve_client_stalls_total")
    # A small receive window and no window growth: the router's writes to this client block once
    # ~1 KB is unread, as they would for a client on a stuck connection.
    options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]

    async def run():
        async with (
            grpc.aio.insecure_channel(cluster.router, options=options) as stuck_channel,
            grpc.aio.insecure_channel(cluster.router) as channel,
        ):
            stuck = router_pb2_grpc.RouterStub(stuck_channel).Generate(_request(_prompt(999), 980), timeout=60)
            first = await stuck.read()  # then reads nothing more
            assert first.token_ids
            stub = router_pb2_grpc.RouterStub(channel)
            started = time.monotonic()
            others = await asyncio.gather(*(_read(stub, _prompt(500 + i), 300) for i in range(8)))
            others_seconds = time.monotonic() - started
            await asyncio.sleep(STALL_SECONDS + 2.5)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                while await stuck.read() is not grpc.aio.EOF:
                    pass
            return others, others_seconds, err.value

    others, others_seconds, error = asyncio.run(run())
    for i, tokens in enumerate(others):
        assert tokens == _expected(model_dir, _prompt(500 + i), 300), i
    # 300 steps of 8 ms: nobody waited for the stuck client's bound (5 s) or its 980 tokens (~8 s)
    assert others_seconds < STALL_SECONDS, others_seconds
    assert error.code() == grpc.StatusCode.CANCELLED
    assert _routers_metric(cluster, "pdserve_client_stalls_total") == stalls_before + 1
    cluster.wait_idle()  # its blocks were freed


def test_two_routers_serve_the_same_workers_at_once(cluster, model_dir):
    routers = cluster.services("router")
    assert len(routers) == 2 and all(r["public"] == cluster.router for r in routers)
    before = [_metric(cluster, r, "pdserve_requests_total", finish_reason="length") for r in routers]

    async def run():
        async def through(address: str, offset: int) -> list[list[int]]:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = router_pb2_grpc.RouterStub(channel)
                return await asyncio.gather(*(_read(stub, _prompt(offset + i), 150) for i in range(24)))

        return await asyncio.gather(through(routers[0]["grpc"], 2000), through(routers[1]["grpc"], 3000))

    first, second = asyncio.run(run())
    for offset, results in ((2000, first), (3000, second)):
        for i, tokens in enumerate(results):
            assert tokens == _expected(model_dir, _prompt(offset + i), 150), (offset, i)
    after = [_metric(cluster, r, "pdserve_requests_total", finish_reason="length") for r in routers]
    assert [a - b for a, b in zip(after, before, strict=True)] == [24, 24]
    # both routers' requests ran on both decode workers, and every block came back
    assert all(_metric(cluster, w, "pdserve_decode_generated_tokens_total") > 0 for w in cluster.services("decode"))
    cluster.wait_idle()


def _run_serving_tpot_bench(tmp_path, tokens: int, *flags: str) -> dict:
    """bench.serving_tpot, small: its own cluster, engine-only and serving trials alternating. The
    streams' `tokens` must outlast the spread of their prefills, or the bench finds no steps with
    all of them decoding: on a loaded CPU, ~0.1 s."""
    out = tmp_path / "serving-tpot"
    argv = [sys.executable, "-m", "bench.serving_tpot", "--model", "llama", "--batch", "8", "--prompt-tokens", "16"]
    argv += ["--tokens", str(tokens), "--rounds", "2", "--out", str(out), *flags]
    bench = subprocess.Popen(
        argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = bench.communicate(timeout=300)
    finally:
        if bench.poll() is None:  # its cluster goes with it
            os.killpg(bench.pid, signal.SIGKILL)
            bench.wait()
    assert bench.returncode == 0, output
    result = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").stat().st_size > 0
    assert result["batch"] == 8 and len(result["rounds"]) == 2
    for r in result["rounds"]:  # the prefill worker's step log holds each stream's prompt once
        assert sum(r["stream_prefill_batches"]) == 8 and r["window_steps"] >= r["full_batch_steps"]
    return result


def test_the_serving_tpot_bench_emulated_times_the_whole_batch_against_the_engine_alone(tmp_path):
    """bench.serving_tpot with engines emulated at the H100 profile: the decode worker's steps take
    the engine-only steps' time (the same profile, the same batch), and the client's TPOT through
    the router is that plus what the serving path adds: not less, and not several times more."""
    profile = os.path.join(ROOT, "profiles", "llama-3-8b-H100-80G-analytic.json")
    result = _run_serving_tpot_bench(tmp_path, 128, "--emulate", profile)  # (~7 ms steps)
    assert result["worker_step_over_engine"] == pytest.approx(1.0, abs=0.2)
    assert 0.95 <= result["serving_over_engine"] < 2.0


def test_the_serving_tpot_bench_runs_the_model_on_the_cpu(tmp_path):
    """The same bench with the model running (the tiny Llama on the CPU): the path its GPU run takes
    (--device cuda:0), here on the CPU; the ratio is this machine's and not checked."""
    result = _run_serving_tpot_bench(tmp_path, 512)  # (~1 ms steps)
    assert result["device"] == "cpu" and result["emulated_profile"] == ""
    assert result["engine_tpot_s"] > 0 and result["tpot_s"] > 0 and result["worker_period_s"] > 0
