"""Instances with tensor/pipeline parallelism through the Helm charts, rendered by real Helm.

A prefill or decode worker is rank 0 of its instance and starts the ranks of its own pod as child
processes, rank r on cuda:r. An instance on one pod (podsPerReplica 1) is a Deployment's pod with
`--tensor-parallel`/`--pipeline-parallel` and tp*pp GPUs. An instance over P pods holds pp/P whole
stages per pod: its worker (pod 0) is a StatefulSet's pod with `--pods=P --rendezvous-port`, and
pods 1..P-1 are followers (`python -m services.engine.follower --leader <worker>:<port> --pod J`),
one StatefulSet per J, each pod with tp*pp/P GPUs. Plans go the way an operator's do: plan ->
`write_plan` (plan.json, values.yaml) -> `helm template`."""

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

MODEL = {
    "modelPath": "/models/llama-2-70b",
    "modelVolume": {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
}
INSTANCE_POD = "pdserve.io/instance-pod"


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


# ---- instances over several pods: a worker and its followers -------------------------------------


def pod_spec(workload) -> dict:
    return workload["spec"]["template"]["spec"]


def pod_labels(workload) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def instance_pods(objects, role: str) -> tuple[list[dict], dict[str, list[dict]]]:
    """The role's worker StatefulSets (pod 0 of each instance) and, by worker name, its followers'
    (pod 1, 2, ... of each instance, in that order)."""
    sets = [w for w in workloads(objects, role) if w["kind"] == "StatefulSet"]
    leaders = [w for w in sets if pod_labels(w)[INSTANCE_POD] == "0"]
    followers = {
        leader["metadata"]["name"]: sorted(
            (w for w in sets if w["metadata"]["name"].startswith(leader["metadata"]["name"] + "-pod")),
            key=lambda w: int(pod_labels(w)[INSTANCE_POD]),
        )
        for leader in leaders
    }
    assert len(leaders) + sum(map(len, followers.values())) == len(sets)
    return leaders, followers


def run_follower_command(container: dict, pod_name: str, tmp_path) -> tuple[list[str], set[int]]:
    """Runs the follower container's command with /bin/sh as its pod would, `python` being a stand-in
    that records its arguments and the signals it ignores: (python's argv, ignored signal numbers)."""
    command = container["command"]
    assert command[:2] == ["/bin/sh", "-c"] and "$(" not in command[2]  # nothing for Kubernetes to expand
    env = {e["name"] for e in container["env"]}
    assert "K8S_POD_NAME" in env and container["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do echo "$a"; done > "$OUT"\ngrep SigIgn /proc/$$/status > "$OUT.sig"\n')
    fake.chmod(0o755)
    out = tmp_path / "argv"
    environment = {"PATH": f"{tmp_path}:/usr/bin:/bin", "K8S_POD_NAME": pod_name, "OUT": str(out)}
    subprocess.run([*command, *container["args"]], env=environment, check=True, timeout=10)
    mask = int(open(f"{out}.sig").read().split()[1], 16)
    return out.read_text().splitlines(), {n for n in range(1, 65) if mask >> (n - 1) & 1}


class _Parsed(Exception):
    pass


def follower_parses(argv: list[str]) -> dict:
    """services.engine.follower's own parser (built in its main()) on these args: the parsed flags,
    or a skip while the follower lacks a flag the chart renders (it is written alongside the charts).
    main() stops right after parsing: nothing connects or checks files."""
    import argparse
    from unittest import mock

    from services.engine import follower

    real = argparse.ArgumentParser.parse_args
    parsed = {}

    def parse_args(self, args=None, namespace=None):
        parsed.update(vars(real(self, args, namespace)))
        raise _Parsed

    with (
        mock.patch.object(sys, "argv", ["follower", *argv]),
        mock.patch.object(argparse.ArgumentParser, "parse_args", parse_args),
        mock.patch("sys.stderr"),
    ):
        try:
            follower.main()
        except _Parsed:
            return parsed
        except SystemExit:
            pytest.skip(f"services.engine.follower does not take {argv} yet")
    pytest.fail("services.engine.follower's main() did not parse its arguments")


def check_instances(objects, role: str, values: dict, tmp_path, parsers=None) -> list[tuple[dict, list[dict]]]:
    """The role's instances over podsPerReplica pods, as the worker and follower contract has them."""
    tp, pp, pods = values["tensorParallel"], values["pipelineParallel"], values["podsPerReplica"]
    per_pod = tp * pp // pods
    assert not [w for w in workloads(objects, role) if w["kind"] == "Deployment"]
    leaders, followers = instance_pods(objects, role)
    assert sum(leader["spec"]["replicas"] for leader in leaders) == values["replicaCount"]
    services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}
    headless = services[f"pd-{role}-headless"]
    rendezvous = services[f"pd-{role}-rendezvous"]
    assert rendezvous["spec"]["clusterIP"] == "None" and rendezvous["spec"]["publishNotReadyAddresses"] is True
    assert {p["port"] for p in rendezvous["spec"]["ports"]} == {29500, 29501}
    pairs = []
    for leader in leaders:
        for workload in [leader, *followers[leader["metadata"]["name"]]]:
            manifest = {k: v for k, v in workload.items() if k != "_template"}
            kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)
            assert workload["spec"]["serviceName"] == rendezvous["metadata"]["name"]
            assert workload["spec"]["podManagementPolicy"] == "Parallel"
            assert workload["spec"]["replicas"] == leader["spec"]["replicas"]
            # the StatefulSets' Service gives every pod of the role a DNS name; the router's only pod 0s
            assert rendezvous["spec"]["selector"].items() <= pod_labels(workload).items()
            selected = headless["spec"]["selector"].items() <= pod_labels(workload).items()
            assert selected == (workload is leader), workload["metadata"]["name"]
            assert pod_spec(workload)["hostIPC"] is True
            assert container_of(workload)["resources"]["limits"]["nvidia.com/gpu"] == per_pod
        # pod 0: the worker, with the instance's degrees and its pods
        worker = container_of(leader)
        args = worker["args"]
        assert parallel_flags(args) == expected_flags(tp, pp)
        assert args[args.index(f"--pipeline-parallel={pp}") + 1 :][:2] == [f"--pods={pods}", "--rendezvous-port=29500"]
        ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
        assert (ports["rendezvous"], ports["dist-store"]) == (29500, 29501)
        if parsers is not None:
            parser = parsers[role]
            missing = sorted({a.split("=", 1)[0] for a in args} - parser.flags())
            if not missing:
                parsed = parse_container(worker, parser)
                assert (parsed.pods, parsed.rendezvous_port) == (pods, 29500)
                assert parsed.tensor_parallel * parsed.pipeline_parallel == tp * pp
        # pods 1..P-1: followers of the worker with their own ordinal
        pod_followers = followers[leader["metadata"]["name"]]
        assert [int(pod_labels(f)[INSTANCE_POD]) for f in pod_followers] == list(range(1, pods))
        for j, follower in enumerate(pod_followers, start=1):
            assert follower["metadata"]["name"] == f"{leader['metadata']['name']}-pod{j}"
            container = container_of(follower)
            assert "ports" not in container and "metrics" not in json.dumps(container)
            assert not {"startupProbe", "readinessProbe", "livenessProbe"} & set(container)
            annotations = follower["spec"]["template"]["metadata"].get("annotations", {})
            assert not [a for a in annotations if a.startswith("prometheus.io/")]  # no metrics to scrape
            ordinal = leader["spec"]["replicas"] - 1
            argv, ignored = run_follower_command(container, f"{follower['metadata']['name']}-{ordinal}", tmp_path)
            address = f"{leader['metadata']['name']}-{ordinal}.{rendezvous['metadata']['name']}.llm.svc.cluster.local"
            assert argv[:4] == ["-m", "services.engine.follower", f"--leader={address}:29500", f"--pod={j}"]
            assert 15 in ignored  # SIGTERM: the worker drains, then ends the connection ...
            grace = pod_spec(follower)["terminationGracePeriodSeconds"]
            assert grace > pod_spec(leader)["terminationGracePeriodSeconds"]  # ... within this pod's grace
            parsed = follower_parses(argv[2:])
            assert (parsed["leader"], parsed["pod"]) == (f"{address}:29500", j)
            # the model at the same path, the same env (the worker's, plus the pod's own name)
            assert pod_spec(follower)["volumes"] == pod_spec(leader)["volumes"]
            assert container["volumeMounts"] == worker["volumeMounts"]
            assert container["env"][1:] == worker["env"]
            assert container["image"] == worker["image"]
            pairs.append((leader, follower))
    return pairs


