"""Instances with tensor/pipeline parallelism through the Helm charts, rendered by real Helm.

A prefill or decode worker is rank 0 of its instance and starts ranks 1..tp*pp-1 as its own child
processes, rank r on cuda:r: so an instance is one pod with `--tensor-parallel`/`--pipeline-parallel`
and tp*pp GPUs, and a pipeline with a stage per pod (podsPerReplica > 1) is refused. Plans go the
way an operator's do: plan -> `write_plan` (plan.json, values.yaml) -> `helm template`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jsonschema
import kubernetes_validate
import pytest
import yaml
from deploy_helpers import HELM_DIR, KUBE_VERSION, ROOT, helm, render, render_error
from test_helm_charts import component_of, container_of, parse_container, workloads

from services.planner.hardware import ClusterSpec, get_gpu
from services.planner.plan_output import helm_problems, helm_values, write_plan
from services.planner.search import PhaseChoice, Plan, place_packed, place_units

PODS_REFUSAL = "would need the ranks of different pods to rendezvous"


def merged(defaults: dict, overrides: dict) -> dict:
    """Helm's merge of a values file over a chart's defaults (maps merge, the rest is replaced)."""
    out = dict(defaults)
    for key, value in overrides.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def check_schema(role: str, values: dict) -> None:
    """The worker chart's values.schema.json accepts the role's values over its defaults (Helm
    checks the same before it renders)."""
    with open(os.path.join(HELM_DIR, role, "values.schema.json")) as f:
        schema = json.load(f)
    with open(os.path.join(HELM_DIR, role, "values.yaml")) as f:
        defaults = yaml.safe_load(f)
    jsonschema.validate(merged(defaults, values), schema)


def choice(tp: int, pp: int) -> PhaseChoice:
    return PhaseChoice(tp, pp, goodput=2.5, max_batched_tokens=4096, kv_capacity_tokens=100000)


def make_plan(cluster: ClusterSpec, prefill: tuple, decode: tuple, n_p: int = 2, n_d: int = 1) -> Plan:
    """A high-affinity plan as the search would return it, placed by the search's own place_packed."""
    p, d = choice(*prefill), choice(*decode)
    return Plan(
        algorithm="high-affinity (Algorithm 1)",
        model="llama-2-70b",
        gpu=cluster.gpu.name,
        cluster={"num_nodes": cluster.num_nodes, "gpus_per_node": cluster.gpus_per_node},
        slo={"ttft_s": 0.5, "tpot_s": 0.1, "attainment": 0.9},
        workload={"name": "chat"},
        rate=4.0,
        prefill=p,
        decode=d,
        num_prefill=n_p,
        num_decode=n_d,
        instances=place_packed(cluster, [("prefill", p)] * n_p + [("decode", d)] * n_d),
    )


def values_file(plan: Plan, out_dir) -> tuple[dict, str]:
    """values.yaml as `pdserve plan search` writes it beside plan.json; and the file's text."""
    paths = write_plan(plan, str(out_dir))
    with open(paths["json"]) as f:
        assert json.load(f)["instances"] == plan.instances
    with open(paths["helm"]) as f:
        text = f.read()
    return yaml.safe_load(text), text


def parallel_flags(args: list[str]) -> list[str]:
    return [a for a in args if a.startswith(("--tensor-parallel", "--pipeline-parallel"))]


def expected_flags(tp: int, pp: int) -> list[str]:
    """What the charts render: a flag for each degree above 1 (the workers' default is 1)."""
    return [*([f"--tensor-parallel={tp}"] if tp > 1 else []), *([f"--pipeline-parallel={pp}"] if pp > 1 else [])]


def check_workers(objects, values: dict) -> None:
    """Each role's pods: one instance each, with the plan's degrees as flags and one GPU per rank."""
    for role in ("prefill", "decode"):
        planned = values[role]
        tp, pp = planned["tensorParallel"], planned["pipelineParallel"]
        check_schema(role, planned)
        deployments = workloads(objects, role)
        assert sum(d["spec"]["replicas"] for d in deployments) == planned["replicaCount"]
        for deployment in deployments:
            manifest = {k: v for k, v in deployment.items() if k != "_template"}
            kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)
            container = container_of(deployment)
            args = container["args"]
            assert parallel_flags(args) == expected_flags(tp, pp), args
            assert container["resources"]["limits"]["nvidia.com/gpu"] == tp * pp
            assert "--device=cuda" in args


