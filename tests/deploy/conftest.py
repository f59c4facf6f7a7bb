"""Fixtures of the deployment tests: the services' parsers, a real planner run, the rendered charts."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from unittest import mock

import pytest
import yaml
from deploy_helpers import CHARTS, ROOT, SERVICES, render


@pytest.fixture(scope="session")
def parsers() -> dict:
    """Each service's own argparse parser, as its `python -m services.<name>` builds it.

    The router and kvstore expose `parser()`. The engine workers build theirs inside main(), so main
    runs with worker_parser recorded and run_worker (the engine start) replaced. PDSERVE_* variables
    are cleared first: flags read them as defaults."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PDSERVE_") or k == "PDSERVE_CACHE"}
    result = {}
    with mock.patch.dict(os.environ, clean, clear=True):
        for service in SERVICES:
            module = importlib.import_module(f"services.{service}.__main__")
            if hasattr(module, "parser"):
                result[service] = module.parser()
                continue
            built = {}
            real = module.worker_parser

            def recording(*args, _real=real, built=built, **kwargs):
                built["parser"] = _real(*args, **kwargs)
                return built["parser"]

            with (
                mock.patch.object(module, "worker_parser", recording),
                mock.patch.object(module, "run_worker", lambda *a, **k: None),
            ):
                module.main([])
            result[service] = built["parser"]
    return result


def run_planner(out_dir, affinity: str) -> dict:
    """values.yaml from `python -m services.planner search`: 60 req/s of chat on a 7B model over
    2 nodes x 4 A100-80G, which it serves with single-GPU instances on both nodes (Algorithm 1) or
    on one node (Algorithm 2). Short probe traces and one process keep it to a few seconds."""
    cmd = [
        sys.executable,
        "-m",
        "services.planner",
        "search",
        "--model",
        "llama-2-7b",
        "--gpu",
        "A100-80G",
        "--nodes",
        "2",
        "--gpus-per-node",
        "4",
        "--rate",
        "60",
        "--slo-ttft",
        "0.3",
        "--slo-tpot",
        "0.08",
        "--affinity",
        affinity,
        "--min-duration",
        "5",
        "--num-requests",
        "200",
        "--no-colocated",
        "--workers",
        "1",
        "--out-dir",
        str(out_dir),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out_dir, "values.yaml")) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="session")
def planner_values(tmp_path_factory) -> dict:
    return run_planner(tmp_path_factory.mktemp("plan-high"), "high")


@pytest.fixture(scope="session")
def planner_values_low(tmp_path_factory) -> dict:
    return run_planner(tmp_path_factory.mktemp("plan-low"), "low")


@pytest.fixture(scope="session")
def renders(planner_values) -> dict[str, list[dict]]:
    """Every chart with its defaults, the umbrella with the planner's values, and the umbrella with
    every option on (monitoring, ingress with TLS, kvstore on the pod network, a model volume)."""
    options = {
        "global": {
            "monitoring": {"serviceMonitor": True, "dashboards": True, "prometheusRule": True},
            "modelPath": "/models/Meta-Llama-3-8B-Instruct",
            "modelVolume": {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}},
        },
        "router": {
            "ingress": {"enabled": True, "host": "llm.example.com", "tls": {"secretName": "llm-tls"}},
            "replicaCount": 2,
            "serviceMonitor": {"interval": "1m30s"},
            "admission": {"maxInflightRequests": 0, "maxQueuedPromptTokens": 4000000},
        },
        "kvstore": {"hostNetwork": False, "ucxTls": "tcp,cuda_copy,cuda_ipc,sm,self"},
        # integers of a million or more: Helm holds them as float64 and would print 1.048576e+06
        "prefill": {"replicaCount": 3, "maxModelLen": 1048576, "maxBatchedTokens": 2000000},
        "decode": {
            "streamInterval": 4,
            "podDisruptionBudget": {"maxUnavailable": 0},
            "admission": {"maxInflightRequests": 512},
        },
    }
    result = {f"{chart}-defaults": render(chart) for chart in CHARTS}
    result["pdserve-planner"] = render("pdserve", planner_values)
    result["pdserve-options"] = render("pdserve", options)
    return result
