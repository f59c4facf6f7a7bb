"""The product, end to end: real processes on loopback, a plain generated gRPC client.

Disaggregated on two emulated nodes (prefill on node A, decode on node B: KV crosses between the
kvstore daemons over UCX), on one node (local copies), and colocated. Every output equals Hugging
Face `generate` greedy; afterwards every pool is free and no kvstore entry is left.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
from conversations import check_next_turns_find_the_answer_cached
from openai_checks import check_chat_exact, check_completions_exact
from transformers import AutoTokenizer
from workload import block_bytes, check_outputs, expected_kv_bytes, largest_grpc_message, run_workload

from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.launcher import free_port, health_status
from services.router.worker_calls import WorkerCall
from services.runtime.step_log import read_step_log

pytestmark = pytest.mark.slow


# ---- disaggregated, two nodes (conftest.py's two_node) --------------------------------------------
def test_two_nodes_exact_outputs_with_kv_over_ucx(two_node, workload, model_dir):
    prefill_nodes = {s["node"] for s in two_node.services("prefill")}
    decode_nodes = {s["node"] for s in two_node.services("decode")}
    assert len(two_node.services("kvstore")) == 2 and prefill_nodes.isdisjoint(decode_nodes)

    results = run_workload(two_node.router, workload)
    check_outputs(workload, results, AutoTokenizer.from_pretrained(model_dir))
    two_node.wait_idle()

    stats = {s.node_id: s for s in two_node.kvstore_stats()}
    want = expected_kv_bytes(workload, model_dir)
    (prefill_node,), (decode_node,) = prefill_nodes, decode_nodes
    assert stats[prefill_node].bytes_ucx_sent == want
    assert stats[decode_node].bytes_ucx_received == want
    assert sum(s.bytes_local for s in stats.values()) == 0
    # control messages only: the largest gRPC message anywhere is smaller than one KV block
    assert 0 < largest_grpc_message(two_node) < block_bytes(model_dir)


# As if torch were not installed: importing it fails, and transformers (which checks with
# importlib.util.find_spec, None for a module set to None) runs without it.
NO_TORCH = (
    "import runpy, sys; sys.modules['torch'] = None; "
    "runpy.run_module('services.router', run_name='__main__', alter_sys=True)"
)


def test_a_router_without_torch_serves_the_same_exact_tokens(two_node, workload, model_dir, tmp_path):
    """The router's image has no torch. A second router, in a process where torch cannot be
    imported, serves the workload over the same workers with the same exact outputs, and has no
    libtorch mapped."""
    port = free_port()
    workers = [f"--{role}={','.join(s['grpc'] for s in two_node.services(role))}" for role in ("prefill", "decode")]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(tmp_path / "router.log", "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                NO_TORCH,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--metrics-port",
                str(free_port()),
                "--http-port",
                str(free_port()),
                "--model",
                model_dir,
                *workers,
            ],
            cwd=root,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while health_status(f"127.0.0.1:{port}") != 1:  # SERVING: it has found its workers
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "router.log").read_text()
            time.sleep(0.2)
        results = run_workload(f"127.0.0.1:{port}", workload)
        check_outputs(workload, results, AutoTokenizer.from_pretrained(model_dir))
        with open(f"/proc/{proc.pid}/maps") as f:
            assert "torch" not in f.read()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, (tmp_path / "router.log").read_text()
    two_node.wait_idle()


def test_cancel_mid_stream_frees_decode_blocks_within_a_second(two_node):
    """Six streams cancelled after different numbers of tokens (so cancels land while the router
    waits on the worker and while it writes to the client): every decode block is free within 1 s
    of the last cancel."""
    busy = []

    async def stream_then_cancel(stub, after: int):
        call = stub.Generate(
            router_pb2.GenerateRequest(
                prompt=f"a long story {after} " * 20,
                sampling=common_pb2.SamplingParams(max_tokens=800, temperature=0, ignore_eos=True),
            )
        )
        received = 0
        async for response in call:
            received += len(response.token_ids)
            if received >= after:
                break
        if after == 34:  # the last to cancel: it certainly holds decode blocks now
            busy.append(sum(s.kv_blocks_total - s.kv_blocks_free for s in two_node.worker_stats("decode")))
        call.cancel()
        return time.monotonic()

    async def run():
        async with grpc.aio.insecure_channel(two_node.router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            return max(await asyncio.gather(*(stream_then_cancel(stub, a) for a in (3, 5, 8, 13, 21, 34))))

    last_cancel = asyncio.run(run())
    assert busy and busy[0] > 0  # the streams really held decode blocks
    while True:
        stats = two_node.worker_stats("decode")
        if all(s.kv_blocks_free == s.kv_blocks_total for s in stats):
            break
        assert time.monotonic() - last_cancel < 1.0, "decode blocks not freed within 1 s of the cancel"
        time.sleep(0.02)
    two_node.wait_idle()


def test_cancel_right_after_the_first_token_leaves_no_kv_entry(two_node):
    """Cancels that land just after the first token, while the router is handing the KV to a
    decode worker (or has not yet): every prefill block and kvstore entry is free within 2 s,
    not held until the entry's TTL."""

    async def first_token_then_cancel(stub, i: int):
        call = stub.Generate(
            router_pb2.GenerateRequest(
                prompt=f"cancel me {i} " * 10,
                sampling=common_pb2.SamplingParams(max_tokens=200, temperature=0, ignore_eos=True),
            )
        )
        async for _ in call:
            break
        call.cancel()

    async def run():
        async with grpc.aio.insecure_channel(two_node.router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            await asyncio.gather(*(first_token_then_cancel(stub, i) for i in range(12)))

    asyncio.run(run())
    two_node.wait_idle(timeout=2)


@pytest.mark.parametrize(
    "request_kwargs, field",
    [
        (dict(), "prompt"),
        (dict(prompt="hi", token_ids=[1, 2]), "prompt"),
        (dict(token_ids=[1, 99999]), "token_ids"),
        (dict(prompt="hi", sampling=common_pb2.SamplingParams(temperature=-1)), "sampling.temperature"),
        (dict(prompt="hi", sampling=common_pb2.SamplingParams(top_p=1.5)), "sampling.top_p"),
        (dict(prompt="hi", sampling=common_pb2.SamplingParams(top_k=-3)), "sampling.top_k"),
        (dict(prompt="hi", slo=router_pb2.SloTargets(ttft_seconds=-1)), "slo.ttft_seconds"),
        (dict(token_ids=[5] * 5000), "token_ids"),
        (dict(prompt="hi " * 100_000), "prompt"),
        (dict(prompt="hi", slo=router_pb2.SloTargets(tpot_seconds=float("nan"))), "slo.tpot_seconds"),
        (dict(prompt="hi", request_id="r" * (1 << 20)), "request_id"),  # 1 MB, echoed in every message
        (dict(prompt="hi", request_id="r" * 129), "request_id"),
        (dict(prompt="hi", cache_salt="s" * 257), "cache_salt"),
        (dict(prompt="hi", request_id="bad\nid\x1b[31m"), "request_id"),  # control characters for the logs
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(two_node, request_kwargs, field):
    async def call():
        async with grpc.aio.insecure_channel(two_node.router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            async for _ in stub.Generate(router_pb2.GenerateRequest(**request_kwargs), timeout=30):
                pass

    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(call())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()
    two_node.wait_idle(timeout=2)


def test_a_request_that_does_not_parse_is_invalid_argument(two_node):
    """A prompt whose bytes are not UTF-8 (protobuf refuses to parse the message): INVALID_ARGUMENT
    naming the request, not UNKNOWN; the router keeps serving."""

    async def call():
        async with grpc.aio.insecure_channel(two_node.router) as channel:
            generate = channel.unary_stream(
                "/pdserve.v1.Router/Generate",
                request_serializer=lambda raw: raw,
                response_deserializer=router_pb2.GenerateResponse.FromString,
            )
            async for _ in generate(b"\x0a\x02\xff\xfe", timeout=30):  # field 1 (prompt), 2 bytes
                pass

    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(call())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith("request: cannot be parsed"), err.value.details()

    async def still_serving():
        async with grpc.aio.insecure_channel(two_node.router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            return [
                r
                async for r in stub.Generate(
                    router_pb2.GenerateRequest(prompt="hello", sampling=common_pb2.SamplingParams(max_tokens=2)),
                    timeout=30,
                )
            ]

    assert asyncio.run(still_serving())[-1].finish_reason == "length"


# ---- disaggregated, one node ----------------------------------------------------------------------
def test_one_node_local_copies(cluster_factory, workload, model_dir, tmp_path):
    """Also with the decode workers streaming every 3 tokens (--stream-interval) and writing step logs."""
    steps = tmp_path / "steps"
    steps.mkdir()
    cluster = cluster_factory(
        "--model",
        model_dir,
        "--prefill",
        "2",
        "--decode",
        "2",
        "--nodes",
        "1",
        f"--worker-arg=--step-log={steps}/{{worker}}.jsonl",
        "--worker-arg=--stream-interval=3",
    )
    results = run_workload(cluster.router, workload)
    check_outputs(workload, results, AutoTokenizer.from_pretrained(model_dir))
    cluster.wait_idle()
    (stats,) = cluster.kvstore_stats()
    assert stats.bytes_local == expected_kv_bytes(workload, model_dir)
    assert stats.bytes_ucx_sent == stats.bytes_ucx_received == 0
    # --step-log: one file per worker; every prompt token was prefilled once, and every token after
    # the first was made by a decode step
    logs = {p.name: read_step_log(str(p)) for p in steps.iterdir()}
    assert len(logs) == 4, sorted(logs)
    records = [r for rs in logs.values() for r in rs]
    prefilled = sum(sum(r["lengths"]) for r in records if r["kind"] == "prefill")
    decoded = sum(r["batch"] for r in records if r["kind"] == "decode")
    assert prefilled == sum(len(item["ids"]) for item in workload)
    assert decoded == sum(len(tokens) - 1 for tokens, _, _ in results)
    assert all(r["seconds"] > 0 for r in records)


# ---- colocated -----------------------------------------------------------------------------------
@pytest.mark.parametrize("chunked", [False, True], ids=["prefill-first", "chunked-prefill"])
def test_colocated_mode(cluster_factory, workload, model_dir, chunked, reference):
    # chunked: a 32-token budget per step, so that most prompts are computed over several steps
    chunking = ["--worker-arg=--chunked-prefill --max-num-batched-tokens 32 --max-num-seqs 32"] if chunked else []
    cluster = cluster_factory("--model", model_dir, "--mode", "colocated", "--colocated", "2", *chunking)
    results = run_workload(cluster.router, workload)
    check_outputs(workload, results, AutoTokenizer.from_pretrained(model_dir))
    cluster.wait_idle()
    assert not cluster.services("kvstore")
    mixed_steps = sum(
        float(line.split()[-1])
        for svc in cluster.services("colocated")
        for line in cluster.metrics_text(svc).splitlines()
        if line.startswith('pdserve_decode_step_duration_seconds_count{kind="mixed"}')
    )
    assert (mixed_steps > 0) == chunked
    check_next_turns_find_the_answer_cached(cluster, reference)  # prefix caching (issue 19)
    if not chunked:  # the OpenAI-compatible HTTP API (issue 20)
        check_completions_exact(cluster, workload[:12], AutoTokenizer.from_pretrained(model_dir))
        check_chat_exact(cluster, model_dir)
    cluster.wait_idle()


@pytest.mark.parametrize(
    "role, make_request, field",
    [
        ("prefill", lambda: worker_pb2.PrefillRequest(token_ids=[]), "token_ids"),
        (
            "prefill",
            lambda: worker_pb2.PrefillRequest(
                token_ids=[5], resumed_output_ids=[7, 8], sampling=common_pb2.SamplingParams(max_tokens=2)
            ),
            "resumed_output_ids",
        ),
        (
            "prefill",
            lambda: worker_pb2.PrefillRequest(token_ids=[5], sampling=common_pb2.SamplingParams(top_p=2)),
            "sampling.top_p",
        ),
        ("decode", lambda: worker_pb2.DecodeRequest(prompt_token_ids=[5, 6], output_token_ids=[]), "output_token_ids"),
        ("decode", lambda: worker_pb2.DecodeRequest(prompt_token_ids=[5, 6], output_token_ids=[7]), "kv.kv_id"),
        (
            "decode",
            lambda: worker_pb2.DecodeRequest(prompt_token_ids=[5, 70000], output_token_ids=[7]),
            "prompt_token_ids",
        ),
        ("prefill", lambda: worker_pb2.PrefillRequest(request_id="x" * 200, token_ids=[5]), "request_id"),
        ("prefill", lambda: worker_pb2.PrefillRequest(token_ids=[5], cache_salt="s" * 300), "cache_salt"),
        (
            "decode",
            lambda: worker_pb2.DecodeRequest(request_id="a\tb", prompt_token_ids=[5, 6], output_token_ids=[7]),
            "request_id",
        ),
    ],
)
def test_workers_reject_bad_requests_naming_the_field(two_node, role, make_request, field):
    """Workers validate on their own too: they are reachable without the router (and a router of
    another version may send anything)."""
    svc = two_node.services(role)[0]

    async def call():
        async with grpc.aio.insecure_channel(svc["grpc"]) as channel:
            if role == "prefill":
                async for _ in worker_pb2_grpc.PrefillWorkerStub(channel).Prefill(make_request(), timeout=10):
                    pass
            else:
                decode = worker_pb2_grpc.DecodeWorkerStub(channel).Decode
                async for _ in WorkerCall(svc["grpc"], decode, worker_pb2.DecodeStreamRequest).open(make_request(), 10):
                    pass

    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(call())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field + ":"), err.value.details()
    two_node.wait_idle(timeout=2)
