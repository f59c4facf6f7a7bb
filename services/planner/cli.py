"""Command line of the planner: `pdserve plan profile|simulate|search` (or `python -m services.planner`).

profile   measure the engine here (or, with --analytic, cost a GPU from its datasheet) and
          write a latency profile JSON
simulate  replay a trace (or a synthetic workload) on a simulated cluster built from profiles;
          write per-request TTFT/TPOT and SLO attainment as JSON
search    find the parallelism, replica counts and placement with the best goodput per GPU
          (DistServe Algorithm 1 or 2); write plan.json, plan.yaml and Helm values.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING

from tqdm import tqdm

from services.common.arith import ceil_div
from services.common.commands import run_command

if TYPE_CHECKING:  # imported where used, like the rest of the engine
    from services.engine.config import ModelConfig

GB = 1e9


def add_subparsers(subparsers) -> argparse.ArgumentParser:
    """Adds `plan` with its subcommands to a top-level CLI; each sets `func(args)` to run it."""
    plan = subparsers.add_parser(
        "plan",
        help="profile, simulate and plan a pdserve cluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_commands(plan.add_subparsers(dest="plan_command", required=True, metavar="{profile,simulate,search}"))
    return plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.planner", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _add_commands(parser.add_subparsers(dest="plan_command", required=True, metavar="{profile,simulate,search}"))
    args = parser.parse_args(argv)
    return run_command(args.func, args)


def _add_commands(sub) -> None:
    _add_profile(sub.add_parser("profile", help="measure or derive a latency profile"))
    _add_simulate(sub.add_parser("simulate", help="simulate a cluster on a workload trace"))
    _add_search(sub.add_parser("search", help="search parallelism and placement (DistServe Algorithms 1-2)"))


# ---- shared flags -------------------------------------------------------------------------------


def _add_hardware_flags(p) -> None:
    g = p.add_argument_group("hardware (analytic profiles)")
    g.add_argument("--gpu", default="A100-80G", help="A100-80G, H100-80G, H200 or L40S")
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument(
        "--intra-node-gbps", type=float, help="NVLink/PCIe GB/s per GPU, one direction (default: GPU preset)"
    )
    g.add_argument(
        "--inter-node-gbps",
        type=float,
        help="network GB/s per GPU between nodes (default: GPU preset; DistServe's testbed: 3.125)",
    )
    g.add_argument("--memory-utilization", type=float, default=0.9)
    g.add_argument("--activation-reserve-gib", type=float, default=4.0)
    g.add_argument("--prefill-mfu", type=float, default=0.5, help="achieved fraction of peak FLOP/s in prefill")
    g.add_argument("--bandwidth-efficiency", type=float, default=0.8, help="achieved fraction of HBM bandwidth")
    g.add_argument("--dtype-bytes", type=int, default=2)


def _cluster(args, num_nodes: int = 1, max_nodes_per_instance: int | None = None):
    from .hardware import ClusterSpec, GiB, get_gpu

    cluster = ClusterSpec(
        num_nodes,
        args.gpus_per_node,
        get_gpu(args.gpu),
        max_nodes_per_instance,
        args.memory_utilization,
        args.activation_reserve_gib * GiB,
    )
    return cluster.with_bandwidths(
        args.intra_node_gbps and args.intra_node_gbps * GB, args.inter_node_gbps and args.inter_node_gbps * GB
    )


def _assumptions(args):
    from .analytic import AnalyticAssumptions

    return AnalyticAssumptions(prefill_mfu=args.prefill_mfu, bandwidth_efficiency=args.bandwidth_efficiency)


def _add_overhead_flags(p) -> None:
    g = p.add_argument_group("serving overheads (seconds are given in milliseconds)")
    g.add_argument("--dispatch-ms", type=float, help="arrival at the router -> in a prefill queue")
    g.add_argument("--first-token-ms", type=float, help="prefill done -> first token at the client")
    g.add_argument("--handoff-ms", type=float, help="prefill done -> in a decode queue")
    g.add_argument("--prefill-batch-ms", type=float, help="added to every prefill batch")
    g.add_argument("--decode-step-ms", type=float, help="added to every decode step")
    g.add_argument("--transfer-ms", type=float, help="fixed part of a KV transfer")
    g.add_argument("--transfer-gbps", type=float, help="KV transfer bandwidth, GB/s (0: instantaneous)")


def _apply_overheads(profile, args) -> None:
    o = profile.overheads
    for flag, attr in (
        ("dispatch_ms", "dispatch_s"),
        ("first_token_ms", "first_token_s"),
        ("handoff_ms", "handoff_s"),
        ("prefill_batch_ms", "prefill_batch_s"),
        ("decode_step_ms", "decode_step_s"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            setattr(o, attr, value / 1000)
    if getattr(args, "transfer_ms", None) is not None:
        profile.transfer.fixed_s = args.transfer_ms / 1000
    if getattr(args, "transfer_gbps", None) is not None:
        profile.transfer.bytes_per_s = args.transfer_gbps * GB or None


def _positive_floats(flag: str, text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}: comma-separated numbers, got {text!r}") from None
    if not all(v > 0 for v in values):
        raise ValueError(f"{flag}: every value must be > 0, got {text!r}")
    return values


def _check_out_folder(path: str, create: bool = False) -> None:
    """Before the work, not after it: a long run must not end on a missing output folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if create:
        os.makedirs(folder, exist_ok=True)
    elif not os.path.isdir(folder):
        raise ValueError(f"output folder {folder} does not exist")


