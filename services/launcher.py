"""`pdserve up`: a whole cluster as local processes.

Starts K kvstore daemons (each emulating one node), N prefill and M decode workers spread over
those nodes (or colocated workers), and the router; waits until every gRPC server reports SERVING
through the standard health service; writes a ready file (JSON: the router's address and every
service's gRPC and metrics address); on SIGINT/SIGTERM stops everything (SIGTERM, then SIGKILL
after the grace period) and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_RESTARTS = 3  # per service; past that the launcher stops the cluster


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


@dataclass
class ServiceProcess:
    name: str
    role: str
    node: str
    grpc: str
    metrics: str
    argv: list[str] = field(repr=False)
    pid: int = 0
    log: str = ""


@dataclass
class ClusterSpec:
    model: str = ""
    mode: str = "disaggregated"  # or "colocated"
    prefill: int = 1
    decode: int = 1
    colocated: int = 1
    nodes: int = 1
    placement: str = "split"  # split: prefill on the first nodes, decode on the rest; spread: round robin
    host: str = "127.0.0.1"
    router_port: int = 7000
    kv_cache_gb: float = 0.25
    threads: int = 0  # torch threads per worker (0: cores / workers)
    log_dir: str = "results/cluster-logs"
    worker_args: list[str] = field(default_factory=list)
    role_args: dict[str, list[str]] = field(default_factory=dict)  # extra flags per role (prefill, decode, ...)
    router_args: list[str] = field(default_factory=list)
    kvstore_args: list[str] = field(default_factory=list)


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
            kvstores[node] = add(f"kvstore-{node}", "kvstore", node, "services.kvstore",
                                 ["--node-id", node, "--transfer-host", host] + spec.kvstore_args)
    workers = spec.colocated if spec.mode == "colocated" else spec.prefill + spec.decode
    threads = spec.threads or max(1, (os.cpu_count() or 1) // max(1, workers))
    common = ["--kv-cache-gb", str(spec.kv_cache_gb), "--threads", str(threads)]
    if spec.model:
        common += ["--model", spec.model]
    common += spec.worker_args

    def node_for(role: str, index: int) -> str:
        if spec.placement == "split" and len(nodes) > 1:
            half = len(nodes) // 2
            group = nodes[:half] if role == "prefill" else nodes[half:]
            return group[index % len(group)]
        offset = 0 if role == "prefill" else spec.prefill
        return nodes[(offset + index) % len(nodes)]

    if spec.mode == "colocated":
        for i in range(spec.colocated):
            add(f"colocated-{i}", "colocated", nodes[i % len(nodes)], "services.colocated",
                common + ["--node-id", nodes[i % len(nodes)]] + spec.role_args.get("colocated", []))
    else:
        for role, count in (("prefill", spec.prefill), ("decode", spec.decode)):
            for i in range(count):
                node = node_for(role, i)
                add(f"{role}-{i}", role, node, f"services.{role}",
                    common + ["--node-id", node, "--kvstore", kvstores[node].grpc, "--worker-id", f"{role}-{i}"]
                    + spec.role_args.get(role, []))
    router_port = spec.router_port or free_port(host)
    router_args = ["--port", str(router_port)]
    for role in ("prefill", "decode", "colocated"):
        addrs = [p.grpc for p in procs if p.role == role]
        if addrs:
            router_args += [f"--{role}", ",".join(addrs)]
    if spec.model:
        router_args += ["--model", spec.model]
    mport = free_port(host)
    procs.append(ServiceProcess("router", "router", nodes[0], f"{host}:{router_port}", f"{host}:{mport}",
                                py + ["services.router", "--host", host, "--metrics-port", str(mport)]
                                + router_args + spec.router_args))
    return procs


def prometheus_config(info: dict, rules_dir: str = os.path.join(ROOT, "deploy", "prometheus", "rules"),
                      scrape_interval: str = "5s") -> dict:
    """A Prometheus configuration scraping a local cluster, with the project's rule files.
    Targets carry the same `component` label the Kubernetes scrape config derives from pod labels,
    so the dashboards and rules work on both."""
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [os.path.join(rules_dir, "*.yml")],
        "scrape_configs": [{
            "job_name": "pdserve",
            "static_configs": [{"targets": [svc["metrics"]], "labels": {"component": svc["role"], "node": svc["node"],
                                                                      "service": svc["name"]}}
                               for svc in info["services"]],
        }],
    }


def health_status(address: str, timeout: float = 1.0) -> int:
    try:
        with grpc.insecure_channel(address) as channel:
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
        self.restarts: dict[str, int] = {}

    def _start(self, proc: ServiceProcess, append_log: bool = False) -> None:
        os.makedirs(self.spec.log_dir, exist_ok=True)
        proc.log = os.path.join(self.spec.log_dir, f"{proc.name}.log")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
        env["PDSERVE_EXIT_WITH_PARENT"] = str(os.getpid())  # services/common/flags.py: exit_with_parent
        with open(proc.log, "a" if append_log else "w") as log:
            # Its own session: a terminal's Ctrl-C reaches only the launcher, which then stops the
            # services in order (router first) instead of all of them draining at once.
            popen = subprocess.Popen(proc.argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                     start_new_session=True)
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
                if health_status(proc.grpc) == health_pb2.HealthCheckResponse.SERVING:
                    pending.remove(proc)
            if pending and time.monotonic() > deadline:
                names = ", ".join(p.name for p in pending)
                raise TimeoutError(f"not healthy after {timeout:.0f}s: {names}\n{self.log_tail(pending[0])}")
            time.sleep(0.2)

    def restart(self, proc: ServiceProcess) -> None:
        """Starts a crashed service again on the same ports (its peers find it by address)."""
        self.restarts[proc.name] = self.restarts.get(proc.name, 0) + 1
        self._start(proc, append_log=True)

    def log_tail(self, proc: ServiceProcess, lines: int = 30) -> str:
        try:
            with open(proc.log) as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def start(self, timeout: float = 180.0, progress=print, cancelled=lambda: False) -> None:
        """Starts in dependency order: kvstore daemons, workers, router. Raises StartCancelled
        as soon as `cancelled()` turns true (a Ctrl-C while a large model loads)."""
        for roles in (("kvstore",), ("prefill", "decode", "colocated"), ("router",)):
            group = [p for p in self.procs if p.role in roles]
            for proc in group:
                self._start(proc)
            self._wait_serving(group, timeout, cancelled)
            for proc in group:
                progress(f"  {proc.name:<14} {proc.grpc:<22} metrics {proc.metrics:<22} node {proc.node}")

    def info(self) -> dict:
        router = next(p for p in self.procs if p.role == "router")
        return {
            "router": router.grpc,
            "router_metrics": router.metrics,
            "mode": self.spec.mode,
            "services": [{k: v for k, v in asdict(p).items() if k != "argv"} for p in self.procs],
        }

    def stop(self, grace: float = 20.0) -> dict[str, int]:
        """SIGTERM everything (router first so it stops taking requests), then SIGKILL stragglers.
        Returns each process's exit code."""
        order = sorted(self.procs, key=lambda p: {"router": 0, "prefill": 1, "decode": 1, "colocated": 1}.get(p.role, 2))
        for group_roles in (("router",), ("prefill", "decode", "colocated"), ("kvstore",)):
            group = [p for p in order if p.role in group_roles and p.name in self._popen]
            for proc in group:
                if self._popen[proc.name].poll() is None:
                    self._popen[proc.name].send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for proc in group:
                try:
                    self._popen[proc.name].wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self._popen[proc.name].kill()
                    self._popen[proc.name].wait()
        return {name: p.returncode for name, p in self._popen.items()}


