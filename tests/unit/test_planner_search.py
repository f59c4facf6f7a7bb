import contextlib
import io
import json
import math
import time

import pytest
import yaml

from services.planner.analytic import kv_capacity_tokens
from services.planner.goodput import max_rate_meeting
from services.planner.hardware import ClusterSpec, get_gpu, get_model_shape
from services.planner.plan_output import helm_problems, helm_values, write_plan
from services.planner.search import SearchSpec, candidate_degrees, parallel_config_problems, search
from services.planner.simulator import Slo

A100_CLUSTER = ClusterSpec(4, 8, get_gpu("A100-80G"))
MODEL_13B = get_model_shape("13b")
CHATBOT_SLO = Slo(ttft_s=0.25, tpot_s=0.1)


# ---- goodput binary search ----------------------------------------------------------------------


@pytest.mark.parametrize("guess", [0.01, 1.0, 7.3, 5000.0])
def test_binary_search_finds_a_step_edge(guess):
    calls = []

    def attainment(rate):
        calls.append(rate)
        return 1.0 if rate <= 7.3 else 0.2

    found = max_rate_meeting(attainment, 0.9, guess=guess, rel_tol=0.01)
    assert 7.3 * 0.99 <= found <= 7.3
    assert len(calls) < 40


def test_binary_search_on_a_smooth_curve():
    # attainment = 1 / (1 + (r/10)^4) reaches 0.9 at r = 10 * (1/9)^(1/4)
    exact = 10 * (1 / 9) ** 0.25
    found = max_rate_meeting(lambda r: 1 / (1 + (r / 10) ** 4), 0.9, guess=1.0, rel_tol=0.005)
    assert exact * 0.995 <= found <= exact


def test_binary_search_edges():
    assert max_rate_meeting(lambda r: 0.5, 0.9, guess=3.0) == 0.0  # never meets the SLO
    assert max_rate_meeting(lambda r: 1.0, 0.9, guess=3.0) == math.inf  # never misses it


# ---- constraints --------------------------------------------------------------------------------


def test_constraint_violations_are_named():
    problems = lambda tp, pp, model=MODEL_13B, cluster=A100_CLUSTER: " ".join(
        parallel_config_problems(model, cluster, tp, pp)
    )
    assert problems(2, 4) == ""
    assert "divide the 8 GPUs" in problems(3, 1)  # TP stays inside a node
    assert "layers are not divisible" in problems(1, 3)  # 40 layers
    assert "span" in problems(8, 8)  # 8 nodes of 8 GPUs > 4 nodes
    assert "span" in problems(2, 20, cluster=ClusterSpec(4, 8, get_gpu("A100-80G"), max_nodes_per_instance=2))
    assert "do not fit" in problems(1, 1, model=get_model_shape("175b"))
    big_node = ClusterSpec(1, 16, get_gpu("A100-80G"))
    assert "heads are not divisible" in problems(16, 1, cluster=big_node)  # 40 heads
    llama70 = get_model_shape("llama-2-70b")  # 8 KV heads: tp 16 replicates them, fine; 3 would not
    assert "KV heads" not in problems(16, 1, model=llama70, cluster=big_node)


def test_candidate_degrees_respect_every_constraint():
    degrees = candidate_degrees(MODEL_13B, A100_CLUSTER)
    assert (1, 1) in degrees and (8, 4) in degrees and (3, 1) not in degrees
    for tp, pp in degrees:
        assert 8 % tp == 0 and MODEL_13B.num_heads % tp == 0 and MODEL_13B.num_layers % pp == 0
        per_gpu = (
            A100_CLUSTER.gpu.memory_bytes * A100_CLUSTER.memory_utilization - A100_CLUSTER.activation_reserve_bytes
        )
        assert MODEL_13B.weight_bytes / (tp * pp) < per_gpu
        assert kv_capacity_tokens(MODEL_13B, A100_CLUSTER, tp, pp) >= MODEL_13B.max_model_len


# ---- the described cluster ----------------------------------------------------------------------


