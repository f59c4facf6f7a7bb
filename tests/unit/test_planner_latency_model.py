import json
import os
import random

import numpy as np
import pytest

from services.common.latency_profile import DecodeLatency, LatencyProfile, PrefillLatency
from services.planner import cli as planner_cli
from services.planner.analytic import (
    Parallelism,
    analytic_profile,
    decode_step_seconds,
    kv_capacity_tokens,
    prefill_pass_seconds,
)
from services.planner.hardware import ClusterSpec, get_gpu, get_model_shape, shape_from_hf_config
from services.planner.latency_model import critical_batch_tokens, fit_decode, fit_prefill, nonneg_lstsq

TRUE_PREFILL = PrefillLatency(a=0.012, b=1.7e-4, c=2.5e-8)
TRUE_DECODE = DecodeLatency(a=0.016, b=4e-7, c=9e-5)


def prefill_samples(noise: float, seed: int = 0):
    rng = random.Random(seed)
    samples = []
    for _ in range(60):
        # Log-uniform lengths, like a profile grid: short prompts pin down a, long ones c.
        lengths = [int(2 ** rng.uniform(3, 11)) for _ in range(rng.randint(1, 8))]
        samples.append((lengths, TRUE_PREFILL.time(lengths) * (1 + rng.gauss(0, noise))))
    return samples


def decode_samples(noise: float, seed: int = 0):
    rng = random.Random(seed)
    samples = []
    for _ in range(60):
        batch = int(2 ** rng.uniform(0, 8))
        ctx = batch * int(2 ** rng.uniform(4, 11))
        samples.append((batch, ctx, TRUE_DECODE.step_time(batch, ctx) * (1 + rng.gauss(0, noise))))
    return samples


def test_fit_recovers_exact_coefficients():
    prefill, quality = fit_prefill(prefill_samples(0.0))
    assert (prefill.a, prefill.b, prefill.c) == pytest.approx(
        (TRUE_PREFILL.a, TRUE_PREFILL.b, TRUE_PREFILL.c), rel=1e-6
    )
    assert quality["r2"] == pytest.approx(1.0)
    decode, _ = fit_decode(decode_samples(0.0))
    assert (decode.a, decode.b, decode.c) == pytest.approx((TRUE_DECODE.a, TRUE_DECODE.b, TRUE_DECODE.c), rel=1e-6)


def test_fit_recovers_coefficients_under_noise():
    prefill, _ = fit_prefill(prefill_samples(0.02, seed=1))
    assert prefill.a == pytest.approx(TRUE_PREFILL.a, rel=0.15)
    assert prefill.b == pytest.approx(TRUE_PREFILL.b, rel=0.05)
    assert prefill.c == pytest.approx(TRUE_PREFILL.c, rel=0.15)
    decode, quality = fit_decode(decode_samples(0.02, seed=1))
    assert decode.a == pytest.approx(TRUE_DECODE.a, rel=0.05)
    assert decode.b == pytest.approx(TRUE_DECODE.b, rel=0.05)
    assert decode.c == pytest.approx(TRUE_DECODE.c, rel=0.1)
    assert quality["mean_abs_rel_error"] < 0.03


def test_nonnegative_least_squares_drops_a_negative_term():
    x = np.array([[1.0, n, n * n] for n in (1, 2, 3, 4, 5)])
    y = 2.0 + 3.0 * x[:, 1] - 0.01 * x[:, 2]  # a slightly concave curve: unconstrained c < 0
    coef = nonneg_lstsq(x, y)
    assert np.all(coef >= 0) and coef[2] == 0.0


def test_critical_batch_tokens():
    # a = 10 ms, b = 0.1 ms/token: batching amortises a to 10% of b at 1000 tokens.
    assert critical_batch_tokens(PrefillLatency(0.01, 1e-4, 0.0), typical_len=256) == 1024
    assert critical_batch_tokens(PrefillLatency(0.0, 1e-4, 0.0), typical_len=256) == 256


def test_profile_json_round_trip(tmp_path):
    profile = LatencyProfile(TRUE_PREFILL, TRUE_DECODE, kv_bytes_per_token=819200, kv_capacity_tokens=57780)
    profile.transfer.bytes_per_s = 25e9
    path = tmp_path / "p.json"
    profile.save(str(path))
    data = json.loads(path.read_text())
    assert data["schema"] == "pdserve.profile/v1" and data["prefill"]["b"] == TRUE_PREFILL.b
    back = LatencyProfile.load(str(path))
    assert back == profile


