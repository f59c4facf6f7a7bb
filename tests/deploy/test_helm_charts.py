"""The Helm charts (deploy/helm), rendered by real Helm: lint, Kubernetes schemas, and the
invariants that make a deployment work: every container flag is one its service accepts, probes
and Prometheus annotations use the ports the service listens on, workers get GPUs and share IPC
with the kvstore DaemonSet, and the router is given exactly the headless Services the worker
charts create. Flags come from the services' own parsers (conftest.parsers)."""

from __future__ import annotations

import collections
import json
import os
import re
import sys

import jsonschema
import kubernetes_validate
import pytest
from deploy_helpers import CHARTS, HELM_DIR, KUBE_VERSION, NAMESPACE, ROOT, helm, render, render_error

# Placeholders for the downward-API variables the args refer to as $(NAME).
FIELD_VALUES = {"spec.nodeName": "gpu-node-1", "status.hostIP": "10.0.0.7", "status.podIP": "10.244.1.9"}
HEALTH_SERVICES = {
    "router": "pdserve.v1.Router",
    "prefill": "pdserve.v1.PrefillWorker",
    "decode": "pdserve.v1.DecodeWorker",
    "kvstore": "pdserve.v1.KvStore",
}
WORKLOAD_KINDS = ("Deployment", "DaemonSet", "StatefulSet")


def workloads(objects, component=None):
    return [o for o in objects if o["kind"] in WORKLOAD_KINDS and (component is None or component_of(o) == component)]


def component_of(obj) -> str:
    return obj["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


def container_of(workload) -> dict:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def parse_container(container: dict, parser):
    """Parses the container's args with the service's parser, as the pod would: $(VAR) expanded from
    the container's env. Each flag must be spelled exactly as the parser has it (argparse would
    also take an abbreviation, which a later flag could make ambiguous)."""
    env = {e["name"]: e for e in container.get("env", [])}

    def expand(match):
        name = match.group(1)
        assert name in env, f"$({name}) is not in the container's env: Kubernetes would pass it literally"
        source = env[name]
        if "value" in source:
            return source["value"]
        field = source["valueFrom"]["fieldRef"]["fieldPath"]
        assert field in FIELD_VALUES, f"$({name}) comes from {field}, not the node name, node IP or pod IP"
        return FIELD_VALUES[field]

    args = [re.sub(r"\$\((\w+)\)", expand, a) for a in container["args"]]
    for arg in args:
        flag = arg.split("=", 1)[0]
        assert flag in parser.flags(), f"{arg}: not a flag of {parser.prog}"
    for name in env:  # flags also read PDSERVE_<FLAG>; PDSERVE_CACHE is the one non-flag variable
        if name.startswith("PDSERVE_") and name != "PDSERVE_CACHE":
            assert "--" + name[len("PDSERVE_") :].lower().replace("_", "-") in parser.flags(), name
    try:
        return parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"{parser.prog} rejects {args}")


def ports_by_name(container) -> dict:
    return {p["name"]: p for p in container["ports"]}


def all_renders(renders):
    return [(name, obj) for name, objects in renders.items() for obj in objects]


# ---- Helm itself -------------------------------------------------------------------------------


@pytest.mark.parametrize("chart", CHARTS)
def test_helm_lint(chart):
    report = helm.lint(os.path.join(HELM_DIR, chart), strict=True, kube_version="v" + KUBE_VERSION)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
    assert not problems, problems


def test_helm_lint_with_planner_values(planner_values):
    report = helm.lint(os.path.join(HELM_DIR, "pdserve"), planner_values, strict=True, kube_version="v" + KUBE_VERSION)
    assert not [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]