def small_spec(**changes) -> SearchSpec:
    """4 nodes x 8 A100-80G, a 13B model, chatbot SLOs at 90%, with a smaller trace than the
    command line's default so the test stays quick (docs/planner.md has the full run)."""
    spec = dict(
        model=MODEL_13B,
        cluster=A100_CLUSTER,
        slo=CHATBOT_SLO,
        attainment=0.9,
        workload="chat",
        num_requests=300,
        min_duration_s=3.0,
        max_requests=2000,
        rel_tol=0.15,
        compare_colocated=False,
        top_segments=2,
        workers=1,
    )  # the CLI test covers the worker processes
    spec.update(changes)
    return SearchSpec(**spec)


@pytest.fixture(scope="module")
def high_plan():
    err = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err):  # tqdm draws on stderr
        plan = search(small_spec(affinity="high"), progress=True)
    return plan, time.perf_counter() - start, err.getvalue()


@pytest.fixture(scope="module")
def low_plan():
    return search(small_spec(affinity="low"), progress=False)


def check_placement(plan, cluster: ClusterSpec):
    used = set()
    for inst in plan.instances:
        assert len(inst["stages"]) == inst["pipeline_parallel"]
        nodes = set()
        for stage in inst["stages"]:
            # a stage's tensor-parallel group is inside one node, on distinct GPUs nobody else has
            assert len(stage["gpus"]) == inst["tensor_parallel"]
            assert 0 <= stage["node"] < cluster.num_nodes
            for gpu in stage["gpus"]:
                assert 0 <= gpu < cluster.gpus_per_node
                assert (stage["node"], gpu) not in used
                used.add((stage["node"], gpu))
            nodes.add(stage["node"])
        assert len(nodes) <= cluster.node_limit
    assert len(used) == plan.gpus_used <= cluster.total_gpus
    for choice in (plan.prefill, plan.decode):
        tp, pp = choice.tensor_parallel, choice.pipeline_parallel
        assert not parallel_config_problems(MODEL_13B, cluster, tp, pp, stages_on_separate_nodes=bool(plan.segments))
        assert choice.kv_capacity_tokens == kv_capacity_tokens(MODEL_13B, cluster, tp, pp) >= MODEL_13B.max_model_len


def test_high_affinity_search_is_quick_and_shows_progress(high_plan):
    plan, seconds, progress = high_plan
    assert seconds < 120 and 0 < plan.search_seconds <= seconds
    assert "search: phase goodputs" in progress and "100%" in progress
    assert "search: verify plan" in progress


def test_high_affinity_plan_respects_constraints(high_plan):
    plan, _, _ = high_plan
    check_placement(plan, A100_CLUSTER)
    assert plan.num_prefill * plan.prefill.goodput >= plan.rate * 0.999
    assert plan.num_decode * plan.decode.goodput >= plan.rate * 0.999
    assert plan.verification["meets_target"] and plan.verification["attainment"] >= 0.9
    assert {c["phase"] for c in plan.candidates} == {"prefill", "decode"}
    assert len(plan.candidates) == 2 * len(candidate_degrees(MODEL_13B, A100_CLUSTER))


def test_low_affinity_keeps_stage_pairs_on_one_node(low_plan):
    plan = low_plan
    check_placement(plan, A100_CLUSTER)
    unit = plan.unit
    assert plan.prefill.pipeline_parallel == plan.decode.pipeline_parallel == unit["pipeline_parallel"]
    by_unit = {}
    for inst in plan.instances:
        by_unit.setdefault(inst["unit"], []).append(inst)
    assert len(by_unit) == unit["units"]
    for insts in by_unit.values():
        assert {i["role"] for i in insts} == {"prefill", "decode"}
        for stage in range(unit["pipeline_parallel"]):
            # stage s of every prefill and decode instance of a unit: one node, so KV stays in it
            assert len({i["stages"][stage]["node"] for i in insts}) == 1
    for seg in plan.segments:
        gpus = [g for row in seg["prefill"] + seg["decode"] for g in row["gpus"]]
        assert len(gpus) == len(set(gpus)) <= A100_CLUSTER.gpus_per_node
    assert plan.verification["attainment"] >= 0.9


