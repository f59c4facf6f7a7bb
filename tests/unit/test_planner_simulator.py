import random

import numpy as np
import pytest

from services.common.enums import FinishReason
from services.common.latency_profile import DecodeLatency, LatencyProfile, Overheads, PrefillLatency, TransferSpec
from services.engine.block_manager import BlockManager
from services.engine.config import SamplingParams
from services.engine.scheduler import BatchScheduler, StepKind
from services.engine.sequence import Sequence
from services.planner.simulator import SimConfig, Slo, simulate
from services.planner.workload import TraceRequest, make_trace


def profile(
    prefill=(0.0, 0.0, 0.0),
    decode=(0.0, 0.0, 0.0),
    *,
    kv_tokens=1 << 30,
    kv_bytes=1000,
    pp=1,
    budget=1 << 20,
    max_num_seqs=256,
    block_size=16,
) -> LatencyProfile:
    return LatencyProfile(
        PrefillLatency(*prefill),
        DecodeLatency(*decode),
        kv_bytes_per_token=kv_bytes,
        kv_capacity_tokens=kv_tokens,
        block_size=block_size,
        max_batched_tokens=budget,
        max_num_seqs=max_num_seqs,
        pipeline_parallel=pp,
    )


def reference_decode(trace, a, b, c, max_seqs):
    """Continuous batching written the plain way, one step at a time: requests arrive with their
    first token (decode-only), join at the first step boundary after arriving, FCFS, at most
    max_seqs running; unlimited memory."""
    t, i, waiting, running, finish = 0.0, 0, [], [], {}
    order = sorted(range(len(trace)), key=lambda k: trace[k].arrival_s)
    while len(finish) < len(trace):
        while i < len(order) and trace[order[i]].arrival_s <= t:
            waiting.append(order[i])
            i += 1
        while waiting and len(running) < max_seqs:
            k = waiting.pop(0)
            r = trace[k]
            if r.output_tokens <= 1:
                finish[k] = r.arrival_s
            else:
                running.append([k, r.prompt_tokens + 1, r.output_tokens - 1])
        if not running:
            t = trace[order[i]].arrival_s
            continue
        t += a + b * sum(x[1] for x in running) + c * len(running)
        for x in running:
            x[1] += 1
            x[2] -= 1
        for x in [x for x in running if x[2] == 0]:
            finish[x[0]] = t
            running.remove(x)
    return np.array(
        [(finish[k] - r.arrival_s) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0 for k, r in enumerate(trace)]
    )


@pytest.mark.parametrize("admission", ["reserve", "on_demand"])
def test_decode_runs_match_a_step_by_step_reference(admission):
    rng = random.Random(0)
    trace, t = [], 0.0
    for _ in range(400):
        t += rng.expovariate(6.0)
        trace.append(TraceRequest(t, rng.randint(5, 300), rng.randint(1, 80)))
    a, b, c = 0.01, 1e-5, 1e-3
    config = SimConfig(
        decode_profile=profile(decode=(a, b, c), max_num_seqs=16), num_prefill=0, num_decode=1, kv_admission=admission
    )
    result = simulate(config, trace)
    np.testing.assert_allclose(result.tpot_s, reference_decode(trace, a, b, c, 16), rtol=1e-9, atol=1e-12)
    assert result.preemptions.sum() == 0


def test_one_request_through_every_stage():
    overheads = Overheads(dispatch_s=0.001, first_token_s=0.003, handoff_s=0.002)
    config = SimConfig(
        prefill_profile=profile(prefill=(0.1, 0.0, 0.0)),
        decode_profile=profile(decode=(0.01, 0, 0)),
        transfer=TransferSpec(fixed_s=0.05, bytes_per_s=1e6),
        overheads=overheads,
    )
    result = simulate(config, [TraceRequest(0.0, 100, 11)])
    # prefill 0.001 -> 0.101; first token at the client 0.104; decode queue at 0.103; KV of 100
    # tokens (100 kB at 1 MB/s) lands at 0.103 + 0.1 + 0.05; ten steps of 10 ms; + 3 ms to the client.
    assert result.ttft_s[0] == pytest.approx(0.104)
    assert result.tpot_s[0] == pytest.approx((0.253 + 0.1 + 0.003 - 0.104) / 10)