def test_every_render_is_valid_kubernetes(renders):
    """Kubernetes' OpenAPI schemas, strict (unknown fields fail). The Prometheus Operator's CRDs have
    no schema there: their fields are checked in test_monitoring_objects."""
    kinds = collections.Counter()
    for name, obj in all_renders(renders):
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        manifest = {k: v for k, v in obj.items() if k != "_template"}
        try:
            kubernetes_validate.validate(manifest, KUBE_VERSION, strict=True)
        except jsonschema.ValidationError as e:  # kubernetes_validate's own error subclasses it
            pytest.fail(f"{name} {obj['_template']} {obj['kind']}: {e.message} at {list(e.path)}")
        kinds[obj["kind"]] += 1
    assert {"Deployment", "DaemonSet", "Service", "PodDisruptionBudget", "ConfigMap", "Ingress"} <= set(kinds)


# ---- invariants --------------------------------------------------------------------------------


def test_workloads_match_their_services_flags(renders, parsers):
    """Every container's flags parse with its service's parser; probes use the gRPC port it listens
    on; the Prometheus annotation names its metrics port; the kubelet waits longer than the drain."""
    checked = collections.Counter()
    for name, obj in all_renders(renders):
        if obj["kind"] not in WORKLOAD_KINDS:
            continue
        component = component_of(obj)
        pod = obj["spec"]["template"]
        container = container_of(obj)
        assert "command" not in container  # the image's ENTRYPOINT runs python -m services.<name>
        args = parse_container(container, parsers[component])
        ports = ports_by_name(container)
        assert ports["grpc"]["containerPort"] == args.port, name
        assert ports["metrics"]["containerPort"] == args.metrics_port, name
        if getattr(args, "http_port", -1) >= 0:  # the router's OpenAI-compatible HTTP API
            assert ports["http"]["containerPort"] == args.http_port, name
        else:
            assert "http" not in ports, name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == args.port, (name, probe)
        assert "service" not in container["readinessProbe"]["grpc"]  # overall health: NOT_SERVING until ready
        assert container["livenessProbe"]["grpc"]["service"] == HEALTH_SERVICES[component]
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(args.metrics_port)
        assert pod["metadata"]["labels"]["app.kubernetes.io/part-of"] == "pdserve"
        assert pod["spec"]["terminationGracePeriodSeconds"] > args.grace_seconds
        checked[component] += 1
    assert set(checked) == set(HEALTH_SERVICES), checked


def test_decode_stream_interval_reaches_the_worker(renders, parsers):
    (default,) = workloads(renders["decode-defaults"], "decode")
    (tuned,) = workloads(renders["pdserve-options"], "decode")
    assert parse_container(container_of(default), parsers["decode"]).stream_interval == 1
    assert parse_container(container_of(tuned), parsers["decode"]).stream_interval == 4


def test_admission_bounds_reach_the_router_and_workers(renders, parsers):
    (router,) = workloads(renders["pdserve-options"], "router")
    (decode,) = workloads(renders["pdserve-options"], "decode")
    (default,) = workloads(renders["router-defaults"], "router")
    tuned = parse_container(container_of(router), parsers["router"])
    assert (tuned.max_inflight_requests, tuned.max_queued_prompt_tokens) == (0, 4000000)  # 0: no bound, kept
    decode_args = parse_container(container_of(decode), parsers["decode"])
    assert (decode_args.max_inflight_requests, decode_args.max_queued_prompt_tokens) == (512, 1 << 18)
    defaults = parse_container(container_of(default), parsers["router"])
    assert (defaults.max_inflight_requests, defaults.max_queued_prompt_tokens) == (2048, 1 << 20)


def test_large_integers_and_an_explicit_zero_render_as_given(renders, parsers):
    objects = renders["pdserve-options"]
    (prefill,) = workloads(objects, "prefill")
    args = parse_container(container_of(prefill), parsers["prefill"])
    assert (args.max_model_len, args.max_num_batched_tokens) == (1048576, 2000000)
    budgets = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "PodDisruptionBudget"}
    assert budgets["pd-decode"]["maxUnavailable"] == 0  # blocks voluntary evictions, as asked
    assert budgets["pd-prefill"]["maxUnavailable"] == 1  # the default
    monitors = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ServiceMonitor"}
    assert monitors["pd-router"]["spec"]["endpoints"][0]["interval"] == "1m30s"


