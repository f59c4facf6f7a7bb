"""Observability against the real thing: a live cluster under load, scraped by a real Prometheus
(Debian's package, installed by `make install`), evaluating the project's rules and dashboards."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import random
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from prometheus_server import need_binary, running_prometheus

from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.launcher import prometheus_config
from services.tiny_models import CORPUS_WORDS, get_model

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROM_DIR = os.path.join(ROOT, "deploy", "prometheus")
GRAFANA_DIR = os.path.join(ROOT, "deploy", "grafana")
NUM_REQUESTS = 24


@pytest.fixture(scope="module")
def cluster(cluster_factory):
    return cluster_factory("--model", get_model("llama"), "--prefill", "1", "--decode", "1", "--nodes", "2")


@pytest.fixture(scope="module")
def loaded(cluster):
    """Sends NUM_REQUESTS requests in waves; half carry a per-request TTFT SLO no one can meet."""
    rng = random.Random(1)

    async def one(i: int):
        sampling = common_pb2.SamplingParams(max_tokens=rng.choice([1, 8, 20]), temperature=0.7, seed=i)
        request = router_pb2.GenerateRequest(
            prompt=" ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randint(3, 40))), sampling=sampling
        )
        if i % 2:
            request.slo.ttft_seconds = 1e-6
        async with grpc.aio.insecure_channel(cluster.router) as channel:
            last = None
            async for response in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=60):
                last = response
            return last

    async def waves():
        out = []
        for start in range(0, NUM_REQUESTS, 4):
            out += await asyncio.gather(*(one(i) for i in range(start, start + 4)))
            await asyncio.sleep(0.3)
        return out

    return asyncio.run(waves())


@pytest.fixture(scope="module")
def prometheus(cluster, loaded, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prometheus")
    with running_prometheus(prometheus_config(cluster.info, scrape_interval="1s"), tmp) as url:
        # more traffic while Prometheus watches, so rates over the last minute are not zero (HTTP
        # too: the dashboards' per-API panels)
        http_load(cluster)
        loaded.extend(load_again(cluster))
        time.sleep(4)  # a few scrapes and rule evaluations after the load
        yield url, tmp / "prometheus.yml"


def load_again(cluster, n: int = 12) -> list:
    async def run():
        out = []
        async with grpc.aio.insecure_channel(cluster.router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            for i in range(n):
                async for response in stub.Generate(
                    router_pb2.GenerateRequest(
                        prompt=f"request number {i}", sampling=common_pb2.SamplingParams(max_tokens=6, temperature=0)
                    )
                ):
                    last = response
                out.append(last)
                await asyncio.sleep(0.4)
        return out

    return asyncio.run(run())


def http_load(cluster, n: int = 3) -> None:
    """A few completions through the router's OpenAI-compatible HTTP API (counted under api="http")."""
    for i in range(n):
        body = json.dumps({"prompt": f"http request {i}", "max_tokens": 4, "temperature": 0}).encode()
        request = urllib.request.Request(
            f"http://{cluster.info['http']}/v1/completions", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as r:
            assert json.load(r)["choices"][0]["finish_reason"] in ("stop", "length")


def query(url: str, expr: str) -> list:
    with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def dashboard_expressions() -> list[tuple[str, str]]:
    exprs = []
    for path in sorted(glob.glob(os.path.join(GRAFANA_DIR, "dashboards", "*.json"))):
        for panel in json.load(open(path))["panels"]:
            for target in panel["targets"]:
                exprs.append((f"{os.path.basename(path)}: {panel['title']}", target["expr"]))
    return exprs


def rules() -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(PROM_DIR, "rules", "*.yml"))):
        for group in yaml.safe_load(open(path))["groups"]:
            out += group["rules"]
    return out


