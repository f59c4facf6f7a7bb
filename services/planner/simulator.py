"""Discrete-event simulation of a serving cluster on a workload trace.

It follows pdserve's own workers (services/prefill, services/decode, services/colocated and the
scheduler in services/engine/scheduler.py), so that its attainment can be checked against them:
  - the router sends each arriving request to the prefill instance with the fewest outstanding
    prompt tokens (or round-robin);
  - a prefill instance batches its queue FCFS up to the token budget L_m (and a batch-size cap)
    while the prompts' blocks fit, runs one batch at a time through its pp pipeline stages (a new
    batch enters stage 1 when stage 1 is free) and holds each request's KV until it is pulled;
  - after the first token the router hands the request to the decode instance with the fewest
    requests; the decode instance admits FCFS at an iteration boundary once it has a batch slot
    and the blocks of the request's context plus a watermark (pull-based), pulls the KV (fixed +
    bytes / bandwidth, one transfer at a time per instance), and the request joins the running
    batch at the boundary after the pull;
  - decode and colocated instances run the same continuous-batching loop: each iteration is a
    prefill of waiting sequences if a batch fits (prefill first) or else one decode step of every
    running sequence; blocks are taken as contexts grow and the newest sequence is preempted
    (and later recomputed by a prefill) when they run out ("on_demand"), or taken for the whole
    request up front ("reserve"). Colocated instances get prompts; decode instances only prefill
    to recompute preempted sequences. With pp pipeline stages an instance keeps pp micro-batches
    ("lanes") in flight over one KV pool;
  - a colocated instance with chunked prefill (`SimConfig.chunked_prefill`) instead puts every
    running sequence's next token in each step and fills the rest of the token budget with prompt
    chunks (FCFS, the last cut to fit), each such step taking the profile's mixed_step_time.

Times come from the fitted latency models of the profiles plus the serving overheads
(latency_model.Overheads). TTFT = first token at the client - arrival; TPOT = (last token - first
token) / (output tokens - 1), 0 for one-token outputs. Tests check the decode and colocated
loops against a step-by-step transcription of the workers, preemptions included.

With `slo` and `stop_below` given, a run stops as soon as so many requests have missed the SLO that
attainment can no longer reach `stop_below`: the rate search only needs to know that.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from services.common.arith import ceil_div
from services.common.latency_profile import LatencyProfile, Overheads, TransferSpec
from services.planner.workload import TraceRequest


@dataclass(frozen=True)
class Slo:
    ttft_s: float = math.inf
    tpot_s: float = math.inf


@dataclass
class SimConfig:
    mode: str = "disaggregated"  # "disaggregated" | "colocated"
    prefill_profile: LatencyProfile | None = None
    decode_profile: LatencyProfile | None = None
    colocated_profile: LatencyProfile | None = None
    num_prefill: int = 1  # 0: requests arrive straight at decode (decode-only study)
    num_decode: int = 1  # 0: requests end at their first token (prefill-only study)
    num_colocated: int = 1
    transfer: TransferSpec | None = None  # None: the decode profile's
    overheads: Overheads | None = None  # None: from the profiles
    prefill_token_budget: int | None = None  # None: profile.max_batched_tokens
    prefill_max_batch_size: int = 1 << 30
    decode_max_num_seqs: int | None = None  # None: profile.max_num_seqs
    prefill_kv_tokens: int | None = None  # None: profile.kv_capacity_tokens
    decode_kv_tokens: int | None = None
    kv_admission: str = "on_demand"  # "on_demand" | "reserve"
    dispatch_policy: str = "least_loaded"  # "least_loaded" | "round_robin"
    # Low node-affinity placement: instances form this many groups (prefill i and decode j belong to
    # groups i * G // num_prefill and j * G // num_decode) and KV only moves inside a group.
    num_groups: int = 1
    chunked_prefill: bool = False  # colocated instances: chunked prefill (the worker's --chunked-prefill)

    def resolved_overheads(self) -> Overheads:
        if self.overheads is not None:
            return self.overheads
        front = self.colocated_profile if self.mode == "colocated" else (self.prefill_profile or self.decode_profile)
        back = self.colocated_profile if self.mode == "colocated" else (self.decode_profile or self.prefill_profile)
        assert front is not None and back is not None  # a cluster without profiles needs explicit overheads
        o = front.overheads
        return Overheads(o.dispatch_s, o.first_token_s, o.handoff_s, o.prefill_batch_s, back.overheads.decode_step_s)


class _Req:
    __slots__ = (
        "admitted",
        "arrival",
        "decode_inst",
        "epoch",
        "failed",
        "finish",
        "first_token",
        "generated",
        "idx",
        "join_blocks",
        "join_ctx",
        "join_step",
        "lane",
        "needs_transfer",
        "output",
        "preemptions",
        "prefill_blocks",
        "prefill_idx",
        "prefill_inst",
        "prompt",
    )

    def __init__(self, idx: int, r: TraceRequest):
        self.idx = idx
        self.arrival = r.arrival_s
        self.prompt = max(1, r.prompt_tokens)
        self.output = max(1, r.output_tokens)
        self.first_token = math.nan
        self.finish = math.nan
        self.generated = 0  # output tokens produced before the current decode membership began
        self.join_ctx = self.join_step = self.join_blocks = 0
        self.epoch = 0  # bumped on preemption: stale finish-heap entries are skipped
        self.prefill_inst: PrefillInstance | None = None
        self.prefill_blocks = 0
        self.decode_inst = -1
        self.needs_transfer = False
        self.preemptions = 0
        self.failed = False
        self.lane: DecodeBatch | None = None  # the DecodeBatch it is running in
        self.admitted = 0  # its lane's admission count when it last took blocks (preemption order)
        self.prefill_idx = -1


def _blocks(tokens: int, block_size: int) -> int:
    return ceil_div(tokens, block_size)


class DecodeBatch:
    """The running sequences of one continuous-batching loop (a decode lane or a colocated worker).

    Steps are simulated in runs: between two events that change the batch (a sequence finishing,
    one joining, the KV pool running short) every step has the same batch and a context sum that
    grows by the batch size, so k steps take k*A + b*(k*S + B*k(k-1)/2) and one event covers them.
    A request that becomes ready mid-run cuts the run at the next step boundary, where it joins.
    Block growth is counted per residue class of context mod block size, not per sequence."""

    def __init__(self, block_size: int, on_demand: bool, admit_on_join: bool = True):
        self.block_size = block_size
        self.on_demand = on_demand
        # Sequences are preempted newest admitted first. They are admitted when they join, unless
        # (chunked prefill) the instance admitted them earlier, at their prompt's first chunk.
        self.admit_on_join = admit_on_join
        self.admissions = 0
        self.partials: list[list] = []  # chunked prefill: [request, tokens cached, tokens], admission order
        self.step = 0  # completed steps
        self.size = 0
        self.sum_ctx = 0
        self.pending: list[_Req] = []  # ready, join at the next step boundary
        self.waiting: deque[_Req] = deque()  # need a prefill first: new prompts, preempted sequences
        self.idle = True  # nothing running on this lane
        self.prefilling = False  # the lane is running a prefill, not a decode run
        self.at_boundary = False  # between two iterations, admitting
        self._finish_heap: list = []
        self._order: list[tuple[int, _Req, int]] = []  # (admitted, request, epoch), oldest admitted first
        self._residue = [0] * block_size
        self._seq = 0
        # the run in progress: start time, per-step constant A, per-context-token b, steps, epoch
        self.run_t0 = self.run_a = self.run_b = 0.0
        self.run_sum_ctx = self.run_steps = self.run_epoch = 0

    def __len__(self) -> int:
        return self.size + len(self.pending)

    def ctx(self, r: _Req) -> int:
        """Context (tokens incl. the one being fed) of member r in the current step."""
        return r.join_ctx + self.step - r.join_step

    def held_blocks(self, r: _Req) -> int:
        """Blocks member r holds before the current step's growth: its cached tokens' (ctx - 1)."""
        if not self.on_demand:
            return r.join_blocks
        return max(r.join_blocks, _blocks(self.ctx(r) - 1, self.block_size))

    def growth_blocks(self) -> int:
        """Blocks the members need before this step: one each whose context crosses into a new
        block (members join holding the blocks of their cached tokens, so joiners count too)."""
        if not self.on_demand:
            return 0
        return self._residue[(1 - self.step) % self.block_size]

    def growth_between(self, first: int, last: int) -> int:
        """Blocks needed at the boundaries first..last-1 steps after the current one."""
        if not self.on_demand or last <= first:
            return 0
        bs, res, step = self.block_size, self._residue, self.step
        cycles, rest = divmod(last - first, bs)
        return cycles * self.size + sum(res[(1 - step - i) % bs] for i in range(first, first + rest))

    def admit(self, r: _Req) -> None:
        self.admissions += 1
        r.admitted = self.admissions

    def join_pending(self) -> None:
        k = self.step
        for r in self.pending:
            r.join_ctx = r.prompt + r.generated
            r.join_step = k
            self._seq += 1
            heapq.heappush(self._finish_heap, (k + r.output - r.generated, self._seq, r, r.epoch))
            if self.admit_on_join:
                self.admit(r)
            bisect.insort(self._order, (r.admitted, r, r.epoch))
            r.lane = self
            self._residue[(r.join_ctx - k) % self.block_size] += 1
            self.sum_ctx += r.join_ctx
            self.size += 1
        self.pending.clear()

    def _remove(self, r: _Req, ctx: int) -> None:
        self.sum_ctx -= ctx
        self.size -= 1
        self._residue[(r.join_ctx - r.join_step) % self.block_size] -= 1

    def newest_admitted(self) -> int | None:
        """When the most recently admitted running sequence was admitted (None: none runs)."""
        while self._order:
            admitted, r, epoch = self._order[-1]
            if r.epoch == epoch and r.lane is self:
                return admitted
            self._order.pop()  # finished, or preempted before
        return None

    def preempt_newest(self) -> _Req | None:
        """Takes the most recently admitted running sequence out (its finish entry goes stale)."""
        while self._order:
            _, r, epoch = self._order.pop()
            if r.epoch != epoch or r.lane is not self:
                continue  # finished, or preempted before
            self._remove(r, self.ctx(r))
            r.generated += self.step - r.join_step
            r.epoch += 1
            r.preemptions += 1
            r.lane = None
            return r
        return None

    # ---- runs of steps ---------------------------------------------------------------------------
    def begin_run(
        self, t: float, a: float, b: float, free_blocks: int, max_steps: int | None = None
    ) -> tuple[float, int]:
        """Starts steps at t, each taking a + b * (context sum). Runs until the next finish or until
        the free blocks would not cover the growth. Returns (end time, blocks reserved for growth)."""
        heap = self._finish_heap
        while heap and heap[0][3] != heap[0][2].epoch:
            heapq.heappop(heap)  # preempted entries
        steps = heap[0][0] - self.step
        if max_steps is not None:
            steps = min(steps, max_steps)
        if self.on_demand and self.size:
            # Each block_size consecutive boundaries take exactly one block per member.
            cycles = free_blocks // self.size
            fits = 1 + cycles * self.block_size
            if fits < steps:
                left = free_blocks - cycles * self.size
                bs, res, step = self.block_size, self._residue, self.step
                while fits < steps:
                    g = res[(1 - step - fits) % bs]
                    if g > left:
                        break
                    left -= g
                    fits += 1
                steps = fits
        self.run_t0, self.run_a, self.run_b, self.run_sum_ctx, self.run_steps = t, a, b, self.sum_ctx, steps
        self.run_epoch += 1
        return t + self.run_time(steps), self.growth_between(1, steps)

    def run_time(self, steps: int) -> float:
        return steps * self.run_a + self.run_b * (steps * self.run_sum_ctx + self.size * steps * (steps - 1) / 2)

    def _first_boundary_after(self, t: float) -> int:
        """Index (1..run_steps) of the run's first step boundary at or after t."""
        elapsed = t - self.run_t0
        qa = self.run_b * self.size / 2
        qb = self.run_a + self.run_b * self.run_sum_ctx - qa
        j = elapsed / qb if qa <= 0 else (-qb + math.sqrt(qb * qb + 4 * qa * elapsed)) / (2 * qa)
        j = max(1, math.ceil(j - 1e-9))
        while j < self.run_steps and self.run_time(j) < elapsed:
            j += 1
        return min(j, self.run_steps)

    def next_boundary(self, t: float) -> float:
        """Time of the current run's first step boundary at or after t."""
        return self.run_t0 + self.run_time(self._first_boundary_after(t))

    def refundable(self, t: float) -> int:
        """Growth blocks reserved for boundaries of the current run that come after t's boundary."""
        if self.idle or self.prefilling or self.run_steps <= 1:
            return 0
        return self.growth_between(self._first_boundary_after(t), self.run_steps)

    def cut_run(self, t: float) -> tuple[float, int] | None:
        """Ends the current run at its first step boundary at or after t. Returns (boundary time,
        growth blocks no longer needed) or None when the run ends there anyway."""
        if self.idle or self.prefilling or self.run_steps <= 1:
            return None
        j = self._first_boundary_after(t)
        if j >= self.run_steps:
            return None
        refund = self.growth_between(j, self.run_steps)
        self.run_steps = j
        self.run_epoch += 1
        return self.run_t0 + self.run_time(j), refund

    def advance(self, steps: int) -> list[tuple[_Req, int]]:
        """Ends `steps` steps: every member gained that many tokens. Returns (finished request,
        blocks it held)."""
        self.step += steps
        self.sum_ctx += self.size * steps
        done = []
        heap = self._finish_heap
        while heap and heap[0][0] <= self.step:
            _, _, r, epoch = heapq.heappop(heap)
            if epoch != r.epoch:
                continue
            ctx = self.ctx(r)
            blocks = self.held_blocks(r)
            self._remove(r, ctx)
            r.lane = None
            done.append((r, blocks))
        return done