def test_health_services_exist_in_the_protos():
    from pdserve.v1 import common_pb2, kvstore_pb2, router_pb2, worker_pb2

    defined = {
        s.full_name
        for m in (common_pb2, kvstore_pb2, router_pb2, worker_pb2)
        for s in m.DESCRIPTOR.services_by_name.values()
    }
    assert set(HEALTH_SERVICES.values()) <= defined


def test_workers_get_gpus_and_their_nodes_kvstore(renders, parsers):
    for name, objects in renders.items():
        (kvstore,) = workloads(objects, "kvstore") or [None]
        for worker in workloads(objects, "prefill") + workloads(objects, "decode"):
            assert worker["kind"] == "Deployment"
            container = container_of(worker)
            args = parse_container(container, parsers[component_of(worker)])
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, name
            assert args.device == "cuda"
            assert worker["spec"]["template"]["spec"]["hostIPC"] is True
            assert args.node_id == FIELD_VALUES["spec.nodeName"]
            host, port = args.kvstore.rsplit(":", 1)
            assert host == FIELD_VALUES["status.hostIP"], "workers dial the kvstore at their node's IP"
            if kvstore is not None:  # ... on the DaemonSet's host port
                assert int(port) == ports_by_name(container_of(kvstore))["grpc"]["hostPort"]


def test_kvstore_is_a_daemonset_with_host_ipc(renders, parsers):
    for name, objects in renders.items():
        for daemon in workloads(objects, "kvstore"):
            assert daemon["kind"] == "DaemonSet"
            pod = daemon["spec"]["template"]["spec"]
            assert pod["hostIPC"] is True
            container = container_of(daemon)
            args = parse_container(container, parsers["kvstore"])
            ports = ports_by_name(container)
            assert ports["grpc"]["hostPort"] == args.port
            assert ports["ucx"]["containerPort"] == args.transfer_port > 0
            assert args.node_id == FIELD_VALUES["spec.nodeName"]
            reachable = FIELD_VALUES["status.hostIP" if pod.get("hostNetwork") else "status.podIP"]
            assert args.transfer_host == reachable, name
            assert args.advertise_address == f"{reachable}:{args.port}"
            # every port binds --host: the node's address on the node's network, else the pod's interfaces
            assert args.host == (FIELD_VALUES["status.hostIP"] if pod.get("hostNetwork") else "0.0.0.0"), name
            assert "nvidia.com/gpu" not in container["resources"].get("limits", {}), "GPUs belong to the workers"


def test_router_and_workers_listen_on_the_pods_interfaces(renders, parsers):
    for role in ("router", "prefill", "decode"):
        (workload,) = workloads(renders["pdserve-options"], role)
        assert parse_container(container_of(workload), parsers[role]).host == "0.0.0.0"  # (the default: 127.0.0.1)


def test_router_is_given_the_worker_headless_services(renders, parsers):
    """--prefill-dns / --decode-dns name exactly the headless Services that select the worker pods,
    with the workers' gRPC port."""
    for name in ("pdserve-defaults", "pdserve-planner", "pdserve-options"):
        objects = renders[name]
        (router,) = workloads(objects, "router")
        args = parse_container(container_of(router), parsers["router"])
        for role in ("prefill", "decode"):
            workers = workloads(objects, role)
            headless = [
                o
                for o in objects
                if o["kind"] == "Service"
                and o["spec"].get("clusterIP") == "None"
                and all(
                    o["spec"]["selector"].items() <= w["spec"]["template"]["metadata"]["labels"].items()
                    for w in workers
                )
            ]
            assert len(headless) == 1, (name, role)
            service = headless[0]
            port = ports_by_name(container_of(workers[0]))["grpc"]["containerPort"]
            assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"] == port
            expected = f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local:{port}"
            assert getattr(args, f"{role}_dns") == [expected], name
            assert service["spec"]["publishNotReadyAddresses"] is False
        assert not args.prefill and not args.decode and not args.colocated_dns