# ---- profile ------------------------------------------------------------------------------------


def _add_profile(p) -> None:
    p.description = (
        "Measure prefill and decode times of the engine on this machine and fit the latency model; "
        "or, with --analytic, derive them from a GPU's datasheet and a model's shape."
    )
    p.add_argument(
        "--model",
        default="llama-serve",
        help="checkpoint folder, a test model (llama, llama-serve, ...) or a preset shape: llama-2-7b, "
        "llama-2-13b, llama-2-70b, llama-3-8b, llama-3-70b (measured with random weights), and with "
        "--analytic also opt-13b (13b), opt-66b (66b), opt-175b (175b)",
    )
    p.add_argument("--out", default="profile.json")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--kv-cache-mib", type=int, default=256, help="KV pool of the profiled engine")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-batched-tokens", type=int, help="prefill token budget L_m (default: derived from the fit)")
    p.add_argument("--quick", action="store_true", help="a small grid (seconds on a tiny model)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-cuda-graphs", action="store_true", help="profile decode without CUDA graphs")
    p.add_argument("--analytic", action="store_true", help="derive from --gpu and the model's shape instead")
    p.add_argument(
        "--step-log",
        action="append",
        default=[],
        metavar="FILE",
        help="a serving worker's --step-log (repeatable): refit each phase the logs hold on the "
        "instance's own steps, as clients see them (streaming and admission included)",
    )
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (analytic)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree (analytic)")
    p.add_argument("--typical-prompt-len", type=int, default=512, help="prompt length used to choose L_m (analytic)")
    _add_hardware_flags(p)
    _add_overhead_flags(p)
    p.set_defaults(func=cmd_profile)


def _engine_source(name: str) -> tuple[str | None, ModelConfig | None]:
    """(checkpoint folder, None), or (None, ModelConfig) for a Llama-family preset shape that the
    engine builds with random weights (timing does not depend on the values)."""
    if os.path.isdir(name):
        return name, None
    from services.tiny_models import IN_MEMORY_ONLY, SPECS, get_model

    if name in SPECS and name not in IN_MEMORY_ONLY:
        return get_model(name), None
    from .hardware import MODELS

    shape = MODELS.get(name.lower())
    if shape is not None and shape.gated_mlp:
        import transformers

        from services.engine.config import ModelConfig

        hf = transformers.LlamaConfig(
            hidden_size=shape.hidden_size,
            intermediate_size=shape.intermediate_size,
            num_hidden_layers=shape.num_layers,
            num_attention_heads=shape.num_heads,
            num_key_value_heads=shape.num_kv_heads,
            vocab_size=shape.vocab_size,
            max_position_embeddings=shape.max_model_len,
            tie_word_embeddings=shape.tied_embeddings,
        )
        return None, ModelConfig.from_hf_config(hf)
    raise SystemExit(
        f"--model {name!r} is not a checkpoint folder, a test model ({', '.join(SPECS)}) or a "
        f"Llama-family preset ({', '.join(k for k, v in MODELS.items() if v.gated_mlp)})"
    )


