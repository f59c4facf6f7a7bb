"""The engine API the services use: prefill a batch of prompts, step a decode batch.

The engine owns the model, the KV pool and its block accounting. Scheduling (which sequences run
in a step, when to admit, whom to preempt) belongs to the caller: the prefill batcher, the decode
loop and the colocated scheduler each decide differently. Sequences may join or leave the decode
batch at any step: `decode_step` takes whatever list it is given.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .block_manager import BlockManager
from .config import EngineConfig, ModelConfig
from .kv_cache import KvLayout, KvPool, model_id_for
from . import cpu_kernels
from .model import CausalLM, prepare_for_cpu
from .runner import ModelRunner
from .sampler import sample
from .sequence import Sequence
from .weights import init_random_weights, iter_safetensors, load_weights

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    seq: Sequence
    token_id: int
    logprob: float
    finish_reason: str | None  # "stop" | "length" | None while the sequence continues


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class Engine:
    def __init__(
        self,
        model_dir: str | None,
        config: EngineConfig = EngineConfig(),
        *,
        model_config: ModelConfig | None = None,
        weights: Iterable[tuple[str, torch.Tensor]] | None = None,
    ):
        """Loads `model_dir` (a Hugging Face checkpoint folder). Without a folder, pass
        `model_config` and either `weights` (name, tensor) pairs in Hugging Face naming or nothing
        for seeded random weights (benchmarks)."""
        self.config = config
        self.model_config = model_config or ModelConfig.from_pretrained(model_dir)
        mc = self.model_config
        self.device = torch.device(config.device)
        self.max_model_len = min(config.max_model_len or mc.max_model_len, mc.max_model_len)
        with _default_dtype(config.torch_dtype), torch.device("meta"):
            model = CausalLM(mc)
        model = model.to_empty(device=self.device)
        model.init_rotary(self.max_model_len, self.device)
        if mc.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        if model_dir is not None and weights is None:
            weights = iter_safetensors(model_dir)
        if weights is not None:
            load_weights(model, weights)
        else:
            init_random_weights(model, seed=config.seed)
        if self.device.type == "cpu" and config.dtype in ("float32", "bfloat16"):
            kernels = cpu_kernels.load() if config.cpu_kernels and config.dtype == "float32" else None
            prepare_for_cpu(model, kernels)
        self.model = model.eval()

        hf_dict = mc.hf_config.to_dict() if mc.hf_config is not None else {}
        layout = KvLayout(
            num_blocks=self._num_kv_blocks(),
            num_layers=mc.num_layers,
            block_size=config.block_size,
            num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim,
            dtype=config.dtype,
            model_id=model_id_for(model_dir or "random", hf_dict),
        )
        self.kv_pool = KvPool.allocate(layout, config.device, name=config.kv_pool_name)
        # The last block is never handed out: padded rows of a captured decode batch write there.
        self.block_manager = BlockManager(layout.num_blocks - 1, config.block_size)
        self.runner = ModelRunner(self.model, config, self.kv_pool, self.max_model_len, null_block=layout.num_blocks - 1)
        log.info(
            "engine ready: %s, %.1fM params, %s on %s, %d KV blocks of %d tokens (%.1f MiB)",
            mc.architecture, mc.num_params() / 1e6, config.dtype, config.device,
            self.block_manager.num_blocks, config.block_size, layout.total_bytes / 2**20,
        )

    def _num_kv_blocks(self) -> int:
        mc, cfg = self.model_config, self.config
        block_bytes = mc.kv_elements_per_token * cfg.block_size * torch.empty((), dtype=cfg.torch_dtype).element_size()
        budget = cfg.kv_cache_bytes
        if budget is None:
            if self.device.type == "cuda":
                free, total = torch.cuda.mem_get_info(self.device)
                used = total - free
                budget = int(total * cfg.gpu_memory_utilization) - used
            else:
                budget = cfg.cpu_kv_cache_bytes
        num_blocks = budget // block_bytes
        min_blocks = -(-self.max_model_len // cfg.block_size) + 1
        if num_blocks < min_blocks:
            raise ValueError(
                f"KV budget of {budget} bytes holds {num_blocks} blocks; one sequence of max_model_len "
                f"{self.max_model_len} needs {min_blocks}. Raise the KV memory or lower max_model_len."
            )
        return int(num_blocks)

    # ---- block accounting --------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.config.block_size

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return self.block_manager.blocks_for_tokens(num_tokens)

    def allocate(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Gives `seq` blocks for its first `num_tokens` tokens (default: all of them)."""
        need = self.blocks_for_tokens(len(seq.token_ids) if num_tokens is None else num_tokens)
        seq.block_table.extend(self.block_manager.allocate(need - len(seq.block_table)))

    def blocks_needed_for_step(self, seq: Sequence) -> int:
        """Blocks a decode step of `seq` would allocate (0 or 1)."""
        return int(self.blocks_for_tokens(len(seq.token_ids)) > len(seq.block_table))

    def free(self, seq: Sequence) -> None:
        self.free_blocks(self.detach_blocks(seq))

    def detach_blocks(self, seq: Sequence) -> list[int]:
        """Takes the sequence's blocks from it without freeing them (give them back with
        free_blocks): for blocks that something outside the engine may still be writing."""
        self.runner.forget(seq.seq_id)
        blocks, seq.block_table, seq.num_cached = seq.block_table, [], 0
        return blocks

    def free_blocks(self, blocks: list[int]) -> None:
        self.block_manager.free(blocks)

    # ---- compute ---------------------------------------------------------------------------
    def validate_prompt(self, prompt: list[int]) -> None:
        if not prompt:
            raise ValueError("prompt must contain at least one token")
        if len(prompt) >= self.max_model_len:
            raise ValueError(f"prompt has {len(prompt)} tokens; max_model_len is {self.max_model_len}")
        bad = next((t for t in prompt if not 0 <= t < self.model_config.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.model_config.vocab_size})")

    def prefill(self, seqs: list[Sequence]) -> list[StepOutput]:
        """Computes the K/V of every token of each sequence and samples its next token.

        Blocks are allocated here for sequences that have none (raises OutOfBlocksError when the
        pool cannot hold them; check with `blocks_for_tokens` first)."""
        for seq in seqs:
            self.allocate(seq)
        logits = self.runner.prefill(seqs)
        for seq in seqs:
            seq.num_cached = len(seq.token_ids)
        return self._sample_and_append(seqs, logits)

    def decode_step(self, seqs: list[Sequence]) -> list[StepOutput]:
        for seq in seqs:
            self.allocate(seq)
        logits = self.runner.decode(seqs)
        for seq in seqs:
            seq.num_cached = len(seq.token_ids)
        return self._sample_and_append(seqs, logits)

    def _sample_and_append(self, seqs: list[Sequence], logits: torch.Tensor) -> list[StepOutput]:
        self.last_logits = logits  # [len(seqs), vocab] of this step, for inspection and tests
        result = sample(logits, [s.sampling for s in seqs], [s.num_output_tokens for s in seqs])
        outputs = []
        for seq, token, logprob in zip(seqs, result.token_ids, result.logprobs):
            seq.token_ids.append(token)
            seq.output_logprobs.append(logprob)
            seq.finish_reason = self._finish_reason(seq, token)
            outputs.append(StepOutput(seq, token, logprob, seq.finish_reason))
        return outputs

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        sp = seq.sampling
        if token in sp.stop_token_ids or (not sp.ignore_eos and token in self.model_config.eos_token_ids):
            return "stop"
        if seq.num_output_tokens >= sp.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return "length"
        return None

    def close(self) -> None:
        self.kv_pool.close()


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))