def test_router_service_and_disruption_budgets(renders):
    objects = renders["pdserve-defaults"]
    (router,) = workloads(objects, "router")
    labels = router["spec"]["template"]["metadata"]["labels"]
    (service,) = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "pd-router"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"].get("clusterIP") != "None"
    budgets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PodDisruptionBudget"}
    assert set(budgets) == {"pd-router", "pd-prefill", "pd-decode"}
    for workload in workloads(objects):
        if workload["kind"] == "Deployment":
            pod_labels = workload["spec"]["template"]["metadata"]["labels"]
            assert any(b["spec"]["selector"]["matchLabels"].items() <= pod_labels.items() for b in budgets.values())


def _router_objects(objects) -> tuple[dict, dict]:
    (router,) = workloads(objects, "router")
    (service,) = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "pd-router"]
    return container_of(router), service


def test_router_http_api_port_and_its_service_port(renders, parsers):
    """httpPort: --http-port, a container port named http, and a port of the router Service that
    targets it (plain HTTP, or HTTPS with global.tls); 0 or null turns all three off."""
    for name in ("router-defaults", "pdserve-defaults", "pdserve-options"):
        container, service = _router_objects(renders[name])
        args = parse_container(container, parsers["router"])
        assert args.http_port == 8000 == ports_by_name(container)["http"]["containerPort"], name
        http = {p["name"]: p for p in service["spec"]["ports"]}["http"]
        assert [http[k] for k in ("port", "targetPort", "protocol", "appProtocol")] == [8000, "http", "TCP", "http"]
        assert args.served_model_name == ""  # the service's default: --model, or the tiny model's name

    container, service = _router_objects(
        render("router", {"httpPort": 8080, "service": {"httpPort": 80}, "servedModelName": "llama-3: 8b"})
    )
    args = parse_container(container, parsers["router"])
    assert (args.http_port, args.served_model_name) == (8080, "llama-3: 8b")
    assert ports_by_name(container)["http"]["containerPort"] == 8080
    http = {p["name"]: p for p in service["spec"]["ports"]}["http"]
    assert (http["port"], http["targetPort"]) == (80, "http")

    for off in (0, None):
        for chart, values in (("router", {"httpPort": off}), ("pdserve", {"router": {"httpPort": off}})):
            container, service = _router_objects(render(chart, values))
            assert parse_container(container, parsers["router"]).http_port == -1, (chart, off)
            assert "http" not in ports_by_name(container), (chart, off)
            assert {p["name"] for p in service["spec"]["ports"]} == {"grpc", "metrics"}, (chart, off)

    # with TLS the HTTP port serves HTTPS with the router's certificate
    _, service = _router_objects(_tls_render({"secretName": "pdserve-tls"}))
    assert {p["name"]: p for p in service["spec"]["ports"]}["http"]["appProtocol"] == "https"


# ---- the planner's values ----------------------------------------------------------------------


def test_planner_values_drive_the_umbrella(renders, planner_values, parsers):
    objects = renders["pdserve-planner"]
    placement = planner_values["placement"]
    for role in ("prefill", "decode"):
        planned = planner_values[role]
        deployments = workloads(objects, role)
        assert sum(d["spec"]["replicas"] for d in deployments) == planned["replicaCount"]
        per_node = collections.Counter(str(i["stages"][0]["node"]) for i in placement["instances"] if i["role"] == role)
        pinned = {
            d["spec"]["template"]["spec"]["nodeSelector"][placement["nodeLabel"]]: d["spec"]["replicas"]
            for d in deployments
        }
        assert pinned == dict(per_node)
        for d in deployments:
            container = container_of(d)
            assert (
                container["resources"]["limits"]["nvidia.com/gpu"] == planned["resources"]["limits"]["nvidia.com/gpu"]
            )
            assert (
                float(d["metadata"]["annotations"]["pdserve.io/expected-goodput-per-replica"])
                == planned["expectedGoodputPerReplica"]
            )
            args = parse_container(container, parsers[role])
            if role == "prefill":
                assert args.max_num_batched_tokens == planned["maxBatchedTokens"]
    assert len({n for i in placement["instances"] for n in [i["stages"][0]["node"]]}) == 2  # the plan uses both nodes
    (router,) = workloads(objects, "router")
    args = parse_container(container_of(router), parsers["router"])
    slo = planner_values["global"]["slo"]
    assert (args.slo_ttft_seconds, args.slo_tpot_seconds, args.slo_attainment_target) == (
        slo["ttftSeconds"],
        slo["tpotSeconds"],
        slo["attainment"],
    )
    (plan,) = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "pd-plan"]
    assert "instances" in plan["data"]["plan.yaml"]