def test_search_for_a_target_rate_covers_it():
    cluster = ClusterSpec(1, 2, get_gpu("H100-80G"))
    spec = small_spec(
        model=get_model_shape("llama-3-8b"),
        cluster=cluster,
        rate=10.0,
        num_requests=200,
        min_duration_s=3.0,
        max_requests=2000,
    )
    plan = search(spec, progress=False)
    assert plan.rate == 10.0
    assert plan.num_prefill * plan.prefill.goodput >= 10.0 and plan.num_decode * plan.decode.goodput >= 10.0
    assert plan.gpus_used <= 2
    check_placement_model = get_model_shape("llama-3-8b")
    for choice in (plan.prefill, plan.decode):
        assert not parallel_config_problems(
            check_placement_model, cluster, choice.tensor_parallel, choice.pipeline_parallel
        )


def test_plan_files_and_helm_values(high_plan, low_plan, tmp_path):
    plan, _, _ = high_plan
    paths = write_plan(plan, str(tmp_path / "high"))
    data = json.loads(open(paths["json"]).read())
    assert data["schema"] == "pdserve.plan/v1" and data["gpus_used"] == plan.gpus_used
    assert yaml.safe_load(open(paths["yaml"]))["prefill"]["replicas"] == plan.num_prefill
    values = yaml.safe_load(open(paths["helm"]))
    assert set(values) == {"global", "prefill", "decode", "router", "kvstore", "placement"}
    for role, choice, replicas in (
        ("prefill", plan.prefill, plan.num_prefill),
        ("decode", plan.decode, plan.num_decode),
    ):
        v = values[role]
        assert v["replicaCount"] == replicas
        assert v["tensorParallel"] == choice.tensor_parallel and v["pipelineParallel"] == choice.pipeline_parallel
        assert v["resources"]["limits"]["nvidia.com/gpu"] * v["podsPerReplica"] >= choice.num_gpus
    assert values["prefill"]["maxBatchedTokens"] == plan.prefill.max_batched_tokens
    assert values["placement"]["algorithm"] == "high-affinity"
    check_pods_per_replica(plan, values)
    low = helm_values(low_plan)
    assert low["placement"]["algorithm"] == "low-affinity"
    assert len(low["placement"]["segments"]) == low_plan.unit["units"] * low_plan.unit["pipeline_parallel"]
    check_pods_per_replica(low_plan, low)
    # Algorithm 2 puts stage s on node s: a pipeline is pp pods of a stage each, which the charts deploy
    assert helm_problems(low_plan) == []
    assert low["decode"]["podsPerReplica"] == low_plan.unit["pipeline_parallel"]


def check_pods_per_replica(plan, values):
    """podsPerReplica: the most nodes an instance of the role spans. The Helm charts run an instance
    as that many pods of pipeline / podsPerReplica whole, consecutive stages, each on one node, with
    tp x pp / podsPerReplica GPUs; helm_problems names the roles with an instance that does not split
    so."""
    refused = []
    for role in ("prefill", "decode"):
        instances = [i for i in plan.instances if i["role"] == role]
        pods = max(len({st["node"] for st in i["stages"]}) for i in instances)
        v = values[role]
        assert v["podsPerReplica"] == pods
        pp = v["pipelineParallel"]
        per_pod = pp // pods
        splits = pp % pods == 0 and all(
            len({st["node"] for st in i["stages"][j * per_pod : (j + 1) * per_pod]}) == 1
            for i in instances
            for j in range(pods)
        )
        if splits:
            assert v["resources"]["limits"]["nvidia.com/gpu"] * pods == v["tensorParallel"] * pp
        else:
            refused.append(role)
    problems = helm_problems(plan)
    assert [p.split(":")[0] for p in problems] == refused
    assert all("--max-nodes-per-instance 1" in p for p in problems)
