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
from services.launcher import Cluster, ClusterSpec, StartCancelled, prometheus_config
from services.planner.plan_output import read_layout
from services.tiny_models import DEFAULT_SERVED_NAME, model_dir_or_default


def add_up_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="", help="checkpoint folder (default: the embedded tiny model)")
    ap.add_argument("--mode", choices=["disaggregated", "colocated"], default="disaggregated")
    # None: not given (--plan sets them; 1, 1, 1, 1 and split otherwise)
    ap.add_argument("--prefill", type=int, help="prefill workers (default 1)")
    ap.add_argument("--decode", type=int, help="decode workers (default 1)")
    ap.add_argument("--colocated", type=int, help="workers in colocated mode (default 1)")
    ap.add_argument("--nodes", type=int, help="kvstore daemons, each emulating a node (default 1)")
    ap.add_argument(
        "--placement",
        choices=["split", "spread"],
        help="split (default): prefill on the first half of the nodes, decode on the rest; spread: round robin",
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7000, help="router gRPC port (0: any free port)")
    ap.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="the routers' OpenAI-compatible HTTP API port (0: any free port, -1: off)",
    )
    ap.add_argument(
        "--routers",
        type=int,
        default=1,
        help="routers over the same workers, all serving --port (the kernel spreads client connections)",
    )
    ap.add_argument("--kv-cache-gb", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: cores / workers)")
    parallel = ap.add_argument_group(
        "parallelism (engine/parallel.py): tp x pp ranks per instance, one process each (on CUDA, one GPU each); "
        "KV moves between instances of different layouts (docs/kvstore.md)"
    )
    parallel.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="",
        help="cuda: each worker instance on GPUs of its own, one per rank, consecutive (the first instance "
        "from cuda:0); the machine needs them all. Default: the workers' own --device (cpu)",
    )
    parallel.add_argument("--tp", type=int, default=1, help="colocated mode: tensor-parallel ranks per pipeline stage")
    parallel.add_argument("--pp", type=int, default=1, help="colocated mode: pipeline stages per instance")
    parallel.add_argument(
        "--pods",
        type=int,
        default=1,
        help="colocated mode: hosts each instance spans (whole stages each), emulated here by a follower "
        "process per extra pod (engine/follower.py)",
    )
    for role in ("prefill", "decode"):
        parallel.add_argument(f"--{role}-tp", type=int, default=1, help=f"tensor-parallel ranks per {role} stage")
        parallel.add_argument(f"--{role}-pp", type=int, default=1, help=f"pipeline stages per {role} instance")
        parallel.add_argument(f"--{role}-pods", type=int, default=1, help=f"hosts each {role} instance spans")
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
        help="when a service dies: start it again (unless it is crash-looping: 3 restarts within 5 minutes) "
        "or stop the whole cluster",
    )
    ap.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        help='extra flags for every worker (repeatable): "--dtype bfloat16", or --worker-arg=--no-cuda-graphs '
        "for a flag without a value",
    )
    ap.add_argument("--router-arg", action="append", default=[], help="extra flag for the router (repeatable)")
    ap.add_argument(
        "--tls",
        action="store_true",
        help="mutual TLS on every port and call, with a throwaway CA and certificates in <log-dir>/tls "
        "(the ready file names the CA and a client certificate)",
    )
    ap.add_argument(
        "--api-key",
        default=os.environ.get("PDSERVE_API_KEY", ""),
        help="the router's public API requires it (metadata authorization: Bearer <key>, 16+ characters) "
        "[env PDSERVE_API_KEY]",
    )
    emulate = ap.add_argument_group("emulated engines (services/engine/emulated.py): no model, GPU timings")
    emulate.add_argument(
        "--emulate",
        default="",
        metavar="PROFILE",
        help="every worker runs an emulated engine taking this latency profile's time per step",
    )
    emulate.add_argument("--prefill-profile", default="", help="the prefill workers' profile (default: --emulate)")
    emulate.add_argument("--decode-profile", default="", help="the decode workers' profile (default: --emulate)")
    emulate.add_argument(
        "--plan",
        default="",
        metavar="PLAN_JSON",
        help="start the layout a `pdserve plan search` wrote (instances, nodes, SLOs), every worker emulated "
        "at the profile the search simulated its role with (--emulate or --*-profile: another profile of the "
        "same parallel degrees); with --mode colocated, its colocated baseline on the same GPUs",
    )
    ap.add_argument("--kvstore-arg", action="append", default=[], help="extra flag for every kvstore (repeatable)")


