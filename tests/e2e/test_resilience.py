"""Failure handling with real processes: a decode worker SIGKILLed mid-stream, deadlines, and the
standard health and reflection services on every server."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from processes import children, wait_gone
from transformers import AutoModelForCausalLM, AutoTokenizer

from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.tiny_models import get_model

pytestmark = pytest.mark.slow

EXPECTED_SERVICES = {
    "router": {"pdserve.v1.Router"},
    "prefill": {"pdserve.v1.PrefillWorker", "pdserve.v1.Worker"},
    "decode": {"pdserve.v1.DecodeWorker", "pdserve.v1.Worker"},
    "kvstore": {"pdserve.v1.KvStore"},
}


@pytest.fixture(scope="module")
def cluster(cluster_factory):
    return cluster_factory(
        "--model", get_model("llama"), "--prefill", "1", "--decode", "2", "--nodes", "2", "--placement", "spread"
    )


def test_every_server_has_health_and_only_the_router_reflection(cluster):
    """Reflection lists a server's services to anyone: on at the public router, off on internal
    services unless --reflection on (test_security checks it under TLS too)."""
    for svc in cluster.info["services"]:
        with grpc.insecure_channel(svc["grpc"]) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
            if svc["role"] == "router":
                names = set(ProtoReflectionDescriptorDatabase(channel).get_services())
                assert EXPECTED_SERVICES["router"] | {"grpc.health.v1.Health"} <= names
            else:
                with pytest.raises(grpc.RpcError) as err:
                    ProtoReflectionDescriptorDatabase(channel).get_services()
                assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, svc["name"]


def test_decode_worker_killed_mid_stream_client_sees_one_uninterrupted_exact_stream(cluster):
    model_dir = get_model("llama")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = "the decode worker streams tokens while the router watches it"
    ids = tokenizer.encode(prompt)
    expected = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=400)[0, len(ids) :].tolist()
    assert len(expected) >= 100  # long enough to kill a worker in the middle

    async def run():
        async with grpc.aio.insecure_channel(cluster.router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            call = stub.Generate(
                router_pb2.GenerateRequest(
                    prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=400, temperature=0)
                ),
                timeout=120,
            )
            tokens, killed, last = [], None, None
            started = time.monotonic()
            async for response in call:
                tokens.extend(response.token_ids)
                last = response
                if killed is None and len(tokens) >= 20:
                    busy = [
                        (s, st)
                        for s, st in zip(cluster.services("decode"), cluster.worker_stats("decode"))
                        if st.running > 0
                    ]
                    assert len(busy) == 1
                    killed = busy[0][0]
                    os.kill(killed["pid"], signal.SIGKILL)
                    killed_after = time.monotonic() - started
            return tokens, last, killed, killed_after

    tokens, last, killed, killed_after = asyncio.run(run())
    assert killed is not None
    assert tokens == expected
    assert last.timing.retries == 1 and last.finish_reason in ("stop", "length")
    # queue time counts the waits for a prefill (the first and the re-prefill's), not the first
    # decode worker's lifetime before it died
    assert last.timing.queue_seconds < killed_after
    # the launcher restarts the dead worker; the cluster returns to idle with nothing leaked
    cluster.wait_recovered()


def test_deadline_is_honoured_and_frees_blocks(cluster):
    async def run():
        async with grpc.aio.insecure_channel(cluster.router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in stub.Generate(
                    router_pb2.GenerateRequest(
                        prompt="deadline", sampling=common_pb2.SamplingParams(max_tokens=900, ignore_eos=True)
                    ),
                    timeout=0.5,
                ):
                    pass
            return err.value.code(), time.monotonic() - started

    code, elapsed = asyncio.run(run())
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and elapsed < 2
    cluster.wait_idle(timeout=3)


# ---- the launcher, stopped the ways people stop it ------------------------------------------------
def _launch(tmp_path):
    """`pdserve up` in its own session, as a shell runs a foreground job: killpg(SIGINT) is Ctrl-C."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ready = tmp_path / "ready.json"
    ready.write_text("{}")  # a stale file from an earlier run: must not survive
    log = open(tmp_path / "launcher.log", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "up",
            "--port",
            "0",
            "--http-port",
            "0",
            "--ready-file",
            str(ready),
            "--log-dir",
            str(tmp_path / "logs"),
            "--model",
            get_model("llama"),
        ],
        cwd=root,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, ready


def _wait_ready(proc, ready, tmp_path) -> set[int]:
    """Waits for the launcher's ready file; returns the pids of the services it started."""
    services: set[int] = set()
    deadline = time.monotonic() + 240
    while not (ready.exists() and ready.read_text() != "{}"):
        services |= children(proc.pid)
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "launcher.log").read_text()
        time.sleep(0.2)
    return services | children(proc.pid)


def test_ctrl_c_stops_a_running_cluster_cleanly(tmp_path):
    proc, ready = _launch(tmp_path)
    services = _wait_ready(proc, ready, tmp_path)
    assert len(services) == 4  # kvstore, prefill, decode, router
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C: the whole foreground process group
    assert proc.wait(timeout=90) == 0, (tmp_path / "launcher.log").read_text()
    assert "unclean" not in (tmp_path / "launcher.log").read_text()
    assert not ready.exists()  # nobody should find the addresses of a stopped cluster
    wait_gone(services)


def test_sigterm_while_starting_stops_at_once_and_leaves_nothing(tmp_path):
    proc, ready = _launch(tmp_path)
    assert not ready.exists() or ready.read_text() == "{}"
    services: set[int] = set()
    deadline = time.monotonic() + 60
    while not services:  # the first service (a kvstore daemon) is starting
        services |= children(proc.pid)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    while proc.poll() is None:
        services |= children(proc.pid)
        assert time.monotonic() - stopped_at < 30, "the launcher went on starting the cluster"
        time.sleep(0.05)
    assert proc.returncode == 0, (tmp_path / "launcher.log").read_text()
    assert not ready.exists()
    wait_gone(services)


def test_a_killed_launcher_takes_its_services_with_it(tmp_path):
    """SIGKILL cannot be handled, so the services watch for it themselves (PR_SET_PDEATHSIG): each
    gets a SIGTERM and drains; none is left running without its launcher."""
    proc, ready = _launch(tmp_path)
    services = _wait_ready(proc, ready, tmp_path)
    assert len(services) == 4
    proc.kill()
    proc.wait(timeout=10)
    wait_gone(services, timeout=60)
