"""Builds the Grafana dashboards (deploy/grafana/dashboards/*.json) from the panel lists below.

    python deploy/grafana/dashboards.py        # rewrites the JSON files

Edit the lists here, not the JSON: a test checks that the committed JSON is this script's output
and that every expression returns data from a live cluster scraped by a real Prometheus.
Expressions use Grafana's $__rate_interval and the recording rules of deploy/prometheus/rules.
The router's request metrics carry an `api` label ("grpc" or "http"): the SLO overview has a
variable $api (multi-select, All by default) and its request panels query those metrics directly,
filtered by it (the recording rules sum over both APIs, for the alerts); quantiles still sum by
(le), so a selection of several APIs gives one set of quantiles. `promql()` turns a panel's
expression into what Grafana sends with every variable at its default (All).
"""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "dashboards")
RATE = "$__rate_interval"
# The router's request metrics, limited to the APIs chosen in the dashboard's $api variable.
API = 'api=~"$api"'
ALL = ".*"  # what Grafana puts in place of $api for All (the default)


def promql(expr: str, *, rate_interval: str = "1m", api: str = ALL) -> str:
    """A panel's expression as Grafana sends it to Prometheus: $__rate_interval and $api replaced
    (by default with All; a selection of several APIs is a regex, e.g. api="(grpc|http)")."""
    return expr.replace(RATE, rate_interval).replace("$api", api)


def q(expr: str, legend: str = "") -> dict:
    return {"expr": expr, "legend": legend}


def quantiles(metric: str, by: str = "", selector: str = "") -> list[dict]:
    """p50, p90, p99 of a histogram, its series summed by le (and `by`), of those matching selector."""
    group = f"le, {by}" if by else "le"
    suffix = f" {{{{{by}}}}}" if by else ""
    series = f"{metric}_bucket{{{selector}}}" if selector else f"{metric}_bucket"
    return [
        q(f"histogram_quantile({p}, sum by ({group}) (rate({series}[{RATE}])))", f"p{int(p * 100)}{suffix}")
        for p in (0.5, 0.9, 0.99)
    ]


def api_ratio(met: str, window: str = "5m") -> str:
    """The share of the chosen APIs' SLO-judged requests counted by `met` over the window."""
    return f"sum(rate({met}{{{API}}}[{window}])) / sum(rate(pdserve_slo_requests_total{{{API}}}[{window}]))"