def cmd_profile(args) -> int:
    if args.analytic:
        from .analytic import analytic_profile
        from .hardware import get_model_shape

        shape = get_model_shape(args.model, args.dtype_bytes)
        cluster = _cluster(args, num_nodes=max(1, ceil_div(args.tp * args.pp, args.gpus_per_node)))
        profile = analytic_profile(
            shape,
            cluster,
            args.tp,
            args.pp,
            assumptions=_assumptions(args),
            typical_prompt_len=args.typical_prompt_len,
            max_num_seqs=args.max_num_seqs,
        )
    else:
        import torch

        from services.engine.config import EngineConfig
        from services.engine.engine import Engine

        from .profile import ProfileGrid, profile_engine

        if args.threads:
            torch.set_num_threads(args.threads)
        _check_out_folder(args.out)
        model_dir, model_config = _engine_source(args.model)
        config = EngineConfig(
            dtype=args.dtype,
            device=args.device,
            kv_cache_bytes=args.kv_cache_mib << 20,
            max_num_seqs=args.max_num_seqs,
            enable_cuda_graphs=not args.no_cuda_graphs,
        )
        engine = Engine(model_dir, config, model_config=model_config)
        try:
            grid = ProfileGrid.quick() if args.quick else ProfileGrid()
            profile = profile_engine(engine, grid, model_name=args.model)
        finally:
            engine.close()
    if args.step_log:
        from .profile import refit_from_step_logs

        profile = refit_from_step_logs(profile, args.step_log)
    if args.max_batched_tokens:
        profile.max_batched_tokens = args.max_batched_tokens
    _apply_overheads(profile, args)
    profile.save(args.out)
    pf, dc = profile.prefill, profile.decode
    print(
        f"wrote {args.out}: prefill = {pf.a * 1e3:.3f} ms + {pf.b * 1e6:.3f} us * sum(len) + "
        f"{pf.c * 1e9:.4f} ns * sum(len^2); decode step = {dc.a * 1e3:.3f} ms + {dc.b * 1e9:.3f} ns * sum(ctx) + "
        f"{dc.c * 1e6:.3f} us * batch; L_m = {profile.max_batched_tokens}, KV = {profile.kv_capacity_tokens} tokens"
    )
    return 0


# ---- simulate -----------------------------------------------------------------------------------


def _add_workload_flags(p, default_rate: float | None) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--workload", default="chat", help="chat, code or summarization (synthetic)")
    g.add_argument("--num-requests", type=int, default=1000)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--scale", type=float, default=1.0, help="multiply every length (shrink for tiny models)")
    g.add_argument("--cv", type=float, help="burstiness: Gamma arrivals with this coefficient of variation")
    g.add_argument(
        "--rate",
        type=float,
        default=default_rate,
        help="requests/s" + ("" if default_rate else " to cover (default: the most the cluster serves)"),
    )


def _add_simulate(p) -> None:
    p.description = (
        "Simulate a disaggregated or colocated cluster on a trace and report per-request TTFT/TPOT and SLO attainment."
    )
    p.add_argument("--profile", help="profile JSON for every instance")
    p.add_argument("--prefill-profile", help="profile JSON of the prefill instances (default: --profile)")
    p.add_argument("--decode-profile", help="profile JSON of the decode instances (default: --profile)")
    p.add_argument("--mode", choices=("disaggregated", "colocated"), default="disaggregated")
    p.add_argument("--num-prefill", type=int, default=1)
    p.add_argument("--num-decode", type=int, default=1)
    p.add_argument("--num-colocated", type=int, default=1)
    p.add_argument("--trace", help="JSONL trace (arrival_s, prompt_tokens, output_tokens); else synthetic")
    p.add_argument("--rates", help="comma-separated rates: replay the trace compressed to each (a sweep)")
    p.add_argument("--slo-ttft", type=float, default=0.25, help="seconds")
    p.add_argument("--slo-tpot", type=float, default=0.1, help="seconds")
    p.add_argument("--max-batched-tokens", type=int, help="prefill token budget (default: profile)")
    p.add_argument("--prefill-max-batch-size", type=int, help="most prompts in one prefill batch")
    p.add_argument("--max-num-seqs", type=int, help="decode batch limit (default: profile)")
    p.add_argument("--prefill-kv-tokens", type=int, help="KV capacity of a prefill instance (default: profile)")
    p.add_argument("--decode-kv-tokens", type=int, help="KV capacity of a decode instance (default: profile)")
    p.add_argument("--kv-admission", choices=("on_demand", "reserve"), default="on_demand")
    p.add_argument("--dispatch", choices=("least_loaded", "round_robin"), default="least_loaded")
    p.add_argument(
        "--chunked-prefill",
        action="store_true",
        help="colocated instances run chunked prefill (the worker's --chunked-prefill; default: prefill first)",
    )
    p.add_argument("--out", default="simulation.json")
    p.add_argument("--no-requests", action="store_true", help="write summaries only, not per-request rows")
    _add_workload_flags(p, default_rate=1.0)
    _add_overhead_flags(p)
    p.set_defaults(func=cmd_simulate)