def add_up_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="", help="checkpoint folder (default: the embedded tiny model)")
    ap.add_argument("--mode", choices=["disaggregated", "colocated"], default="disaggregated")
    ap.add_argument("--prefill", type=int, default=1, help="prefill workers")
    ap.add_argument("--decode", type=int, default=1, help="decode workers")
    ap.add_argument("--colocated", type=int, default=1, help="workers in colocated mode")
    ap.add_argument("--nodes", type=int, default=1, help="kvstore daemons, each emulating a node")
    ap.add_argument("--placement", choices=["split", "spread"], default="split",
                    help="split: prefill on the first half of the nodes, decode on the rest")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7000, help="router gRPC port (0: any free port)")
    ap.add_argument("--kv-cache-gb", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: cores / workers)")
    ap.add_argument("--ready-file", default="", help="write the cluster's addresses here (JSON) once healthy")
    ap.add_argument("--log-dir", default="results/cluster-logs")
    ap.add_argument("--prometheus-config", default="",
                    help="write a Prometheus config scraping this cluster (with deploy/prometheus rules) here")
    ap.add_argument("--on-exit", choices=["restart", "stop"], default="restart",
                    help="when a service dies: start it again (up to 3 times) or stop the whole cluster")
    ap.add_argument("--worker-arg", action="append", default=[],
                    help='extra flags for every worker (repeatable): "--dtype bfloat16", or --worker-arg=--no-cuda-graphs '
                         "for a flag without a value")
    ap.add_argument("--router-arg", action="append", default=[], help="extra flag for the router (repeatable)")
    ap.add_argument("--kvstore-arg", action="append", default=[], help="extra flag for every kvstore (repeatable)")