def test_model_shapes():
    opt = get_model_shape("13b")
    assert opt.name == "opt-13b" and 12.5e9 < opt.num_params() < 13.2e9
    llama = get_model_shape("llama-2-13b")
    assert 12.8e9 < llama.num_params() < 13.2e9
    assert llama.kv_bytes_per_token == 2 * 40 * 5120 * 2
    assert 7.9e9 < get_model_shape("llama-3-8b").num_params() < 8.1e9
    assert 170e9 < get_model_shape("175b").num_params() < 180e9
    cfg = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 1024,
    }
    tiny = shape_from_hf_config(cfg)
    assert tiny.head_dim == 16 and tiny.num_kv_heads == 2
    with pytest.raises(ValueError):
        get_model_shape("no-such-model")


def test_model_shape_from_checkpoint_folder(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "qwen2",
                "hidden_size": 128,
                "num_hidden_layers": 3,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "intermediate_size": 256,
                "vocab_size": 1000,
                "tie_word_embeddings": True,
                "max_position_embeddings": 2048,
            }
        )
    )
    shape = get_model_shape(str(tmp_path))
    assert (shape.num_layers, shape.num_kv_heads, shape.max_model_len) == (3, 2, 2048)


A100 = ClusterSpec(4, 8, get_gpu("A100-80G"))
OPT13B = get_model_shape("13b")


def test_analytic_tensor_parallel_helps_with_diminishing_returns():
    lengths = [512]
    t1 = prefill_pass_seconds(lengths, OPT13B, A100.gpu, Parallelism(1, 1))
    t2 = prefill_pass_seconds(lengths, OPT13B, A100.gpu, Parallelism(2, 1))
    t8 = prefill_pass_seconds(lengths, OPT13B, A100.gpu, Parallelism(8, 1))
    assert 1.0 < t1 / t2 < 2.0  # all-reduces and fixed costs: the speedup K of CONTEXT.md is below 2
    assert t1 / t8 < 8.0 * 0.8
    # 13B on one A100: ~60-120 ms for a 512-token prefill, ~15-25 ms for a small decode step.
    assert 0.05 < t1 < 0.15
    assert 0.012 < decode_step_seconds(1, 512, OPT13B, A100.gpu, Parallelism(1, 1)) < 0.03


def test_analytic_pipeline_keeps_latency_and_adds_hops():
    single = prefill_pass_seconds([512], OPT13B, A100.gpu, Parallelism(1, 1))
    intra = prefill_pass_seconds([512], OPT13B, A100.gpu, Parallelism(1, 4, inter_node_hops=0))
    inter = prefill_pass_seconds([512], OPT13B, A100.gpu, Parallelism(1, 4, inter_node_hops=3))
    assert single < intra < inter < single * 1.2


def test_analytic_profile_fits_its_own_roofline():
    profile = analytic_profile(OPT13B, A100, 2, 1)
    assert profile.source == "analytic" and profile.tensor_parallel == 2
    assert profile.fit["prefill"]["mean_abs_rel_error"] < 0.1
    assert profile.fit["decode"]["mean_abs_rel_error"] < 0.1
    exact = decode_step_seconds(32, 32 * 600, OPT13B, A100.gpu, Parallelism(2, 1))
    assert profile.decode.step_time(32, 32 * 600) == pytest.approx(exact, rel=0.1)
    assert profile.kv_capacity_tokens == kv_capacity_tokens(OPT13B, A100, 2, 1)
    assert 128 <= profile.max_batched_tokens <= 8192


def test_memory_capacity():
    # 26 GB of weights: one A100-80G holds them with room for ~57k tokens of KV (800 KB/token).
    one = kv_capacity_tokens(OPT13B, A100, 1, 1)
    assert 40_000 < one < 70_000
    assert kv_capacity_tokens(OPT13B, A100, 2, 1) > 2 * one  # the weights split too
    assert kv_capacity_tokens(get_model_shape("175b"), A100, 1, 1) == 0  # 350 GB do not fit one GPU