def test_prefill_batches_up_to_the_token_budget():
    trace = [TraceRequest(0.0, 60, 1) for _ in range(4)]
    one_each = simulate(SimConfig(prefill_profile=profile(prefill=(0.01, 1e-3, 0), budget=100), num_decode=0), trace)
    assert sorted(one_each.ttft_s) == pytest.approx([0.07, 0.14, 0.21, 0.28])
    # An idle instance starts on the first arrival at once (alone); the rest batch behind it.
    pairs = simulate(SimConfig(prefill_profile=profile(prefill=(0.01, 1e-3, 0), budget=130), num_decode=0), trace)
    assert sorted(pairs.ttft_s) == pytest.approx([0.07, 0.20, 0.20, 0.27])
    capped = simulate(
        SimConfig(
            prefill_profile=profile(prefill=(0.01, 1e-3, 0), budget=1000), num_decode=0, prefill_max_batch_size=3
        ),
        trace,
    )
    assert sorted(capped.ttft_s) == pytest.approx([0.07, 0.26, 0.26, 0.26])


def test_prefill_memory_holds_kv_until_decode_pulls_it():
    trace = [TraceRequest(0.001 * i, 32, 50) for i in range(6)]
    slow_decode = profile(decode=(0.02, 0, 0), max_num_seqs=1)
    roomy = simulate(
        SimConfig(prefill_profile=profile(prefill=(0.01, 0, 0), budget=32), decode_profile=slow_decode), trace
    )
    tight = simulate(
        SimConfig(prefill_profile=profile(prefill=(0.01, 0, 0), budget=32, kv_tokens=64), decode_profile=slow_decode),
        trace,
    )
    # The first is pulled at once; the next two wait in the prefill pool (full: 4 blocks) for the
    # busy decode worker, so the fourth cannot even start its prefill until one is pulled.
    assert roomy.ttft_s.max() < 0.1
    assert tight.ttft_s[:3].max() < 0.1
    assert tight.ttft_s[3] > 0.9


def test_decode_memory_limits_concurrency_and_preempts_on_demand():
    trace = [TraceRequest(0.0, 64, 64), TraceRequest(0.0, 64, 64)]
    decode = profile(decode=(0.01, 0, 0), kv_tokens=192)  # 12 blocks: one request needs 8 at its end
    reserve = simulate(SimConfig(decode_profile=decode, num_prefill=0, kv_admission="reserve"), trace)
    # The second waits for the first: its TPOT includes 63 steps of waiting.
    assert sorted(reserve.tpot_s) == pytest.approx([0.01, 0.02])
    assert reserve.preemptions.sum() == 0
    on_demand = simulate(SimConfig(decode_profile=decode, num_prefill=0, kv_admission="on_demand"), trace)
    assert on_demand.preemptions.sum() > 0  # both start, the pool runs dry, the newest steps back
    assert np.all(np.isfinite(on_demand.tpot_s))


def test_colocated_prefills_stall_decodes():
    trace = make_trace("chat", 4.0, 300, seed=0, scale=0.5)
    p = profile(prefill=(0.05, 1e-3, 0), decode=(0.02, 1e-6, 1e-4))
    disagg = simulate(SimConfig(prefill_profile=p, decode_profile=p), trace)
    coloc = simulate(SimConfig(mode="colocated", colocated_profile=p), trace)
    assert np.mean(coloc.tpot_s) > 1.2 * np.mean(disagg.tpot_s)
    assert np.all(np.isfinite(coloc.tpot_s)) and np.all(np.isfinite(coloc.ttft_s))
    one = simulate(SimConfig(mode="colocated", colocated_profile=p), [TraceRequest(0.0, 100, 5)])
    assert one.ttft_s[0] == pytest.approx(0.05 + 1e-3 * 100)
    assert one.tpot_s[0] == pytest.approx(0.02 + 1e-6 * 102.5 + 1e-4)  # mean context 101..104