def check_parsers(objects, parsers) -> None:
    """The worker services' own parsers take the rendered args. Last in a test: it skips while a
    worker lacks a flag the chart renders (the pipeline flag lands in the workers separately)."""
    for deployment in workloads(objects, "prefill") + workloads(objects, "decode"):
        role = component_of(deployment)
        parser, container = parsers[role], container_of(deployment)
        missing = sorted({a.split("=", 1)[0] for a in container["args"]} - parser.flags())
        if missing:
            pytest.skip(f"the {role} worker has no {', '.join(missing)} flag yet")
        args = parse_container(container, parser)
        ranks = args.tensor_parallel * getattr(args, "pipeline_parallel", 1)
        assert ranks == int(container["resources"]["limits"]["nvidia.com/gpu"])


# ---- plans -> values.yaml -> the umbrella chart ----------------------------------------------------


@pytest.fixture(scope="module")
def planner_values_70b(tmp_path_factory) -> dict:
    """values.yaml from a real `python -m services.planner search`: a 70B model does not fit one
    A100-80G, so every instance has two GPUs or more (the search picks the degrees), on one node."""
    out_dir = tmp_path_factory.mktemp("plan-70b")
    cmd = [sys.executable, "-m", "services.planner", "search", "--model", "llama-2-70b", "--gpu", "A100-80G"]
    cmd += ["--nodes", "1", "--gpus-per-node", "8", "--rate", "2", "--slo-ttft", "1.0", "--slo-tpot", "0.1"]
    cmd += ["--min-duration", "5", "--num-requests", "200", "--no-colocated", "--workers", "1"]
    proc = subprocess.run([*cmd, "--out-dir", str(out_dir)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out_dir, "values.yaml")) as f:
        return yaml.safe_load(f)


def test_searched_plan_with_tensor_parallelism_deploys(planner_values_70b, parsers):
    values = planner_values_70b
    for role in ("prefill", "decode"):
        assert values[role]["tensorParallel"] * values[role]["pipelineParallel"] >= 2
        assert values[role]["podsPerReplica"] == 1
    objects = render("pdserve", values)
    check_workers(objects, values)
    report = helm.lint(os.path.join(HELM_DIR, "pdserve"), values, strict=True, kube_version="v" + KUBE_VERSION)
    assert not [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    check_parsers(objects, parsers)


@pytest.mark.parametrize(
    "prefill, decode",
    [((2, 1), (2, 1)), ((1, 2), (1, 2)), ((2, 2), (2, 2)), ((1, 1), (2, 2))],
    ids=["tp2", "pp2", "tp2xpp2", "tp1-and-tp2xpp2"],
)
def test_parallel_plans_render_one_pod_per_instance(prefill, decode, tmp_path, parsers):
    cluster = ClusterSpec(2, 8, get_gpu("A100-80G"))
    plan = make_plan(cluster, prefill, decode)
    assert helm_problems(plan) == []
    values, text = values_file(plan, tmp_path)
    assert "NOT DEPLOYABLE" not in text
    for role, (tp, pp) in (("prefill", prefill), ("decode", decode)):
        assert (values[role]["tensorParallel"], values[role]["pipelineParallel"]) == (tp, pp)
        assert values[role]["podsPerReplica"] == 1
        assert values[role]["resources"]["limits"]["nvidia.com/gpu"] == tp * pp
    objects = render("pdserve", values)
    check_workers(objects, values)
    # each pod is pinned to the node its instance's stages are planned on
    for deployment in workloads(objects, "prefill") + workloads(objects, "decode"):
        node = deployment["spec"]["template"]["spec"]["nodeSelector"]["pdserve.io/node-index"]
        role = component_of(deployment)
        planned = [i for i in plan.instances if i["role"] == role and str(i["stages"][0]["node"]) == node]
        assert deployment["spec"]["replicas"] == len(planned)
        assert all({st["node"] for st in i["stages"]} == {int(node)} for i in planned)
    check_parsers(objects, parsers)


# ---- the worker charts on their own -------------------------------------------------------------


@pytest.mark.parametrize("chart", ["prefill", "decode"])
@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2), (4, 2)])
def test_worker_chart_asks_for_a_gpu_per_rank(chart, tp, pp):
    (deployment,) = workloads(render(chart, {"tensorParallel": tp, "pipelineParallel": pp}), chart)
    container = container_of(deployment)
    assert parallel_flags(container["args"]) == expected_flags(tp, pp)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == tp * pp
    assert container["resources"]["limits"]["memory"] == "64Gi"  # the rest of `resources` as given
    # the defaults: one rank, one GPU, no parallelism flags
    (default,) = workloads(render(chart), chart)
    assert container_of(default)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert parallel_flags(container_of(default)["args"]) == []


