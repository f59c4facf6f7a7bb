"""The cluster on a GPU: CUDA-IPC KV pools mapped by the kvstore daemons, KV moved between daemons
by UCX from GPU memory (and by device copies on one node), exact greedy outputs; a tensor-parallel
instance of 2 ranks on one GPU.

Skipped without a CUDA GPU (there is none in CI); run on a GPU machine with
`pytest tests/e2e/test_gpu_cluster.py`."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer
from workload import block_bytes, check_outputs, expected_kv_bytes, largest_grpc_message, run_workload

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs on the device machine)"),
]

GPU_WORKERS = ["--worker-arg", "--device cuda", "--kvstore-arg", "--ucx-tls tcp,sm,self,cuda_copy,cuda_ipc"]


def test_gpu_two_nodes_cuda_ipc_pools_and_ucx(cluster_factory, workload, model_dir):
    cluster = cluster_factory("--model", model_dir, "--prefill", "1", "--decode", "1", "--nodes", "2", *GPU_WORKERS)
    results = run_workload(cluster.router, workload)
    check_outputs(workload, results, AutoTokenizer.from_pretrained(model_dir))
    cluster.wait_idle()
    stats = cluster.kvstore_stats()
    want = expected_kv_bytes(workload, model_dir)
    assert sum(s.bytes_ucx_received for s in stats) == want
    assert sum(s.bytes_ucx_sent for s in stats) == want
    assert 0 < largest_grpc_message(cluster) < block_bytes(model_dir)


def test_gpu_one_node_device_copies(cluster_factory, workload, model_dir):
    cluster = cluster_factory("--model", model_dir, "--prefill", "1", "--decode", "1", "--nodes", "1", *GPU_WORKERS)
    results = run_workload(cluster.router, workload)
    check_outputs(workload, results, AutoTokenizer.from_pretrained(model_dir))
    cluster.wait_idle()
    (stats,) = cluster.kvstore_stats()
    assert stats.bytes_local == expected_kv_bytes(workload, model_dir)


def test_gpu_tensor_parallel_2_on_one_gpu(cluster_factory, workload, model_dir):
    """Two tensor-parallel ranks in two processes on the one GPU (--ranks-share-gpu: NCCL wants a
    GPU per rank, so their all-reduces go through gloo and host memory; a correctness check, not a
    speed one) serve the workload exactly as transformers generates it."""
    cluster = cluster_factory(
        "--model", model_dir, "--mode", "colocated", "--colocated", "1", "--tp", "2",
        "--worker-arg", "--device cuda", "--worker-arg=--ranks-share-gpu",
    )  # fmt: skip
    results = run_workload(cluster.router, workload)
    check_outputs(workload, results, AutoTokenizer.from_pretrained(model_dir))
    cluster.wait_idle()
