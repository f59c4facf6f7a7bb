"""`plan search`: DistServe's placement search (Algorithms 1 and 2).

High node-affinity (Algorithm 1: the network between nodes is fast enough to carry the KV):
prefill and decode are planned independently. For every (tensor, pipeline) degree that fits the
GPU, node and memory limits, simulate one instance of each phase on the workload, binary-search
the highest rate that meets that phase's SLO at the attainment target, keep the configuration
with the best goodput per GPU, and replicate each to cover the target rate.

Low node-affinity (Algorithm 2: slow links between nodes): KV must stay inside a node. Prefill and
decode instances share the pipeline degree pp, and stage s of both sits on one node, so each KV
transfer is a per-stage copy over NVLink. A "unit" spans pp nodes; each of its nodes holds one
stage of n_p prefill instances (tp_p GPUs each) and n_d decode instances (tp_d each). Units are
ranked by the estimate min(n_p * g_p, n_d * g_d) from the phase goodputs, the best few are
simulated end to end (both phases, transfers, joint SLO), and the best is replicated.

Both end by simulating the whole planned cluster at the target rate; if the joint attainment
misses the target (each phase meeting its own SLO 90% of the time does not make 90% of requests
meet both), replicas are added to the weaker phase while GPUs remain.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field, replace
from typing import Any, TypedDict

from tqdm import tqdm

from services.common.arith import ceil_div
from services.common.latency_profile import LatencyProfile, TransferSpec
from services.planner.workload import make_trace, rescale_rate

from .analytic import AnalyticAssumptions, Parallelism, analytic_profile, kv_capacity_tokens
from .goodput import (
    bisect_rate,
    decode_capacity,
    decode_goodput,
    max_rate_meeting,
    prefill_capacity,
    prefill_goodput,
    trace_attainment,
)
from .hardware import ClusterSpec, ModelShape
from .simulator import SimConfig, Slo, simulate

PLAN_SCHEMA = "pdserve.plan/v1"
log = logging.getLogger(__name__)


def concurrent_sequences(profile: LatencyProfile, mean_context: float) -> float:
    """Requests a decode (or colocated) instance runs at once: its batch limit (per pipeline stage)
    or its KV memory at the workload's mean context, whichever binds."""
    slots = profile.max_num_seqs * profile.pipeline_parallel
    return min(slots, profile.kv_capacity_tokens / max(mean_context, 1.0))


@dataclass(frozen=True)
class SearchSpec:
    model: ModelShape
    cluster: ClusterSpec
    slo: Slo
    attainment: float = 0.9
    workload: str = "chat"
    num_requests: int = 1000  # requests per simulated probe
    seed: int = 0
    scale: float = 1.0
    cv: float | None = None  # None: Poisson arrivals
    rate: float | None = None  # traffic to cover; None: the most the cluster can serve
    affinity: str = "high"  # "high" (Algorithm 1) | "low" (Algorithm 2)
    assumptions: AnalyticAssumptions = field(default_factory=AnalyticAssumptions)
    rel_tol: float = 0.03  # rate bisection stops at this relative width
    min_duration_s: float = 30.0  # each probe replays at least this much traffic (see trace_at)
    max_requests: int = 30000  # ... but at most this many requests
    top_segments: int = 3  # Algorithm 2: unit candidates simulated end to end
    compare_colocated: bool = True  # also find the best colocated (vLLM-like) per-GPU goodput
    transfer_fixed_s: float = 1e-3  # per-transfer latency (connection, handshake)
    kv_admission: str = "on_demand"
    workers: int | None = None  # processes for the simulations; None: one per CPU, 1: in this process


