"""A whole cluster as local processes (`pdserve up`, the demo, the e2e tests and benchmarks).

`Cluster` starts K kvstore daemons (each emulating one node), N prefill and M decode workers
spread over those nodes (or colocated workers), and the router, all at once; waits until every
gRPC server reports SERVING through the standard health service; `info()` is every service's gRPC
and metrics address; `stop()` stops them router first (SIGTERM, then SIGKILL after the grace
period). The command around it (ready file, signals, restarts) is services/cli/up.py.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.grpc_client import sync_channel
from services.common.tls import TlsFiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A service that exits more than this often within the window is crash-looping: the launcher stops
# the cluster instead of restarting it again. Crashes further apart are restarted however many
# there are (a long-running cluster outlives many).
MAX_RESTARTS = 3
RESTART_WINDOW_SECONDS = 300.0
STOP_SECONDS_PER_PROCESS = 1.0  # added to a group's grace per process in it


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now, below the kernel's ephemeral range.

    The port is chosen here and bound later by a child process. A port from the ephemeral range
    (what binding to port 0 returns) can be taken in between as the source port of any outgoing
    connection, and a cluster's own gRPC clients open many; ports below the range are only ever
    taken by explicit binds."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    low = 20000 if ephemeral_low > 21000 else 1024
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(low, ephemeral_low)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in [{low}, {ephemeral_low}) on {host}")


def free_port_pair(host: str = "127.0.0.1") -> int:
    """A free port whose next port is free too (an instance's rendezvous and its ranks' store)."""
    for _ in range(100):
        port = free_port(host)
        if port + 1 in _handed_out:  # planned for another service, which has not bound it yet
            continue
        with socket.socket() as s:
            try:
                s.bind((host, port + 1))
            except OSError:
                continue
        _handed_out.add(port + 1)
        return port
    raise RuntimeError(f"no two consecutive free ports on {host}")


def _wait_all(popens: list[subprocess.Popen], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in popens) and time.monotonic() < deadline:
        time.sleep(0.05)


@dataclass
class ServiceProcess:
    name: str
    role: str
    node: str
    grpc: str
    metrics: str
    argv: list[str] = field(repr=False)
    public: str = ""  # routers: the address clients use (shared by every router of the cluster)
    http: str = ""  # routers: the OpenAI-compatible HTTP API's address (shared likewise); "": off
    pid: int = 0
    log: str = ""


@dataclass
class ClusterSpec:
    model: str = ""
    served_model_name: str = ""  # the model's name in the APIs (default: the router's, from model)
    mode: str = "disaggregated"  # or "colocated"
    prefill: int = 1
    decode: int = 1
    colocated: int = 1
    nodes: int = 1
    placement: str = "split"  # split: prefill on the first nodes, decode on the rest; spread: round robin
    node_of: dict[str, list[int]] = field(default_factory=dict)  # role -> each worker's node index (else placement)
    host: str = "127.0.0.1"
    router_port: int = 7000
    routers: int = 1  # more than one: all serve router_port (SO_REUSEPORT), each also its own port
    http_port: int = 0  # the routers' OpenAI-compatible HTTP API (all on this one port); 0: a free port, -1: off
    kv_cache_gb: float = 0.25
    threads: int = 0  # torch threads per worker (0: cores / workers)
    # role -> (tensor-parallel ranks, pipeline stages) of each of its instances, one process per rank
    # (engine/parallel.py); (1, 1) when not given
    parallel: dict[str, tuple[int, int]] = field(default_factory=dict)
    # role -> pods (hosts) each of its instances spans, whole pipeline stages each: the worker runs the
    # first's ranks, a follower process (engine/follower.py) each other's (1 when not given)
    pods: dict[str, int] = field(default_factory=dict)
    # "cuda": every worker instance on GPUs of its own, one per rank, consecutive over the instances
    # (cuda:0.. for the first); "" leaves the workers' --device alone (default cpu, or --worker-arg)
    device: str = ""
    log_dir: str = "results/cluster-logs"
    worker_args: list[str] = field(default_factory=list)
    role_args: dict[str, list[str]] = field(default_factory=dict)  # extra flags per role (prefill, decode, ...)
    router_args: list[str] = field(default_factory=list)
    kvstore_args: list[str] = field(default_factory=list)
    # role -> latency profile: that role's workers run emulated engines (services/engine/emulated.py)
    profiles: dict[str, str] = field(default_factory=dict)
    tls: bool = False  # mutual TLS everywhere, with a throwaway CA (services/common/certs.py)
    api_key: str = ""  # the router's public API needs it (authorization: Bearer <key>)


def _node_names(spec: ClusterSpec) -> list[str]:
    return [f"node-{chr(ord('a') + i)}" for i in range(spec.nodes)]


def plan_processes(spec: ClusterSpec) -> list[ServiceProcess]:
    host, py = spec.host, [sys.executable, "-m"]
    nodes = _node_names(spec)
    procs: list[ServiceProcess] = []

    def add(name, role, node, module, extra):
        port, mport = free_port(host), free_port(host)
        argv = py + [module, "--host", host, "--port", str(port), "--metrics-port", str(mport)] + extra
        procs.append(ServiceProcess(name, role, node, f"{host}:{port}", f"{host}:{mport}", argv))
        return procs[-1]

    kvstores = {}
    if spec.mode == "disaggregated":
        for node in nodes:
            kvstores[node] = add(
                f"kvstore-{node}",
                "kvstore",
                node,
                "services.kvstore",
                ["--node-id", node, "--transfer-host", host] + spec.kvstore_args,
            )
    workers = spec.colocated if spec.mode == "colocated" else spec.prefill + spec.decode
    # an emulated engine sleeps through its steps: one thread each
    threads = spec.threads or (1 if spec.profiles else max(1, (os.cpu_count() or 1) // max(1, workers)))
    common = ["--kv-cache-gb", str(spec.kv_cache_gb), "--threads", str(threads)]
    if spec.model:
        common += ["--model", spec.model]
    common += spec.worker_args

    next_gpu = 0

    def role_args(role: str) -> list[str]:
        nonlocal next_gpu
        tp, pp = spec.parallel.get(role, (1, 1))
        if role in spec.profiles:
            device = ["--device", "emulated", "--profile", spec.profiles[role]]
        elif spec.device == "cuda":  # rank r of this instance's pod on cuda:first+r (engine/parallel.py)
            device = ["--device", f"cuda:{next_gpu}"]
            next_gpu += tp * pp // spec.pods.get(role, 1)  # its followers' GPUs follow (add_followers)
        else:
            device = []
        ranks = ["--tensor-parallel", str(tp), "--pipeline-parallel", str(pp)] if tp * pp > 1 else []
        return device + ranks + spec.role_args.get(role, [])

    def node_for(role: str, index: int) -> str:
        if role in spec.node_of:
            return nodes[spec.node_of[role][index]]
        if role == "colocated":
            return nodes[index % len(nodes)]
        if spec.placement == "split" and len(nodes) > 1:
            half = len(nodes) // 2
            group = nodes[:half] if role == "prefill" else nodes[half:]
            return group[index % len(group)]
        offset = 0 if role == "prefill" else spec.prefill
        return nodes[(offset + index) % len(nodes)]

    def add_followers(worker: ServiceProcess) -> None:
        """The instance's other pods: a follower each, emulating another host."""
        pods = spec.pods.get(worker.role, 1)
        if pods == 1:
            return
        port = free_port_pair(host)
        worker.argv += ["--pods", str(pods), "--rendezvous-port", str(port)]
        nonlocal next_gpu
        tp, pp = spec.parallel.get(worker.role, (1, 1))
        for pod in range(1, pods):
            argv = py + ["services.engine.follower", "--leader", f"{host}:{port}", "--pod", str(pod)]
            if spec.device == "cuda":  # an emulated host: GPUs of its own on this machine
                argv += ["--device", f"cuda:{next_gpu}"]
                next_gpu += tp * pp // pods
            procs.append(ServiceProcess(f"{worker.name}-pod{pod}", "follower", worker.node, "", "", argv))

    if spec.mode == "colocated":
        for i in range(spec.colocated):
            node = node_for("colocated", i)
            worker = add(
                f"colocated-{i}",
                "colocated",
                node,
                "services.colocated",
                common + ["--node-id", node] + role_args("colocated"),
            )
            add_followers(worker)
    else:
        for role, count in (("prefill", spec.prefill), ("decode", spec.decode)):
            for i in range(count):
                node = node_for(role, i)
                worker = add(
                    f"{role}-{i}",
                    role,
                    node,
                    f"services.{role}",
                    common
                    + ["--node-id", node, "--kvstore", kvstores[node].grpc, "--worker-id", f"{role}-{i}"]
                    + role_args(role),
                )
                add_followers(worker)
    public_port = spec.router_port or free_port(host)
    http_port = spec.http_port or free_port(host)
    router_args = []
    for role in ("prefill", "decode", "colocated"):
        addrs = [p.grpc for p in procs if p.role == role]
        if addrs:
            router_args += [f"--{role}", ",".join(addrs)]
    if spec.model:
        router_args += ["--model", spec.model]
    if spec.served_model_name:
        router_args += ["--served-model-name", spec.served_model_name]
    for i in range(spec.routers):
        # One router: on the public port. Several: each on a port of its own (health checks and
        # metrics reach each one) and all on the public one, which the kernel spreads connections over.
        port = public_port if spec.routers == 1 else free_port(host)
        shared = [] if spec.routers == 1 else ["--shared-port", str(public_port)]
        mport = free_port(host)
        procs.append(
            ServiceProcess(
                "router" if spec.routers == 1 else f"router-{i}",
                "router",
                nodes[0],
                f"{host}:{port}",
                f"{host}:{mport}",
                py
                + ["services.router", "--host", host, "--port", str(port), "--metrics-port", str(mport)]
                + ["--http-port", str(http_port)]
                + shared
                + router_args
                + spec.router_args,
                public=f"{host}:{public_port}",
                http=f"{host}:{http_port}" if http_port > 0 else "",
            )
        )
    return procs