class Simulation:
    def __init__(
        self, config: SimConfig, trace: list[TraceRequest], slo: Slo | None = None, stop_below: float | None = None
    ):
        self.config = config
        ordered = all(a.arrival_s <= b.arrival_s for a, b in zip(trace, trace[1:]))
        self.reqs = [_Req(i, r) for i, r in enumerate(trace if ordered else sorted(trace, key=lambda r: r.arrival_s))]
        self.slo = slo or Slo()
        n = len(self.reqs)
        self.max_failures = math.inf if stop_below is None else math.floor((1 - stop_below) * n + 1e-9)
        self.failures = 0
        self.stopped_early = False
        self.backlog = 0
        self.overheads = config.resolved_overheads()
        self._heap: list = []
        self._seq = 0
        self._rr_prefill = self._rr_decode = 0
        self.prefills: list[PrefillInstance] = []
        self.decodes: list[DecodeInstance] = []
        self.colocated: list[ColocatedInstance] = []
        if config.mode == "colocated":
            profile = config.colocated_profile
            for i in range(config.num_colocated):
                assert profile is not None  # an instance needs the profile of its phase
                self.colocated.append(ColocatedInstance(self, i, profile, config))
        elif config.mode == "disaggregated":
            for i in range(config.num_prefill):
                assert config.prefill_profile is not None  # an instance needs the profile of its phase
                self.prefills.append(PrefillInstance(self, i, config.prefill_profile, config))
            transfer = config.transfer or (config.decode_profile.transfer if config.decode_profile else TransferSpec())
            for i in range(config.num_decode):
                assert config.decode_profile is not None  # an instance needs the profile of its phase
                self.decodes.append(DecodeInstance(self, i, config.decode_profile, config, transfer))
            if not self.prefills and not self.decodes:
                raise ValueError("a cluster needs prefill or decode instances")
            groups = max(1, config.num_groups)
            self._group_decodes: list[list[DecodeInstance]] = [[] for _ in range(groups)]
            for p in self.prefills:
                p.group = p.index * groups // len(self.prefills)
            for d in self.decodes:
                self._group_decodes[d.index * groups // len(self.decodes)].append(d)
            if groups > 1 and self.prefills and self.decodes and not all(self._group_decodes):
                raise ValueError("every group needs at least one decode instance")
        else:
            raise ValueError(f"mode must be disaggregated or colocated, got {config.mode!r}")

    # ---- event machinery ----------------------------------------------------------------------
    def schedule(self, t: float, fn, arg=None) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, arg))

    def run(self) -> SimResult:
        reqs, heap = self.reqs, self._heap
        arrivals = [r.arrival for r in reqs]
        i, n = 0, len(reqs)
        pop, arrive = heapq.heappop, self._arrive
        while self.failures <= self.max_failures:
            if heap and (i >= n or heap[0][0] <= arrivals[i]):
                t, _, fn, arg = pop(heap)
                fn(t, arg)
            elif i < n:
                arrive(arrivals[i], reqs[i])
                i += 1
                if i == n:
                    self.backlog = self._backlog()
            else:
                break
        else:
            self.stopped_early = True
        return SimResult.from_sim(self)

    def _backlog(self) -> int:
        """Requests queued but not in any batch yet. Read when the last request arrives: a cluster
        that keeps up has few; an overloaded one has a share of the trace that grows with it."""
        return (
            sum(len(p.queue) for p in self.prefills)
            + sum(len(d.admission) for d in self.decodes)
            + sum(len(lane.waiting) for inst in self.decodes + self.colocated for lane in inst.lanes)
        )

    # ---- request path -------------------------------------------------------------------------
    def _pick(self, instances, load, attr):
        if len(instances) == 1:
            return instances[0]
        if self.config.dispatch_policy == "round_robin":
            k = getattr(self, attr)
            setattr(self, attr, k + 1)
            return instances[k % len(instances)]
        return min(instances, key=load)

    def _arrive(self, t: float, r: _Req) -> None:
        t += self.overheads.dispatch_s
        if self.colocated:
            self._pick(self.colocated, ColocatedInstance.load, "_rr_prefill").enqueue(t, r)
        elif self.prefills:
            self._pick(self.prefills, PrefillInstance.load, "_rr_prefill").enqueue(t, r)
        else:  # decode-only: the request arrives with its first token and its KV ready
            r.first_token = t
            r.generated = 1
            if r.output <= 1:
                self.finish(r, t)
            else:
                self.handoff(t, r)

    def first_token(self, t: float, r: _Req) -> None:
        r.first_token = t + self.overheads.first_token_s
        r.generated = 1
        if r.first_token - r.arrival > self.slo.ttft_s:
            r.failed = True
            self.failures += 1

    def handoff(self, t: float, r: _Req) -> None:
        decodes = self.decodes
        if self.config.num_groups > 1 and r.prefill_inst is not None:
            decodes = self._group_decodes[r.prefill_inst.group]
        inst = self._pick(decodes, DecodeInstance.load, "_rr_decode")
        delay = self.overheads.handoff_s
        if delay:
            self.schedule(t + delay, inst.enqueue, r)
        else:
            inst.enqueue(t, r)

    def finish(self, r: _Req, t: float) -> None:
        r.finish = t + self.overheads.first_token_s if r.output > 1 else r.first_token
        if not r.failed and r.output > 1 and (r.finish - r.first_token) / (r.output - 1) > self.slo.tpot_s:
            r.failed = True
            self.failures += 1


