"""A real local cluster, started with `pdserve up` as a subprocess and stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest
from conversations import reference  # noqa: F401 - fixtures shared by the e2e modules
from workload import model_dir, workload  # noqa: F401 - fixtures shared by the e2e modules

from pdserve.v1 import common_pb2, common_pb2_grpc, kvstore_pb2, kvstore_pb2_grpc
from services.common.grpc_client import sync_channel
from services.common.tls import TlsFiles
from services.tiny_models import get_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class RunningCluster:
    def __init__(self, proc: subprocess.Popen, info: dict, log_path: str, ready_path: str):
        self.proc = proc
        self.info = info
        self.log_path = log_path
        self.ready_path = ready_path  # the launcher's ready file (rewritten when it restarts a service)

    @property
    def router(self) -> str:
        return self.info["router"]

    def services(self, role: str) -> list[dict]:
        return [s for s in self.info["services"] if s["role"] == role]

    def worker_stats(self, role: str, tls: TlsFiles | None = None) -> list[common_pb2.WorkerStats]:
        out = []
        for svc in self.services(role):
            with sync_channel(svc["grpc"], tls) as ch:
                out.append(common_pb2_grpc.WorkerStub(ch).Stats(common_pb2.StatsRequest(), timeout=5))
        return out

    def kvstore_stats(self, tls: TlsFiles | None = None) -> list[kvstore_pb2.KvStoreStats]:
        out = []
        for svc in self.services("kvstore"):
            with sync_channel(svc["grpc"], tls) as ch:
                out.append(kvstore_pb2_grpc.KvStoreStub(ch).Stats(kvstore_pb2.KvStoreStatsRequest(), timeout=5))
        return out

    def metrics_text(self, service: dict, tls: TlsFiles | None = None) -> str:
        """Its /metrics; under TLS, presenting `tls` (a cluster certificate) as the client's."""
        if tls is None:
            with urllib.request.urlopen(f"http://{service['metrics']}/metrics", timeout=5) as r:
                return r.read().decode()
        context = ssl.create_default_context(cafile=tls.ca)
        context.check_hostname = False  # (addressed by IP; the certificate names tls.server_name)
        context.load_cert_chain(tls.cert, tls.key)
        with urllib.request.urlopen(f"https://{service['metrics']}/metrics", timeout=5, context=context) as r:
            return r.read().decode()

    def stop(self) -> int:
        """SIGTERM to the launcher; its exit code once every service stopped."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def wait_idle(self, timeout: float = 10.0, tls: TlsFiles | None = None) -> None:
        """Every worker pool fully free and no kvstore entry left (releases are asynchronous)."""
        deadline = time.monotonic() + timeout
        while True:
            workers = [s for role in ("prefill", "decode", "colocated") for s in self.worker_stats(role, tls)]
            pools_free = all(s.kv_blocks_free == s.kv_blocks_total for s in workers)
            entries = sum(k.entries_device + k.entries_host for k in self.kvstore_stats(tls))
            if pools_free and entries == 0:
                return
            if time.monotonic() > deadline:
                used = {s.role + "@" + s.node_id: s.kv_blocks_total - s.kv_blocks_free for s in workers}
                raise AssertionError(f"not idle after {timeout}s: blocks in use {used}, kvstore entries {entries}")
            time.sleep(0.1)

    def wait_recovered(self, timeout: float = 60.0) -> None:
        """wait_idle, through a restart: until every service answers again and nothing is held."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.wait_idle(timeout=1)
                return
            except (AssertionError, grpc.RpcError):
                assert time.monotonic() < deadline, "the cluster did not recover"
                time.sleep(0.5)


def start_cluster(tmp_path, *args: str, timeout: float = 240.0) -> RunningCluster:
    ready = tmp_path / "ready.json"
    log_path = tmp_path / "launcher.log"
    cmd = [
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
        *args,
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"cluster did not start:\n{log_path.read_text()[-4000:]}")
        time.sleep(0.2)
    return RunningCluster(proc, json.loads(ready.read_text()), str(log_path), str(ready))


def _clusters(tmp_path_factory):
    started: list[RunningCluster] = []

    def make(*args: str) -> RunningCluster:
        cluster = start_cluster(tmp_path_factory.mktemp("cluster"), *args)
        started.append(cluster)
        return cluster

    yield make
    for cluster in started:
        if cluster.proc.poll() is None:
            code = cluster.stop()
            assert code == 0, f"launcher exited {code}:\n{open(cluster.log_path).read()[-3000:]}"


@pytest.fixture(scope="module")
def cluster_factory(tmp_path_factory):
    yield from _clusters(tmp_path_factory)


@pytest.fixture(scope="session")
def session_cluster_factory(tmp_path_factory):
    yield from _clusters(tmp_path_factory)


@pytest.fixture(scope="session")
def two_node(session_cluster_factory):
    """Disaggregated over two nodes (KV over UCX), 2 prefill and 2 decode workers: shared by the
    modules that only send it requests (test_cluster.py, test_openai_api.py), started once."""
    model = get_model("llama")  # (workload.py's model_dir)
    return session_cluster_factory("--model", model, "--prefill", "2", "--decode", "2", "--nodes", "2")
