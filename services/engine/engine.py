"""The engine the workers drive: prefill a batch of prompts, step a decode batch, or (chunked
prefill) both at once.

An engine owns the KV pool and its block accounting, and makes one token per sequence per step.
`Engine` computes them with the model (on its backend); `EmulatedEngine` (emulated.py) runs no
model and takes the time a latency profile says. Which sequences run in a step, when to admit and
whom to preempt is the scheduler's (scheduler.py): an engine runs whatever batch it is given, and
sequences may join or leave the decode batch at any step.
"""

from __future__ import annotations

import logging
import ssl
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from services.common.arith import ceil_div
from services.common.enums import FinishReason

from .backends import select_backend
from .backends.base import AttentionShape
from .block_manager import BlockManager
from .config import EngineConfig, ModelConfig
from .kv_cache import InstanceKv, KvLayout, KvPool, model_id_for
from .layers.linear import NO_TP, TensorParallel
from .layers.rotary import RotaryEmbedding
from .model import CausalLM
from .parallel import NO_PP, Pipeline, Ranks, agreed_min, all_ranks, check_split
from .runner import ModelRunner
from .sampler import SampleResult, sample
from .scheduler import StepKind, StepPlan
from .sequence import Sequence
from .weights import init_random_weights, iter_safetensors, load_weights

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    seq: Sequence
    token_id: int
    logprob: float
    finish_reason: FinishReason | None  # None while the sequence continues


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class EngineBase(ABC):
    """What every engine has and does; subclasses make the tokens (`_prefill`, `_decode`)."""

    config: EngineConfig
    model_config: ModelConfig
    max_model_len: int
    kv_pool: KvPool
    block_manager: BlockManager

    @property
    def block_size(self) -> int:
        return self.config.block_size

    def instance_kv(self) -> InstanceKv:
        """The KV pools a worker registers with its kvstore daemon: this engine's one pool."""
        return InstanceKv(self.kv_pool.layout, (self.kv_pool.descriptor,))

    def free(self, seq: Sequence) -> None:
        self.block_manager.free_seq(seq)

    def release_idle_memory(self) -> None:
        """Called between requests, when nothing runs: frees what is kept for the next step."""

    def min_transfer_seconds(self, num_tokens: int) -> float:
        """The least a pull of `num_tokens` tokens' KV into this engine may take (an emulated device
        takes what its profile says; a real one, whatever the copy takes)."""
        return 0.0

    def run(self, plan: StepPlan) -> list[StepOutput]:
        """Runs a scheduler's step."""
        if plan.kind is StepKind.MIXED:
            assert plan.num_tokens is not None
            return self.mixed_step(plan.seqs, plan.num_tokens)
        return self.prefill(plan.seqs) if plan.kind is StepKind.PREFILL else self.decode_step(plan.seqs)

    def prefill(self, seqs: list[Sequence]) -> list[StepOutput]:
        """Computes the K/V of every token of each sequence and its next token.

        Sequences without blocks get them here (OutOfBlocksError when the pool cannot hold them;
        a scheduler allocates first). Sequences whose prefix is cached already (prefix caching:
        `num_cached` > 0) compute the rest, as chunked prefill computes a prompt's last chunk."""
        for seq in seqs:
            self.block_manager.allocate_seq(seq)
        if any(seq.num_cached for seq in seqs):
            return self.mixed_step(seqs, [len(seq) - seq.num_cached for seq in seqs])
        result = self._prefill(seqs)
        self._computed(seqs, [len(seq) for seq in seqs])
        return self._append(seqs, result)

    def prefill_pipelined(self, seqs: list[Sequence]) -> tuple[list[StepOutput], float]:
        """prefill() on an instance whose stages may hold several batches at once (a prefill
        worker's step): returns once the next batch may enter, with the time.monotonic() at which
        this batch's results leave the last stage. Without pipeline stages, that is now."""
        outputs = self.prefill(seqs)
        return outputs, time.monotonic()

    def decode_step(self, seqs: list[Sequence]) -> list[StepOutput]:
        self.block_manager.allocate_for_step(seqs)
        result = self._decode(seqs)
        self._computed(seqs, [len(seq) for seq in seqs])
        return self._append(seqs, result)

    def mixed_step(self, seqs: list[Sequence], num_tokens: list[int]) -> list[StepOutput]:
        """Chunked prefill: sequence i computes `num_tokens[i]` tokens from its `num_cached` on (a
        prompt chunk, or a running sequence's next token), all in one pass; those that reach their
        last token get their next one. Each sequence gets blocks for all of its tokens."""
        for seq in seqs:
            self.block_manager.allocate_seq(seq)
        completing = [
            i for i, (seq, n) in enumerate(zip(seqs, num_tokens, strict=True)) if seq.num_cached + n == len(seq)
        ]
        result = self._mixed(seqs, num_tokens, completing)
        self._computed(seqs, [seq.num_cached + n for seq, n in zip(seqs, num_tokens, strict=True)])
        return self._append([seqs[i] for i in completing], result)

    def _computed(self, seqs: list[Sequence], num_cached: list[int]) -> None:
        """The K/V of each sequence's first `num_cached` tokens is in its blocks now."""
        for seq, n in zip(seqs, num_cached, strict=True):
            seq.num_cached = n
            self.block_manager.enter_computed_blocks(seq)

    @abstractmethod
    def _prefill(self, seqs: list[Sequence]) -> SampleResult:
        """Each sequence's next token (its blocks are allocated)."""

    @abstractmethod
    def _decode(self, seqs: list[Sequence]) -> SampleResult: ...

    @abstractmethod
    def _mixed(self, seqs: list[Sequence], num_tokens: list[int], completing: list[int]) -> SampleResult:
        """The next tokens of seqs[i] for i in `completing`."""

    def _append(self, seqs: list[Sequence], result: SampleResult) -> list[StepOutput]:
        outputs = []
        for seq, token, logprob in zip(seqs, result.token_ids, result.logprobs, strict=True):
            seq.token_ids.append(token)
            seq.output_logprobs.append(logprob)
            seq.finish_reason = self._finish_reason(seq, token)
            outputs.append(StepOutput(seq, token, logprob, seq.finish_reason))
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        sp = seq.sampling
        if token in sp.stop_token_ids or (not sp.ignore_eos and token in self.model_config.eos_token_ids):
            return FinishReason.STOP
        if seq.num_output_tokens >= sp.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def close(self) -> None:
        self.kv_pool.close()