def test_low_affinity_plan_keeps_each_segment_on_its_node(planner_values_low):
    """Algorithm 2: the prefill and decode instances of a segment must share a node; pinning every
    instance to its planned node does that."""
    placement = planner_values_low["placement"]
    assert placement["algorithm"] == "low-affinity" and placement["segments"]
    objects = render("pdserve", planner_values_low)
    pinned = collections.Counter()
    for deployment in workloads(objects, "prefill") + workloads(objects, "decode"):
        node = deployment["spec"]["template"]["spec"]["nodeSelector"][placement["nodeLabel"]]
        pinned[(component_of(deployment), node)] += deployment["spec"]["replicas"]
    planned = collections.Counter()
    for segment in placement["segments"]:
        for role in ("prefill", "decode"):
            planned[(role, str(segment["node"]))] += len(segment[role])
    assert pinned == planned


def test_placement_can_be_turned_off(planner_values):
    values = {**planner_values, "placement": {**planner_values["placement"], "enabled": False}}
    deployments = workloads(render("pdserve", values), "decode")
    assert [d["spec"]["replicas"] for d in deployments] == [planner_values["decode"]["replicaCount"]]
    assert "nodeSelector" not in deployments[0]["spec"]["template"]["spec"]


def test_unsupported_or_invalid_values_are_refused(planner_values):
    # tensor parallelism on the plan's single GPU: each rank needs one (test_helm_parallel.py has more)
    tp2 = {**planner_values, "prefill": {**planner_values["prefill"], "tensorParallel": 2}}
    assert "ask for 2 GPUs" in render_error("pdserve", tp2)
    # an instance's pods hold whole pipeline stages (test_helm_parallel.py has more)
    assert "do not split evenly over 2 pods" in render_error("decode", {"podsPerReplica": 2})
    mismatch = {**planner_values, "decode": {**planner_values["decode"], "replicaCount": 9}}
    assert "placement.instances places" in render_error("pdserve", mismatch)
    assert "replicaCount" in render_error("prefill", {"replicaCount": "two"})
    assert "replicas" in render_error("prefill", {"replicas": 2})  # misspelt key: unknown keys are refused
    assert "router.discovery.prefill.port" in render_error("pdserve", {"prefill": {"port": 7201}})
    assert "kvstorePort" in render_error("pdserve", {"kvstore": {"port": 7130}})
    # two listeners on one port: the second bind would fail and the pod crash-loop
    assert "decode.port and decode.metricsPort are both 7300" in render_error("decode", {"metricsPort": 7300})
    assert "kvstore.port and kvstore.transferPort are both 7100" in render_error("kvstore", {"transferPort": 7100})
    # UCX takes one of the 16 ports from transferPort
    assert "kvstore.port and kvstore.transferPort are both 7100" in render_error("kvstore", {"transferPort": 7090})
    assert "router.port and router.metricsPort" in render_error("router", {"metricsPort": 7000})
    assert "router.metricsPort and router.httpPort are both 9000" in render_error("router", {"httpPort": 9000})
    assert "router.port and router.httpPort" in render_error("pdserve", {"router": {"httpPort": 7000}})
    assert "httpPort" in render_error("router", {"httpPort": "8000"})