def test_decode_pipeline_runs_micro_batches_in_parallel():
    trace = [TraceRequest(0.0, 10, 11), TraceRequest(0.0, 10, 11)]
    lanes = simulate(SimConfig(decode_profile=profile(decode=(0.01, 0, 0), pp=2, max_num_seqs=1), num_prefill=0), trace)
    assert lanes.tpot_s == pytest.approx([0.01, 0.01])
    single = simulate(SimConfig(decode_profile=profile(decode=(0.01, 0, 0), max_num_seqs=1), num_prefill=0), trace)
    assert sorted(single.tpot_s) == pytest.approx([0.01, 0.02])


def test_groups_keep_kv_inside_their_group():
    trace = make_trace("code", 20.0, 200, seed=1)
    p = profile(prefill=(0.005, 1e-5, 0), decode=(0.01, 0, 1e-4))
    result = simulate(SimConfig(prefill_profile=p, decode_profile=p, num_prefill=2, num_decode=4, num_groups=2), trace)
    assert set(result.prefill_instance) == {0, 1}
    assert np.all(result.decode_instance // 2 == result.prefill_instance)


def test_round_robin_and_least_loaded_dispatch():
    trace = [TraceRequest(0.01 * i, 10, 1) for i in range(6)]
    p = profile(prefill=(1.0, 0, 0))
    rr = simulate(SimConfig(prefill_profile=p, num_prefill=3, num_decode=0, dispatch_policy="round_robin"), trace)
    assert list(rr.prefill_instance) == [0, 1, 2, 0, 1, 2]
    least = simulate(SimConfig(prefill_profile=p, num_prefill=3, num_decode=0), trace)
    assert sorted(np.bincount(least.prefill_instance)) == [2, 2, 2]


def test_attainment_and_early_stop():
    trace = make_trace("chat", 50.0, 2000, seed=2)
    p = profile(prefill=(0.05, 1e-4, 0))
    slo = Slo(ttft_s=0.2)
    full = simulate(SimConfig(prefill_profile=p, num_decode=0), trace, slo)
    assert 0 <= full.attainment < 0.9 and not full.stopped_early
    assert full.attainment == pytest.approx(np.mean(full.ttft_s <= 0.2))
    early = simulate(SimConfig(prefill_profile=p, num_decode=0), trace, slo, stop_below=0.9)
    assert early.stopped_early and early.attainment < 0.9
    summary = full.summary()
    assert summary["ttft_attainment"] == full.attainment and summary["tpot_attainment"] == 1.0
    rows = full.to_json()["requests"]
    assert len(rows) == 2000 and set(rows[0]) == {
        "arrival_s",
        "prompt_tokens",
        "output_tokens",
        "ttft_s",
        "tpot_s",
        "ok",
    }


def reference_worker(trace, a, b, c, pa, pb, max_seqs, total_blocks, bs, colocated, budget=1 << 30):
    """pdserve's decode or colocated worker written step by step after services/engine/scheduler.py
    and services/decode/server.py, with a zero-time KV pull. Each engine iteration, at time t:
    requests that arrived by t enter (decode: the admission queue; colocated: the waiting queue);
    decode admits FCFS, while no preempted sequence waits, a batch slot and the context's blocks
    plus a watermark (while others hold blocks) are free, giving each the blocks of its cached
    tokens; then a prefill batch of waiting sequences runs if
    one fits (token budget, blocks plus the watermark while others run), else every running
    sequence takes a block if its context crosses one, preempting the newest to the head of the
    waiting queue while blocks are short, and advances one token."""
    cdiv = lambda x: -(-x // bs)
    watermark = max(1, total_blocks // 100)
    order = sorted(range(len(trace)), key=lambda k: trace[k].arrival_s)
    P = [r.prompt_tokens for r in trace]
    out = [r.output_tokens for r in trace]
    gen = [0 if colocated else 1 for _ in trace]
    held = [0] * len(trace)
    first, finish, preemptions = [r.arrival_s for r in trace], {}, [0] * len(trace)
    admission, waiting, running = [], [], []
    free, t, i = total_blocks, 0.0, 0
    while len(finish) < len(trace):
        while i < len(order) and trace[order[i]].arrival_s <= t:
            k = order[i]
            i += 1
            if not colocated and out[k] <= 1:
                finish[k] = trace[k].arrival_s
            else:
                (waiting if colocated else admission).append(k)
        while admission and not waiting:
            k = admission[0]
            if len(running) >= max_seqs:
                break
            if cdiv(P[k] + gen[k]) + (watermark if running else 0) > free:
                break
            admission.pop(0)
            held[k] = cdiv(P[k] + gen[k] - 1)
            free -= held[k]
            running.append(k)
        reserve = watermark if running else 0
        batch, tokens, blocks = [], 0, 0
        while waiting and len(running) + len(batch) < max_seqs:
            k = waiting[0]
            n = P[k] + gen[k]
            if (batch and tokens + n > budget) or blocks + cdiv(n) > free - reserve:
                break
            batch.append(waiting.pop(0))
            tokens, blocks = tokens + n, blocks + cdiv(n)
        if batch:
            t += pa + pb * tokens
            for k in batch:
                held[k] = cdiv(P[k] + gen[k])
                free -= held[k]
                if gen[k] == 0:
                    first[k] = t
                gen[k] += 1
                if gen[k] == out[k]:
                    finish[k] = t
                    free += held[k]
                else:
                    running.append(k)
        elif running:
            while running and sum(cdiv(P[k] + gen[k]) > held[k] for k in running) > free:
                k = running.pop()
                free += held[k]
                preemptions[k] += 1
                waiting.insert(0, k)
            for k in running:
                if cdiv(P[k] + gen[k]) > held[k]:
                    held[k] += 1
                    free -= 1
            t += a + b * sum(P[k] + gen[k] for k in running) + c * len(running)
            for k in list(running):
                gen[k] += 1
                if gen[k] == out[k]:
                    finish[k] = t
                    free += held[k]
                    running.remove(k)
        elif i < len(order):
            t = max(t, trace[order[i]].arrival_s)
    ttft = np.array([first[k] - r.arrival_s for k, r in enumerate(trace)])
    tpot = np.array(
        [(finish[k] - first[k]) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0 for k, r in enumerate(trace)]
    )
    return ttft, tpot, np.array(preemptions)


def busy_trace(seed: int, n: int, rate: float, max_prompt: int, max_output: int):
    rng = random.Random(seed)
    trace, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        trace.append(TraceRequest(t, rng.randint(5, max_prompt), rng.randint(1, max_output)))
    return trace


def test_decode_worker_under_memory_pressure_matches_a_step_by_step_reference():
    trace = busy_trace(3, 300, 8.0, 120, 90)
    a, b, c, pa, pb, bs, blocks = 0.01, 1e-5, 1e-3, 0.004, 2e-5, 16, 48
    p = profile(prefill=(pa, pb, 0), decode=(a, b, c), kv_tokens=blocks * bs, block_size=bs, max_num_seqs=12)
    result = simulate(SimConfig(decode_profile=p, num_prefill=0, num_decode=1), trace)
    _, tpot, preemptions = reference_worker(trace, a, b, c, pa, pb, 12, blocks, bs, colocated=False)
    assert preemptions.sum() > 10  # the pool is tight enough to preempt (and recompute)
    np.testing.assert_array_equal(result.preemptions, preemptions)
    np.testing.assert_allclose(result.tpot_s, tpot, rtol=1e-9, atol=1e-12)


def test_colocated_worker_matches_a_step_by_step_reference():
    trace = busy_trace(4, 300, 6.0, 200, 60)
    a, b, c, pa, pb, bs, blocks = 0.01, 1e-5, 1e-3, 0.004, 1e-4, 16, 64
    p = profile(
        prefill=(pa, pb, 0), decode=(a, b, c), kv_tokens=blocks * bs, block_size=bs, max_num_seqs=10, budget=400
    )
    result = simulate(SimConfig(mode="colocated", colocated_profile=p), trace)
    ttft, tpot, preemptions = reference_worker(trace, a, b, c, pa, pb, 10, blocks, bs, colocated=True, budget=400)
    assert preemptions.sum() > 5
    np.testing.assert_array_equal(result.preemptions, preemptions)
    np.testing.assert_allclose(result.ttft_s, ttft, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(result.tpot_s, tpot, rtol=1e-9, atol=1e-12)


def chunked_worker(trace, p: LatencyProfile):
    """The colocated worker with --chunked-prefill, step by step: pdserve's own scheduler
    (BatchScheduler on a BlockManager, services/engine) with each step lasting what an emulated
    engine takes for it (services/engine/emulated.py), and the requests that arrived by a step's
    start in the waiting queue."""
    blocks = BlockManager(p.kv_capacity_blocks, p.block_size)
    scheduler = BatchScheduler(blocks, p.max_num_seqs, p.max_batched_tokens, chunked_prefill=True)
    seqs = [
        Sequence.from_prompt(str(k), [5] * r.prompt_tokens, SamplingParams(max_tokens=r.output_tokens, ignore_eos=True))
        for k, r in enumerate(trace)
    ]
    index = {s.seq_id: k for k, s in enumerate(seqs)}
    order = sorted(range(len(trace)), key=lambda k: trace[k].arrival_s)
    first, finish, preemptions = {}, {}, np.zeros(len(trace), dtype=int)
    t, i = 0.0, 0
    while len(finish) < len(trace):
        while i < len(order) and trace[order[i]].arrival_s <= t:
            scheduler.add_prompt(seqs[order[i]])
            i += 1
        running = list(scheduler.running)
        plan = scheduler.schedule()
        for seq in running:
            preemptions[index[seq.seq_id]] += seq not in scheduler.running
        if plan is None:
            t = trace[order[i]].arrival_s
            continue
        num_tokens = plan.num_tokens or [1] * len(plan.seqs)
        if plan.kind is StepKind.DECODE:
            t += p.decode.step_time(len(plan.seqs), sum(len(s) for s in plan.seqs))
        else:
            one = [s.num_cached + 1 for s, n in zip(plan.seqs, num_tokens) if n == 1 and s.num_cached > 0]
            chunks = [(s.num_cached, n) for s, n in zip(plan.seqs, num_tokens) if not (n == 1 and s.num_cached > 0)]
            t += p.mixed_step_time(chunks, one)
        for seq, n in zip(plan.seqs, num_tokens):
            seq.num_cached += n
            if seq.num_cached == len(seq):
                seq.token_ids.append(7)
                first.setdefault(index[seq.seq_id], t)
                if seq.num_output_tokens >= seq.sampling.max_tokens:
                    seq.finish_reason = FinishReason.LENGTH
                    finish[index[seq.seq_id]] = t
        scheduler.finish_step(plan)
    assert blocks.num_free == blocks.num_blocks
    ttft = np.array([first[k] - r.arrival_s for k, r in enumerate(trace)])
    tpot = np.array(
        [(finish[k] - first[k]) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0 for k, r in enumerate(trace)]
    )
    return ttft, tpot, preemptions


def test_colocated_worker_with_chunked_prefill_matches_pdserves_scheduler_step_by_step():
    trace = busy_trace(5, 300, 6.0, 300, 60)
    p = profile(
        prefill=(0.004, 1e-4, 1e-7),
        decode=(0.01, 1e-5, 1e-3),
        kv_tokens=64 * 16,
        block_size=16,
        max_num_seqs=10,
        budget=64,
    )
    result = simulate(SimConfig(mode="colocated", colocated_profile=p, chunked_prefill=True), trace)
    ttft, tpot, preemptions = chunked_worker(trace, p)
    assert preemptions.sum() > 5  # the pool is tight enough to preempt, prompts part-way included
    np.testing.assert_array_equal(result.preemptions, preemptions)
    np.testing.assert_allclose(result.ttft_s, ttft, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(result.tpot_s, tpot, rtol=1e-9, atol=1e-12)
