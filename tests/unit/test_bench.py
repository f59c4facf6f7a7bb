"""The benchmark's arithmetic on synthetic latencies with known answers: attainment, percentiles,
and the goodput search (the same bisection the planner uses), without running a cluster."""

import json
import math
import os
import random

import pytest

from bench.distserve_puzzle import CASES, CONTEXT, PromptScaledSearch
from bench.loadgen import RequestResult, attainment, percentile, summarize
from bench.overhead import METRICS, bucket_quantile
from bench.overhead import summarize as summarize_overhead
from bench.serving import goodput, steady_state_limit
from services.planner.hardware import ClusterSpec, GiB, get_gpu, get_model_shape
from services.planner.search import SearchSpec
from services.planner.workload import make_trace, read_trace, rescale_rate, write_trace


def _result(ttft: float, tpot: float, tokens: int = 10, error: str = "") -> RequestResult:
    return RequestResult("r", 10, tokens, tokens=0 if error else tokens, ttft=ttft, tpot=tpot, error=error)


def test_attainment_needs_both_slos_and_counts_failures_as_misses():
    results = [
        _result(0.1, 0.01),  # meets both
        _result(0.3, 0.01),  # TTFT miss
        _result(0.1, 0.20),  # TPOT miss
        _result(0.25, 0.1),  # exactly at both SLOs: met (<=)
        _result(0.0, 0.0, error="UNAVAILABLE: gone"),  # failed request: a miss
    ]
    assert attainment(results, ttft_slo=0.25, tpot_slo=0.1) == pytest.approx(2 / 5)
    s = summarize(results, 0.25, 0.1)
    assert (
        s["errors"] == 1
        and s["ttft_attainment"] == pytest.approx(3 / 5)
        and s["tpot_attainment"] == pytest.approx(3 / 5)
    )


def test_percentile_interpolates_and_ignores_nan():
    assert percentile([1, 2, 3, 4, 5], 0.5) == 3
    assert percentile([1, 2, 3, 4], 0.5) == pytest.approx(2.5)
    assert percentile([float("nan"), 10.0], 0.99) == 10.0
    assert math.isnan(percentile([], 0.5))


class SyntheticRunner:
    """Stands in for a cluster: at rate r every request's TTFT grows past the SLO once r exceeds a
    known capacity, like a queue that saturates; records which rates were probed."""

    def __init__(self, capacity: float, n: int = 200, seed: int = 0):
        self.capacity, self.n, self.rng, self.probed = capacity, n, random.Random(seed), []

    def run(self, rate: float):
        self.probed.append(rate)
        if rate <= self.capacity:
            return [_result(0.05, 0.01) for _ in range(self.n)]
        miss = min(1.0, 0.2 + (rate - self.capacity))  # above capacity at least 20% miss
        return [_result(0.5 if i < miss * self.n else 0.05, 0.01) for i in range(self.n)]


@pytest.mark.parametrize("capacity, swept", [(3.3, [1, 2, 4, 8]), (0.7, [1, 2, 4]), (20.0, [1, 2, 4])])
def test_goodput_search_finds_the_known_capacity(capacity, swept):
    runner = SyntheticRunner(capacity)
    found, capped = goodput(runner, swept, ttft_slo=0.25, tpot_slo=0.1, target=0.9, rel_tol=0.02)
    assert not capped
    assert found <= capacity  # never reports a rate that misses the target
    assert found == pytest.approx(capacity, rel=0.03)


def test_goodput_is_zero_when_nothing_meets_the_target():
    class Hopeless(SyntheticRunner):
        def run(self, rate):
            return [_result(1.0, 0.01)] * 10

    assert goodput(Hopeless(0), [1, 2], 0.25, 0.1, 0.9, 0.05) == (0.0, False)


def test_goodput_past_what_the_trace_can_probe_is_reported_as_a_lower_bound():
    runner = SyntheticRunner(capacity=50.0)
    found, capped = goodput(runner, [1, 2, 4], 0.25, 0.1, 0.9, 0.02, max_rate=6.0)
    assert capped and found == 6.0 and max(runner.probed) <= 6.0
    assert steady_state_limit(n=40, unloaded_e2e=2.0) == 5.0  # arrivals span 4 request lifetimes