@dataclass
class PhaseChoice:
    tensor_parallel: int
    pipeline_parallel: int
    goodput: float  # req/s one instance sustains within its SLO
    max_batched_tokens: int
    kv_capacity_tokens: int

    @property
    def num_gpus(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def goodput_per_gpu(self) -> float:
        return self.goodput / self.num_gpus

    def to_json(self) -> dict:
        return {**asdict(self), "gpus_per_instance": self.num_gpus, "goodput_per_gpu": self.goodput_per_gpu}


@dataclass
class Plan:
    algorithm: str
    model: str
    gpu: str
    cluster: dict
    slo: dict
    workload: dict
    rate: float
    prefill: PhaseChoice
    decode: PhaseChoice
    num_prefill: int
    num_decode: int
    instances: list  # [{"role", "index", "stages": [{"stage", "node", "gpus"}]}]
    segments: list = field(default_factory=list)  # Algorithm 2: [{"unit", "stage", "node", "prefill", "decode"}]
    unit: dict | None = None  # Algorithm 2: the replicated node segment
    verification: dict = field(default_factory=dict)
    candidates: list = field(default_factory=list)
    colocated_baseline: dict | None = None
    search_seconds: float = 0.0
    # role -> the profile its instances were simulated with (the decode one carrying the plan's KV
    # transfer model): what `pdserve up --plan` gives emulated workers. Written beside plan.json.
    profiles: dict[str, LatencyProfile] = field(default_factory=dict)

    @property
    def gpus_used(self) -> int:
        return self.num_prefill * self.prefill.num_gpus + self.num_decode * self.decode.num_gpus

    def to_json(self) -> dict:
        return {
            "schema": PLAN_SCHEMA,
            "algorithm": self.algorithm,
            "model": self.model,
            "gpu": self.gpu,
            "cluster": self.cluster,
            "slo": self.slo,
            "workload": self.workload,
            "rate": self.rate,
            "gpus_used": self.gpus_used,
            "goodput_per_gpu": self.rate / self.gpus_used if self.gpus_used else 0.0,
            "prefill": {**self.prefill.to_json(), "replicas": self.num_prefill},
            "decode": {**self.decode.to_json(), "replicas": self.num_decode},
            "unit": self.unit,
            "instances": self.instances,
            "segments": self.segments,
            "verification": self.verification,
            "colocated_baseline": self.colocated_baseline,
            "candidates": self.candidates,
            "search_seconds": self.search_seconds,
        }


# ---- constraints --------------------------------------------------------------------------------


def parallel_config_problems(
    model: ModelShape, cluster: ClusterSpec, tp: int, pp: int, stages_on_separate_nodes: bool = False
) -> list[str]:
    """Why (tp, pp) cannot run this model on this cluster; empty when it can."""
    m = cluster.gpus_per_node
    problems = []
    if tp > m or m % tp:
        problems.append(f"tensor degree {tp} must divide the {m} GPUs of a node (TP stays inside a node)")
    if model.num_heads % tp:
        problems.append(f"{model.num_heads} attention heads are not divisible by tensor degree {tp}")
    if model.num_kv_heads % tp and tp % model.num_kv_heads:
        problems.append(f"{model.num_kv_heads} KV heads neither divide nor are divisible by tensor degree {tp}")
    if model.intermediate_size % tp:
        problems.append(f"MLP width {model.intermediate_size} is not divisible by tensor degree {tp}")
    if model.num_layers % pp:
        problems.append(f"{model.num_layers} layers are not divisible by pipeline degree {pp}")
    if tp <= m:
        nodes = pp if stages_on_separate_nodes else ceil_div(pp, m // tp)
        if nodes > cluster.node_limit:
            problems.append(f"{pp} stages of {tp} GPUs span {nodes} nodes; the limit is {cluster.node_limit}")
    kv = kv_capacity_tokens(model, cluster, tp, pp)
    if kv <= 0:
        problems.append(f"the weights ({model.weight_bytes / 2**30:.1f} GiB) do not fit {tp * pp} GPUs")
    elif kv < model.max_model_len:
        problems.append(f"the KV cache holds {kv} tokens, less than one {model.max_model_len}-token sequence")
    return problems


def candidate_degrees(
    model: ModelShape, cluster: ClusterSpec, stages_on_separate_nodes: bool = False
) -> list[tuple[int, int]]:
    tps = [tp for tp in range(1, cluster.gpus_per_node + 1) if cluster.gpus_per_node % tp == 0]
    max_pp = cluster.node_limit * cluster.gpus_per_node
    return [
        (tp, pp)
        for tp in tps
        for pp in range(1, max_pp + 1)
        if not parallel_config_problems(model, cluster, tp, pp, stages_on_separate_nodes)
    ]


# ---- the search ---------------------------------------------------------------------------------


class SimOptions(TypedDict):
    """SimConfig fields that every simulation of a search shares."""

    kv_admission: str


class PlacementSearch:
    def __init__(self, spec: SearchSpec, progress: bool = True):
        self.spec = spec
        self.progress = progress
        self.trace = self.base_trace(spec.num_requests)
        mean = lambda xs: sum(xs) / len(xs)
        self.mean_prompt = mean([r.prompt_tokens for r in self.trace])
        self.mean_context = mean([r.prompt_tokens + r.output_tokens / 2 for r in self.trace])
        self._base = self.trace
        self._profiles: dict = {}
        self._goodputs: dict = {}
        self.sim_options: SimOptions = {"kv_admission": spec.kv_admission}
        self._pool: ProcessPoolExecutor | None = None

    # ---- traces ----------------------------------------------------------------------------------
    def base_trace(self, n: int, rate: float = 1.0, seed_offset: int = 0):
        s = self.spec
        return make_trace(
            s.workload, rate, n, s.seed + seed_offset, cv=s.cv, scale=s.scale, max_model_len=s.model.max_model_len
        )

    def _probe_length(self, rate: float, concurrency: float) -> int:
        s = self.spec
        n = max(s.num_requests, int(rate * s.min_duration_s), int(3 * concurrency))
        return min(n, max(s.max_requests, s.num_requests))

    def trace_at(self, rate: float, concurrency: float = 0.0):
        """The probe trace at `rate`: prefixes of one unit-rate trace, compressed to `rate`.

        A short trace hides overload: a queue that grows by 3% of the rate needs many requests
        before it breaks the SLO, and an instance that can hold a whole trace at once never
        queues at all. So each probe replays at least `min_duration_s` of traffic and three times
        the requests the instance can run concurrently."""
        n = self._probe_length(rate, concurrency)
        if len(self._base) < n:
            self._base = self.base_trace(max(n, 2 * len(self._base)))
        return rescale_rate(self._base[:n], rate, from_rate=1.0)

    def verification_trace(self, rate: float, concurrency: float):
        """A fresh trace (another seed) for checking the whole plan, as long as the probes'."""
        return self.base_trace(self._probe_length(rate, concurrency), rate, seed_offset=1)

    def trace_source(self, concurrency: float = 0.0):
        return lambda rate: self.trace_at(rate, concurrency)

    def concurrency(self, profile: LatencyProfile) -> float:
        return concurrent_sequences(profile, self.mean_context)

    # ---- profiles and goodputs (the tasks, also run in worker processes) -------------------------
    def profile(self, tp: int, pp: int, hops: int | None = None) -> LatencyProfile:
        c = self.spec.cluster
        par = Parallelism.packed(tp, pp, c.gpus_per_node) if hops is None else Parallelism(tp, pp, hops)
        key = (tp, pp, par.inter_node_hops)
        if key not in self._profiles:
            self._profiles[key] = analytic_profile(
                self.spec.model,
                c,
                tp,
                pp,
                par=par,
                assumptions=self.spec.assumptions,
                typical_prompt_len=max(int(self.mean_prompt), 64),
            )
        return self._profiles[key]

    def phase_goodput(self, phase: str, tp: int, pp: int, hops: int | None = None) -> float:
        """Goodput of one instance of a phase alone (DistServe's simu_prefill / simu_decode)."""
        profile = self.profile(tp, pp, hops)
        s = self.spec
        if phase == "prefill":
            return prefill_goodput(profile, self.trace_source(), s.slo, s.attainment, s.rel_tol, **self.sim_options)
        return decode_goodput(
            profile, self.trace_source(self.concurrency(profile)), s.slo, s.attainment, s.rel_tol, **self.sim_options
        )

    def unit_goodput(self, pp: int, tp_p: int, n_p: int, tp_d: int, n_d: int, guess: float) -> float:
        """Goodput of one Algorithm-2 unit end to end (both phases, transfers, the joint SLO)."""
        s = self.spec
        cfg = self._unit_config(pp, tp_p, tp_d, n_p, n_d)
        assert cfg.decode_profile is not None  # _unit_config always sets it
        fn = trace_attainment(cfg, self.trace_source(n_d * self.concurrency(cfg.decode_profile)), s.slo, s.attainment)
        return max_rate_meeting(fn, s.attainment, guess=guess, rel_tol=s.rel_tol)

    def colocated_goodput(self, tp: int, chunked_prefill: bool) -> float:
        return self.colocated_goodput_of(self.profile(tp, 1), chunked_prefill)

    def colocated_goodput_of(self, prof: LatencyProfile, chunked_prefill: bool) -> float:
        """Goodput of one colocated instance at `prof` on the search's workload and SLOs."""
        s = self.spec
        cfg = SimConfig(
            mode="colocated",
            colocated_profile=prof,
            num_colocated=1,
            chunked_prefill=chunked_prefill,
            **self.sim_options,
        )
        fn = trace_attainment(cfg, self.trace_source(self.concurrency(prof)), s.slo, s.attainment)
        guess = min(prefill_capacity(prof, self.trace), decode_capacity(prof, self.trace))
        return max_rate_meeting(fn, s.attainment, guess=guess, rel_tol=s.rel_tol)

    def _map(self, method: str, tasks: list[tuple], desc: str, unit: str = "sim") -> list:
        """Runs self.<method>(*task) for every task, in worker processes when there are several
        CPUs; results in task order, a progress bar as they complete."""
        results = [None] * len(tasks)
        with tqdm(total=len(tasks), desc=desc, unit=unit, disable=not self.progress) as bar:
            pool = self._worker_pool(len(tasks))
            if pool is None:
                for i, task in enumerate(tasks):
                    bar.set_postfix_str(_task_label(method, task))
                    results[i] = getattr(self, method)(*task)
                    bar.update()
            else:
                futures = {pool.submit(_run_task, method, task): i for i, task in enumerate(tasks)}
                try:
                    for future in as_completed(futures):
                        i = futures[future]
                        results[i] = future.result()
                        bar.set_postfix_str(_task_label(method, tasks[i]))
                        bar.update()
                except BrokenProcessPool:
                    # Workers could not start (e.g. a main module read from stdin cannot be
                    # re-imported by spawn): finish here instead.
                    log.warning("search worker processes failed; continuing in this process")
                    self.close()
                    self.spec = replace(self.spec, workers=1)
                    for i, task in enumerate(tasks):
                        if results[i] is None:
                            results[i] = getattr(self, method)(*task)
                            bar.update()
        return results

    def _worker_pool(self, num_tasks: int):
        workers = self.spec.workers or len(os.sched_getaffinity(0))
        if workers <= 1 or num_tasks <= 1:
            return None
        if self._pool is None:
            # spawn: a fresh interpreter per worker (forking a process that has touched torch or
            # threads is unsafe); each builds its own PlacementSearch from the spec.
            self._pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(self.spec,),
            )
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def phase_goodputs(self, degrees: list[tuple[int, int]], hops_of) -> dict:
        """{(phase, tp, pp): goodput} for every degree and phase."""
        tasks = [(phase, tp, pp, hops_of(tp, pp)) for tp, pp in degrees for phase in ("prefill", "decode")]
        todo = [t for t in tasks if t not in self._goodputs]
        # Big decode instances take longest: start them first so the workers finish together.
        todo.sort(key=lambda t: -(t[0] == "decode") * t[1] * t[2])
        for task, g in zip(todo, self._map("phase_goodput", todo, "search: phase goodputs")):
            self._goodputs[task] = g
        return {(phase, tp, pp): self._goodputs[(phase, tp, pp, h)] for phase, tp, pp, h in tasks}

    def _choice(self, profile: LatencyProfile, goodput: float) -> PhaseChoice:
        return PhaseChoice(
            profile.tensor_parallel,
            profile.pipeline_parallel,
            goodput,
            profile.max_batched_tokens,
            profile.kv_capacity_tokens,
        )

    def high_affinity_transfer(self, p: PhaseChoice, d: PhaseChoice) -> TransferSpec:
        # Each GPU of the prefill instance sends its shard over its own NIC.
        bw = self.spec.cluster.gpu.inter_node_bytes_per_s * min(p.num_gpus, d.num_gpus)
        return TransferSpec(self.spec.transfer_fixed_s, bw)

    def low_affinity_transfer(self, p: PhaseChoice, d: PhaseChoice) -> TransferSpec:
        # Stage s copies only its own layers' KV, over NVLink, all stages at once.
        bw = (
            self.spec.cluster.gpu.intra_node_bytes_per_s
            * min(p.tensor_parallel, d.tensor_parallel)
            * p.pipeline_parallel
        )
        return TransferSpec(self.spec.transfer_fixed_s, bw)

    # ---- Algorithm 1 ---------------------------------------------------------------------------
    def high_affinity(self) -> Plan:
        start = time.perf_counter()
        s = self.spec
        degrees = candidate_degrees(s.model, s.cluster)
        if not degrees:
            raise ValueError("no (tensor, pipeline) degree fits this model on this cluster")
        goodputs = self.phase_goodputs(degrees, lambda tp, pp: None)
        candidates = [
            {
                "phase": ph,
                "tensor_parallel": tp,
                "pipeline_parallel": pp,
                "goodput": g,
                "goodput_per_gpu": g / (tp * pp),
            }
            for (ph, tp, pp), g in goodputs.items()
        ]
        p, d = self._choose_phases(candidates)
        total = s.cluster.total_gpus
        rate = s.rate if s.rate is not None else _max_rate_two_pools(p, d, total)
        if rate <= 0:
            raise ValueError(
                f"the cluster's {total} GPUs cannot hold one prefill instance ({p.num_gpus} GPUs) and "
                f"one decode instance ({d.num_gpus} GPUs)"
            )
        n_p, n_d = math.ceil(rate / p.goodput), math.ceil(rate / d.goodput)
        if n_p * p.num_gpus + n_d * d.num_gpus > total:
            raise ValueError(
                f"covering {rate:.2f} req/s needs {n_p} prefill x {p.num_gpus} + {n_d} decode x "
                f"{d.num_gpus} GPUs, more than the cluster's {total}; the cluster can serve about "
                f"{_max_rate_two_pools(p, d, total):.2f} req/s"
            )
        sim_cfg = lambda n_p, n_d: SimConfig(
            prefill_profile=self.profile(p.tensor_parallel, p.pipeline_parallel),
            decode_profile=self.profile(d.tensor_parallel, d.pipeline_parallel),
            num_prefill=n_p,
            num_decode=n_d,
            transfer=self.high_affinity_transfer(p, d),
            **self.sim_options,
        )

        def grow(n_p, n_d, weaker):
            n_p, n_d = (n_p + 1, n_d) if weaker == "prefill" else (n_p, n_d + 1)
            return (n_p, n_d) if n_p * p.num_gpus + n_d * d.num_gpus <= total else None

        decode_profile = sim_cfg(1, 1).decode_profile
        assert decode_profile is not None  # sim_cfg always sets it
        concurrency = (n_d + 2) * self.concurrency(decode_profile)
        n_p, n_d, rate, verification = self._verify(sim_cfg, rate, n_p, n_d, concurrency, grow)
        instances = place_packed(s.cluster, [("prefill", p)] * n_p + [("decode", d)] * n_d)
        plan = self._plan("high-affinity (Algorithm 1)", rate, p, d, n_p, n_d, instances, verification, candidates)
        plan.profiles = {
            "prefill": self.profile(p.tensor_parallel, p.pipeline_parallel),
            "decode": replace(
                self.profile(d.tensor_parallel, d.pipeline_parallel), transfer=self.high_affinity_transfer(p, d)
            ),
        }
        plan.search_seconds = time.perf_counter() - start
        return plan

    def _choose_phases(self, candidates: list[dict]) -> tuple[PhaseChoice, PhaseChoice]:
        """Algorithm 1 keeps the best goodput per GPU for each phase. With a target rate, whole
        instances are what gets bought, so the configuration needing the fewest GPUs for that
        rate wins (a 20-GPU instance with the best per-GPU goodput wastes most of itself at a
        rate a 2-GPU one covers); without one, the pair that lets the cluster serve the most."""
        rows = {
            ph: [c for c in candidates if c["phase"] == ph and 0 < c["goodput"] < math.inf]
            for ph in ("prefill", "decode")
        }
        for ph, r in rows.items():
            if not r:
                raise ValueError(f"no {ph} configuration meets the SLO even at a low rate")
        choice = lambda c: self._choice(self.profile(c["tensor_parallel"], c["pipeline_parallel"]), c["goodput"])
        gpus = lambda c: c["tensor_parallel"] * c["pipeline_parallel"]
        rate = self.spec.rate
        if rate is not None:
            pick = {
                ph: min(r, key=lambda c: (math.ceil(rate / c["goodput"]) * gpus(c), -c["goodput_per_gpu"]))
                for ph, r in rows.items()
            }
            return choice(pick["prefill"]), choice(pick["decode"])
        total = self.spec.cluster.total_gpus
        best, best_key = None, None
        for cp in rows["prefill"]:
            for cd in rows["decode"]:
                p, d = choice(cp), choice(cd)
                served = _max_rate_two_pools(p, d, total)
                key = (round(served, 6), -(p.num_gpus + d.num_gpus))
                if best_key is None or key > best_key:
                    best, best_key = (p, d), key
        assert best is not None  # both rows are non-empty (checked above)
        return best

    def _verify(self, make_config, rate: float, n_p: int, n_d: int, concurrency: float, grow=None):
        """Simulates the whole planned cluster at `rate`. Below the attainment target, with a
        target rate: asks `grow(n_p, n_d, weaker_phase)` for more replicas while it has GPUs;
        without one (the cluster is already full): lowers the rate to what the cluster serves."""
        s = self.spec
        trace_at = lambda r: self.verification_trace(r, concurrency)
        run = lambda r, stop=None: simulate(make_config(n_p, n_d), trace_at(r), s.slo, stop_below=stop)
        passes = lambda result: result.attainment >= s.attainment and not result.overloaded
        added = []
        with tqdm(desc="search: verify plan", unit="sim", disable=not self.progress) as bar:
            while True:
                result = run(rate)
                summary = result.summary()
                bar.update()
                bar.set_postfix_str(f"{n_p}P+{n_d}D at {rate:.3g} req/s: attainment={summary['attainment']:.3f}")
                if passes(result):
                    break
                if s.rate is None:
                    hi, lo = rate, rate * 0.9
                    while lo > 1e-6 and not passes(run(lo, s.attainment)):
                        hi, lo = lo, lo * 0.8
                        bar.update()
                    rate = bisect_rate(lambda r: float(passes(run(r, s.attainment))), 1.0, lo, hi, s.rel_tol)
                    result = run(rate)
                    summary = result.summary()
                    break
                weaker = "prefill" if summary["ttft_attainment"] < summary["tpot_attainment"] else "decode"
                grown = grow(n_p, n_d, weaker) if grow else None
                if grown is None:
                    break
                n_p, n_d = grown
                added.append(weaker)
        keep = (
            "attainment",
            "ttft_attainment",
            "tpot_attainment",
            "ttft_s",
            "tpot_s",
            "num_requests",
            "preemptions",
            "overloaded",
            "backlog_at_last_arrival",
        )
        verification = {
            "rate": rate,
            "meets_target": passes(result),
            "replicas_added": added,
            **{k: summary[k] for k in keep},
        }
        return n_p, n_d, rate, verification

    # ---- Algorithm 2 ---------------------------------------------------------------------------
    def low_affinity(self) -> Plan:
        start = time.perf_counter()
        s = self.spec
        m = s.cluster.gpus_per_node
        degrees = candidate_degrees(s.model, s.cluster, stages_on_separate_nodes=True)
        if not degrees:
            raise ValueError("no (tensor, pipeline) degree fits this model on this cluster")
        # Every stage boundary crosses nodes: stage s of every instance of a unit is on node s.
        phase_rows = self.phase_goodputs(degrees, lambda tp, pp: pp - 1)
        candidates = [
            {
                "phase": ph,
                "tensor_parallel": tp,
                "pipeline_parallel": pp,
                "goodput": g,
                "goodput_per_gpu": g / (tp * pp),
            }
            for (ph, tp, pp), g in phase_rows.items()
        ]
        # Node segments: stage s of n_p prefill and n_d decode instances on one node.
        segments = []
        for tp_p, pp in degrees:
            for tp_d, pp_d in degrees:
                if pp_d != pp:
                    continue
                g_p, g_d = phase_rows[("prefill", tp_p, pp)], phase_rows[("decode", tp_d, pp)]
                if g_p <= 0 or g_d <= 0:
                    continue
                for n_p in range(1, m // tp_p + 1):
                    for n_d in range(1, (m - n_p * tp_p) // tp_d + 1):
                        # Rank by goodput per GPU of the nodes the unit occupies: GPUs a unit leaves
                        # idle on its nodes are lost unless another copy of it fits beside it.
                        estimate = min(n_p * g_p, n_d * g_d)
                        per_node_gpu = estimate * (m // (n_p * tp_p + n_d * tp_d)) / (pp * m)
                        segments.append((per_node_gpu, estimate, pp, tp_p, n_p, tp_d, n_d))
        if not segments:
            raise ValueError("no node segment meets the SLOs")
        segments.sort(reverse=True)
        top, seen = [], set()
        for seg in segments:  # the best few, one per shape (scaled copies of a unit estimate the same)
            _, _, pp, tp_p, n_p, tp_d, n_d = seg
            shape = (pp, tp_p, tp_d, n_p / math.gcd(n_p, n_d), n_d / math.gcd(n_p, n_d))
            if shape not in seen:
                seen.add(shape)
                top.append(seg)
            if len(top) == s.top_segments:
                break
        tasks = [(pp, tp_p, n_p, tp_d, n_d, estimate) for _, estimate, pp, tp_p, n_p, tp_d, n_d in top]
        verified = []
        for (pp, tp_p, n_p, tp_d, n_d, estimate), g in zip(
            tasks, self._map("unit_goodput", tasks, "search: units end to end", "unit")
        ):
            gpus = pp * (n_p * tp_p + n_d * tp_d)
            verified.append(
                {
                    "pipeline_parallel": pp,
                    "prefill_tensor_parallel": tp_p,
                    "prefill_per_node": n_p,
                    "decode_tensor_parallel": tp_d,
                    "decode_per_node": n_d,
                    "gpus": gpus,
                    "estimated_goodput": estimate,
                    "goodput": g,
                    "goodput_per_gpu": g / gpus,
                }
            )
        for u in verified:
            per_node = (
                u["prefill_per_node"] * u["prefill_tensor_parallel"]
                + u["decode_per_node"] * u["decode_tensor_parallel"]
            )
            u["units_per_node_group"] = m // per_node
            u["max_units"] = (s.cluster.num_nodes // u["pipeline_parallel"]) * u["units_per_node_group"]
            if s.rate is not None and u["goodput"] > 0:
                units = math.ceil(s.rate / u["goodput"])
                u["nodes_needed"] = math.ceil(units / u["units_per_node_group"]) * u["pipeline_parallel"]
        usable = [u for u in verified if u["goodput"] > 0 and u["max_units"] > 0]
        if not usable:
            raise ValueError("no unit meets the SLOs end to end")
        if s.rate is None:  # the unit that lets the whole cluster serve the most
            unit = max(usable, key=lambda u: (u["max_units"] * u["goodput"], u["goodput_per_gpu"]))
        else:  # the unit that covers the rate on the fewest nodes, then GPUs
            unit = min(usable, key=lambda u: (u["nodes_needed"], math.ceil(s.rate / u["goodput"]) * u["gpus"]))
        pp, tp_p, n_p, tp_d, n_d = (
            unit[k]
            for k in (
                "pipeline_parallel",
                "prefill_tensor_parallel",
                "prefill_per_node",
                "decode_tensor_parallel",
                "decode_per_node",
            )
        )
        max_units = unit["max_units"]
        rate = s.rate if s.rate is not None else max_units * unit["goodput"]
        num_units = math.ceil(rate / unit["goodput"])
        if num_units > max_units:
            raise ValueError(
                f"covering {rate:.2f} req/s needs {num_units} units of {unit['gpus']} GPUs; the cluster "
                f"holds {max_units} (about {max_units * unit['goodput']:.2f} req/s)"
            )
        p = self._choice(self.profile(tp_p, pp, pp - 1), phase_rows[("prefill", tp_p, pp)])
        d = self._choice(self.profile(tp_d, pp, pp - 1), phase_rows[("decode", tp_d, pp)])

        def make_config(units, _):
            return self._unit_config(pp, tp_p, tp_d, n_p * units, n_d * units, groups=units)

        def grow(units, _, weaker):  # whole units only: prefill and decode stages come in pairs
            return (units + 1, units + 1) if units + 1 <= max_units else None

        concurrency = num_units * n_d * self.concurrency(make_config(1, 1).decode_profile)
        num_units, _, rate, verification = self._verify(make_config, rate, num_units, num_units, concurrency, grow)
        instances, seg_rows = place_units(s.cluster, num_units, pp, tp_p, n_p, tp_d, n_d)
        plan = self._plan(
            "low-affinity (Algorithm 2)",
            rate,
            p,
            d,
            n_p * num_units,
            n_d * num_units,
            instances,
            verification,
            candidates,
        )
        plan.unit = {**unit, "units": num_units, "all_verified": verified}
        plan.profiles = {
            "prefill": self.profile(tp_p, pp, pp - 1),
            "decode": replace(self.profile(tp_d, pp, pp - 1), transfer=self.low_affinity_transfer(p, d)),
        }
        plan.segments = seg_rows
        plan.search_seconds = time.perf_counter() - start
        return plan

    def _unit_config(self, pp, tp_p, tp_d, n_p, n_d, groups: int = 1) -> SimConfig:
        p_prof, d_prof = self.profile(tp_p, pp, pp - 1), self.profile(tp_d, pp, pp - 1)
        transfer = self.low_affinity_transfer(self._choice(p_prof, 0), self._choice(d_prof, 0))
        return SimConfig(
            prefill_profile=p_prof,
            decode_profile=d_prof,
            num_prefill=n_p,
            num_decode=n_d,
            transfer=transfer,
            num_groups=groups,
            **self.sim_options,
        )

    # ---- colocated baseline --------------------------------------------------------------------
    def colocated_baseline(self) -> dict | None:
        """The best per-GPU goodput of colocated instances (vLLM-like, tensor parallel only), prefill
        first or with chunked prefill, on the same workload and SLOs: what disaggregation is
        compared against. Every configuration tried is under `candidates`."""
        s = self.spec
        tasks = [
            (tp, chunked)
            for tp in sorted({tp for tp, pp in candidate_degrees(s.model, s.cluster) if pp == 1})
            for chunked in (False, True)
            # chunked prefill needs a step budget for every running sequence's next token
            if not chunked or self.profile(tp, 1).max_batched_tokens >= self.profile(tp, 1).max_num_seqs
        ]
        goodputs = self._map("colocated_goodput", tasks, "search: colocated baseline")
        rows = [
            {"tensor_parallel": tp, "chunked_prefill": chunked, "goodput": g, "goodput_per_gpu": g / tp}
            for (tp, chunked), g in zip(tasks, goodputs)
        ]
        if not rows:
            return None
        return {**max(rows, key=lambda r: r["goodput_per_gpu"]), "candidates": rows}

    def _plan(self, algorithm, rate, p, d, n_p, n_d, instances, verification, candidates) -> Plan:
        s = self.spec
        c = s.cluster
        return Plan(
            algorithm=algorithm,
            model=s.model.name,
            gpu=c.gpu.name,
            cluster={
                "num_nodes": c.num_nodes,
                "gpus_per_node": c.gpus_per_node,
                "max_nodes_per_instance": c.node_limit,
                "intra_node_bytes_per_s": c.gpu.intra_node_bytes_per_s,
                "inter_node_bytes_per_s": c.gpu.inter_node_bytes_per_s,
            },
            slo={"ttft_s": s.slo.ttft_s, "tpot_s": s.slo.tpot_s, "attainment": s.attainment},
            workload={"name": s.workload, "num_requests": s.num_requests, "seed": s.seed, "scale": s.scale, "cv": s.cv},
            rate=rate,
            prefill=p,
            decode=d,
            num_prefill=n_p,
            num_decode=n_d,
            instances=instances,
            verification=verification,
            candidates=candidates,
        )

    def run(self) -> Plan:
        if self.spec.affinity not in ("high", "low"):
            raise ValueError(f"affinity must be high or low, got {self.spec.affinity!r}")
        try:
            plan = self.high_affinity() if self.spec.affinity == "high" else self.low_affinity()
            if self.spec.compare_colocated:
                start = time.perf_counter()
                plan.colocated_baseline = self.colocated_baseline()
                if plan.colocated_baseline:
                    plan.profiles["colocated"] = self.profile(plan.colocated_baseline["tensor_parallel"], 1)
                plan.search_seconds += time.perf_counter() - start
        finally:
            self.close()
        return plan


# Worker processes hold one PlacementSearch each (built from the spec) and run its task methods.
_WORKER: PlacementSearch | None = None


def _init_worker(spec: SearchSpec) -> None:
    global _WORKER
    _WORKER = PlacementSearch(spec, progress=False)


def _run_task(method: str, task: tuple):
    return getattr(_WORKER, method)(*task)


def _task_label(method: str, task: tuple) -> str:
    if method == "phase_goodput":
        return f"{task[0]} tp={task[1]} pp={task[2]}"
    if method == "unit_goodput":
        pp, tp_p, n_p, tp_d, n_d, _ = task
        return f"pp={pp}: {n_p}x tp{tp_p} P + {n_d}x tp{tp_d} D per node"
    return f"tp={task[0]}" + (" chunked" if task[1:] and task[1] else "")


def search(spec: SearchSpec, progress: bool = True) -> Plan:
    return PlacementSearch(spec, progress).run()


def _max_rate_two_pools(p: PhaseChoice, d: PhaseChoice, total_gpus: int) -> float:
    """The highest rate n prefill + m decode instances cover within `total_gpus`."""
    best = 0.0
    for n_p in range(1, total_gpus // p.num_gpus + 1):
        n_d = (total_gpus - n_p * p.num_gpus) // d.num_gpus
        if n_d >= 1:
            best = max(best, min(n_p * p.goodput, n_d * d.goodput))
    return best


# ---- placement ----------------------------------------------------------------------------------


def place_packed(cluster: ClusterSpec, instances: list[tuple[str, PhaseChoice]]) -> list[dict]:
    """Algorithm 1's placement: each instance's stages on consecutive GPUs, a stage's tensor-parallel
    group always inside one node. Larger groups first, so power-of-two groups never fragment."""
    free = [list(range(cluster.gpus_per_node)) for _ in range(cluster.num_nodes)]
    counters: dict[str, int] = {}
    rows = []
    for role, choice in instances:
        counters[role] = counters.get(role, 0)
        rows.append((role, counters[role], choice))
        counters[role] += 1
    placed = []
    node = 0
    for role, index, choice in sorted(rows, key=lambda r: -r[2].tensor_parallel):
        tp = choice.tensor_parallel
        stages = []
        for stage in range(choice.pipeline_parallel):
            while node < cluster.num_nodes and len(free[node]) < tp:
                node += 1
            if node == cluster.num_nodes:  # fall back to any node with room
                roomy = next((k for k in range(cluster.num_nodes) if len(free[k]) >= tp), None)
                if roomy is None:
                    raise ValueError("the instances do not fit the cluster's GPUs")
                node = roomy
            gpus, free[node] = free[node][:tp], free[node][tp:]
            stages.append({"stage": stage, "node": node, "gpus": gpus})
        spanned = len({st["node"] for st in stages})
        if spanned > cluster.node_limit:
            raise ValueError(f"{role} instance {index} would span {spanned} nodes (limit {cluster.node_limit})")
        placed.append(
            {
                "role": role,
                "index": index,
                "tensor_parallel": tp,
                "pipeline_parallel": choice.pipeline_parallel,
                "stages": stages,
            }
        )
    placed.sort(key=lambda r: (r["role"] != "prefill", r["index"]))
    return placed


def place_units(cluster: ClusterSpec, num_units: int, pp: int, tp_p: int, n_p: int, tp_d: int, n_d: int):
    """Algorithm 2's placement: unit u's stage s on one node, holding stage s of the unit's n_p
    prefill and n_d decode instances, so every KV transfer is node-local."""
    per_node = n_p * tp_p + n_d * tp_d
    units_per_group = cluster.gpus_per_node // per_node
    instances: list[dict[str, Any]] = []
    segments: list[dict[str, Any]] = []
    for u in range(num_units):
        group, slot = divmod(u, units_per_group)
        base_node, base_gpu = group * pp, slot * per_node
        if base_node + pp > cluster.num_nodes:
            raise ValueError("the units do not fit the cluster's nodes")
        for role, tp, count, offset in (("prefill", tp_p, n_p, 0), ("decode", tp_d, n_d, n_p * tp_p)):
            for i in range(count):
                first = base_gpu + offset + i * tp
                instances.append(
                    {
                        "role": role,
                        "index": u * count + i,
                        "unit": u,
                        "tensor_parallel": tp,
                        "pipeline_parallel": pp,
                        "stages": [
                            {"stage": st, "node": base_node + st, "gpus": list(range(first, first + tp))}
                            for st in range(pp)
                        ],
                    }
                )
        for st in range(pp):
            node_rows = {
                role: [
                    {"instance": inst["index"], "gpus": inst["stages"][st]["gpus"]}
                    for inst in instances
                    if inst["unit"] == u and inst["role"] == role
                ]
                for role in ("prefill", "decode")
            }
            segments.append({"unit": u, "stage": st, "node": base_node + st, **node_rows})
    instances.sort(key=lambda r: (r["role"] != "prefill", r["index"]))
    return instances, segments