def prometheus_config(
    info: dict, rules_dir: str = os.path.join(ROOT, "deploy", "prometheus", "rules"), scrape_interval: str = "5s"
) -> dict:
    """A Prometheus configuration scraping a local cluster, with the project's rule files.
    Targets carry the same `component` label the Kubernetes scrape config derives from pod labels,
    so the dashboards and rules work on both. Under TLS it scrapes over HTTPS with the cluster's
    client certificate (the ready file's "tls"), which the services' /metrics ask for."""
    tls = info.get("tls")
    https = {}
    if tls:
        https = {
            "scheme": "https",
            "tls_config": {
                "ca_file": tls["ca"],
                "cert_file": tls["cert"],
                "key_file": tls["key"],
                "server_name": tls["server_name"],
            },
        }
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [os.path.join(rules_dir, "*.yml")],
        "scrape_configs": [
            {
                "job_name": "pdserve",
                **https,
                "static_configs": [
                    {
                        "targets": [svc["metrics"]],
                        "labels": {"component": svc["role"], "node": svc["node"], "service": svc["name"]},
                    }
                    for svc in info["services"]
                    if svc["metrics"]  # (a follower has none)
                ],
            }
        ],
    }


def health_status(address: str, timeout: float = 1.0, tls: TlsFiles | None = None) -> int:
    try:
        with sync_channel(address, tls) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status
    except grpc.RpcError:
        return health_pb2.HealthCheckResponse.UNKNOWN


