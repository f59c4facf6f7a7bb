"""Writing a plan: JSON (complete), YAML (same content), Helm values for deploy/, and the latency
profile of each role's instances; and reading its layout back for `pdserve up --plan`.

The values are for an umbrella chart with subcharts `prefill`, `decode`, `router` and `kvstore`
(docs/planner.md lists every key). An instance on one node is one pod asking for tensor x pipeline
GPUs: the worker starts every rank of its instance as a child process. An instance whose placement
spans nodes is `podsPerReplica` pods (the most nodes an instance of the role spans), each holding
pipeline / podsPerReplica whole, consecutive stages on one node; `helm_problems` names the
instances the charts cannot deploy that way, and `write_plan` warns and notes them in values.yaml.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass

import yaml

from services.common.latency_profile import LatencyProfile

from .search import PLAN_SCHEMA, Plan

# role -> the file (beside plan.json) holding the profile its instances were simulated with
PROFILE_FILES = {role: f"{role}-profile.json" for role in ("prefill", "decode", "colocated")}
# role -> where plan.json describes that role's instances
PLAN_SECTIONS = {"prefill": "prefill", "decode": "decode", "colocated": "colocated_baseline"}
log = logging.getLogger(__name__)


def _gpus_per_node(instance: dict) -> dict[int, int]:
    """node -> how many of the instance's GPUs the placement puts there."""
    per_node: dict[int, int] = {}
    for st in instance["stages"]:
        per_node[st["node"]] = per_node.get(st["node"], 0) + len(st["gpus"])
    return per_node


def _role_values(plan: Plan, role: str) -> dict:
    choice = plan.prefill if role == "prefill" else plan.decode
    replicas = plan.num_prefill if role == "prefill" else plan.num_decode
    instances = [i for i in plan.instances if i["role"] == role]
    pods, gpus_per_pod = 1, choice.num_gpus
    if instances:
        # the instance spread over the most nodes: the role's instances run as that many pods
        # each, of pipeline / pods whole stages (helm_problems names those that cannot)
        per_node = max((_gpus_per_node(i) for i in instances), key=len)
        pods, gpus_per_pod = len(per_node), max(per_node.values())
    values = {
        "enabled": True,
        "replicaCount": replicas,
        "tensorParallel": choice.tensor_parallel,
        "pipelineParallel": choice.pipeline_parallel,
        "podsPerReplica": pods,
        "resources": {"limits": {"nvidia.com/gpu": gpus_per_pod}},
        "expectedGoodputPerReplica": round(choice.goodput, 4),
    }
    if role == "prefill":
        values["maxBatchedTokens"] = choice.max_batched_tokens
    return values


def _pod_nodes(instance: dict, pods: int) -> list[list[int]]:
    """The nodes of each pod's stages when the instance runs as `pods` pods of consecutive, whole
    pipeline stages (pipeline / pods each), in stage order."""
    per_pod = len(instance["stages"]) // pods
    return [sorted({st["node"] for st in instance["stages"][j * per_pod : (j + 1) * per_pod]}) for j in range(pods)]


