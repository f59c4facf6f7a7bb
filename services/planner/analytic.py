"""A latency profile from a GPU's datasheet and a model's shape, for hardware that is not at hand.

Each forward pass is costed with a roofline (the slower of compute and memory traffic) plus the
communication that tensor and pipeline parallelism add, then the same (a, b, c) forms that a
measured profile uses are fitted to those times over a grid of batches. So the simulator and the
search treat analytic and measured profiles alike.

Assumptions (all in `AnalyticAssumptions`, all overridable):
  - Prefill matmuls reach `prefill_mfu` of peak FLOP/s; causal attention (FlashAttention-style,
    skipping the masked half) reaches `attention_mfu`. FLOPs: 2 * params per token for the
    matmuls, 2 * layers * heads * head_dim * len^2 for attention.
  - Decode reads all weights of its shard plus each sequence's KV every step at
    `bandwidth_efficiency` of HBM bandwidth; its matmuls reach `decode_mfu` (they are thin).
  - Tensor parallelism (Megatron): 2 all-reduces of the activations per layer, ring algorithm:
    latency + 2 (tp-1)/tp * bytes / (link bandwidth * comm_efficiency), not overlapped with compute.
    Weights and KV heads are split tp ways (KV heads replicated when tp > kv heads).
  - Pipeline parallelism: layers split evenly; a full pass of one (micro)batch crosses pp-1 stage
    boundaries, each sending the activations once; stages packed onto nodes tp GPUs at a time,
    so hops between nodes go over the network. The profile is the time of one full pass: the
    simulator runs pp batches (prefill) or micro-batches (decode) in flight at once.
  - Fixed costs: `step_overhead_s` per forward (scheduler, sampling) and `layer_overhead_s` per
    layer (kernel launches).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from services.common.latency_profile import LatencyProfile, Overheads, TransferSpec

from .hardware import ClusterSpec, GpuSpec, ModelShape
from .latency_model import critical_batch_tokens, fit_decode, fit_prefill


@dataclass(frozen=True)
class AnalyticAssumptions:
    prefill_mfu: float = 0.5
    attention_mfu: float = 0.35
    decode_mfu: float = 0.3
    bandwidth_efficiency: float = 0.8
    comm_efficiency: float = 0.7
    allreduce_latency_s: float = 15e-6
    hop_latency_s: float = 20e-6
    step_overhead_s: float = 1e-3
    layer_overhead_s: float = 10e-6


@dataclass(frozen=True)
class Parallelism:
    tensor: int = 1
    pipeline: int = 1
    inter_node_hops: int = 0  # pipeline boundaries that cross nodes

    @classmethod
    def packed(cls, tensor: int, pipeline: int, gpus_per_node: int) -> Parallelism:
        """Stages placed consecutively, gpus_per_node // tensor stages per node."""
        stages_per_node = max(1, gpus_per_node // tensor)
        nodes = math.ceil(pipeline / stages_per_node)
        return cls(tensor, pipeline, nodes - 1)


def _allreduce_s(num_bytes: float, tp: int, gpu: GpuSpec, a: AnalyticAssumptions) -> float:
    if tp == 1:
        return 0.0
    return a.allreduce_latency_s + 2 * (tp - 1) / tp * num_bytes / (gpu.intra_node_bytes_per_s * a.comm_efficiency)


def _pipeline_hops_s(num_bytes: float, par: Parallelism, gpu: GpuSpec, a: AnalyticAssumptions) -> float:
    hops = par.pipeline - 1
    if hops == 0:
        return 0.0
    inter = min(par.inter_node_hops, hops)
    intra = hops - inter
    eff = a.comm_efficiency
    return (
        hops * a.hop_latency_s
        + intra * num_bytes / (gpu.intra_node_bytes_per_s * eff)
        + inter * num_bytes / (gpu.inter_node_bytes_per_s * eff)
    )


def prefill_pass_seconds(
    lengths: list[int],
    shape: ModelShape,
    gpu: GpuSpec,
    par: Parallelism,
    a: AnalyticAssumptions = AnalyticAssumptions(),
) -> float:
    tp, layers = par.tensor, shape.num_layers
    tokens = sum(lengths)
    matmul_flops = 2 * layers * shape.layer_params * tokens
    attn_flops = 2 * layers * shape.attention_width * sum(n * n for n in lengths)
    compute = matmul_flops / (tp * gpu.peak_flops * a.prefill_mfu) + attn_flops / (
        tp * gpu.peak_flops * a.attention_mfu
    )
    memory = shape.weight_bytes / tp / (gpu.hbm_bytes_per_s * a.bandwidth_efficiency)
    activation_bytes = tokens * shape.hidden_size * shape.dtype_bytes
    comm = 2 * layers * _allreduce_s(activation_bytes, tp, gpu, a) + _pipeline_hops_s(activation_bytes, par, gpu, a)
    return max(compute, memory) + comm + a.step_overhead_s + layers * a.layer_overhead_s


def decode_step_seconds(
    batch_size: int,
    sum_context: int,
    shape: ModelShape,
    gpu: GpuSpec,
    par: Parallelism,
    a: AnalyticAssumptions = AnalyticAssumptions(),
) -> float:
    tp, layers = par.tensor, shape.num_layers
    kv_split = min(tp, shape.num_kv_heads)
    memory = (shape.weight_bytes / tp + shape.kv_bytes_per_token * sum_context / kv_split) / (
        gpu.hbm_bytes_per_s * a.bandwidth_efficiency
    )
    flops = 2 * layers * shape.layer_params * batch_size + 4 * layers * shape.attention_width * sum_context
    compute = flops / (tp * gpu.peak_flops * a.decode_mfu)
    activation_bytes = batch_size * shape.hidden_size * shape.dtype_bytes
    comm = 2 * layers * _allreduce_s(activation_bytes, tp, gpu, a) + _pipeline_hops_s(activation_bytes, par, gpu, a)
    return max(compute, memory) + comm + a.step_overhead_s + layers * a.layer_overhead_s


def kv_capacity_tokens(shape: ModelShape, cluster: ClusterSpec, tp: int, pp: int) -> int:
    """KV slots of an instance: what is left on each GPU after its weight shard and a reserve.
    0 when the weights do not fit."""
    per_gpu = cluster.gpu.memory_bytes * cluster.memory_utilization - cluster.activation_reserve_bytes
    free = per_gpu - shape.weight_bytes / (tp * pp)
    if free <= 0:
        return 0
    kv_per_token_per_gpu = shape.kv_bytes_per_token / (pp * min(tp, shape.num_kv_heads))
    return int(free // kv_per_token_per_gpu)


def analytic_profile(
    shape: ModelShape,
    cluster: ClusterSpec,
    tp: int,
    pp: int,
    *,
    par: Parallelism | None = None,
    assumptions: AnalyticAssumptions = AnalyticAssumptions(),
    typical_prompt_len: int = 512,
    block_size: int = 16,
    max_num_seqs: int = 256,
) -> LatencyProfile:
    gpu = cluster.gpu
    par = par or Parallelism.packed(tp, pp, cluster.gpus_per_node)
    max_len = shape.max_model_len
    lengths = [n for n in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192) if n <= max_len]
    prefill_samples = []
    for n in lengths:
        for bs in (1, 2, 4, 8, 16):
            if n * bs <= max(16384, n):
                batch = [n] * bs
                prefill_samples.append((batch, prefill_pass_seconds(batch, shape, gpu, par, assumptions)))
    for mix in ([16, 512], [64, 1024, 128], [256] * 3 + [1024]):  # mixed batches too
        mix = [min(n, max_len - 1) for n in mix]
        prefill_samples.append((mix, prefill_pass_seconds(mix, shape, gpu, par, assumptions)))
    decode_samples = []
    for bs in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        for ctx in (64, 256, 1024, 2048):
            if ctx < max_len:
                decode_samples.append((bs, bs * ctx, decode_step_seconds(bs, bs * ctx, shape, gpu, par, assumptions)))
    prefill, prefill_fit = fit_prefill(prefill_samples)
    decode, decode_fit = fit_decode(decode_samples)
    # Each GPU of the prefill instance sends its KV shard to its counterpart in parallel.
    transfer = TransferSpec(fixed_s=0.0, bytes_per_s=gpu.inter_node_bytes_per_s * tp * pp)
    return LatencyProfile(
        prefill=prefill,
        decode=decode,
        kv_bytes_per_token=shape.kv_bytes_per_token,
        kv_capacity_tokens=kv_capacity_tokens(shape, cluster, tp, pp),
        block_size=block_size,
        max_batched_tokens=critical_batch_tokens(prefill, min(typical_prompt_len, max_len)),
        max_num_seqs=max_num_seqs,
        tensor_parallel=tp,
        pipeline_parallel=pp,
        source="analytic",
        model=shape.name,
        device=gpu.name,
        dtype=f"{8 * shape.dtype_bytes}-bit",
        overheads=Overheads(),
        transfer=transfer,
        fit={"prefill": prefill_fit, "decode": decode_fit},
        notes={
            "assumptions": asdict(assumptions),
            "inter_node_hops": par.inter_node_hops,
            "gpu": asdict(gpu),
            "params": shape.num_params(),
        },
    )