# ---- monitoring, dashboards, TLS, models ---------------------------------------------------------


def test_monitoring_objects(renders):
    objects = renders["pdserve-options"]
    services = [o for o in objects if o["kind"] == "Service"]
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert {m["metadata"]["name"] for m in monitors} == {"pd-router", "pd-prefill", "pd-decode", "pd-kvstore"}
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        selected = [
            s for s in services if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
        ]
        assert selected, monitor["metadata"]["name"]
        for service in selected:
            assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
    names = {r.get("record") or r.get("alert") for g in rule["spec"]["groups"] for r in g["rules"]}
    assert "pdserve:slo_attainment:ratio_rate5m" in names and "PdserveSloAttainmentLow" in names


def test_dashboard_configmaps_carry_deploy_grafana(renders):
    """Each chart links its dashboard from deploy/grafana/dashboards (files/dashboards/*.json are
    symlinks, which Helm follows): the ConfigMaps hold exactly those files, all four of them."""
    source = os.path.join(ROOT, "deploy", "grafana", "dashboards")
    found = {}
    for obj in renders["pdserve-options"]:
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"].endswith("-dashboards"):
            assert obj["metadata"]["labels"]["grafana_dashboard"] == "1"
            found.update(obj["data"])
    assert set(found) == set(os.listdir(source))
    for filename, text in found.items():
        with open(os.path.join(source, filename)) as f:
            assert text == f.read()
        assert json.loads(text)["uid"]


def test_ingress_tls_and_model_volume(renders, parsers):
    objects = renders["pdserve-options"]
    (ingress,) = [o for o in objects if o["kind"] == "Ingress"]
    assert ingress["spec"]["tls"] == [{"secretName": "llm-tls", "hosts": ["llm.example.com"]}]
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]["name"] == "pd-router"
    for workload in workloads(objects):
        pod = workload["spec"]["template"]["spec"]
        container = container_of(workload)
        if component_of(workload) == "kvstore":
            continue
        args = parse_container(container, parsers[component_of(workload)])
        assert args.model == "/models/Meta-Llama-3-8B-Instruct"
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["model"]["persistentVolumeClaim"]["claimName"] == "models"
        mount = {m["name"]: m for m in container["volumeMounts"]}["model"]
        assert mount["readOnly"] and args.model.startswith(mount["mountPath"] + "/")


# ---- files kept in step ------------------------------------------------------------------------


def test_values_schemas_are_generated():
    sys.path.insert(0, HELM_DIR)
    try:
        import schemas
    finally:
        sys.path.remove(HELM_DIR)
    for chart, schema in schemas.build().items():
        with open(os.path.join(HELM_DIR, chart, "values.schema.json")) as f:
            assert f.read() == schemas.render(schema), f"run python deploy/helm/schemas.py ({chart})"


def test_linked_files_resolve_into_deploy():
    """The subcharts, dashboards and rules inside the charts are symlinks; each must point at the
    file it stands for, or Helm would load nothing (or something stale)."""
    for chart in CHARTS:
        for folder, _, files in os.walk(os.path.join(HELM_DIR, chart, "files")):
            for filename in files:
                path = os.path.join(folder, filename)
                assert os.path.islink(path) and os.path.isfile(path), path
                assert os.path.realpath(path).startswith(os.path.join(ROOT, "deploy") + os.sep)
    for name in ("router", "prefill", "decode", "kvstore", "pdserve-lib"):
        link = os.path.join(HELM_DIR, "pdserve", "charts", name)
        assert os.path.realpath(link) == os.path.join(HELM_DIR, name)


def test_packaged_umbrella_renders_the_same(tmp_path, planner_values):
    """`helm package` stores the linked files, so the archive (what a chart repository would serve)
    renders exactly what the chart folder does."""
    import tarfile

    archive = helm.package(os.path.join(HELM_DIR, "pdserve"), destination=str(tmp_path))
    with tarfile.open(archive) as tar:
        assert not [m.name for m in tar.getmembers() if m.issym() or m.islnk()]
    values = {**planner_values, "global": {**planner_values["global"], "monitoring": {"dashboards": True}}}
    with helm.Chart.load(archive) as packaged, helm.Chart.load(os.path.join(HELM_DIR, "pdserve")) as folder:
        assert packaged.render(values, name="pd", namespace=NAMESPACE) == folder.render(
            values, name="pd", namespace=NAMESPACE
        )