def helm_problems(plan: Plan) -> list[str]:
    """Why deploy/helm would refuse or misplace this plan's values, one line per role. The charts run
    an instance as podsPerReplica pods (the most nodes an instance of the role spans), each holding
    pipeline / podsPerReplica whole, consecutive stages, pinned to one node: so an instance spanning
    nodes is deployable when its pipeline splits evenly into that many pods and each pod's stages
    share a node (a stage per node, as Algorithm 2 places them, or as packing does across a node
    boundary between stages); not when a pod's stages would be on two nodes."""
    per_node = plan.cluster.get("gpus_per_node")
    problems = []
    for role, choice in (("prefill", plan.prefill), ("decode", plan.decode)):
        instances = [i for i in plan.instances if i["role"] == role]
        pods = max((len(_gpus_per_node(i)) for i in instances), default=1)
        if pods == 1:
            continue
        pp = choice.pipeline_parallel
        if pp % pods:
            split = f"its {pp} pipeline stages do not split into {pods} pods of whole stages"
            bad = [i for i in instances if len(_gpus_per_node(i)) > 1]
        else:
            split = f"a pod holds {pp // pods} consecutive stages, which the placement puts on more than one node"
            bad = [i for i in instances if any(len(nodes) > 1 for nodes in _pod_nodes(i, pods))]
        if not bad:
            continue
        if per_node and choice.num_gpus > per_node:
            why = f"{choice.num_gpus} GPUs per instance, more than a node's {per_node}"
        elif plan.segments:
            why = "the low-affinity placement puts each pipeline stage on a node of its own"
        else:
            why = "the placement packed them across node boundaries"
        first = bad[0]
        nodes = ", ".join(str(st["node"]) for st in first["stages"])
        problems.append(
            f"{role}: {len(bad)} of {len(instances)} instances (tensor {choice.tensor_parallel} x pipeline "
            f"{choice.pipeline_parallel}) span nodes in a way the Helm charts cannot deploy, e.g. instance "
            f"{first['index']} with its stages on nodes {nodes} ({why}). The charts run each instance as "
            f"podsPerReplica={pods} pods of whole, consecutive pipeline stages, each pod on one node, but "
            f"{split}: re-plan with --max-nodes-per-instance 1 (docs/deploy.md, 'Tensor and pipeline parallelism')."
        )
    return problems


def helm_values(plan: Plan) -> dict:
    affinity = "low" if plan.segments else "high"
    placement = {
        "algorithm": f"{affinity}-affinity",
        # Logical node indices: label nodes pdserve.io/node-index=<n> and pin pods with a nodeSelector.
        "nodeLabel": "pdserve.io/node-index",
        "instances": [
            {
                "role": i["role"],
                "index": i["index"],
                **({"unit": i["unit"]} if "unit" in i else {}),
                "stages": [{"stage": st["stage"], "node": st["node"], "gpus": st["gpus"]} for st in i["stages"]],
            }
            for i in plan.instances
        ],
    }
    if plan.segments:
        # Algorithm 2: stage s of a unit's prefill and decode instances share a node, so the KV
        # of each layer moves over NVLink only.
        placement["segments"] = [
            {
                "name": f"unit{seg['unit']}-stage{seg['stage']}",
                "node": seg["node"],
                "prefill": seg["prefill"],
                "decode": seg["decode"],
            }
            for seg in plan.segments
        ]
    return {
        "global": {
            "model": plan.model,
            "gpu": plan.gpu,
            "slo": {
                "ttftSeconds": plan.slo["ttft_s"],
                "tpotSeconds": plan.slo["tpot_s"],
                "attainment": plan.slo["attainment"],
            },
            "plannedRate": round(plan.rate, 4),
        },
        "prefill": _role_values(plan, "prefill"),
        "decode": _role_values(plan, "decode"),
        "router": {"enabled": True, "replicaCount": 1},
        "kvstore": {"enabled": True},  # a DaemonSet: one per node
        "placement": placement,
    }