def cmd_simulate(args) -> int:
    from services.common.latency_profile import LatencyProfile
    from services.planner.workload import make_trace, read_trace, rescale_rate

    from .simulator import SimConfig, Slo, simulate

    def load(path):
        if not path:
            raise SystemExit("give --profile (or --prefill-profile and --decode-profile)")
        prof = LatencyProfile.load(path)
        _apply_overheads(prof, args)
        return prof

    counts = (
        {"--num-colocated": args.num_colocated}
        if args.mode == "colocated"
        else {"--num-prefill": args.num_prefill, "--num-decode": args.num_decode}
    )
    if any(n < 0 for n in counts.values()) or not any(counts.values()):
        raise ValueError(
            f"{' and '.join(counts)}: need at least one instance, and no negative counts "
            f"(0 prefill or 0 decode instances simulates the other phase alone), got "
            f"{', '.join(f'{k} {v}' for k, v in counts.items())}"
        )
    if args.chunked_prefill and args.mode != "colocated":
        raise ValueError("--chunked-prefill is for --mode colocated (prefill instances batch whole prompts)")
    rates = _positive_floats("--rates", args.rates) if args.rates else [None]
    _check_out_folder(args.out)
    if args.mode == "colocated":
        profiles = {"colocated_profile": load(args.profile or args.prefill_profile)}
    else:
        profiles = {
            "prefill_profile": load(args.prefill_profile or args.profile) if args.num_prefill else None,
            "decode_profile": load(args.decode_profile or args.profile) if args.num_decode else None,
        }
    front = next(p for p in profiles.values() if p is not None)
    config = SimConfig(
        mode=args.mode,
        num_prefill=args.num_prefill,
        num_decode=args.num_decode,
        num_colocated=args.num_colocated,
        prefill_token_budget=args.max_batched_tokens,
        prefill_max_batch_size=args.prefill_max_batch_size or 1 << 30,
        decode_max_num_seqs=args.max_num_seqs,
        prefill_kv_tokens=args.prefill_kv_tokens,
        decode_kv_tokens=args.decode_kv_tokens,
        kv_admission=args.kv_admission,
        dispatch_policy=args.dispatch,
        chunked_prefill=args.chunked_prefill,
        **profiles,
    )
    if args.trace:
        trace = read_trace(args.trace)
        base_rate = len(trace) / trace[-1].arrival_s if trace and trace[-1].arrival_s > 0 else 1.0
    else:
        base_rate = args.rate
        trace = make_trace(args.workload, args.rate, args.num_requests, args.seed, cv=args.cv, scale=args.scale)
    if not trace:
        raise ValueError(f"{args.trace or '--num-requests'}: no requests to simulate")
    slo = Slo(args.slo_ttft, args.slo_tpot)
    runs = []
    for rate in tqdm(rates, desc="simulating", unit="rate", disable=len(rates) == 1):
        replay = rescale_rate(trace, rate, from_rate=base_rate) if rate is not None else trace
        start = time.perf_counter()
        result = simulate(config, replay, slo)
        run = result.to_json()
        run.pop("schema")
        run["summary"]["simulated_seconds"] = time.perf_counter() - start
        run = {"rate": rate or base_rate, **run}
        if args.no_requests:
            run.pop("requests")
        runs.append(run)
        s = run["summary"]
        print(
            f"rate {run['rate']:.3f} req/s: attainment {s['attainment']:.3f} (TTFT {s['ttft_attainment']:.3f}, "
            f"TPOT {s['tpot_attainment']:.3f}), mean TTFT {s['ttft_s'].get('mean', float('nan')):.4f} s, "
            f"mean TPOT {s['tpot_s'].get('mean', float('nan')):.4f} s"
        )
    from .plan_output import finite

    out = {
        "schema": "pdserve.simulation/v1",
        "config": {
            "mode": args.mode,
            "num_prefill": args.num_prefill,
            "num_decode": args.num_decode,
            "num_colocated": args.num_colocated,
            "trace": args.trace or args.workload,
            "profile": front.model,
            "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot},
            "kv_admission": args.kv_admission,
            "dispatch": args.dispatch,
        },
        "runs": runs,
    }
    with open(args.out, "w") as f:
        json.dump(finite(out), f)
        f.write("\n")
    print(f"wrote {args.out}")
    return 0