# ---- the checks ----------------------------------------------------------------------------------
def test_promtool_accepts_configs_and_rules(prometheus):
    promtool = need_binary("promtool")
    _, generated = prometheus
    for config in (os.path.join(PROM_DIR, "prometheus.yml"), str(generated)):
        out = subprocess.run([promtool, "check", "config", config], capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr
    out = subprocess.run(
        [promtool, "check", "rules", *glob.glob(os.path.join(PROM_DIR, "rules", "*.yml"))],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_router_saturation_alert_fires_past_a_quarter_of_the_tpot_slo_and_not_below(tmp_path):
    """promtool's rule tests on synthetic series: a router delaying tokens ~50 ms at p99 under a
    100 ms TPOT SLO fires PdserveRouterSaturated once its 10 minutes have passed; one at ~5 ms
    never does."""
    promtool = need_binary("promtool")
    rule = next(r for r in rules() if r.get("alert") == "PdserveRouterSaturated")
    bounds = ("0.005", "0.01", "0.05", "+Inf")
    relay = "pdserve_router_token_relay_seconds_bucket"
    series = []
    for instance, first_full in (("slow", "0.05"), ("fast", "0.005")):  # every token in (0.01, 0.05] or <= 5 ms
        for le in bounds:
            full = bounds.index(le) >= bounds.index(first_full)
            series.append(
                {
                    "series": f'{relay}{{instance="{instance}",api="grpc",le="{le}"}}',
                    "values": "0+100x30" if full else "0x30",
                }
            )
    series.append({"series": 'pdserve_slo_target_seconds{instance="slow",slo="tpot"}', "values": "0.1x30"})
    p99 = 0.01 + 0.04 * 0.99
    test = {
        "rule_files": [os.path.join(PROM_DIR, "rules", "pdserve-alerts.yml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [
                    {"eval_time": "8m", "alertname": "PdserveRouterSaturated", "exp_alerts": []},  # pending
                    {
                        "eval_time": "20m",
                        "alertname": "PdserveRouterSaturated",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "instance": "slow"},
                                "exp_annotations": {
                                    "summary": f"router slow delays tokens {p99 * 1000:.4g}ms at p99",
                                    "description": rule["annotations"]["description"],
                                },
                            }
                        ],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "router-saturated.test.yml"
    path.write_text(yaml.safe_dump(test))
    out = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_target_is_scraped(prometheus, cluster):
    url, _ = prometheus
    up = {r["metric"]["service"]: r["value"][1] for r in query(url, "up")}
    assert up == {svc["name"]: "1" for svc in cluster.info["services"]}


def test_every_dashboard_expression_returns_data(prometheus):
    url, _ = prometheus
    exprs = dashboard_expressions()
    assert len(exprs) > 40
    empty = [where for where, expr in exprs if not query(url, promql(expr))]  # as Grafana sends them, api All
    assert not empty, f"no data for: {empty}"


def test_every_recording_rule_evaluates_and_returns_data(prometheus):
    url, _ = prometheus
    recording = [r for r in rules() if "record" in r]
    assert len(recording) >= 10
    for rule in recording:
        assert query(url, rule["expr"]), f"{rule['record']}: its expression returned nothing"
        assert query(url, rule["record"]), f"{rule['record']}: Prometheus has not recorded it"


def test_every_alert_rule_evaluates_and_its_signal_returns_data(prometheus):
    """An alert returns data only while firing, so the whole expression must evaluate without error
    and the signal it compares (the expression left of the threshold) must have data."""
    url, _ = prometheus
    alerts = [r for r in rules() if "alert" in r]
    assert {a["alert"] for a in alerts} >= {
        "PdserveSloAttainmentLow",
        "PdserveKvPoolNearlyFull",
        "PdserveKvTransferFailures",
        "PdserveShedding",
        "PdserveWorkerEjected",
        "PdserveRouterSaturated",
    }
    for rule in alerts:
        query(url, rule["expr"])
        signal = re.split(r"\s(?:<|>|==|!=|<=|>=)\s", rule["expr"])[0]
        assert query(url, signal), f"{rule['alert']}: no data for {signal!r}"


def test_histograms_and_slo_counters_agree_with_what_clients_saw(cluster, loaded):
    """Every request this module sent (`loaded`) against the router's own histogram and counters."""
    router = next(s for s in cluster.info["services"] if s["role"] == "router")
    families = {f.name: f for f in text_string_to_metric_families(cluster.metrics_text(router))}

    def sample(family: str, name: str, **labels) -> float:
        labels.setdefault("api", "grpc")  # (the module's HTTP requests are its own series)
        return next(
            s.value
            for s in families[family].samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert len(loaded) >= NUM_REQUESTS
    assert sample("pdserve_time_to_first_token_seconds", "pdserve_time_to_first_token_seconds_count") == len(loaded)
    ttfts = [r.timing.ttft_seconds for r in loaded]
    assert sample("pdserve_time_to_first_token_seconds", "pdserve_time_to_first_token_seconds_sum") == pytest.approx(
        sum(ttfts)
    )
    for s in families["pdserve_time_to_first_token_seconds"].samples:
        if s.name.endswith("_bucket") and s.labels["api"] == "grpc":
            le = float(s.labels["le"])
            assert s.value == sum(1 for t in ttfts if t <= le), f"bucket le={le}"
    assert sample("pdserve_slo_requests", "pdserve_slo_requests_total") == len(loaded)
    # every message after a request's first came from its decode worker's call: each has a gap
    # since the one before (ITL) and a delay at the router (relay), and nothing else has either
    relayed = sample("pdserve_router_token_relay_seconds", "pdserve_router_token_relay_seconds_count")
    assert relayed == sample("pdserve_inter_token_latency_seconds", "pdserve_inter_token_latency_seconds_count") > 0
    assert 0 < sample("pdserve_router_token_relay_seconds", "pdserve_router_token_relay_seconds_sum") < relayed
    assert sample("pdserve_slo_ttft_met", "pdserve_slo_ttft_met_total") == sum(r.timing.slo_ttft_met for r in loaded)
    assert sample("pdserve_slo_tpot_met", "pdserve_slo_tpot_met_total") == sum(r.timing.slo_tpot_met for r in loaded)
    assert sample("pdserve_slo_met", "pdserve_slo_met_total") == sum(
        r.timing.slo_ttft_met and r.timing.slo_tpot_met for r in loaded
    )
    # the impossible per-request SLO really was applied to half of the first wave
    first = loaded[:NUM_REQUESTS]
    assert all(r.timing.slo_ttft_seconds == 1e-6 and not r.timing.slo_ttft_met for r in first[1::2])
    assert all(r.timing.slo_ttft_seconds == 0.25 for r in first[0::2])


def documented_metrics() -> dict[str, set[str]]:
    sections: dict[str, set[str]] = {}
    current = None
    for line in open(os.path.join(ROOT, "docs", "metrics.md")):
        if line.startswith("## "):
            current = line[3:].strip()
        m = re.match(r"\| `(pdserve_[a-z0-9_]+)` \|", line)
        if m and current:
            sections.setdefault(current, set()).add(m.group(1))
    return sections


def exposed_metrics(text: str) -> set[str]:
    names = set()
    for family in text_string_to_metric_families(text):
        if family.name.startswith("pdserve_"):
            names.add(family.name + "_total" if family.type == "counter" else family.name)
    return names


def test_docs_metrics_md_matches_live_metrics_both_ways(cluster, loaded):
    docs = documented_metrics()
    for svc in cluster.info["services"]:
        documented = docs["All services"] | docs[svc["role"]]
        exposed = exposed_metrics(cluster.metrics_text(svc))
        assert exposed - documented == set(), f"{svc['name']} exposes undocumented metrics"
        assert documented - exposed == set(), f"{svc['name']} lacks documented metrics"
        # and the standard process metrics are there too
        assert "process_resident_memory_bytes" in cluster.metrics_text(svc)


def _dashboards():
    """deploy/grafana/dashboards.py, the generator (a script, not a package)."""
    sys.path.insert(0, GRAFANA_DIR)
    try:
        import dashboards
    finally:
        sys.path.pop(0)
    return dashboards


def promql(expr: str) -> str:
    return _dashboards().promql(expr)


def test_committed_dashboards_are_the_generator_output():
    dashboards = _dashboards()
    for name, text in dashboards.build().items():
        assert open(os.path.join(GRAFANA_DIR, "dashboards", name)).read() == text, f"regenerate {name}"