def two_node_plan(prefill: tuple, decode: tuple, affinity: str) -> Plan:
    """A plan whose instances each span two nodes, a stage per node: Algorithm 2's unit (stage s of
    both instances on node s) on 2 nodes of 4 A100s, or Algorithm 1's packing on 4 nodes each too
    small for a whole instance (prefill on nodes 0-1, decode on 2-3)."""
    if affinity == "low":
        cluster = ClusterSpec(2, 4, get_gpu("A100-80G"))
        plan = make_plan(cluster, prefill, decode, n_p=1, n_d=1)
        plan.instances, plan.segments = place_units(cluster, 1, prefill[1], prefill[0], 1, decode[0], 1)
        return plan
    return make_plan(ClusterSpec(4, prefill[0], get_gpu("A100-80G")), prefill, decode, n_p=1, n_d=1)


@pytest.mark.parametrize("affinity", ["low", "high"])
@pytest.mark.parametrize("degrees", [(1, 2), (2, 2)], ids=["pp2", "tp2xpp2"])
def test_pipelines_over_two_nodes_deploy_as_a_worker_and_a_follower(degrees, affinity, tmp_path, parsers):
    plan = two_node_plan(degrees, degrees, affinity)
    assert all(len({st["node"] for st in i["stages"]}) == 2 for i in plan.instances)
    assert helm_problems(plan) == []
    values, text = values_file(plan, tmp_path)
    assert "NOT DEPLOYABLE" not in text
    tp = degrees[0]
    for role in ("prefill", "decode"):
        assert (values[role]["podsPerReplica"], values[role]["resources"]["limits"]["nvidia.com/gpu"]) == (2, tp)
        check_schema(role, values[role])
    values["global"].update(MODEL)
    objects = render("pdserve", values)
    for role in ("prefill", "decode"):
        pairs = check_instances(objects, role, values[role], tmp_path, parsers)
        # pod J of each instance is pinned to the node of its stages
        for leader, follower in pairs:
            planned = [i for i in plan.instances if i["role"] == role]
            (instance,) = planned  # one instance per role here
            assert pod_spec(leader)["nodeSelector"] == {"pdserve.io/node-index": str(instance["stages"][0]["node"])}
            assert pod_spec(follower)["nodeSelector"] == {"pdserve.io/node-index": str(instance["stages"][1]["node"])}
            nodes = "-".join(str(st["node"]) for st in instance["stages"])
            assert leader["metadata"]["name"] == f"pd-{role}-node{nodes}"
            assert container_of(follower)["volumeMounts"][1] == {
                "name": "model",
                "mountPath": "/models",
                "readOnly": True,
            }
    report = helm.lint(os.path.join(HELM_DIR, "pdserve"), values, strict=True, kube_version="v" + KUBE_VERSION)
    assert not [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]


