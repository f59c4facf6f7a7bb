import numpy as np
import pytest

from services.planner.workload import (
    WORKLOADS,
    TraceRequest,
    gamma_arrivals,
    make_trace,
    poisson_arrivals,
    read_trace,
    rescale_rate,
    write_trace,
)


def test_round_trip(tmp_path):
    requests = [TraceRequest(0.5, 10, 3), TraceRequest(0.1, 7, 1, prompt="hi there", request_id="a")]
    path = tmp_path / "trace.jsonl"
    write_trace(str(path), requests)
    lines = path.read_text().splitlines()
    assert lines[0] == '{"arrival_s": 0.5, "prompt_tokens": 10, "output_tokens": 3}'
    back = read_trace(str(path))
    assert [r.arrival_s for r in back] == [0.1, 0.5]  # sorted by arrival
    assert back[0].prompt == "hi there" and back[0].request_id == "a"


def test_missing_field_is_reported(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"arrival_s": 1.0, "prompt_tokens": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        read_trace(str(path))


def test_deterministic_for_a_seed():
    a = make_trace("chat", 2.0, 200, seed=7)
    b = make_trace("chat", 2.0, 200, seed=7)
    c = make_trace("chat", 2.0, 200, seed=8)
    assert a == b
    assert a != c


def test_rates_share_requests_and_prefixes_are_stable():
    slow, fast = make_trace("code", 1.0, 300, seed=1), make_trace("code", 4.0, 300, seed=1)
    assert [(r.prompt_tokens, r.output_tokens) for r in slow] == [(r.prompt_tokens, r.output_tokens) for r in fast]
    assert fast[-1].arrival_s == pytest.approx(slow[-1].arrival_s / 4)
    assert make_trace("code", 1.0, 100, seed=1) == slow[:100]
    again = rescale_rate(slow, 4.0, from_rate=1.0)
    assert [r.arrival_s for r in again] == pytest.approx([r.arrival_s for r in fast])


def test_poisson_and_gamma_rates_and_burstiness():
    rate, n = 5.0, 50_000
    for arrivals, cv in (
        (poisson_arrivals(rate, n, 0), 1.0),
        (gamma_arrivals(rate, 3.0, n, 0), 3.0),
        (gamma_arrivals(rate, 0.5, n, 0), 0.5),
    ):
        gaps = np.diff([0.0] + arrivals)
        assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
        assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_length_distributions_and_scale(workload):
    spec = WORKLOADS[workload]
    full = make_trace(workload, 1.0, 4000, seed=3)
    prompts = np.array([r.prompt_tokens for r in full])
    outputs = np.array([r.output_tokens for r in full])
    assert prompts.min() >= spec.prompt.min_tokens and prompts.max() <= spec.prompt.max_tokens
    assert outputs.min() >= spec.output.min_tokens and outputs.max() <= spec.output.max_tokens
    # Clipping moves the mean a little; within 20% of the documented one.
    assert prompts.mean() == pytest.approx(spec.prompt.mean, rel=0.2)
    assert outputs.mean() == pytest.approx(spec.output.mean, rel=0.2)
    small = make_trace(workload, 1.0, 4000, seed=3, scale=0.1)
    assert np.mean([r.prompt_tokens for r in small]) == pytest.approx(prompts.mean() * 0.1, rel=0.2)
    assert min(r.output_tokens for r in small) >= 1


def test_max_model_len_trims():
    trace = make_trace("summarization", 1.0, 500, seed=0, max_model_len=1024)
    assert all(r.prompt_tokens + r.output_tokens <= 1024 and r.output_tokens >= 1 for r in trace)