# (title, unit, queries, kind) ; kind: "timeseries" or "stat"
DASHBOARDS = {
    "pdserve-slo-overview": (
        "pdserve / SLO overview",
        [
            (
                "SLO attainment (both SLOs, 5m)",
                "percentunit",
                [  # the recording rules pdserve:slo_*attainment:ratio_rate5m, for the chosen APIs
                    q(api_ratio("pdserve_slo_met_total"), "both"),
                    q(api_ratio("pdserve_slo_ttft_met_total"), "TTFT"),
                    q(api_ratio("pdserve_slo_tpot_met_total"), "TPOT"),
                    q("max(pdserve_slo_attainment_target_ratio)", "target"),
                ],
                "timeseries",
            ),
            (
                "Attainment, last window (all APIs)",
                "percentunit",
                [q("min(pdserve_slo_attainment_ratio)", "attainment")],
                "stat",
            ),
            (
                "Goodput and throughput",
                "reqps",
                [  # pdserve:goodput:rate5m and pdserve:requests:rate5m, for the chosen APIs
                    q(f"sum(rate(pdserve_slo_met_total{{{API}}}[5m]))", "goodput (met both SLOs)"),
                    q(f"sum(rate(pdserve_slo_requests_total{{{API}}}[5m]))", "finished requests"),
                ],
                "timeseries",
            ),
            (
                "Request rate by finish reason",
                "reqps",
                [q(f"sum by (finish_reason) (rate(pdserve_requests_total{{{API}}}[{RATE}]))", "{{finish_reason}}")],
                "timeseries",
            ),
            (
                "Requests by API",
                "reqps",
                [q(f"sum by (api) (rate(pdserve_requests_total{{{API}}}[{RATE}]))", "{{api}}")],
                "timeseries",
            ),
            (
                "HTTP API responses by status",
                "reqps",
                [q(f"sum by (status) (rate(pdserve_http_responses_total[{RATE}]))", "{{status}}")],
                "timeseries",
            ),
            (
                "TTFT against SLO",
                "s",
                quantiles("pdserve_time_to_first_token_seconds", selector=API)
                + [q('max(pdserve_slo_target_seconds{slo="ttft"})', "SLO")],
                "timeseries",
            ),
            (
                "TPOT against SLO",
                "s",
                quantiles("pdserve_time_per_output_token_seconds", selector=API)
                + [q('max(pdserve_slo_target_seconds{slo="tpot"})', "SLO")],
                "timeseries",
            ),
            ("End-to-end latency", "s", quantiles("pdserve_e2e_request_latency_seconds", selector=API), "timeseries"),
            ("Queue time before compute", "s", quantiles("pdserve_request_queue_time_seconds"), "timeseries"),
            ("Router overhead in TTFT", "s", quantiles("pdserve_router_overhead_seconds"), "timeseries"),
            ("Inter-token latency", "s", quantiles("pdserve_inter_token_latency_seconds", selector=API), "timeseries"),
            (
                "Router delay per token (worker's message in to client's message out)",
                "s",
                quantiles("pdserve_router_token_relay_seconds", selector=API),
                "timeseries",
            ),
            (
                "Tokens per second",
                "short",
                [
                    q(f"sum(rate(pdserve_prompt_tokens_total{{{API}}}[{RATE}]))", "prompt"),
                    q(f"sum(rate(pdserve_generation_tokens_total{{{API}}}[{RATE}]))", "generated"),
                ],
                "timeseries",
            ),
            (
                "Requests in flight, retries",
                "short",
                [
                    q(f"sum(pdserve_requests_in_flight{{{API}}})", "in flight"),
                    q(f"sum(rate(pdserve_request_retries_total[{RATE}]))", "failovers/s"),
                ],
                "timeseries",
            ),
            (
                "Refused for load (RESOURCE_EXHAUSTED)",
                "reqps",
                [q(f"sum by (component) (rate(pdserve_admission_refusals_total[{RATE}]))", "{{component}}")],
                "timeseries",
            ),
            (
                "Workers the router sends work",
                "short",
                [
                    q("sum by (role) (pdserve_router_worker_healthy)", "{{role}} healthy"),
                    q(
                        f"sum by (reason) (increase(pdserve_router_worker_ejections_total[{RATE}]))",
                        "ejected: {{reason}}",
                    ),
                ],
                "timeseries",
            ),
        ],
    ),
    "pdserve-prefill": (
        "pdserve / prefill",
        [
            (
                "Queue",
                "short",
                [
                    q("sum by (instance) (pdserve_prefill_queue_requests)", "requests {{instance}}"),
                    q("sum by (instance) (pdserve_prefill_queue_tokens)", "tokens {{instance}}"),
                ],
                "timeseries",
            ),
            ("Queue time", "s", quantiles("pdserve_prefill_queue_time_seconds"), "timeseries"),
            ("Batch step time", "s", quantiles("pdserve_prefill_step_duration_seconds"), "timeseries"),
            ("Tokens per batch", "short", quantiles("pdserve_prefill_batch_tokens"), "timeseries"),
            ("Prompts per batch", "short", quantiles("pdserve_prefill_batch_requests"), "timeseries"),
            (
                "KV pool usage",
                "percentunit",
                [q('pdserve:kv_blocks_usage:ratio{role="prefill"}', "{{instance}}")],
                "timeseries",
            ),
            (
                "Prefix cache hit rate (prefill and colocated workers)",
                "percentunit",
                [
                    q(
                        f"sum by (tier) (rate(pdserve_prefix_cache_hit_tokens_total[{RATE}])) / "
                        f"sum by (tier) (rate(pdserve_prefix_cache_queries_tokens_total[{RATE}]))",
                        "{{tier}}",
                    )
                ],
                "timeseries",
            ),
            (
                "Prompt tokens looked up, found cached",
                "short",
                [
                    q(
                        f"sum by (instance) (rate(pdserve_prefix_cache_queries_tokens_total[{RATE}]))",
                        "looked up {{instance}}",
                    ),
                    q(
                        f"sum by (instance, tier) (rate(pdserve_prefix_cache_hit_tokens_total[{RATE}]))",
                        "found ({{tier}}) {{instance}}",
                    ),
                ],
                "timeseries",
            ),
            (
                "Cached blocks and evictions",
                "short",
                [
                    q("sum by (instance) (pdserve_prefix_cache_blocks)", "cached {{instance}}"),
                    q(
                        f"sum by (instance) (rate(pdserve_prefix_cache_evicted_blocks_total[{RATE}]))",
                        "evicted/s {{instance}}",
                    ),
                ],
                "timeseries",
            ),
            (
                "Router: prompts by cached prefix at the chosen worker",
                "reqps",
                [
                    q(
                        f"sum by (policy, outcome) (rate(pdserve_router_prefix_dispatch_total[{RATE}]))",
                        "{{policy}}: {{outcome}}",
                    )
                ],
                "timeseries",
            ),
            (
                "KV entries waiting to be pulled",
                "short",
                [q("sum by (instance) (pdserve_prefill_published_entries)", "{{instance}}")],
                "timeseries",
            ),
            (
                "Requests by outcome",
                "reqps",
                [q(f"sum by (outcome) (rate(pdserve_prefill_requests_total[{RATE}]))", "{{outcome}}")],
                "timeseries",
            ),
        ],
    ),
    "pdserve-decode": (
        "pdserve / decode",
        [
            (
                "Running and waiting requests",
                "short",
                [
                    q("sum by (instance) (pdserve_decode_running_requests)", "running {{instance}}"),
                    q("sum by (instance) (pdserve_decode_waiting_requests)", "waiting {{instance}}"),
                ],
                "timeseries",
            ),
            ("Decode step time", "s", quantiles("pdserve_decode_step_duration_seconds", by="kind"), "timeseries"),
            ("Batch size", "short", quantiles("pdserve_decode_batch_size"), "timeseries"),
            ("Admission wait (for KV blocks)", "s", quantiles("pdserve_decode_admission_wait_seconds"), "timeseries"),
            (
                "KV pool usage",
                "percentunit",
                [q('pdserve:kv_blocks_usage:ratio{role=~"decode|colocated"}', "{{role}} {{instance}}")],
                "timeseries",
            ),
            (
                "Generated tokens per second",
                "short",
                [q(f"sum by (instance) (rate(pdserve_decode_generated_tokens_total[{RATE}]))", "{{instance}}")],
                "timeseries",
            ),
            (
                # the process's CPU beyond the engine call is the serving path (scheduling, streaming, gRPC)
                "CPU per generated token: serving path and engine call",
                "s",
                [
                    q(
                        f"(sum by (instance) (rate(process_cpu_seconds_total[{RATE}]))"
                        f" - sum by (instance) (rate(pdserve_decode_engine_cpu_seconds_total[{RATE}])))"
                        f" / sum by (instance) (rate(pdserve_decode_generated_tokens_total[{RATE}]))",
                        "serving path {{instance}}",
                    ),
                    q(
                        f"sum by (instance) (rate(pdserve_decode_engine_cpu_seconds_total[{RATE}]))"
                        f" / sum by (instance) (rate(pdserve_decode_generated_tokens_total[{RATE}]))",
                        "engine call {{instance}}",
                    ),
                ],
                "timeseries",
            ),
            (
                "Preemptions and KV recomputes",
                "ops",
                [
                    q(f"sum(rate(pdserve_decode_preemptions_total[{RATE}]))", "preemptions"),
                    q(f"sum by (reason) (rate(pdserve_decode_kv_recomputes_total[{RATE}]))", "recompute: {{reason}}"),
                ],
                "timeseries",
            ),
        ],
    ),
    "pdserve-kvstore": (
        "pdserve / kvstore transfers",
        [
            (
                "KV bytes moved by path",
                "Bps",
                [
                    q(f"sum by (path) (rate(pdserve_kvstore_transferred_bytes_total[{RATE}]))", "{{path}}"),
                    q(f"sum(rate(pdserve_kvstore_served_bytes_total[{RATE}]))", "served to other nodes"),
                ],
                "timeseries",
            ),
            (
                "Pulls by path",
                "ops",
                [q(f"sum by (path) (rate(pdserve_kvstore_pulls_total[{RATE}]))", "{{path}}")],
                "timeseries",
            ),
            ("Transfer duration", "s", quantiles("pdserve_kvstore_transfer_duration_seconds", by="path"), "timeseries"),
            (
                "Transfer failures",
                "ops",
                [q(f"sum by (reason) (rate(pdserve_kvstore_transfer_failures_total[{RATE}]))", "{{reason}}")],
                "timeseries",
            ),
            ("Entries by tier", "short", [q("sum by (tier) (pdserve_kvstore_entries)", "{{tier}}")], "timeseries"),
            (
                "Host tier",
                "bytes",
                [q("sum by (instance) (pdserve_kvstore_host_tier_bytes)", "{{instance}}")],
                "timeseries",
            ),
            (
                "TTL moves, expirations, evictions",
                "ops",
                [
                    q(f"sum(rate(pdserve_kvstore_ttl_moves_total[{RATE}]))", "moved to host"),
                    q(f"sum(rate(pdserve_kvstore_expired_entries_total[{RATE}]))", "expired"),
                    q(f"sum(rate(pdserve_kvstore_host_evictions_total[{RATE}]))", "evicted"),
                ],
                "timeseries",
            ),
            ("Registered pools", "short", [q("sum by (instance) (pdserve_kvstore_pools)", "{{instance}}")], "stat"),
        ],
    ),
}