# ---- search -------------------------------------------------------------------------------------


def _add_search(p) -> None:
    p.description = (
        "Search tensor/pipeline degrees and replica counts for the best goodput per GPU "
        "(DistServe Algorithm 1, or 2 with --affinity low), then write the plan."
    )
    p.add_argument("--model", default="13b", help="model preset or Hugging Face checkpoint folder")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--max-nodes-per-instance", type=int, help="N of Algorithms 1-2 (default: all nodes)")
    p.add_argument(
        "--affinity",
        choices=("high", "low"),
        default="high",
        help="high: fast network, Algorithm 1; low: slow network, Algorithm 2 (KV stays in a node)",
    )
    p.add_argument("--slo-ttft", type=float, default=0.25, help="seconds")
    p.add_argument("--slo-tpot", type=float, default=0.1, help="seconds")
    p.add_argument("--attainment", type=float, default=0.9)
    p.add_argument("--out-dir", default="plan")
    p.add_argument("--rel-tol", type=float, default=0.03, help="rate bisection width")
    p.add_argument("--min-duration", type=float, default=30.0, help="seconds of traffic per simulated probe")
    p.add_argument("--top-segments", type=int, default=3, help="Algorithm 2: units simulated end to end")
    p.add_argument("--no-colocated", action="store_true", help="skip the colocated (vLLM-like) baseline")
    p.add_argument("--workers", type=int, help="processes for the simulations (default: one per CPU)")
    _add_workload_flags(p, default_rate=None)
    _add_hardware_flags(p)
    p.set_defaults(func=cmd_search)


def cmd_search(args) -> int:
    if not 0 < args.attainment <= 1:
        raise ValueError(f"--attainment: a fraction in (0, 1], got {args.attainment}")
    if not args.rel_tol > 0:
        raise ValueError(f"--rel-tol: must be > 0, got {args.rel_tol}")
    for flag in ("nodes", "gpus_per_node"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')}: must be >= 1, got {getattr(args, flag)}")
    _check_out_folder(os.path.join(args.out_dir, "x"), create=True)
    from .hardware import get_model_shape
    from .plan_output import write_plan
    from .search import SearchSpec, search
    from .simulator import Slo

    spec = SearchSpec(
        model=get_model_shape(args.model, args.dtype_bytes),
        cluster=_cluster(args, args.nodes, args.max_nodes_per_instance),
        slo=Slo(args.slo_ttft, args.slo_tpot),
        attainment=args.attainment,
        workload=args.workload,
        num_requests=args.num_requests,
        seed=args.seed,
        scale=args.scale,
        cv=args.cv,
        rate=args.rate,
        affinity=args.affinity,
        assumptions=_assumptions(args),
        rel_tol=args.rel_tol,
        min_duration_s=args.min_duration,
        top_segments=args.top_segments,
        compare_colocated=not args.no_colocated,
        workers=args.workers,
    )
    plan = search(spec)
    paths = write_plan(plan, args.out_dir)
    p, d = plan.prefill, plan.decode
    print(
        f"{plan.algorithm}: {plan.num_prefill} x prefill (tp={p.tensor_parallel}, pp={p.pipeline_parallel}) + "
        f"{plan.num_decode} x decode (tp={d.tensor_parallel}, pp={d.pipeline_parallel}) on {plan.gpus_used} GPUs "
        f"for {plan.rate:.2f} req/s ({plan.rate / plan.gpus_used:.3f} req/s per GPU); simulated attainment "
        f"{plan.verification['attainment']:.3f}; searched in {plan.search_seconds:.1f} s"
    )
    if plan.colocated_baseline:
        c = plan.colocated_baseline
        policy = "chunked prefill" if c["chunked_prefill"] else "prefill first"
        print(f"colocated baseline: tp={c['tensor_parallel']}, {policy}, {c['goodput_per_gpu']:.3f} req/s per GPU")
    print("wrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