def test_cpu_ranks_share_the_pods_cpus():
    values = {"tensorParallel": 2, "pipelineParallel": 2, "device": "cpu", "dtype": "float32"}
    (deployment,) = workloads(render("decode", values), "decode")
    container = container_of(deployment)
    assert {"--device=cpu", "--tensor-parallel=2", "--pipeline-parallel=2"} <= set(container["args"])
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert container["resources"]["requests"]["cpu"] == "4"


def test_gpu_limit_covers_every_rank():
    # rank r on cuda:(first + r): from cuda:1 the pod needs GPUs 0..tp*pp
    (deployment,) = workloads(render("prefill", {"tensorParallel": 2, "device": "cuda:1"}), "prefill")
    assert container_of(deployment)["resources"]["limits"]["nvidia.com/gpu"] == 3
    # an explicit limit (the planner writes one) is kept when it is enough ...
    explicit = {"tensorParallel": 2, "resources": {"limits": {"nvidia.com/gpu": 4}}}
    (deployment,) = workloads(render("prefill", explicit), "prefill")
    assert container_of(deployment)["resources"]["limits"]["nvidia.com/gpu"] == 4
    # ... and refused when a rank would have no GPU
    small = {"tensorParallel": 2, "pipelineParallel": 2, "resources": {"limits": {"nvidia.com/gpu": 2}}}
    error = render_error("decode", small)
    assert "decode.resources.limits.nvidia.com/gpu is 2" in error and "ask for 4 GPUs" in error


# ---- pipelines across pods: refused ---------------------------------------------------------------


@pytest.mark.parametrize("chart", ["prefill", "decode"])
def test_a_pipeline_across_pods_is_refused(chart):
    error = render_error(chart, {"pipelineParallel": 2, "podsPerReplica": 2})
    assert f"{chart}.podsPerReplica is 2" in error and PODS_REFUSAL in error
    assert "all 2 ranks of an instance" in error and "in one pod" in error


def test_a_plan_spanning_nodes_is_reported_and_refused(tmp_path):
    # 8 GPUs per instance on nodes of 4: every decode instance needs two nodes
    cluster = ClusterSpec(2, 4, get_gpu("A100-80G"))
    plan = make_plan(cluster, (4, 1), (4, 2), n_p=0, n_d=1)
    (problem,) = helm_problems(plan)
    assert problem.startswith("decode: 1 of 1 instances (tensor 4 x pipeline 2) span nodes")
    assert "more than a node's 4" in problem and "--max-nodes-per-instance 1" in problem
    values, text = values_file(plan, tmp_path)
    assert "# NOT DEPLOYABLE as is: decode:" in text
    assert values["decode"]["podsPerReplica"] == 2
    error = render_error("pdserve", values)
    assert "decode.podsPerReplica is 2" in error and PODS_REFUSAL in error


def test_a_packed_instance_split_across_nodes_is_reported():
    # three single-GPU prefills fill node 0 up to its last GPU, so the pipeline's stage 1 lands on node 1
    cluster = ClusterSpec(2, 4, get_gpu("A100-80G"))
    plan = make_plan(cluster, (1, 1), (1, 2), n_p=3, n_d=1)
    (problem,) = helm_problems(plan)
    assert "decode: 1 of 1 instances" in problem and "on nodes 0, 1" in problem and "across node boundaries" in problem
    assert helm_values(plan)["decode"]["podsPerReplica"] == 2
    assert helm_values(plan)["prefill"]["podsPerReplica"] == 1


def test_low_affinity_pipelines_are_reported():
    """Algorithm 2 puts stage s of a unit on node s: with pp > 1 every instance spans pp nodes."""
    cluster = ClusterSpec(2, 4, get_gpu("A100-80G"))
    instances, segments = place_units(cluster, 1, 2, 1, 1, 1, 1)
    plan = make_plan(cluster, (1, 2), (1, 2), n_p=1, n_d=1)
    plan.instances, plan.segments = instances, segments
    problems = helm_problems(plan)
    assert [p.split(":")[0] for p in problems] == ["prefill", "decode"]
    assert all("a node of its own" in p for p in problems)
    values = helm_values(plan)
    assert values["prefill"]["podsPerReplica"] == values["decode"]["podsPerReplica"] == 2
    assert PODS_REFUSAL in render_error("pdserve", values)
