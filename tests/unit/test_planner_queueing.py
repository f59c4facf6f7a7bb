"""The simulator's prefill queue against the closed forms of CONTEXT.md (DistServe section 3).

One prefill instance, deterministic service time D, Poisson arrivals at rate R, one request per
batch. The closed forms are exact for these idealised queues (docs/planner.md derives them):
  - one GPU, M/D/1:            D + R D^2 / (2 (1 - R D))
  - 2-way inter-op (pipeline): D + R D^2 / (4 (2 - R D))   = an M/D/1 queue of service D/2 at stage 1
                                                            plus D/2 in stage 2, which never blocks
  - 2-way intra-op, speedup K: D/K + R D^2 / (2 K (K - R D)) = M/D/1 with service D/K
The mean of a queue's waiting time converges slowly near saturation (at R D = 0.8 the relative
standard error with n requests is about 5.3 / sqrt(n)), so the request counts are chosen for a
standard error of 0.5% or less: 2% is then at least four standard errors.
"""

import numpy as np
import pytest

from services.common.latency_profile import DecodeLatency, LatencyProfile, PrefillLatency
from services.planner.simulator import SimConfig, simulate
from services.planner.workload import TraceRequest, poisson_arrivals

D = 0.1  # seconds
K = 1.5  # intra-op speedup


def mean_ttft(service_s: float, pipeline: int, rate: float, n: int, seed: int) -> float:
    profile = LatencyProfile(
        PrefillLatency(service_s, 0.0, 0.0),
        DecodeLatency(0.0, 0.0, 0.0),
        kv_bytes_per_token=1,
        kv_capacity_tokens=1 << 40,
        pipeline_parallel=pipeline,
        max_batched_tokens=1 << 30,
    )
    trace = [TraceRequest(t, 1, 1) for t in poisson_arrivals(rate, n, seed)]
    config = SimConfig(prefill_profile=profile, num_prefill=1, num_decode=0, prefill_max_batch_size=1)
    return float(np.mean(simulate(config, trace).ttft_s))


# (R*D, requests): more requests where the queue is slower to average out.
LOADS = [(0.2, 100_000), (0.5, 300_000), (0.8, 1_000_000)]


@pytest.mark.parametrize("load,n", LOADS)
def test_single_gpu_matches_md1(load, n):
    rate = load / D
    expected = D + rate * D**2 / (2 * (1 - rate * D))
    assert mean_ttft(D, 1, rate, n, seed=1) == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("load", [0.2, 0.5, 0.8])
def test_two_way_inter_op_matches_closed_form(load):
    # Stage 1 runs at utilisation R*D/2 <= 0.4, which averages out quickly.
    rate = load / D
    expected = D + rate * D**2 / (4 * (2 - rate * D))
    assert mean_ttft(D, 2, rate, 100_000, seed=2) == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("load,n", [(0.2, 100_000), (0.5, 100_000), (0.8, 300_000)])
def test_two_way_intra_op_matches_closed_form(load, n):
    rate = load / D
    expected = D / K + rate * D**2 / (2 * K * (K - rate * D))
    assert mean_ttft(D / K, 1, rate, n, seed=3) == pytest.approx(expected, rel=0.02)


def test_pipeline_beats_tensor_parallel_only_at_high_load():
    """CONTEXT.md: at low rate execution time dominates and intra-op wins; at high rate queueing
    dominates and inter-op wins."""
    low, high = 0.1 / D, 1.3 / D
    assert mean_ttft(D / K, 1, low, 20_000, 4) < mean_ttft(D, 2, low, 20_000, 4)
    assert mean_ttft(D, 2, high, 50_000, 5) < mean_ttft(D / K, 1, high, 50_000, 5)


def test_single_queue_is_exactly_lindleys_recursion():
    """No approximation in the simulator itself: with one-request batches, each TTFT is the
    waiting time of Lindley's recursion W_n = max(0, W_{n-1} + D - (A_n - A_{n-1})) plus D."""
    arrivals = poisson_arrivals(0.8 / D, 20_000, 9)
    profile = LatencyProfile(
        PrefillLatency(D, 0.0, 0.0),
        DecodeLatency(0.0, 0.0, 0.0),
        kv_bytes_per_token=1,
        kv_capacity_tokens=1 << 40,
        max_batched_tokens=1 << 30,
    )
    config = SimConfig(prefill_profile=profile, num_prefill=1, num_decode=0, prefill_max_batch_size=1)
    ttft = simulate(config, [TraceRequest(t, 1, 1) for t in arrivals]).ttft_s
    free, expected = 0.0, []
    for t in arrivals:
        free = max(t, free) + D
        expected.append(free - t)
    np.testing.assert_allclose(ttft, expected, rtol=1e-12, atol=1e-12)