@pytest.mark.parametrize("chart", ["prefill", "decode"])
@pytest.mark.parametrize("tp, pp, pods", [(1, 2, 2), (2, 2, 2), (1, 4, 2), (2, 4, 4), (1, 4, 4)])
def test_worker_chart_splits_an_instance_into_pods_of_whole_stages(chart, tp, pp, pods, tmp_path):
    values = {"tensorParallel": tp, "pipelineParallel": pp, "podsPerReplica": pods, "replicaCount": 3}
    values["global"] = dict(MODEL)
    check_schema(chart, values)
    objects = render(chart, values)
    check_instances(objects, chart, values, tmp_path)
    leaders, followers = instance_pods(objects, chart)
    assert [leader["metadata"]["name"] for leader in leaders] == [f"pd-{chart}"]
    assert [f["metadata"]["name"] for f in followers[f"pd-{chart}"]] == [f"pd-{chart}-pod{j}" for j in range(1, pods)]
    # the disruption budget covers every pod of the role: evicting a follower stops its instance too
    (budget,) = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
    for workload in workloads(objects, chart):
        assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels(workload).items()


def test_followers_get_the_workers_certificates_and_scheduling(tmp_path):
    values = {
        "pipelineParallel": 2,
        "podsPerReplica": 2,
        "rendezvousPort": 30500,
        "nodeSelector": {"gpu": "a100"},
        "tolerations": [{"key": "gpu", "operator": "Exists"}],
        "global": {"tls": {"enabled": True, "secretName": "pdserve-tls", "serverName": "pdserve.internal"}},
    }
    objects = render("decode", values)
    (leader,), followers = instance_pods(objects, "decode")
    (follower,) = followers["pd-decode"]
    worker, container = container_of(leader), container_of(follower)
    tls = [a for a in worker["args"] if a.startswith(("--tls-cert=", "--tls-key=", "--tls-ca=", "--tls-server-name="))]
    assert len(tls) == 4 and container["args"] == ["--pod=1", *tls]
    assert {"name": "tls", "mountPath": "/etc/pdserve/tls", "readOnly": True} in container["volumeMounts"]
    assert pod_spec(follower)["volumes"] == pod_spec(leader)["volumes"]
    assert "--rendezvous-port=30500" in worker["args"]
    argv, _ = run_follower_command(container, "pd-decode-pod1-0", tmp_path)
    assert argv[2] == "--leader=pd-decode-0.pd-decode-rendezvous.llm.svc.cluster.local:30500"
    (service,) = [o for o in objects if o["metadata"]["name"] == "pd-decode-rendezvous"]
    assert {p["port"] for p in service["spec"]["ports"]} == {30500, 30501}
    # without a placement: the chart's own scheduling for every pod of the instance
    for workload in (leader, follower):
        assert pod_spec(workload)["nodeSelector"] == {"gpu": "a100"}
        assert pod_spec(workload)["tolerations"] == values["tolerations"]
    # last: it skips while services.engine.follower has no --tls-* flags (they are written alongside)
    parsed = follower_parses(["--leader=x:1", *container["args"]])
    assert (parsed["pod"], parsed["tls_cert"], parsed["tls_server_name"]) == (
        1,
        "/etc/pdserve/tls/tls.crt",
        "pdserve.internal",
    )