class PrefillInstance:
    def __init__(self, sim: Simulation, index: int, profile: LatencyProfile, config: SimConfig):
        self.sim = sim
        self.index = index
        self.latency = profile.prefill
        self.pipeline = profile.pipeline_parallel
        self.budget = config.prefill_token_budget or profile.max_batched_tokens
        self.max_batch = config.prefill_max_batch_size
        self.block_size = profile.block_size
        kv_tokens = config.prefill_kv_tokens or profile.kv_capacity_tokens
        self.total_blocks = self.free_blocks = max(1, kv_tokens // profile.block_size)
        self.batch_overhead = sim.overheads.prefill_batch_s
        self.holds_kv = config.num_decode > 0
        self.group = 0
        self.queue: deque[_Req] = deque()
        self.outstanding_tokens = 0
        self.stage_free = [0.0] * self.pipeline
        self.idle = True

    def load(self) -> int:
        return self.outstanding_tokens

    def enqueue(self, t: float, r: _Req) -> None:
        r.prefill_idx = self.index
        self.queue.append(r)
        self.outstanding_tokens += r.prompt
        if self.idle:
            self._start(t)

    def _start(self, t: float) -> None:
        q, bs = self.queue, self.block_size
        batch: list[_Req] = []
        tokens = sq = blocks = 0
        while q and len(batch) < self.max_batch:
            r = q[0]
            need = _blocks(r.prompt, bs)
            if batch and tokens + r.prompt > self.budget:
                break
            # An oversized prompt still runs alone on an empty instance rather than block forever.
            if blocks + need > self.free_blocks and not (not batch and self.free_blocks == self.total_blocks):
                break
            q.popleft()
            r.prefill_blocks = need
            batch.append(r)
            tokens += r.prompt
            sq += r.prompt * r.prompt
            blocks += need
        if not batch:
            self.idle = True  # memory full: release() restarts us
            return
        self.free_blocks -= blocks
        lat = self.latency
        duration = lat.a + lat.b * tokens + lat.c * sq + self.batch_overhead
        self.idle = False
        if self.pipeline == 1:
            self.sim.schedule(t + duration, self._done_and_next, batch)
            return
        stage = duration / self.pipeline
        end = t
        for k in range(self.pipeline):
            end = max(end, self.stage_free[k]) + stage
            self.stage_free[k] = end
        self.sim.schedule(t + stage, self._stage0_free)
        self.sim.schedule(end, self._done, batch)

    def _stage0_free(self, t: float, _=None) -> None:
        self.idle = True
        if self.queue:
            self._start(t)

    def _done_and_next(self, t: float, batch: list[_Req]) -> None:
        self.idle = True
        self._done(t, batch)
        if self.queue and self.idle:
            self._start(t)

    def _done(self, t: float, batch: list[_Req]) -> None:
        sim = self.sim
        freed = 0
        for r in batch:
            self.outstanding_tokens -= r.prompt
            sim.first_token(t, r)
            if r.output <= 1 or not self.holds_kv:
                freed += r.prefill_blocks
                sim.finish(r, t)
            else:
                r.prefill_inst = self
                r.needs_transfer = True
                sim.handoff(t, r)
        if freed:
            self.release(t, freed)

    def release(self, t: float, blocks: int) -> None:
        self.free_blocks += blocks
        if self.idle and self.queue:
            self._start(t)


class BatchingInstance:
    """pdserve's continuous-batching loop (services/engine/scheduler.py), one per lane.

    At every iteration boundary it prefills waiting sequences if a batch fits (prefill first, FCFS,
    the token budget, their blocks plus a watermark while others run), otherwise it advances every
    running sequence by one token, first giving a block to each whose context crosses one and,
    while the pool is dry, preempting the newest (its blocks freed; back to the head of the
    waiting queue, to be recomputed by a prefill). Decode instances feed running sequences in
    after their KV pull; colocated ones feed prompts into the waiting queue. A pipeline-parallel
    instance runs one such loop per micro-batch ("lane") over one KV pool."""

    def __init__(
        self,
        sim: Simulation,
        index: int,
        profile: LatencyProfile,
        config: SimConfig,
        lanes: int,
        chunked_prefill: bool = False,
    ):
        self.sim = sim
        self.index = index
        self.profile = profile
        self.chunked_prefill = chunked_prefill
        self.prefill_latency = profile.prefill
        self.decode_latency = profile.decode
        self.block_size = profile.block_size
        self.budget = config.prefill_token_budget or profile.max_batched_tokens
        # Per lane, as vLLM's max_num_seqs is per virtual engine.
        self.max_seqs = config.decode_max_num_seqs or profile.max_num_seqs
        kv_tokens = config.decode_kv_tokens or profile.kv_capacity_tokens
        self.total_blocks = self.free_blocks = max(1, kv_tokens // profile.block_size)
        self.reserve = config.kv_admission == "reserve"
        # A few blocks kept spare so that admitting a request does not force a preemption at once.
        self.watermark = max(1, self.total_blocks // 100)
        self.overheads = sim.overheads
        self.lanes = [DecodeBatch(self.block_size, not self.reserve, not chunked_prefill) for _ in range(lanes)]

    def _blocks_to_hold(self, r: _Req, cached_tokens: int) -> int:
        """Blocks a sequence gets when it enters: its cached tokens', or its whole life's ("reserve")."""
        return _blocks(r.prompt + r.output - 1 if self.reserve else cached_tokens, self.block_size)

    def _admit(self, t: float) -> None:
        """Hook run at each boundary before the scheduling decision (decode: KV admission)."""

    def wake(self, t: float, lane: DecodeBatch) -> None:
        """Something arrived that the lane's next boundary must see."""
        if lane.at_boundary:
            return
        if lane.idle:
            self._boundary(t, lane)
        elif not lane.prefilling:
            self._cut(t, lane)

    def _cut(self, t: float, lane: DecodeBatch) -> None:
        cut = lane.cut_run(t)
        if cut:
            end, refund = cut
            self.free_blocks += refund
            self.sim.schedule(end, self._run_done, (lane, lane.run_epoch))

    def _settle(self, t: float, need: int, skip: DecodeBatch | None = None) -> bool:
        """Decode runs reserve the blocks their sequences grow into up to the run's end. When
        something needs some of those now, cut the runs at their next boundary (as step-by-step
        accounting would have them) and return the reserve. True when `need` blocks are free."""
        lanes = [lane for lane in self.lanes if lane is not skip and not lane.idle and not lane.prefilling]
        if need > self.free_blocks + sum(lane.refundable(t) for lane in lanes):
            return False
        for lane in lanes:
            self._cut(t, lane)
        return need <= self.free_blocks

    def _boundary(self, t: float, lane: DecodeBatch) -> None:
        lane.at_boundary = True
        self._admit(t)
        if self.chunked_prefill:
            lane.at_boundary = False
            self._chunked_boundary(t, lane)
            return
        batch = self._prefill_batch(lane)
        lane.at_boundary = False
        if batch:
            lat = self.prefill_latency
            tokens = sum(n for _, n in batch)
            duration = lat.a + lat.b * tokens + lat.c * sum(n * n for _, n in batch) + self.overheads.prefill_batch_s
            lane.idle, lane.prefilling = False, True
            self.sim.schedule(t + duration, self._prefill_done, (lane, batch))
            return
        lane.join_pending()
        grow = lane.growth_blocks()
        if grow > self.free_blocks and len(self.lanes) > 1:
            self._settle(t, grow, skip=lane)  # other lanes' reserves first, before preempting
        while grow > self.free_blocks:
            victim = lane.preempt_newest()
            if victim is None:
                break
            self._preempted(victim, lane)
            grow = lane.growth_blocks()
        self.free_blocks -= grow
        self._decode_run(t, lane)

    def _decode_run(self, t: float, lane: DecodeBatch) -> None:
        """Steps of the running sequences alone, until something may change the batch."""
        if lane.size == 0:
            lane.idle = True
            return
        lane.idle = False
        dlat = self.decode_latency
        # Blocks only come back when a sequence finishes (the end of a run) or is preempted (here):
        # after a preemption the next boundary may admit or recompute, so it must be a real one.
        one_step = self._could_start_more(lane)
        end, reserved = lane.begin_run(
            t,
            dlat.a + dlat.c * lane.size + self.overheads.decode_step_s,
            dlat.b,
            self.free_blocks,
            1 if one_step else None,
        )
        self.free_blocks -= reserved
        self.sim.schedule(end, self._run_done, (lane, lane.run_epoch))

    def _could_start_more(self, lane: DecodeBatch) -> bool:
        """Whether the next boundary, with the blocks free now, would prefill or admit something."""
        if not lane.waiting or lane.size + len(lane.pending) >= self.max_seqs:
            return False
        r = lane.waiting[0]
        return self._blocks_to_hold(r, r.prompt + r.generated) <= self.free_blocks - self.watermark

    def _prefill_batch(self, lane: DecodeBatch) -> list[tuple[_Req, int]]:
        q = lane.waiting
        running = lane.size + len(lane.pending)
        free = self.free_blocks - (self.watermark if running else 0)
        batch: list[tuple[_Req, int]] = []
        tokens, blocks = 0, 0
        while q and running + len(batch) < self.max_seqs:
            r = q[0]
            n = r.prompt + r.generated  # a preempted sequence recomputes its output so far too
            need = self._blocks_to_hold(r, n)
            if batch and tokens + n > self.budget:
                break
            # A prompt bigger than the whole pool still runs alone on an empty one, rather than hang.
            if blocks + need > free and not (not batch and running == 0 and self.free_blocks == self.total_blocks):
                break
            q.popleft()
            r.join_blocks = need
            batch.append((r, n))
            tokens += n
            blocks += need
        self.free_blocks -= blocks
        return batch

    def _prefill_done(self, t: float, arg) -> None:
        lane, batch = arg
        lane.prefilling, lane.idle = False, True
        for r, _ in batch:
            self._prompt_computed(t, lane, r)
        self._boundary(t, lane)

    def _prompt_computed(self, t: float, lane: DecodeBatch, r: _Req) -> None:
        """Its prompt (and, recomputed, its output so far) is in the pool and a token sampled."""
        if math.isnan(r.first_token):
            self._first_token(t, r)
        else:
            r.generated += 1  # the recompute samples the next token too
        r.decode_inst = self.index
        if r.generated >= r.output:
            self.free_blocks += r.join_blocks
            self._finished(t, r)
        else:
            lane.pending.append(r)

    # ---- chunked prefill (scheduler.py BatchScheduler._schedule_chunked) -------------------------
    def _chunked_boundary(self, t: float, lane: DecodeBatch) -> None:
        lane.join_pending()
        grow = lane.growth_blocks()
        while grow > self.free_blocks and self._preempt_newest_admitted(lane):
            grow = lane.growth_blocks()
        self.free_blocks -= grow
        budget = self.budget - lane.size
        # [entry, tokens now]: prompts part-way through, those with one token left first (with the
        # running sequences' next tokens), then new prompts while their blocks fit
        rows = []
        for entry in sorted(lane.partials, key=lambda e: e[2] - e[1] != 1):
            if budget:
                n = min(entry[2] - entry[1], budget)
                rows.append((entry, n))
                budget -= n
        num_partial_rows = len(rows)
        while budget and lane.waiting and lane.size + len(lane.partials) < self.max_seqs:
            r = lane.waiting[0]
            tokens = r.prompt + r.generated  # a preempted sequence recomputes its output so far too
            need = self._blocks_to_hold(r, tokens)
            if need + (self.watermark if lane.size or lane.partials else 0) > self.free_blocks:
                break
            lane.waiting.popleft()
            self.free_blocks -= need
            r.join_blocks = need
            lane.admit(r)
            entry = [r, 0, tokens]
            lane.partials.append(entry)
            n = min(tokens, budget)
            rows.append((entry, n))
            budget -= n
        if not rows:
            self._decode_run(t, lane)
            return
        # Timed as the worker's step: a decode step when every row is the next token of a sequence
        # that was running or part-way through its prompt, else a mixed one whose one-token rows
        # with a cached context count as next tokens.
        num_next = lane.size + sum(n == e[2] - e[1] == 1 for e, n in rows[:num_partial_rows])
        if num_next == lane.size + len(rows):
            context = lane.sum_ctx + sum(e[2] for e, _ in rows)
            duration = self.decode_latency.step_time(num_next, context)
        else:
            one = [(e, n) for e, n in rows if n == 1 and e[1] > 0]
            chunks = [(e[1], n) for e, n in rows if not (n == 1 and e[1] > 0)]
            context = lane.sum_ctx + sum(e[1] + 1 for e, _ in one)
            duration = self.profile.mixed_time(chunks, lane.size + len(one), context)
        lane.idle, lane.prefilling = False, True
        self.sim.schedule(t + duration + self.overheads.decode_step_s, self._mixed_done, (lane, rows))

    def _mixed_done(self, t: float, arg) -> None:
        lane, rows = arg
        lane.prefilling, lane.idle = False, True
        for r, blocks in lane.advance(1):
            self.free_blocks += blocks
            self._finished(t, r)
        for entry, n in rows:
            entry[1] += n
            if entry[1] == entry[2]:
                lane.partials.remove(entry)
                self._prompt_computed(t, lane, entry[0])
        self._boundary(t, lane)

    def _preempt_newest_admitted(self, lane: DecodeBatch) -> bool:
        """Frees the blocks of the most recently admitted sequence, running or part-way through its
        prompt: back to the head of the waiting queue. False when there is none."""
        newest = lane.newest_admitted()
        if lane.partials and (newest is None or lane.partials[-1][0].admitted > newest):
            r = lane.partials.pop()[0]
            self.free_blocks += r.join_blocks
            r.preemptions += 1
            lane.waiting.appendleft(r)
            return True
        victim = lane.preempt_newest()
        if victim is None:
            return False
        self._preempted(victim, lane)
        return True

    def _first_token(self, t: float, r: _Req) -> None:
        self.sim.first_token(t, r)

    def _finished(self, t: float, r: _Req) -> None:
        self.sim.finish(r, t)

    def _preempted(self, r: _Req, lane: DecodeBatch) -> None:
        self.free_blocks += self._held_at_preemption(r)
        lane.waiting.appendleft(r)

    def _held_at_preemption(self, r: _Req) -> int:
        # preempt_newest already moved r.generated on: its cached tokens are prompt + generated - 1
        return (
            r.join_blocks if self.reserve else max(r.join_blocks, _blocks(r.prompt + r.generated - 1, self.block_size))
        )

    def _run_done(self, t: float, arg) -> None:
        lane, epoch = arg
        if epoch != lane.run_epoch:
            return  # this run was cut short; a later event ends it
        lane.idle = True
        for r, blocks in lane.advance(lane.run_steps):
            self.free_blocks += blocks
            self._finished(t, r)
        self._boundary(t, lane)


class DecodeInstance(BatchingInstance):
    """The decode worker (services/decode/server.py): a request waits, holding nothing, until a
    boundary finds it a batch slot and the blocks of its context plus the watermark (the
    watermark only while others hold blocks; nothing is admitted while a preempted sequence
    waits for its recompute); then its KV
    is pulled (one transfer at a time over the instance's link) into blocks for its cached
    tokens, and it joins the running batch at the boundary after the pull."""

    def __init__(self, sim: Simulation, index: int, profile: LatencyProfile, config: SimConfig, transfer: TransferSpec):
        super().__init__(sim, index, profile, config, profile.pipeline_parallel)
        self.kv_bytes_per_token = profile.kv_bytes_per_token
        self.transfer = transfer
        self.admission: deque[_Req] = deque()
        self.pulling = 0
        self.num_seqs = 0  # admitted and not finished: pulling, running or waiting to be recomputed
        self.link_free = 0.0

    def in_flight(self) -> int:
        return self.num_seqs

    def _finished(self, t: float, r: _Req) -> None:
        self.num_seqs -= 1
        self.sim.finish(r, t)

    def load(self) -> int:
        return self.in_flight() + len(self.admission)

    def enqueue(self, t: float, r: _Req) -> None:
        self.admission.append(r)
        idle = next((lane for lane in self.lanes if lane.idle and not lane.at_boundary), None)
        if idle is not None:
            self._boundary(t, idle)  # an idle engine thread admits at once
        elif len(self.admission) == 1 and self._fits(r, t):
            # Admit at the next boundary of any lane rather than at the end of its run.
            lanes = [lane for lane in self.lanes if not lane.prefilling]
            if len(lanes) == len(self.lanes):  # (a prefilling lane reaches a boundary soon anyway)
                soonest = min(lanes, key=lambda lane: lane.next_boundary(t)) if len(lanes) > 1 else lanes[0]
                self._cut(t, soonest)

    def _need(self, r: _Req) -> int:
        """Free blocks admission asks for: the context's (cached tokens + the next), and the
        watermark while other sequences hold blocks."""
        tokens = r.prompt + r.output - 1 if self.reserve else r.prompt + r.generated
        return _blocks(tokens, self.block_size) + (self.watermark if self.in_flight() else 0)

    def _recomputes_waiting(self) -> bool:
        """Preempted sequences waiting for a recompute: they go first, nothing is admitted."""
        return any(lane.waiting for lane in self.lanes)

    def _fits(self, r: _Req, t: float | None = None) -> bool:
        """Whether the head of the queue could be admitted (at t's next boundary, when t is given)."""
        if self._recomputes_waiting() or self.in_flight() >= self.max_seqs * len(self.lanes):
            return False
        need = self._need(r)
        if need <= self.free_blocks:
            return True
        if t is None:
            return False
        lanes = [lane for lane in self.lanes if not lane.idle and not lane.prefilling]
        return need <= self.free_blocks + sum(lane.refundable(t) for lane in lanes)

    def _could_start_more(self, lane: DecodeBatch) -> bool:
        return super()._could_start_more(lane) or bool(self.admission and self._fits(self.admission[0]))

    def _admit(self, t: float) -> None:
        while self.admission:
            r = self.admission[0]
            if not self._fits(r) and (
                self._recomputes_waiting()
                or self.in_flight() >= self.max_seqs * len(self.lanes)
                or not self._settle(t, self._need(r))
            ):
                return
            self.admission.popleft()
            held = self._blocks_to_hold(r, r.prompt + r.generated - 1)
            self.free_blocks -= held
            r.join_blocks = held
            r.decode_inst = self.index
            self.pulling += 1
            self.num_seqs += 1
            if r.needs_transfer:
                # One transfer at a time over this instance's link; the fixed part is latency.
                num_bytes = (r.prompt + r.generated - 1) * self.kv_bytes_per_token
                busy = num_bytes / self.transfer.bytes_per_s if self.transfer.bytes_per_s else 0.0
                start = max(t, self.link_free)
                self.link_free = start + busy
                done = start + busy + self.transfer.fixed_s
                if done > t:
                    self.sim.schedule(done, self._transfer_done, r)
                    continue
            self._transfer_done(t, r)

    def _transfer_done(self, t: float, r: _Req) -> None:
        self.pulling -= 1
        r.needs_transfer = False
        if r.prefill_inst is not None:
            inst, r.prefill_inst = r.prefill_inst, None
            inst.release(t, r.prefill_blocks)
        lane = min(self.lanes, key=len) if len(self.lanes) > 1 else self.lanes[0]
        lane.pending.append(r)
        self.wake(t, lane)


class ColocatedInstance(BatchingInstance):
    """The colocated worker: prompts go straight into the waiting queue; a prefill batch goes
    first, stalling every running decode, or (chunked prefill) prompt chunks share each step with
    the running sequences' next tokens."""

    def __init__(self, sim: Simulation, index: int, profile: LatencyProfile, config: SimConfig):
        super().__init__(sim, index, profile, config, 1, config.chunked_prefill)
        if config.chunked_prefill and self.budget < self.max_seqs:
            raise ValueError(
                f"chunked prefill needs a token budget ({self.budget}) of at least the batch limit ({self.max_seqs})"
            )
        self.outstanding_tokens = 0  # prompt tokens not yet prefilled
        self.in_flight = 0  # requests enqueued and not finished

    def load(self) -> int:
        """The router's colocated policy (services/router/policies.py, pick_colocated)."""
        return self.outstanding_tokens + self.in_flight

    def enqueue(self, t: float, r: _Req) -> None:
        lane = self.lanes[0]
        lane.waiting.append(r)
        self.outstanding_tokens += r.prompt
        self.in_flight += 1
        self.wake(t, lane)

    def _finished(self, t: float, r: _Req) -> None:
        self.in_flight -= 1
        super()._finished(t, r)

    def _first_token(self, t: float, r: _Req) -> None:
        self.outstanding_tokens -= r.prompt
        self.sim.first_token(t, r)


@dataclass
class SimResult:
    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    ttft_s: np.ndarray  # nan where the run stopped before the first token
    tpot_s: np.ndarray  # nan where the run stopped before the last token
    preemptions: np.ndarray
    prefill_instance: np.ndarray  # -1: none (decode-only or colocated)
    decode_instance: np.ndarray  # the decode (or colocated) instance that finished it, -1: none
    slo: Slo
    stopped_early: bool = False
    backlog: int = 0  # requests still queued (in no batch) when the last one arrived
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_sim(cls, sim: Simulation) -> SimResult:
        cols = np.array(
            [
                (r.arrival, r.prompt, r.output, r.first_token, r.finish, r.preemptions, r.prefill_idx, r.decode_inst)
                for r in sim.reqs
            ],
            dtype=float,
        ).reshape(-1, 8)
        arrival, prompt, out, first, finish = cols[:, 0], cols[:, 1], cols[:, 2], cols[:, 3], cols[:, 4]
        tpot = np.where(out > 1, (finish - first) / np.maximum(out - 1, 1), 0.0)
        tpot = np.where(np.isnan(finish), np.nan, tpot)
        ints = lambda c: c.astype(np.int64)
        return cls(
            arrival,
            ints(prompt),
            ints(out),
            first - arrival,
            tpot,
            ints(cols[:, 5]),
            ints(cols[:, 6]),
            ints(cols[:, 7]),
            sim.slo,
            sim.stopped_early,
            sim.backlog,
        )

    def __len__(self) -> int:
        return len(self.arrival_s)

    def _ok(self, values: np.ndarray, limit: float) -> np.ndarray:
        return np.nan_to_num(values, nan=math.inf) <= limit  # unfinished requests miss

    @property
    def ttft_ok(self) -> np.ndarray:
        return self._ok(self.ttft_s, self.slo.ttft_s)

    @property
    def tpot_ok(self) -> np.ndarray:
        return self._ok(self.tpot_s, self.slo.tpot_s)

    @property
    def overloaded(self) -> bool:
        """More than 5% of the trace (and over 20 requests) still queued at the last arrival: the
        cluster is not keeping up, whatever the attainment of a finite trace says. TPOT in
        particular spreads a queueing delay over every output token, so a decode queue can grow
        for minutes before attainment shows it."""
        return self.backlog > max(20, 0.05 * len(self))

    @property
    def attainment(self) -> float:
        return float(np.mean(self.ttft_ok & self.tpot_ok)) if len(self) else 1.0

    def summary(self) -> dict:
        def stats(x):
            x = x[~np.isnan(x)]
            if not len(x):
                return {}
            return {
                "mean": float(x.mean()),
                "p50": float(np.percentile(x, 50)),
                "p90": float(np.percentile(x, 90)),
                "p99": float(np.percentile(x, 99)),
            }

        span = float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) > 1 else 0.0
        return {
            "num_requests": len(self),
            "rate": (len(self) - 1) / span if span > 0 else None,
            "attainment": self.attainment,
            "ttft_attainment": float(np.mean(self.ttft_ok)) if len(self) else 1.0,
            "tpot_attainment": float(np.mean(self.tpot_ok)) if len(self) else 1.0,
            "slo": {"ttft_s": _finite(self.slo.ttft_s), "tpot_s": _finite(self.slo.tpot_s)},
            "ttft_s": stats(self.ttft_s),
            "tpot_s": stats(self.tpot_s),
            "preemptions": int(self.preemptions.sum()),
            "backlog_at_last_arrival": self.backlog,
            "overloaded": self.overloaded,
            "stopped_early": self.stopped_early,
            **self.extra,
        }

    def to_json(self) -> dict:
        requests = [
            {
                "arrival_s": float(a),
                "prompt_tokens": int(p),
                "output_tokens": int(o),
                "ttft_s": _finite(float(tt)),
                "tpot_s": _finite(float(tp)),
                "ok": bool(ok),
            }
            for a, p, o, tt, tp, ok in zip(
                self.arrival_s,
                self.prompt_tokens,
                self.output_tokens,
                self.ttft_s,
                self.tpot_s,
                self.ttft_ok & self.tpot_ok,
            )
        ]
        return {"schema": "pdserve.simulation/v1", "summary": self.summary(), "requests": requests}


def _finite(x: float):
    return None if x is None or math.isnan(x) or math.isinf(x) else x


def simulate(
    config: SimConfig, trace: list[TraceRequest], slo: Slo | None = None, stop_below: float | None = None
) -> SimResult:
    return Simulation(config, trace, slo, stop_below).run()