def test_traces_are_reproducible_and_rescale_keeps_the_requests(tmp_path):
    a, b = make_trace("chat", 2.0, 50, seed=7), make_trace("chat", 2.0, 50, seed=7)
    assert a == b and make_trace("chat", 2.0, 50, seed=8) != a
    fast = rescale_rate(a, 8.0, from_rate=2.0)
    assert [r.prompt_tokens for r in fast] == [r.prompt_tokens for r in a]
    assert fast[-1].arrival_s == pytest.approx(a[-1].arrival_s / 4)
    write_trace(str(tmp_path / "t.jsonl"), a)
    assert read_trace(str(tmp_path / "t.jsonl")) == a


def test_puzzle_scales_prompts_within_opts_window_and_keeps_the_rest():
    spec = SearchSpec(
        model=get_model_shape("opt-13b", 2),
        cluster=ClusterSpec(1, 8, get_gpu("A100-80G"), None, 0.9, 4 * GiB),
        slo=CASES["opt-13b"][0],
        workers=1,
    )
    plain = PromptScaledSearch(spec, 1.0).base_trace(500)
    longer = PromptScaledSearch(spec, 4.0).base_trace(500)
    assert plain == make_trace("chat", 1.0, 500, 0, max_model_len=spec.model.max_model_len)
    assert [r.output_tokens for r in longer] == [r.output_tokens for r in plain]
    assert [r.arrival_s for r in longer] == [r.arrival_s for r in plain]
    assert all(r.prompt_tokens + r.output_tokens < CONTEXT for r in longer)
    scaled = [(a, b) for a, b in zip(plain, longer) if 4 * a.prompt_tokens + a.output_tokens < CONTEXT]
    assert len(scaled) > 250 and all(b.prompt_tokens == 4 * a.prompt_tokens for a, b in scaled)


def test_overhead_ratios_are_medians_of_paired_rounds():
    """bench.overhead pairs each round's base and head trials: the ratio is the median of the
    per-round ratios, not a ratio of medians; a metric the base lacks (0) gives nan, not a crash."""

    def trial(router: float, engine_thread: float = 0.0) -> dict:
        values = dict.fromkeys(METRICS, 1.0)
        values.update(router_us_per_token=router, decode_engine_thread_us_per_token=engine_thread)
        return values

    trials = {"base": [trial(100), trial(200), trial(100)], "head": [trial(50), trial(40), trial(90, 5.0)]}
    out = summarize_overhead(trials, ["base", "head"])
    assert out["base"]["router_us_per_token"] == 100 and out["head"]["router_us_per_token"] == 50
    assert out["head_over_base"]["router_us_per_token"] == 0.5  # of 0.5, 0.2 and 0.9
    assert math.isnan(out["head_over_base"]["decode_engine_thread_us_per_token"])


def test_the_routers_delay_quantiles_come_from_the_buckets_increase_as_histogram_quantile_reads_them():
    """bench.overhead reads the router's delay per token from its histogram's buckets, scraped
    before and after a trial: only what the trial added counts, linear within a bucket."""
    before = {0.001: 10.0, 0.002: 10.0, 0.005: 10.0, math.inf: 10.0}
    after = {0.001: 10.0, 0.002: 60.0, 0.005: 100.0, math.inf: 100.0}  # the trial: 50 in (1, 2] ms, 40 in (2, 5]
    assert bucket_quantile(before, after, 0.5) == pytest.approx(0.001 + 0.001 * 45 / 50)
    assert bucket_quantile(before, after, 0.99) == pytest.approx(0.002 + 0.003 * (89.1 - 50) / 40)
    assert bucket_quantile({}, {0.001: 0.0, math.inf: 5.0}, 0.99) == 0.001  # past the last bound: that bound
    assert math.isnan(bucket_quantile(after, after, 0.99))  # nothing counted during the trial
    assert math.isnan(bucket_quantile({}, {}, 0.5))  # a checkout without the metric


