# syntax=docker/dockerfile:1
# pdserve router (the public gRPC and OpenAI-compatible HTTP APIs; tokenizer, no GPU): `python -m services.router`.
# Build from the repository root:
#   docker build -f deploy/docker/router.Dockerfile -t REGISTRY/pdserve-router:0.1.0 .
# No torch: the router tokenizes and dispatches; pdserve's base dependencies (no `engine` extra)
# hold what it needs (tests/deploy/test_dockerfiles.py checks that no torch gets in).
ARG PYTHON_IMAGE=python:3.12-slim

# ---- builder: a virtualenv with pdserve, its dependencies and the generated gRPC stubs ----------
FROM ${PYTHON_IMAGE} AS builder
ENV VIRTUAL_ENV=/opt/pdserve \
    PATH=/opt/pdserve/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/pdserve
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY services/ services/
COPY bench/ bench/
# pdserve with its base dependencies (grpcio-tools among them), then the stubs generated from protos/
# as `make protos` does, then pdserve again with the stubs in it.
RUN pip install . \
 && mkdir -p pdserve/v1 \
 && python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. protos/pdserve/v1/*.proto \
 && touch pdserve/__init__.py pdserve/v1/__init__.py \
 && pip install --no-deps --force-reinstall . \
 && python -c "import pdserve.v1.router_pb2_grpc, services.router.__main__" \
 && ! python -c "import torch" 2>/dev/null

# ---- runtime: the same base, the virtualenv, a non-root user -------------------------------------
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 pdserve \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/pdserve pdserve
COPY --from=builder /opt/pdserve /opt/pdserve
# A container is its own network namespace: listen on its interfaces (the services' default,
# 127.0.0.1, would be unreachable from outside it).
ENV PATH=/opt/pdserve/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PDSERVE_CACHE=/home/pdserve/.cache/pdserve \
    PDSERVE_HOST=0.0.0.0
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /home/pdserve
# gRPC, Prometheus /metrics and the OpenAI-compatible HTTP API (the service's defaults).
EXPOSE 7000 9000 8000
ENTRYPOINT ["python", "-m", "services.router"]