def spec_from_args(args) -> ClusterSpec:
    def split_flags(values):  # "--a 1 --b 'x y'" -> ["--a", "1", "--b", "x y"]
        return [part for v in values for part in shlex.split(v)]

    _check_profile_flags(args)
    spec = ClusterSpec(
        model=args.model,
        mode=args.mode,
        prefill=_given(args.prefill, 1),
        decode=_given(args.decode, 1),
        colocated=_given(args.colocated, 1),
        nodes=_given(args.nodes, 1),
        placement=args.placement or "split",
        host=args.host,
        router_port=args.port,
        http_port=args.http_port,
        routers=args.routers,
        kv_cache_gb=args.kv_cache_gb,
        threads=args.threads,
        device=args.device if args.device == "cuda" else "",
        parallel=(
            {"colocated": (args.tp, args.pp)}
            if args.mode == "colocated"
            else {"prefill": (args.prefill_tp, args.prefill_pp), "decode": (args.decode_tp, args.decode_pp)}
        ),
        pods=(
            {"colocated": args.pods}
            if args.mode == "colocated"
            else {"prefill": args.prefill_pods, "decode": args.decode_pods}
        ),
        log_dir=args.log_dir,
        worker_args=split_flags(args.worker_arg),
        router_args=split_flags(args.router_arg),
        kvstore_args=split_flags(args.kvstore_arg),
        profiles=_profiles(args),
        tls=args.tls,
        api_key=args.api_key,
    )
    if args.plan:
        _apply_plan(args, spec)
    return spec


def _given(value: int | None, default: int) -> int:
    return default if value is None else value


def _profiles(args) -> dict[str, str]:
    """role -> the latency profile its emulated workers take (none: real engines)."""
    profiles = {
        "prefill": args.prefill_profile or args.emulate,
        "decode": args.decode_profile or args.emulate,
        "colocated": args.emulate,
    }
    return {role: path for role, path in profiles.items() if path}


def _apply_plan(args, spec: ClusterSpec) -> None:
    """The plan's instances, nodes, profiles and SLOs into the spec; refuses flags it would override."""
    given = [
        flag for flag in ("prefill", "decode", "colocated", "nodes", "placement") if getattr(args, flag) is not None
    ]
    if given:
        raise SystemExit(f"--plan sets the layout: drop --{', --'.join(given)}")
    try:
        layout = read_layout(args.plan, spec.mode)
    except (OSError, ValueError, KeyError) as exc:
        raise SystemExit(f"--plan: {exc}") from None
    for role, overriding in spec.profiles.items():
        if role not in layout.profiles:
            continue
        planned, other = LatencyProfile.load(layout.profiles[role]), LatencyProfile.load(overriding)
        if (other.tensor_parallel, other.pipeline_parallel) != (planned.tensor_parallel, planned.pipeline_parallel):
            raise SystemExit(
                f"--plan: its {role} instances are tp={planned.tensor_parallel}, pp={planned.pipeline_parallel}; "
                f"{overriding} is a tp={other.tensor_parallel}, pp={other.pipeline_parallel} profile"
            )
    counts = {role: len(nodes) for role, nodes in layout.nodes.items()}
    spec.prefill, spec.decode = counts.get("prefill", 0), counts.get("decode", 0)
    spec.colocated, spec.nodes, spec.node_of = counts.get("colocated", 0), layout.num_nodes, layout.nodes
    spec.profiles = {**layout.profiles, **{r: p for r, p in spec.profiles.items() if r in layout.profiles}}
    spec.role_args = {role: layout.worker_args.get(role, []) + spec.role_args.get(role, []) for role in layout.nodes}
    slo = [
        "--slo-ttft-seconds",
        str(layout.slo["ttft_s"]),
        "--slo-tpot-seconds",
        str(layout.slo["tpot_s"]),
        "--slo-attainment-target",
        str(layout.slo["attainment"]),
    ]
    spec.router_args = slo + spec.router_args  # a --router-arg given too comes later and wins


