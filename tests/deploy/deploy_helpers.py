"""Helpers of the deployment tests: charts rendered by real Helm (helm-python-sdk embeds Helm's own
Go library through ctypes: no helm binary, no network) and the services' real argparse parsers."""

from __future__ import annotations

import os

import helm_python as helm  # helm-python-sdk, a dev dependency
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HELM_DIR = os.path.join(ROOT, "deploy", "helm")
CHARTS = ("router", "prefill", "decode", "kvstore", "pdserve")  # pdserve: the umbrella
SERVICES = ("router", "prefill", "decode", "colocated", "kvstore")
RELEASE, NAMESPACE = "pd", "llm"
KUBE_VERSION = "1.30.0"

helm.disable_logging()  # it logs every symlink it follows


def render(chart: str, values: dict | None = None, *, name: str = RELEASE, namespace: str = NAMESPACE) -> list[dict]:
    """Renders deploy/helm/<chart> with Helm; returns the Kubernetes objects (NOTES.txt left out),
    each with the template it came from under the key "_template"."""
    with helm.Chart.load(os.path.join(HELM_DIR, chart)) as loaded:
        manifests = loaded.render(values or {}, name=name, namespace=namespace, is_install=True)
    objects = []
    for template, text in sorted(manifests.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["_template"] = template
                objects.append(doc)
    return objects


def render_error(chart: str, values: dict) -> str:
    """The error Helm gives for these values (the test fails if it renders)."""
    with helm.Chart.load(os.path.join(HELM_DIR, chart)) as loaded, pytest.raises(helm.HelmError) as info:
        loaded.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return str(info.value)