class Engine(EngineBase):
    """The model on its backend, its KV pool on the same device."""

    def __init__(
        self,
        model_dir: str | None,
        config: EngineConfig | None = None,
        *,
        model_config: ModelConfig | None = None,
        weights: Iterable[tuple[str, torch.Tensor]] | None = None,
        tp: TensorParallel | None = None,
        pipeline: Pipeline | None = None,
        rendezvous_tls: ssl.SSLContext | None = None,
    ):
        """Loads `model_dir` (a Hugging Face checkpoint folder). Without a folder, pass
        `model_config` and either `weights` (name, tensor) pairs in Hugging Face naming or nothing
        for seeded random weights (benchmarks).

        With `config.tensor_parallel` x `config.pipeline_parallel` > 1 this is rank 0 of the
        instance: it starts the other ranks (parallel.py), which build their own Engine with their
        `tp` and `pipeline`; over several pods it waits for their followers at `config.rendezvous`
        (with TLS when `rendezvous_tls`, a server context)."""
        self.config = config = config or EngineConfig()
        if model_config is None:
            assert model_dir is not None, "give a model folder or a model_config"
            model_config = ModelConfig.from_pretrained(model_dir)
        self.model_config = model_config
        self.ranks: Ranks | None = None
        if tp is None and config.ranks > 1:
            if model_dir is None or weights is not None:
                raise ValueError(
                    "tensor and pipeline parallelism load a checkpoint folder on every rank (give model_dir)"
                )
            check_split(model_config, config)
            self.ranks = Ranks.start(model_dir, config, model_config, rendezvous_tls)
            tp, pipeline = self.ranks.tp, self.ranks.pipeline
        self.tp = tp or NO_TP
        self.pipeline = pipeline or NO_PP
        try:
            self._build(model_dir, weights)
        except BaseException:
            if self.ranks is not None:  # the other ranks would wait for this one forever
                self.ranks.abort()
            raise

    def _build(self, model_dir: str | None, weights: Iterable[tuple[str, torch.Tensor]] | None) -> None:
        config, mc, tp, pipeline = self.config, self.model_config, self.tp, self.pipeline
        layers = pipeline.layers if pipeline.stages > 1 else range(mc.num_layers)
        self.device = torch.device(config.device)
        self.max_model_len = min(config.max_model_len or mc.max_model_len, mc.max_model_len)
        dtype = getattr(torch, config.dtype)
        rotary = RotaryEmbedding(mc, self.max_model_len, self.device)
        kv_heads = tp.kv_heads(mc.num_kv_heads)  # this rank's
        shape = AttentionShape(tp.split(mc.num_heads, "attention heads"), kv_heads, mc.head_dim)
        self.backend = select_backend(config, mc, rotary, shape, len(layers))
        with _default_dtype(dtype), torch.device("meta"):
            model = CausalLM(mc, self.backend, tp, layers)
        model = model.to_empty(device=self.device)
        model.tie_weights()  # to_empty gave each module its own tensor
        if model_dir is not None and weights is None:
            weights = iter_safetensors(model_dir)
        if weights is not None:
            load_weights(model, weights)
        else:
            init_random_weights(model, seed=config.seed)
        model.finalize()
        self.model = model.eval()

        hf_dict = mc.hf_config.to_dict() if mc.hf_config is not None else {}
        num_blocks = self._num_kv_blocks(len(layers), kv_heads)
        if config.ranks > 1:
            num_blocks = agreed_min(num_blocks)  # block ids mean the same on every rank
        layout = KvLayout(
            num_blocks=num_blocks,
            num_layers=len(layers),
            block_size=config.block_size,
            num_kv_heads=kv_heads,
            head_dim=mc.head_dim,
            dtype=config.dtype,
            model_id=model_id_for(model_dir or "random", hf_dict),
        )
        self.kv_pool = KvPool.allocate(layout, config.device, name=config.kv_pool_name)
        # every rank's pool, for rank 0 to register with the kvstore daemon
        self.rank_pool_descriptors = (
            all_ranks(self.kv_pool.descriptor) if config.ranks > 1 else [self.kv_pool.descriptor]
        )
        # The last block is never handed out: padded rows of a captured decode batch write there.
        self.block_manager = BlockManager(layout.num_blocks - 1, config.block_size, config.enable_prefix_caching)
        self.runner = ModelRunner(
            self.model,
            self.backend,
            config,
            self.kv_pool,
            self.block_manager,
            self.max_model_len,
            null_block=layout.num_blocks - 1,
            pipeline=pipeline,
        )
        if self.ranks is not None:
            self.runner.before_forward = self.ranks.send
        self.last_logits: torch.Tensor | None = None  # [len(seqs), vocab] of the last step, for tests
        log.info(
            "engine ready: %s, %.1fM params%s, %s on %s (%s backend), %d KV blocks of %d tokens (%.1f MiB)",
            mc.architecture,
            mc.num_params() / 1e6,
            f", rank {pipeline.rank if pipeline.stages > 1 else tp.rank} of tp {tp.size} x pp {pipeline.stages} "
            f"(layers {layers.start}-{layers.stop - 1})"
            if config.ranks > 1
            else "",
            config.dtype,
            config.device,
            self.backend.name,
            self.block_manager.num_blocks,
            config.block_size,
            layout.total_bytes / 2**20,
        )

    def _num_kv_blocks(self, num_layers: int, kv_heads: int) -> int:
        mc, cfg = self.model_config, self.config
        block_bytes = 2 * num_layers * kv_heads * mc.head_dim * cfg.block_size * cfg.dtype_bytes
        budget = cfg.kv_cache_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, total = torch.cuda.mem_get_info(self.device)
                used = total - free
                budget = int(total * cfg.gpu_memory_utilization) - used
            else:
                budget = cfg.cpu_kv_cache_bytes
        num_blocks = budget // block_bytes
        min_blocks = ceil_div(self.max_model_len, cfg.block_size) + 1
        if num_blocks < min_blocks:
            raise ValueError(
                f"KV budget of {budget} bytes holds {num_blocks} blocks; one sequence of max_model_len "
                f"{self.max_model_len} needs {min_blocks}. Raise the KV memory or lower max_model_len."
            )
        return int(num_blocks)

    def instance_kv(self) -> InstanceKv:
        """The instance's KV geometry as a whole (the model's layers and K/V heads) and each rank's
        pool: rank r holds its stage's layers and its share of their K/V heads (kvstore/shards.py)."""
        mc = self.model_config
        whole = replace(self.kv_pool.layout, num_layers=mc.num_layers, num_kv_heads=mc.num_kv_heads)
        return InstanceKv(
            whole,
            tuple(self.rank_pool_descriptors),
            tensor_parallel=self.config.tensor_parallel,
            pipeline_parallel=self.config.pipeline_parallel,
        )

    def _prefill(self, seqs: list[Sequence]) -> SampleResult:
        return self._sample(seqs, self.runner.prefill(seqs))

    def _decode(self, seqs: list[Sequence]) -> SampleResult:
        return self._sample(seqs, self.runner.decode(seqs))

    def _mixed(self, seqs: list[Sequence], num_tokens: list[int], completing: list[int]) -> SampleResult:
        return self._sample([seqs[i] for i in completing], self.runner.mixed(seqs, num_tokens, completing))

    def release_idle_memory(self) -> None:
        # Alone only: every rank orders a decode batch by what its own mirror holds, so a mirror
        # cleared on this rank and not on the others would have them disagree on the order.
        if self.ranks is None:
            self.backend.release_idle_memory()

    def close(self) -> None:
        if self.ranks is not None:
            self.ranks.close()
        super().close()

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> SampleResult:
        self.last_logits = logits
        early = [i for i, s in enumerate(seqs) if s.num_output_tokens < s.sampling.min_tokens]
        if early:  # min_tokens: the tokens that would end these sequences cannot be drawn yet
            logits = logits.clone()
            for i in early:
                sp = seqs[i].sampling
                ends = list(sp.stop_token_ids) + ([] if sp.ignore_eos else list(self.model_config.eos_token_ids))
                logits[i, [t for t in ends if t < logits.shape[-1]]] = float("-inf")
        return sample(logits, [s.sampling for s in seqs], [s.num_output_tokens for s in seqs])