class StartCancelled(Exception):
    pass


class Cluster:
    def __init__(self, spec: ClusterSpec):
        self.spec = spec
        self.procs = plan_processes(spec)
        self._popen: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, list[float]] = {}  # service -> when it was restarted
        self.client_tls: TlsFiles | None = None  # the launcher's own identity (health checks, tools)
        self.api_key_file = ""
        if spec.tls:
            self._issue_certificates()
        if spec.api_key:
            self.api_key_file = os.path.join(spec.log_dir, "api-keys")
            os.makedirs(spec.log_dir, exist_ok=True)
            fd = os.open(self.api_key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(spec.api_key + "\n")
            for proc in self.procs:
                if proc.role == "router":
                    proc.argv += ["--api-key-file", self.api_key_file]

    def _issue_certificates(self) -> None:
        """A CA for this cluster and a certificate for each service (and for the launcher's clients)."""
        from services.common.certs import new_cluster_ca  # (cryptography: only with --tls)

        ca = new_cluster_ca(os.path.join(self.spec.log_dir, "tls"))
        for proc in self.procs:
            files = ca.issue(proc.name, self.spec.host)
            proc.argv += ["--tls-cert", files.cert, "--tls-key", files.key, "--tls-ca", files.ca]
        self.client_tls = ca.issue("client", self.spec.host)

    def _start(self, proc: ServiceProcess, append_log: bool = False) -> None:
        os.makedirs(self.spec.log_dir, exist_ok=True)
        proc.log = os.path.join(self.spec.log_dir, f"{proc.name}.log")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        env["PDSERVE_EXIT_WITH_PARENT"] = str(os.getpid())  # services/common/flags.py: exit_with_parent
        with open(proc.log, "a" if append_log else "w") as log:
            # Its own session: a terminal's Ctrl-C reaches only the launcher, which then stops the
            # services in order (router first) instead of all of them draining at once.
            popen = subprocess.Popen(
                proc.argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True
            )
        proc.pid = popen.pid
        self._popen[proc.name] = popen

    def _wait_serving(self, procs: list[ServiceProcess], timeout: float, cancelled=lambda: False) -> None:
        deadline = time.monotonic() + timeout
        pending = list(procs)
        while pending:
            if cancelled():
                raise StartCancelled("stop requested while starting")
            for proc in list(pending):
                code = self._popen[proc.name].poll()
                if code is not None:
                    raise RuntimeError(f"{proc.name} exited with code {code} while starting:\n{self.log_tail(proc)}")
                # a follower serves nothing: its worker turns SERVING only once every follower joined
                if (
                    not proc.grpc
                    or health_status(proc.grpc, tls=self.client_tls) == health_pb2.HealthCheckResponse.SERVING
                ):
                    pending.remove(proc)
            if pending and time.monotonic() > deadline:
                names = ", ".join(p.name for p in pending)
                raise TimeoutError(f"not healthy after {timeout:.0f}s: {names}\n{self.log_tail(pending[0])}")
            time.sleep(0.2)

    def exit_code(self, proc: ServiceProcess) -> int | None:
        """The service's exit code, or None while it runs."""
        return self._popen[proc.name].poll()

    def crash_looping(self, proc: ServiceProcess) -> bool:
        """True if the service was restarted MAX_RESTARTS times within the last RESTART_WINDOW_SECONDS."""
        recent = [t for t in self.restarts.get(proc.name, []) if time.monotonic() - t < RESTART_WINDOW_SECONDS]
        return len(recent) >= MAX_RESTARTS

    def restart(self, proc: ServiceProcess) -> None:
        """Starts a crashed service again on the same ports (its peers find it by address)."""
        self.restarts.setdefault(proc.name, []).append(time.monotonic())
        self._start(proc, append_log=True)

    def log_tail(self, proc: ServiceProcess, lines: int = 30) -> str:
        try:
            with open(proc.log) as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def start(self, timeout: float = 180.0, progress=print, cancelled=lambda: False) -> None:
        """Starts every service at once, then waits until each serves, in dependency order:
        kvstore daemons, workers, router. Each waits for what it needs (a worker for its node's
        daemon, the router for its workers: one never seen healthy is not an ejection), so their
        imports and model loads overlap. Raises StartCancelled as soon as `cancelled()` turns true
        (a Ctrl-C while a large model loads)."""
        for proc in self.procs:
            self._start(proc)
        for roles in (("kvstore",), ("prefill", "decode", "colocated", "follower"), ("router",)):
            group = [p for p in self.procs if p.role in roles]
            self._wait_serving(group, timeout, cancelled)
            for proc in group:
                if proc.role == "follower":
                    progress(f"  {proc.name:<14} a follower: the instance's ranks on another (emulated) host")
                else:
                    progress(f"  {proc.name:<14} {proc.grpc:<22} metrics {proc.metrics:<22} node {proc.node}")

    def info(self) -> dict:
        router = next(p for p in self.procs if p.role == "router")
        return {
            "router": router.public,
            "http": router.http,
            "router_metrics": router.metrics,
            "mode": self.spec.mode,
            # a client certificate of the cluster (internal services need one) and the API key
            "tls": asdict(self.client_tls) if self.client_tls else None,
            "api_key": self.spec.api_key,
            "services": [{k: v for k, v in asdict(p).items() if k != "argv"} for p in self.procs],
        }

    def stop(self, grace: float = 20.0) -> dict[str, int]:
        """SIGTERM everything (router first so it stops taking requests), then SIGKILL stragglers.
        Each group gets `grace` and a little more per process: dozens of workers (emulated ones)
        exiting at once on a few cores take their time. Returns each process's exit code."""
        order = sorted(
            self.procs,
            key=lambda p: {"router": 0, "prefill": 1, "decode": 1, "colocated": 1, "follower": 2}.get(p.role, 3),
        )
        # A worker stops its followers as it drains (they exit once their ranks have): they are
        # signalled only if they outlive that. (One stopped first would take its worker down.)
        for group_roles in (("router",), ("prefill", "decode", "colocated"), ("follower",), ("kvstore",)):
            group = [p for p in order if p.role in group_roles and p.name in self._popen]
            if group_roles == ("follower",):
                _wait_all([self._popen[p.name] for p in group], grace)
            for proc in group:
                if self._popen[proc.name].poll() is None:
                    self._popen[proc.name].send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace + STOP_SECONDS_PER_PROCESS * len(group)
            for proc in group:
                try:
                    self._popen[proc.name].wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self._popen[proc.name].kill()
                    self._popen[proc.name].wait()
        return {name: p.returncode for name, p in self._popen.items()}