def test_device_index_applies_to_the_worker_only():
    # the worker's ranks run on cuda:1..2 of its pod, a follower's on cuda:0..1 of its own
    objects = render("prefill", {"pipelineParallel": 4, "podsPerReplica": 2, "device": "cuda:1"})
    (leader,), followers = instance_pods(objects, "prefill")
    assert container_of(leader)["resources"]["limits"]["nvidia.com/gpu"] == 3
    assert container_of(followers["pd-prefill"][0])["resources"]["limits"]["nvidia.com/gpu"] == 2
    # on the CPU device no pod asks for a GPU
    cpu = render("prefill", {"pipelineParallel": 2, "podsPerReplica": 2, "device": "cpu", "dtype": "float32"})
    assert not [w for w in workloads(cpu, "prefill") if "nvidia.com/gpu" in container_of(w)["resources"]["limits"]]


def test_one_pod_per_instance_keeps_the_deployment():
    objects = render("decode", {"pipelineParallel": 2})
    assert [w["kind"] for w in workloads(objects, "decode")] == ["Deployment"]
    assert not [a for a in container_of(workloads(objects, "decode")[0])["args"] if a.startswith(("--pods", "--rend"))]
    assert not [o for o in objects if o["metadata"]["name"].endswith("-rendezvous")]
    (headless,) = [o for o in objects if o["kind"] == "Service"]
    assert INSTANCE_POD not in headless["spec"]["selector"]


# ---- what cannot be split so: refused ------------------------------------------------------------


@pytest.mark.parametrize("chart", ["prefill", "decode"])
def test_pods_must_hold_whole_pipeline_stages(chart):
    # ranks that do not split evenly over the pods
    error = render_error(chart, {"podsPerReplica": 2})
    assert f"{chart}.podsPerReplica is 2, but an instance has 1 ranks" in error and "do not split evenly" in error
    error = render_error(chart, {"tensorParallel": 3, "pipelineParallel": 2, "podsPerReplica": 4})
    assert "has 6 ranks (tensorParallel 3 x pipelineParallel 2)" in error
    # ranks that do, but a tensor-parallel group would be cut in two
    error = render_error(chart, {"tensorParallel": 2, "podsPerReplica": 2})
    assert f"{chart}.podsPerReplica is 2, but pipelineParallel is 1" in error
    assert "must be a multiple of podsPerReplica" in error
    error = render_error(chart, {"tensorParallel": 2, "pipelineParallel": 2, "podsPerReplica": 4})
    assert "pipelineParallel is 2" in error and "whole pipeline stages" in error


def test_rendezvous_ports_and_gpu_limits_are_checked():
    multi = {"pipelineParallel": 2, "podsPerReplica": 2}
    error = render_error("decode", {**multi, "rendezvousPort": 9299})  # the store's port would be 9300
    assert "decode.rendezvousPort is 9299" in error and "decode.metricsPort (9300)" in error
    tls = {"global": {"tls": {"enabled": True, "secretName": "s", "healthPort": 29501}}}
    assert "global.tls.healthPort (29501)" in render_error("prefill", {**multi, **tls})
    small = {
        "tensorParallel": 2,
        "pipelineParallel": 2,
        "podsPerReplica": 2,
        "resources": {"limits": {"nvidia.com/gpu": 1}},
    }
    error = render_error("decode", small)
    assert "each of an instance's 2 pods holds 2 ranks" in error and "ask for 2 GPUs per pod" in error
    long_prefix = {**multi, "global": {"namePrefix": "p" * 40}}
    assert "longer than 52 characters" in render_error("prefill", long_prefix)