def write_plan(plan: Plan, out_dir: str) -> dict[str, str]:
    """Writes plan.json, plan.yaml and values.yaml into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    data = finite(plan.to_json())
    paths = {
        "json": os.path.join(out_dir, "plan.json"),
        "yaml": os.path.join(out_dir, "plan.yaml"),
        "helm": os.path.join(out_dir, "values.yaml"),
    }
    for role, profile in plan.profiles.items():
        paths[f"{role}_profile"] = os.path.join(out_dir, PROFILE_FILES[role])
        profile.save(paths[f"{role}_profile"])
        data[PLAN_SECTIONS[role]]["profile"] = PROFILE_FILES[role]
    with open(paths["json"], "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    with open(paths["yaml"], "w") as f:
        yaml.dump(data, f, Dumper=_PlainDumper, sort_keys=False)
    with open(paths["helm"], "w") as f:
        f.write(f"# Helm values for the pdserve umbrella chart, from `pdserve plan search` ({plan.algorithm}).\n")
        f.write(f"# Planned for {plan.rate:.3g} req/s of {plan.workload['name']} on {plan.gpus_used} x {plan.gpu}.\n")
        for problem in helm_problems(plan):
            log.warning("values.yaml: helm will refuse it: %s", problem)
            f.write(f"# NOT DEPLOYABLE as is: {problem}\n")
        yaml.dump(helm_values(plan), f, Dumper=_PlainDumper, sort_keys=False)
    return paths


class _PlainDumper(yaml.SafeDumper):
    """No &anchors / *aliases: the same GPU list appears under instances and segments, and a
    person (or Helm) should read each where it is."""

    def ignore_aliases(self, data):
        return True


def finite(obj):
    """The same structure with inf and nan replaced by None (strict JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


@dataclass
class PlannedLayout:
    """The processes `pdserve up --plan` starts: one emulated worker per planned instance, each
    taking its role's profile. A pipeline spanning nodes is one process (its profile has the
    pipeline's timing) on the node of its first stage."""

    mode: str
    nodes: dict[str, list[int]]  # role -> the node index of each instance
    profiles: dict[str, str]  # role -> the profile file
    slo: dict  # ttft_s, tpot_s, attainment
    worker_args: dict[str, list[str]]  # role -> flags its workers need (the baseline's chunked prefill)

    @property
    def num_nodes(self) -> int:
        return 1 + max(n for nodes in self.nodes.values() for n in nodes)


def read_layout(path: str, mode: str = "disaggregated") -> PlannedLayout:
    """The layout of a plan.json written by `pdserve plan search`: its disaggregated instances, or
    (mode "colocated") its colocated baseline on the same number of GPUs."""
    with open(path) as f:
        try:
            plan = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON ({e})") from None
    if plan.get("schema") != PLAN_SCHEMA:
        raise ValueError(f"{path}: not a plan (schema {plan.get('schema')!r}, want {PLAN_SCHEMA!r})")
    roles = ("colocated",) if mode == "colocated" else ("prefill", "decode")
    profiles = {}
    for role in roles:
        section = plan.get(PLAN_SECTIONS[role])
        if not section:
            raise ValueError(f"{path}: the plan has no colocated baseline (it was searched with --no-colocated)")
        if "profile" not in section:
            raise ValueError(
                f"{path}: no {role} profile file named in it (an older plan): run `pdserve plan search` again"
            )
        profiles[role] = os.path.join(os.path.dirname(os.path.abspath(path)), section["profile"])
        LatencyProfile.load(profiles[role])  # a bad one would stop every worker at start
    if mode == "colocated":
        tp, per_node = plan["colocated_baseline"]["tensor_parallel"], plan["cluster"]["gpus_per_node"]
        count = plan["gpus_used"] // tp  # the disaggregated plan's GPUs, as colocated instances
        if count == 0:
            raise ValueError(
                f"{path}: a colocated instance (tp={tp}) needs more than the plan's {plan['gpus_used']} GPUs"
            )
        nodes = {"colocated": [i * tp // per_node for i in range(count)]}
    else:
        nodes = {
            role: [
                i["stages"][0]["node"] for i in sorted(plan["instances"], key=lambda i: i["index"]) if i["role"] == role
            ]
            for role in roles
        }
    for role in roles:
        if not nodes[role]:
            raise ValueError(f"{path}: the plan has no {role} instances")
    chunked = mode == "colocated" and plan["colocated_baseline"].get("chunked_prefill", False)
    return PlannedLayout(mode, nodes, profiles, plan["slo"], {"colocated": ["--chunked-prefill"]} if chunked else {})
