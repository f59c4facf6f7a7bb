"""Turns sequences into the model's inputs, runs the model, and (with a backend that allows it, on
CUDA) replays captured decode graphs."""

from __future__ import annotations

import logging

import torch

from services.common.arith import ceil_div

from .backends.base import Backend, CachedContext, StepInputs
from .block_manager import BlockManager
from .config import EngineConfig
from .kv_cache import KvPool
from .model import CausalLM
from .sequence import Sequence

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        backend: Backend,
        config: EngineConfig,
        kv_pool: KvPool,
        block_manager: BlockManager,
        max_model_len: int,
        null_block: int,
    ):
        self.model = model
        self.backend = backend
        self.config = config
        self.kv_pool = kv_pool
        self.block_manager = block_manager
        self.device = torch.device(config.device)
        self.block_size = kv_pool.layout.block_size
        self.max_blocks_per_seq = ceil_div(max_model_len, self.block_size)
        self.null_slot = null_block * self.block_size  # padded rows write here, never read
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if backend.supports_cuda_graphs and config.enable_cuda_graphs:
            self._capture_decode_graphs()

    def _tensor(self, data, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, pin_memory=self.device.type == "cuda").to(self.device, non_blocking=True)

    def _slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def _forget_discarded(self) -> None:
        for seq_id in self.block_manager.take_discarded():
            self.backend.forget(seq_id)

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Packs the prompts (no padding), writes their K/V, returns last-token logits [N, V]."""
        self._forget_discarded()
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        for seq in seqs:
            n = len(seq.token_ids)
            input_ids.extend(seq.token_ids)
            positions.extend(range(n))
            slots.extend(self._slot(seq, p) for p in range(n))
            cu.append(cu[-1] + n)
        inputs = StepInputs([s.seq_id for s in seqs], self._tensor(positions), self._tensor(slots), cu_seqlens=cu)
        meta = self.backend.prefill_metadata(inputs)
        last = self._tensor([c - 1 for c in cu[1:]])
        return self.model(self._tensor(input_ids), meta, self.kv_pool, last)

    @torch.inference_mode()
    def mixed(self, seqs: list[Sequence], num_tokens: list[int], logits_of: list[int]) -> torch.Tensor:
        """A chunked-prefill step: sequence i computes its tokens num_cached..num_cached+num_tokens[i]-1
        (a prompt chunk, or the next token of a running sequence) in one forward pass. Returns the
        logits [len(logits_of), V] of the sequences at indices `logits_of` (those reaching their
        last token)."""
        self._forget_discarded()
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        decode_rows: list[int] = []
        decode_seqs: list[Sequence] = []
        chunks: list[tuple[int, int, int, torch.Tensor]] = []
        for seq, n in zip(seqs, num_tokens, strict=True):
            start, end = seq.num_cached, seq.num_cached + n
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slot(seq, p) for p in range(start, end))
            if n == 1 and start > 0:
                decode_rows.append(cu[-1])
                decode_seqs.append(seq)
            else:
                chunks.append((cu[-1], n, start, self._tensor(seq.block_table[: ceil_div(end, self.block_size)])))
            cu.append(cu[-1] + n)
        lens = [s.num_cached + 1 for s in decode_seqs]
        width = ceil_div(max(lens, default=1), self.block_size)
        tables = [s.block_table[:width] + [0] * (width - len(s.block_table[:width])) for s in decode_seqs]
        cached = CachedContext(
            self._tensor(decode_rows),
            self._tensor(tables, torch.int32),
            self._tensor(lens, torch.int32),
            max(lens, default=0),
            chunks,
        )
        inputs = StepInputs(
            [s.seq_id for s in seqs], self._tensor(positions), self._tensor(slots), cu_seqlens=cu, cached=cached
        )
        meta = self.backend.prefill_metadata(inputs)
        last = self._tensor([cu[i + 1] - 1 for i in logits_of])
        return self.model(self._tensor(input_ids), meta, self.kv_pool, last)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One step: feeds each sequence's last token at position len-1, returns logits [B, V]."""
        self._forget_discarded()
        order = self.backend.decode_order([s.seq_id for s in seqs], [len(s.token_ids) for s in seqs])
        if order is None or order == list(range(len(seqs))):
            return self._decode(seqs)
        # run in the backend's order, hand the logits back in the caller's
        logits = self._decode([seqs[i] for i in order])
        out = torch.empty_like(logits)
        out[torch.tensor(order)] = logits
        return out

    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        input_ids = [s.token_ids[-1] for s in seqs]
        positions = [len(s.token_ids) - 1 for s in seqs]
        slots = [self._slot(s, p) for s, p in zip(seqs, positions, strict=True)]
        context_lens = [len(s.token_ids) for s in seqs]
        graph_bs = next((bs for bs in sorted(self.graphs) if bs >= len(seqs)), None)
        if graph_bs is not None:
            return self._replay(graph_bs, seqs, input_ids, positions, slots, context_lens)
        width = ceil_div(max(context_lens), self.block_size)
        tables = [s.block_table[:width] + [0] * (width - len(s.block_table[:width])) for s in seqs]
        inputs = StepInputs(
            [s.seq_id for s in seqs],
            self._tensor(positions),
            self._tensor(slots),
            block_tables=self._tensor(tables, torch.int32),
            context_lens=self._tensor(context_lens, torch.int32),
            context_lens_list=context_lens,
        )
        meta = self.backend.decode_metadata(inputs)
        logits = self.model(self._tensor(input_ids), meta, self.kv_pool)
        self.backend.end_step(meta, self.kv_pool)
        return logits

    # ---- CUDA graphs --------------------------------------------------------------------------
    def _capture_decode_graphs(self) -> None:
        sizes = [bs for bs in self.config.cuda_graph_batch_sizes if bs <= self.config.max_num_seqs]
        max_bs = max(sizes)
        dev = self.device
        self.g_input_ids = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.g_positions = torch.zeros(max_bs, dtype=torch.int64, device=dev)
        self.g_slots = torch.full((max_bs,), self.null_slot, dtype=torch.int64, device=dev)
        self.g_tables = torch.zeros(max_bs, self.max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.g_context_lens = torch.ones(max_bs, dtype=torch.int32, device=dev)
        self.g_logits: dict[int, torch.Tensor] = {}
        pool = None
        for bs in sorted(sizes, reverse=True):
            inputs = StepInputs(
                [""] * bs,
                self.g_positions[:bs],
                self.g_slots[:bs],
                block_tables=self.g_tables[:bs],
                context_lens=self.g_context_lens[:bs],
                context_lens_list=[self.max_blocks_per_seq * self.block_size] * bs,
            )
            meta = self.backend.decode_metadata(inputs)
            args = (self.g_input_ids[:bs], meta, self.kv_pool)
            with torch.inference_mode():
                self.model(*args)  # warm up (Triton compilation, cuBLAS workspaces) outside capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.g_logits[bs] = self.model(*args)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", sorted(sizes))

    def _replay(self, bs, seqs, input_ids, positions, slots, context_lens) -> torch.Tensor:
        batch = len(seqs)
        pad = bs - batch
        self.g_input_ids[:bs].copy_(self._tensor(input_ids + [0] * pad))
        self.g_positions[:bs].copy_(self._tensor(positions + [0] * pad))
        self.g_slots[:bs].copy_(self._tensor(slots + [self.null_slot] * pad))
        self.g_context_lens[:bs].copy_(self._tensor(context_lens + [1] * pad, torch.int32))
        width = ceil_div(max(context_lens), self.block_size)
        tables = [s.block_table[:width] + [0] * (width - len(s.block_table[:width])) for s in seqs]
        tables += [[0] * width] * pad
        self.g_tables[:bs, :width].copy_(self._tensor(tables, torch.int32))
        self.graphs[bs].replay()
        return self.g_logits[bs][:batch]