def _check_profile_flags(args) -> None:
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
    if args.mode == "colocated" and (args.prefill_profile or args.decode_profile):
        raise SystemExit("--prefill-profile and --decode-profile are for disaggregated mode (colocated: --emulate)")
    if (
        (args.prefill_profile or args.decode_profile)
        and not args.emulate
        and not args.plan
        and not (args.prefill_profile and args.decode_profile)
    ):
        raise SystemExit("--prefill-profile and --decode-profile go together (or with --emulate for the other)")


def _check_args(args, spec: ClusterSpec) -> None:
    if spec.api_key and len(spec.api_key) < 16:
        raise SystemExit("--api-key: at least 16 characters")
    counts = {"--nodes": spec.nodes, "--routers": spec.routers}
    counts.update(
        {"--prefill": spec.prefill, "--decode": spec.decode}
        if spec.mode == "disaggregated"
        else {"--colocated": spec.colocated}
    )
    degrees = {
        f"--{prefix}{kind}": getattr(args, f"{prefix.replace('-', '_')}{kind}")
        for prefix in ("", "prefill-", "decode-")
        for kind in ("tp", "pp", "pods")
    }
    for flag, value in {**counts, **degrees}.items():
        if value < 1:
            raise SystemExit(f"{flag} must be >= 1, got {value}")
    for flag, value in degrees.items():
        colocated_flag = flag in ("--tp", "--pp", "--pods")
        if value > 1 and colocated_flag != (spec.mode == "colocated"):
            mode = "colocated" if colocated_flag else "disaggregated"
            raise SystemExit(f"{flag}: for {mode} mode (this cluster is {spec.mode})")
    if any(tp * pp > 1 for tp, pp in spec.parallel.values()) and spec.profiles:
        raise SystemExit("--tp, --pp: an emulated instance's parallelism is its profile's (--emulate)")
    for role, pods in spec.pods.items():
        pp = spec.parallel[role][1]
        if pp % pods:
            flag = "--pods" if role == "colocated" else f"--{role}-pods"
            raise SystemExit(f"{flag}: {pods} pods must each hold whole pipeline stages of the {pp}")
    for flag, path in (("--ready-file", args.ready_file), ("--prometheus-config", args.prometheus_config)):
        folder = os.path.dirname(os.path.abspath(path)) if path else ""
        if path and not os.path.isdir(folder):
            raise SystemExit(f"{flag}: folder {folder} does not exist")
    if spec.model and not os.path.isfile(os.path.join(spec.model, "config.json")):
        raise SystemExit(f"--model: {spec.model} is not a checkpoint folder (no config.json)")


def up(args) -> int:
    spec = spec_from_args(args)
    _check_args(args, spec)
    if not spec.model:
        spec.served_model_name = DEFAULT_SERVED_NAME
    spec.model = model_dir_or_default(spec.model)  # built once here, not by every service at once
    if args.ready_file and os.path.exists(args.ready_file):
        os.remove(args.ready_file)  # a stale file would point scripts at a dead cluster
    cluster = Cluster(spec)
    stop = {"requested": False}

    def on_signal(signum, frame):
        stop["requested"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if args.plan:
        workers = ", ".join(f"{len(nodes)} {role}" for role, nodes in spec.node_of.items())
        print(f"{args.plan}: {workers}, emulated at " + ", ".join(sorted(set(spec.profiles.values()))), flush=True)
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
            _write_ready_file(args.ready_file, info)
        http = f", OpenAI-compatible API at http{'s' if spec.tls else ''}://{info['http']}/v1" if info["http"] else ""
        print(f"ready: router at {info['router']}{http} (Ctrl-C to stop)", flush=True)
        while not stop["requested"]:
            for proc in cluster.procs:
                code = cluster.exit_code(proc)
                if code is None:
                    continue
                if args.on_exit == "restart" and not cluster.crash_looping(proc):
                    print(f"{proc.name} exited with code {code}; restarting it", file=sys.stderr, flush=True)
                    cluster.restart(proc)
                    if args.ready_file:  # its new pid
                        _write_ready_file(args.ready_file, cluster.info())
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


def _write_ready_file(path: str, info: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, path)  # readers never see half a file


def _stopped_cleanly(cluster: Cluster, also_ok: tuple[int, ...] = ()) -> bool:
    codes = cluster.stop()
    bad = {n: c for n, c in codes.items() if c != 0 and c not in also_ok}
    if bad:
        print(f"unclean exits: {bad}", file=sys.stderr)
    return not bad