def query_variable(name: str, label: str, query: str) -> dict:
    """A multi-select variable over a label's values (from Prometheus), All by default (the regex
    ALL, matching any value, so series whose value Grafana has not listed yet still count)."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "definition": query,
        "query": {"query": query, "refId": f"{name}-variable"},
        "refresh": 2,  # on every time range change, so a newly used API appears
        "sort": 1,
        "multi": True,
        "includeAll": True,
        "allValue": ALL,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "hide": 0,
    }


# Variables of each dashboard besides the data source.
VARIABLES = {
    "pdserve-slo-overview": [query_variable("api", "API", "label_values(pdserve_requests_total, api)")],
}


def panel(panel_id: int, title: str, unit: str, queries: list[dict], kind: str) -> dict:
    width = 6 if kind == "stat" else 12
    return {
        "id": panel_id,
        "type": kind,
        "title": title,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"h": 8, "w": width, "x": 0, "y": 0},  # Grafana flows panels left to right
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else {},
        "targets": [
            {
                "refId": chr(ord("A") + i),
                "expr": t["expr"],
                "legendFormat": t["legend"],
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
            }
            for i, t in enumerate(queries)
        ],
    }


def dashboard(uid: str, title: str, panels: list, variables: list = ()) -> dict:
    x = y = 0
    built = []
    for i, spec in enumerate(panels, start=1):
        p = panel(i, *spec)
        w = p["gridPos"]["w"]
        if x + w > 24:
            x, y = 0, y + 8
        p["gridPos"].update(x=x, y=y)
        x += w
        built.append(p)
    return {
        "uid": uid,
        "title": title,
        "tags": ["pdserve"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "label": "Prometheus",
                    "current": {},
                },
                *variables,
            ]
        },
        "panels": built,
    }


def build() -> dict[str, str]:
    return {
        f"{uid}.json": json.dumps(dashboard(uid, title, panels, VARIABLES.get(uid, [])), indent=2) + "\n"
        for uid, (title, panels) in DASHBOARDS.items()
    }


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    for name, text in build().items():
        with open(os.path.join(OUT, name), "w") as f:
            f.write(text)
        print(f"wrote {os.path.join(OUT, name)}")