def test_serving_tpot_counts_each_streams_tokens_within_the_full_batch_window():
    """bench.serving_tpot times a stream over the window when every stream was decoding: its first
    decoded token is its second (the prefill worker's is the first), and a message may carry several."""
    from bench.serving_tpot import second_token_arrival, window_tpot

    stream = [(10.0, 1), (10.5, 1), (11.0, 1), (11.1, 2), (11.2, 1), (12.0, 1)]
    assert second_token_arrival(stream) == 10.5
    assert second_token_arrival([(1.0, 3)]) == 1.0  # first and second in one message
    with pytest.raises(ValueError):
        second_token_arrival([(1.0, 1)])
    # inside [10.5, 11.2]: 10.5, 11.0, 11.1 (2 tokens), 11.2: 4 tokens after the first in 0.7 s
    assert window_tpot(stream, 10.5, 11.2) == pytest.approx(0.7 / 4)
    assert math.isnan(window_tpot(stream, 10.6, 10.9))  # no message, or one: no TPOT


def test_serving_tpot_saves_a_full_size_spec_once_in_the_dtype_it_runs(tmp_path, monkeypatch):
    """Workers load checkpoint folders, so bench.serving_tpot saves an in-memory-only spec (the
    Llama-3-8B shape on a GPU) with random weights: here the tiny Llama's spec stands in for it."""
    import bench.serving_tpot as serving_tpot
    from services.engine.config import ModelConfig
    from services.tiny_models import hf_config

    monkeypatch.setattr(serving_tpot, "IN_MEMORY_ONLY", ("llama",))
    monkeypatch.setattr(serving_tpot, "cache_dir", lambda: str(tmp_path))
    folder = serving_tpot.checkpoint_folder("llama", "bfloat16", "cpu")
    assert folder.startswith(str(tmp_path)) and folder.endswith("-bfloat16")
    config = json.loads(open(os.path.join(folder, "config.json")).read())
    assert config["dtype"] == "bfloat16" and config["hidden_size"] == hf_config("llama").hidden_size
    assert ModelConfig.from_pretrained(folder).vocab_size == hf_config("llama").vocab_size
    assert os.path.exists(os.path.join(folder, "tokenizer.json"))
    mtime = os.path.getmtime(os.path.join(folder, "config.json"))
    assert serving_tpot.checkpoint_folder("llama", "bfloat16", "cpu") == folder  # found, not saved again
    assert os.path.getmtime(os.path.join(folder, "config.json")) == mtime
    assert [p for p in os.listdir(os.path.dirname(folder)) if p.startswith(".")] == []  # no temporary left


def test_serving_tpot_takes_the_decode_workers_steps_at_the_full_batch_within_the_window():
    """bench.serving_tpot's window, from synthetic streams and step-log records: the streams decode
    together from t=1.0 (the last one's second token) to t=2.0 (the first one's last); the worker's
    engine call and step-to-step time come from the steps at the full batch inside it, and the
    prefill steps say how the streams' prompts were batched (the pacer's, of another length, not)."""
    from bench.serving_tpot import full_batch_window

    def stream(first: float, last: float, step: float) -> list[tuple[float, int]]:
        times = [first + i * step for i in range(round((last - first) / step) + 1)]
        return [(t, 1) for t in times]

    streams = [stream(0.5, 2.5, 0.1), stream(0.9, 2.0, 0.1)]  # second tokens at 0.6 and 1.0
    steps = [{"kind": "prefill", "lengths": [4000], "seconds": 0.3, "t": 0.0}]
    steps += [
        {"kind": "prefill", "lengths": [16], "seconds": 0.1, "t": 0.3},
        {"kind": "prefill", "lengths": [16], "seconds": 0.1, "t": 0.7},
    ]
    steps += [{"kind": "decode", "batch": 1, "seconds": 0.01, "t": 0.45 + 0.1 * i} for i in range(5)]
    steps += [{"kind": "decode", "batch": 2, "seconds": 0.09, "t": 0.95 + 0.1 * i} for i in range(11)]
    steps += [{"kind": "decode", "batch": 1, "seconds": 0.01, "t": 2.05 + 0.1 * i} for i in range(4)]
    out = full_batch_window(streams, steps, prompt_tokens=16)
    assert out["tpot_s"] == pytest.approx(0.1)
    assert out["window_steps"] == 10 and out["full_batch_steps"] == 10  # 1.05 .. 1.95
    assert out["worker_step_s"] == pytest.approx(0.09) and out["worker_period_s"] == pytest.approx(0.1)
    assert out["stream_prefill_batches"] == [1, 1]
    with pytest.raises(RuntimeError, match="full batch of 2"):  # the streams never decoded together long enough
        full_batch_window([stream(0.5, 1.0, 0.1), stream(0.9, 1.5, 0.1)], steps, prompt_tokens=16)
