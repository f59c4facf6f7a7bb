"""`pdserve up`: a whole cluster as local processes (services/launcher.py), until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time

import yaml

from services.common.latency_profile import LatencyProfile
from services.launcher import MAX_RESTARTS, Cluster, ClusterSpec, StartCancelled, prometheus_config
from services.tiny_models import model_dir_or_default


def add_up_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="", help="checkpoint folder (default: the embedded tiny model)")
    ap.add_argument("--mode", choices=["disaggregated", "colocated"], default="disaggregated")
    ap.add_argument("--prefill", type=int, default=1, help="prefill workers")
    ap.add_argument("--decode", type=int, default=1, help="decode workers")
    ap.add_argument("--colocated", type=int, default=1, help="workers in colocated mode")
    ap.add_argument("--nodes", type=int, default=1, help="kvstore daemons, each emulating a node")
    ap.add_argument(
        "--placement",
        choices=["split", "spread"],
        default="split",
        help="split: prefill on the first half of the nodes, decode on the rest",
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7000, help="router gRPC port (0: any free port)")
    ap.add_argument("--kv-cache-gb", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: cores / workers)")
    ap.add_argument("--ready-file", default="", help="write the cluster's addresses here (JSON) once healthy")
    ap.add_argument("--log-dir", default="results/cluster-logs")
    ap.add_argument(
        "--prometheus-config",
        default="",
        help="write a Prometheus config scraping this cluster (with deploy/prometheus rules) here",
    )
    ap.add_argument(
        "--on-exit",
        choices=["restart", "stop"],
        default="restart",
        help="when a service dies: start it again (up to 3 times) or stop the whole cluster",
    )
    ap.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        help='extra flags for every worker (repeatable): "--dtype bfloat16", or --worker-arg=--no-cuda-graphs '
        "for a flag without a value",
    )
    ap.add_argument("--router-arg", action="append", default=[], help="extra flag for the router (repeatable)")
    emulate = ap.add_argument_group("emulated engines (services/engine/emulated.py): no model, GPU timings")
    emulate.add_argument(
        "--emulate",
        default="",
        metavar="PROFILE",
        help="every worker runs an emulated engine taking this latency profile's time per step",
    )
    emulate.add_argument("--prefill-profile", default="", help="the prefill workers' profile (default: --emulate)")
    emulate.add_argument("--decode-profile", default="", help="the decode workers' profile (default: --emulate)")
    ap.add_argument("--kvstore-arg", action="append", default=[], help="extra flag for every kvstore (repeatable)")


def spec_from_args(args) -> ClusterSpec:
    def split_flags(values):  # "--a 1 --b 'x y'" -> ["--a", "1", "--b", "x y"]
        return [part for v in values for part in shlex.split(v)]

    return ClusterSpec(
        model=args.model,
        mode=args.mode,
        prefill=args.prefill,
        decode=args.decode,
        colocated=args.colocated,
        nodes=args.nodes,
        placement=args.placement,
        host=args.host,
        router_port=args.port,
        kv_cache_gb=args.kv_cache_gb,
        threads=args.threads,
        log_dir=args.log_dir,
        worker_args=split_flags(args.worker_arg),
        router_args=split_flags(args.router_arg),
        kvstore_args=split_flags(args.kvstore_arg),
        profiles=_profiles(args),
    )


def _profiles(args) -> dict[str, str]:
    """role -> the latency profile its emulated workers take (none: real engines)."""
    profiles = {
        "prefill": args.prefill_profile or args.emulate,
        "decode": args.decode_profile or args.emulate,
        "colocated": args.emulate,
    }
    return {role: path for role, path in profiles.items() if path}


def _check_args(args, spec: ClusterSpec) -> None:
    counts = {"--nodes": spec.nodes}
    counts.update(
        {"--prefill": spec.prefill, "--decode": spec.decode}
        if spec.mode == "disaggregated"
        else {"--colocated": spec.colocated}
    )
    for flag, value in counts.items():
        if value < 1:
            raise SystemExit(f"{flag} must be >= 1, got {value}")
    for flag, path in (("--ready-file", args.ready_file), ("--prometheus-config", args.prometheus_config)):
        folder = os.path.dirname(os.path.abspath(path)) if path else ""
        if path and not os.path.isdir(folder):
            raise SystemExit(f"{flag}: folder {folder} does not exist")
    if spec.model and not os.path.isfile(os.path.join(spec.model, "config.json")):
        raise SystemExit(f"--model: {spec.model} is not a checkpoint folder (no config.json)")
    for flag, path in (
        ("--emulate", args.emulate),
        ("--prefill-profile", args.prefill_profile),
        ("--decode-profile", args.decode_profile),
    ):
        if path:
            try:
                LatencyProfile.load(path)  # a bad one would stop every worker at start
            except (OSError, ValueError) as exc:
                raise SystemExit(f"{flag}: {exc}") from None
    if (
        (args.prefill_profile or args.decode_profile)
        and not args.emulate
        and not (args.prefill_profile and args.decode_profile)
    ):
        raise SystemExit("--prefill-profile and --decode-profile go together (or with --emulate for the other)")


def up(args) -> int:
    spec = spec_from_args(args)
    _check_args(args, spec)
    spec.model = model_dir_or_default(spec.model)  # built once here, not by every service at once
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
                code = cluster.exit_code(proc)
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
