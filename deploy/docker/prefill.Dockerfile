# syntax=docker/dockerfile:1
# pdserve prefill (GPU worker: prompt KV and first token): `python -m services.prefill`, on a CUDA base.
# Build from the repository root:
#   docker build -f deploy/docker/prefill.Dockerfile -t REGISTRY/pdserve-prefill:0.1.0 .
# Build arguments: CUDA_IMAGE (base image; CUDA 12 for the ucxx-cu12 wheels), TORCH_VERSION, and
# TORCH_INDEX_URL (a PyTorch wheel index for a CUDA version that your driver supports; empty: the
# package index's default build). See docs/deploy.md.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---- builder: a virtualenv with pdserve, its dependencies and the generated gRPC stubs ----------
FROM ${CUDA_IMAGE} AS builder
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/pdserve \
    PATH=/opt/pdserve/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/pdserve
# torch first: the largest layer, reused while only the sources change (pinned by TORCH_VERSION,
# which hadolint cannot see through).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
# hadolint ignore=DL3013
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protos/ protos/
COPY services/ services/
COPY bench/ bench/
# pdserve with the engine's dependencies (the `engine` extra: torch, safetensors, ucxx; grpcio-tools
# among the base ones), then the stubs generated from protos/ as `make protos` does, then pdserve
# again with the stubs in it. (".[engine]" is this source tree, which hadolint takes for an unpinned package.)
# hadolint ignore=DL3013
RUN pip install ".[engine]" \
 && mkdir -p pdserve/v1 \
 && python -m grpc_tools.protoc -Iprotos --python_out=. --grpc_python_out=. --pyi_out=. protos/pdserve/v1/*.proto \
 && touch pdserve/__init__.py pdserve/v1/__init__.py \
 && pip install --no-deps --force-reinstall . \
 && python -c "import pdserve.v1.worker_pb2_grpc, services.prefill.__main__"

# ---- runtime: the same base, the virtualenv, a non-root user -------------------------------------
FROM ${CUDA_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
# gcc, libc headers and Python.h: Triton compiles its CUDA driver module on first use (the engine's
# kernels on GPU); without a C compiler at run time the first forward pass fails. On a CPU node the
# engine builds its AVX-512 decode kernels with the same gcc (services/engine/kernels/cpu.py).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 pdserve \
 && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/pdserve pdserve
COPY --from=builder /opt/pdserve /opt/pdserve
# A container is its own network namespace: listen on its interfaces (the services' default,
# 127.0.0.1, would be unreachable from outside it).
ENV PATH=/opt/pdserve/bin:$PATH \
    CC=gcc \
    PYTHONUNBUFFERED=1 \
    PDSERVE_CACHE=/home/pdserve/.cache/pdserve \
    PDSERVE_HOST=0.0.0.0
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /home/pdserve
# gRPC and Prometheus /metrics (the service's defaults).
EXPOSE 7200 9200
ENTRYPOINT ["python", "-m", "services.prefill"]