def spec_from_args(args) -> ClusterSpec:
    def split_flags(values):  # "--a 1 --b 'x y'" -> ["--a", "1", "--b", "x y"]
        return [part for v in values for part in shlex.split(v)]

    return ClusterSpec(
        model=args.model, mode=args.mode, prefill=args.prefill, decode=args.decode, colocated=args.colocated,
        nodes=args.nodes, placement=args.placement, host=args.host, router_port=args.port,
        kv_cache_gb=args.kv_cache_gb, threads=args.threads, log_dir=args.log_dir,
        worker_args=split_flags(args.worker_arg), router_args=split_flags(args.router_arg),
        kvstore_args=split_flags(args.kvstore_arg),
    )


def _check_args(args, spec: ClusterSpec) -> None:
    counts = {"--nodes": spec.nodes}
    counts.update({"--prefill": spec.prefill, "--decode": spec.decode} if spec.mode == "disaggregated"
                  else {"--colocated": spec.colocated})
    for flag, value in counts.items():
        if value < 1:
            raise SystemExit(f"{flag} must be >= 1, got {value}")
    for flag, path in (("--ready-file", args.ready_file), ("--prometheus-config", args.prometheus_config)):
        folder = os.path.dirname(os.path.abspath(path)) if path else ""
        if path and not os.path.isdir(folder):
            raise SystemExit(f"{flag}: folder {folder} does not exist")
    if spec.model and not os.path.isfile(os.path.join(spec.model, "config.json")):
        raise SystemExit(f"--model: {spec.model} is not a checkpoint folder (no config.json)")


def up(args) -> int:
    spec = spec_from_args(args)
    _check_args(args, spec)
    if args.ready_file and os.path.exists(args.ready_file):
        os.remove(args.ready_file)  # a stale file would point scripts at a dead cluster
    cluster = Cluster(spec)
    stop = {"requested": False}

    def on_signal(signum, frame):
        stop["requested"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"starting {spec.mode} cluster ({spec.nodes} node(s)); logs in {spec.log_dir}/", flush=True)
    try:
        try:
            cluster.start(cancelled=lambda: stop["requested"])
        except StartCancelled:
            print("stop requested while starting", flush=True)
            # a service still importing has no SIGTERM handler yet and dies of the signal: expected
            return 0 if _stopped_cleanly(cluster, also_ok=(-signal.SIGTERM,)) else 1
        except Exception as exc:
            print(f"cluster failed to start: {exc}", file=sys.stderr, flush=True)
            cluster.stop(grace=5)
            return 1
        info = cluster.info()
        if args.prometheus_config:
            import yaml

            with open(args.prometheus_config, "w") as f:
                yaml.safe_dump(prometheus_config(info), f, sort_keys=False)
        if args.ready_file:
            tmp = args.ready_file + ".tmp"
            with open(tmp, "w") as f:
                json.dump(info, f, indent=2)
            os.replace(tmp, args.ready_file)
        print(f"ready: router at {info['router']} (Ctrl-C to stop)", flush=True)
        while not stop["requested"]:
            for proc in cluster.procs:
                code = cluster._popen[proc.name].poll()
                if code is None:
                    continue
                if args.on_exit == "restart" and cluster.restarts.get(proc.name, 0) < MAX_RESTARTS:
                    print(f"{proc.name} exited with code {code}; restarting it", file=sys.stderr, flush=True)
                    cluster.restart(proc)
                else:
                    print(f"{proc.name} exited with code {code}; stopping the cluster", file=sys.stderr, flush=True)
                    stop["requested"] = True
                    break
            time.sleep(0.2)
        print("stopping...", flush=True)
        return 0 if _stopped_cleanly(cluster) else 1
    finally:
        cluster.stop(grace=5)  # whatever ended us (a no-op after a clean stop)
        if args.ready_file and os.path.exists(args.ready_file):
            os.remove(args.ready_file)


def _stopped_cleanly(cluster: Cluster, also_ok: tuple[int, ...] = ()) -> bool:
    codes = cluster.stop()
    bad = {n: c for n, c in codes.items() if c != 0 and c not in also_ok}
    if bad:
        print(f"unclean exits: {bad}", file=sys.stderr)
    return not bad