def test_a_pod_whose_stages_the_plan_puts_on_two_nodes_is_reported_and_refused(tmp_path):
    # one prefill GPU on node 0, then the 4-stage decode pipeline on node 0's last 3 GPUs and node 1:
    # as 2 pods of 2 stages, the second pod would have stage 2 on node 0 and stage 3 on node 1
    cluster = ClusterSpec(2, 4, get_gpu("A100-80G"))
    plan = make_plan(cluster, (1, 1), (1, 4), n_p=1, n_d=1)
    assert [st["node"] for st in plan.instances[1]["stages"]] == [0, 0, 0, 1]
    (problem,) = helm_problems(plan)
    assert problem.startswith("decode: 1 of 1 instances (tensor 1 x pipeline 4) span nodes")
    assert "stages on nodes 0, 0, 0, 1" in problem and "a pod holds 2 consecutive stages" in problem
    assert "--max-nodes-per-instance 1" in problem
    values, text = values_file(plan, tmp_path)
    assert "# NOT DEPLOYABLE as is: decode:" in text and values["decode"]["podsPerReplica"] == 2
    error = render_error("pdserve", values)
    assert "decode instance 0 puts stages 2..3 on nodes 0 and 1" in error


def test_a_pipeline_the_pods_cannot_split_is_reported_and_refused(tmp_path):
    # two prefill GPUs on node 0, then 3 stages: two on node 0, one on node 1 (3 stages, 2 pods)
    cluster = ClusterSpec(2, 4, get_gpu("A100-80G"))
    plan = make_plan(cluster, (1, 1), (1, 3), n_p=2, n_d=1)
    (problem,) = helm_problems(plan)
    assert "its 3 pipeline stages do not split into 2 pods of whole stages" in problem
    values, _ = values_file(plan, tmp_path)
    assert "decode.podsPerReplica is 2, but an instance has 3 ranks" in render_error("pdserve", values)


def test_a_packed_pipeline_split_at_a_stage_boundary_deploys(tmp_path):
    # three single-GPU prefills fill node 0 up to its last GPU, so the pipeline's stage 1 lands on
    # node 1: a pod per stage, each on its node
    cluster = ClusterSpec(2, 4, get_gpu("A100-80G"))
    plan = make_plan(cluster, (1, 1), (1, 2), n_p=3, n_d=1)
    assert helm_problems(plan) == []
    values = helm_values(plan)
    assert (values["decode"]["podsPerReplica"], values["prefill"]["podsPerReplica"]) == (2, 1)
    objects = render("pdserve", values)
    assert [w["kind"] for w in workloads(objects, "prefill")] == ["Deployment"]
    (leader,), followers = instance_pods(objects, "decode")
    assert pod_spec(leader)["nodeSelector"] == {"pdserve.io/node-index": "0"}
    assert pod_spec(followers[leader["metadata"]["name"]][0])["nodeSelector"] == {"pdserve.io/node-index": "1"}
    # the router sees one decode worker per instance, the prefill Deployment unchanged
    check_schema("decode", values["decode"])


def test_instances_on_one_node_of_a_multi_pod_role_keep_their_pods_there():
    """Packing may put one instance of a role on one node and another across two: the role is
    2 pods per instance, both pods of the first pinned to its node."""
    cluster = ClusterSpec(2, 4, get_gpu("A100-80G"))
    plan = make_plan(cluster, (1, 1), (1, 2), n_p=1, n_d=3)  # decode 0, 1 on node 0; decode 2 across
    nodes = sorted(tuple(st["node"] for st in i["stages"]) for i in plan.instances if i["role"] == "decode")
    assert nodes == [(0, 0), (0, 1), (1, 1)]
    assert helm_problems(plan) == []
    objects = render("pdserve", helm_values(plan))
    leaders, followers = instance_pods(objects, "decode")
    placed = {}
    for leader in leaders:
        (follower,) = followers[leader["metadata"]["name"]]
        pair = (
            pod_spec(leader)["nodeSelector"]["pdserve.io/node-index"],
            pod_spec(follower)["nodeSelector"]["pdserve.io/node-index"],
        )
        placed[pair] = leader["spec"]["replicas"]
        assert follower["spec"]["replicas"] == leader["spec"]["replicas"]
    assert placed == {("0", "0"): 1, ("0", "1"): 1, ("1", "1"): 1}