# ---- Prometheus pod discovery -------------------------------------------------------------------


def _relabel(rules: list[dict], labels: dict) -> dict | None:
    """Prometheus' relabelling (replace and keep, the actions the file uses): regexes fully
    anchored, source labels joined by ';', $N in the replacement. None: the target is dropped."""
    labels = dict(labels)
    for rule in rules:
        value = ";".join(labels.get(name, "") for name in rule.get("source_labels", []))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if rule.get("action", "replace") == "keep":
            if not match:
                return None
        elif match:
            labels[rule["target_label"]] = re.sub(r"\$(\d+)", r"\\g<\1>", rule.get("replacement", "$1"))
            labels[rule["target_label"]] = match.expand(labels[rule["target_label"]])
    return labels


@pytest.mark.parametrize(
    "pod_ip,address",
    [
        ("10.244.1.9", "10.244.1.9:9300"),
        ("fd00:10:244::9", "[fd00:10:244::9]:9300"),
        ("::ffff:10.0.0.7", "[::ffff:10.0.0.7]:9300"),
    ],
)
def test_prometheus_scrapes_the_metrics_port_on_ipv4_and_ipv6_pods(renders, pod_ip, address):
    """deploy/prometheus/prometheus-kubernetes.yml against the labels Kubernetes discovery gives a
    rendered decode pod (its annotation, its IP): the scrape address is the metrics port, with
    brackets around an IPv6 address (the old `host:port` rewrite of __address__ left IPv6 pods on
    their first container port, gRPC)."""
    import yaml

    with open(os.path.join(ROOT, "deploy", "prometheus", "prometheus-kubernetes.yml")) as f:
        (job,) = yaml.safe_load(f)["scrape_configs"]
    (decode,) = workloads(renders["decode-defaults"], "decode")
    pod = decode["spec"]["template"]
    labels = {
        "__address__": f"[{pod_ip}]:7300" if ":" in pod_ip else f"{pod_ip}:7300",
        "__meta_kubernetes_pod_ip": pod_ip,
        "__meta_kubernetes_namespace": NAMESPACE,
        "__meta_kubernetes_pod_name": "decode-0",
    }
    for key, value in pod["metadata"]["labels"].items():
        labels["__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)] = value
    for key, value in pod["metadata"]["annotations"].items():
        labels["__meta_kubernetes_pod_annotation_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)] = value
    target = _relabel(job["relabel_configs"], labels)
    assert target is not None and target["__address__"] == address
    assert target["component"] == "decode"


# ---- TLS ----------------------------------------------------------------------------------------


def _tls_render(tls: dict, router: dict | None = None) -> list[dict]:
    return render("pdserve", {"global": {"tls": {"enabled": True, **tls}}, "router": router or {}})


def test_tls_from_one_secret_reaches_every_service_and_probes_move_to_the_health_port(parsers):
    objects = _tls_render({"secretName": "pdserve-tls", "healthPort": 7901}, {"apiKeys": {"secretName": "keys"}})
    pods = [w for w in objects if w["kind"] in ("Deployment", "DaemonSet")]
    assert {component_of(w) for w in pods} == {"router", "prefill", "decode", "kvstore"}
    for workload in pods:
        container, role = container_of(workload), component_of(workload)
        args = parse_container(container, parsers[role])
        assert (args.tls_cert, args.tls_key, args.tls_ca) == tuple(
            f"/etc/pdserve/tls/{f}" for f in ("tls.crt", "tls.key", "ca.crt")
        )
        assert (args.tls_server_name, args.health_port) == ("pdserve", 7901)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == 7901, (role, probe)  # kubelet's probes speak no TLS
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == "pdserve-tls"
        assert any(m["name"] == "tls" for m in container["volumeMounts"])
        if role == "router":
            assert args.api_key_file == "/etc/pdserve/api-keys/api-keys"
            assert volumes["api-keys"]["secret"]["secretName"] == "keys"
    assert not [o for o in objects if o["kind"] == "Certificate"]


def test_tls_with_cert_manager_issues_a_certificate_per_component(parsers):
    issuer = {"name": "pdserve-ca", "kind": "ClusterIssuer"}
    objects = _tls_render({"certManager": {"enabled": True, "issuerRef": issuer}})
    certificates = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "Certificate"}
    assert set(certificates) == {f"pd-{c}-tls" for c in ("router", "prefill", "decode", "kvstore")}
    for spec in certificates.values():
        assert spec["dnsNames"] == ["pdserve"] and spec["issuerRef"] == issuer
        assert {"server auth", "client auth"} <= set(spec["usages"])
    for workload in (w for w in objects if w["kind"] in ("Deployment", "DaemonSet")):
        volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
        assert volumes["tls"]["secret"]["secretName"] == f"pd-{component_of(workload)}-tls"


def test_tls_without_certificates_is_refused():
    assert "global.tls.secretName" in render_error("pdserve", {"global": {"tls": {"enabled": True}}})


@pytest.mark.parametrize("metrics", ["mutual", "server", "off"])
def test_tls_metrics_are_scraped_over_https_with_a_cluster_certificate(parsers, metrics):
    """global.tls.metrics reaches every service's --metrics-tls, and the scrapers follow it: the
    pods' prometheus.io/scheme annotation (prometheus-kubernetes.yml turns it into __scheme__) and
    the ServiceMonitors' scheme and tlsConfig (a client certificate only for "mutual")."""
    import yaml

    objects = render(
        "pdserve",
        {
            "global": {
                "tls": {"enabled": True, "secretName": "pdserve-tls", "metrics": metrics},
                "monitoring": {"serviceMonitor": True},
            }
        },
    )
    pods = [w for w in objects if w["kind"] in ("Deployment", "DaemonSet")]
    with open(os.path.join(ROOT, "deploy", "prometheus", "prometheus-kubernetes.yml")) as f:
        (job,) = yaml.safe_load(f)["scrape_configs"]
    for workload in pods:
        assert parse_container(container_of(workload), parsers[component_of(workload)]).metrics_tls == metrics
        pod = workload["spec"]["template"]
        labels = {"__address__": "10.0.0.7:7000", "__meta_kubernetes_pod_ip": "10.0.0.7", "__scheme__": "http"}
        for key, value in {**pod["metadata"]["labels"], **pod["metadata"]["annotations"]}.items():
            kind = "label" if key in pod["metadata"]["labels"] else "annotation"
            labels[f"__meta_kubernetes_pod_{kind}_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)] = value
        target = _relabel(job["relabel_configs"], labels)
        assert target is not None and target["__scheme__"] == ("http" if metrics == "off" else "https")
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert {m["metadata"]["name"] for m in monitors} == {f"pd-{c}" for c in ("router", "prefill", "decode", "kvstore")}
    for monitor in monitors:
        (endpoint,) = monitor["spec"]["endpoints"]
        if metrics == "off":
            assert "scheme" not in endpoint and "tlsConfig" not in endpoint
            continue
        assert endpoint["scheme"] == "https"
        tls = endpoint["tlsConfig"]
        assert tls["serverName"] == "pdserve" and tls["ca"]["secret"] == {"name": "pdserve-tls", "key": "ca.crt"}
        assert ("cert" in tls and "keySecret" in tls) == (metrics == "mutual")


def test_tls_metrics_mode_is_checked():
    error = render_error("pdserve", {"global": {"tls": {"enabled": True, "secretName": "s", "metrics": "plain"}}})
    assert "metrics" in error and "mutual" in error  # the values schema's enum