def test_step_log_refit_recovers_the_decode_model_clients_see(tmp_path):
    """A worker's step log (services/runtime/step_log.py) as a decode worker writes it: steps of a
    running batch, each followed by the worker's own work before the next (here 0.4 ms per
    sequence of streaming), sequences joining and leaving, and idle gaps when the batch empties.
    The refit recovers the cost a client sees: engine step plus streaming, per step."""
    from services.planner.profile import refit_from_step_logs, step_log_samples
    from services.runtime.step_log import StepLog

    streaming_per_seq = 4e-4
    seen = DecodeLatency(TRUE_DECODE.a, TRUE_DECODE.b, TRUE_DECODE.c + streaming_per_seq)
    rng = random.Random(3)
    path = tmp_path / "decode.jsonl"
    log = StepLog(str(path))
    t = 100.0
    log.write({"t": t, "kind": "prefill", "lengths": [40], "running_after": 1, "seconds": 0.01})  # a recompute
    t += 0.01
    for _ in range(60):  # busy periods of a batch with its own sizes and contexts
        contexts = [rng.randint(16, 1500) for _ in range(rng.randint(1, 48))]
        steps = rng.randint(5, 40)
        for step in range(steps):
            batch, context = len(contexts), sum(contexts)
            engine = TRUE_DECODE.step_time(batch, context) * (1 + rng.gauss(0, 0.02))
            contexts = [c + 1 for c in contexts]
            last = step == steps - 1 or rng.random() < 0.05
            log.write(
                {
                    "t": t,
                    "kind": "decode",
                    "batch": batch,
                    "context_tokens": context,
                    "max_context": max(contexts),
                    "running_after": 0 if last else batch,
                    "seconds": engine,
                }
            )
            t += engine + streaming_per_seq * batch
            if last:
                break
        t += rng.uniform(0.5, 3.0)  # idle: never counted as a step
    log.close()
    _, decode = step_log_samples([json.loads(line) for line in path.read_text().splitlines()])
    assert len(decode) > 30
    profile = LatencyProfile(
        prefill=TRUE_PREFILL,
        decode=DecodeLatency(1, 1, 1),
        kv_bytes_per_token=1,
        kv_capacity_tokens=1 << 20,
        block_size=16,
        max_batched_tokens=2048,
        max_num_seqs=256,
    )
    refit = refit_from_step_logs(profile, [str(path)])
    for batch, context in ((1, 100), (8, 4000), (32, 20000), (48, 60000)):
        assert refit.decode.step_time(batch, context) == pytest.approx(seen.step_time(batch, context), rel=0.05)
    assert refit.prefill == TRUE_PREFILL  # one prefill batch is not enough to refit prefill
    assert refit.notes["step_log_samples"]["decode"] == len(decode)
    # only the steps inside a window count
    with pytest.raises(ValueError, match="no usable steps"):
        refit_from_step_logs(profile, [str(path)], since=t + 1)


PROFILES_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "profiles")


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(PROFILES_DIR) if f.endswith(".json")))
def test_each_profile_in_the_repo_loads_says_its_source_and_is_listed(name, tmp_path):
    """The profiles emulated clusters run on: each loads, says where its numbers come from, is in
    profiles/README.md, and an analytic one is what the planner derives today (regenerated)."""
    path = os.path.join(PROFILES_DIR, name)
    profile = LatencyProfile.load(path)
    assert profile.source in ("measured", "analytic")
    with open(os.path.join(PROFILES_DIR, "README.md")) as f:
        assert f"`{name}`" in f.read()
    if profile.source == "analytic":
        again = tmp_path / name
        argv = ["profile", "--analytic", "--model", profile.model, "--gpu", profile.device, "--out", str(again)]
        argv += ["--tp", str(profile.tensor_parallel), "--pp", str(profile.pipeline_parallel)]
        argv += ["--max-num-seqs", str(profile.max_num_seqs)]
        assert planner_cli.main(argv) == 0
        with open(path) as f, open(again) as g:
            stored, derived = _flat(json.load(f)), _flat(json.load(g))
        assert stored.keys() == derived.keys()
        for key, value in derived.items():  # (least squares' last digits vary with the BLAS)
            assert stored[key] == (pytest.approx(value, rel=1e-9, abs=0) if isinstance(value, float) else value), key


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    if isinstance(tree, list):
        return {k: v for i, value in enumerate(tree) for k, v in _flat(value, f"{prefix}{i}.").items()}
    return {prefix: tree}
