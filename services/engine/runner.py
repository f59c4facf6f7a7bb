"""Turns sequences into model inputs, runs the model, and (on CUDA) replays captured decode graphs."""

from __future__ import annotations

import logging

import torch

from .attention import AttentionMetadata, context_mask, slot_indices
from .cpu_kv_mirror import DecodeKvMirror
from .config import EngineConfig
from .kv_cache import KvPool
from .model import CausalLM
from .sequence import Sequence

log = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, model: CausalLM, config: EngineConfig, kv_pool: KvPool, max_model_len: int, null_block: int):
        self.model = model
        self.config = config
        self.kv_pool = kv_pool
        self.device = torch.device(config.device)
        self.block_size = kv_pool.layout.block_size
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        self.null_slot = null_block * self.block_size  # padded rows write here, never read
        self.use_triton = self.device.type == "cuda" and config.attention_backend in ("auto", "triton")
        if config.attention_backend == "triton" and self.device.type != "cuda":
            raise ValueError("attention_backend 'triton' needs a CUDA device")
        self.kv_mirror = None
        # the mirror serves the torch path; the CPU kernels read the pool in place
        if self.device.type == "cpu" and config.cpu_decode_kv_mirror_bytes > 0 and not model.kernel_attention:
            layout = kv_pool.layout
            self.kv_mirror = DecodeKvMirror(layout.num_layers, layout.num_kv_heads, layout.head_dim,
                                            kv_pool.tensor.dtype, config.cpu_decode_kv_mirror_bytes)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if self.device.type == "cuda" and config.enable_cuda_graphs and self.use_triton:
            self._capture_decode_graphs()

    def _tensor(self, data, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, pin_memory=self.device.type == "cuda").to(self.device, non_blocking=True)

    def _slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Packs the prompts (no padding), writes their K/V, returns last-token logits [N, V]."""
        input_ids, positions, slots, cu = [], [], [], [0]
        for seq in seqs:
            n = len(seq.token_ids)
            input_ids.extend(seq.token_ids)
            positions.extend(range(n))
            slots.extend(self._slot(seq, p) for p in range(n))
            cu.append(cu[-1] + n)
        meta = self._with_slot_indices(AttentionMetadata(is_prefill=True, slot_mapping=self._tensor(slots), cu_seqlens=cu))
        last = self._tensor([c - 1 for c in cu[1:]])
        return self.model(self._tensor(input_ids), self._tensor(positions), meta, self.kv_pool, last)

    def _with_slot_indices(self, meta: AttentionMetadata) -> AttentionMetadata:
        if self.device.type == "cpu":
            meta.slot_blocks, meta.slot_rows = slot_indices(meta.slot_mapping, self.block_size)
        return meta

    def forget(self, seq_id: str) -> None:
        """The sequence's blocks were freed: nothing cached about it may be reused."""
        if self.kv_mirror is not None:
            self.kv_mirror.drop(seq_id)

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One step: feeds each sequence's last token at position len-1, returns logits [B, V]."""
        if self.kv_mirror is not None:
            order = self.kv_mirror.prepare([s.seq_id for s in seqs], [len(s.token_ids) for s in seqs])
            if order is not None:
                # run in mirror-slot order, hand the logits back in the caller's order
                logits = self._decode([seqs[i] for i in order], use_mirror=True)
                if order == list(range(len(seqs))):
                    return logits
                out = torch.empty_like(logits)
                out[torch.tensor(order)] = logits
                return out
        return self._decode(seqs)

    def _decode(self, seqs: list[Sequence], use_mirror: bool = False) -> torch.Tensor:
        batch = len(seqs)
        input_ids = [s.token_ids[-1] for s in seqs]
        positions = [len(s.token_ids) - 1 for s in seqs]
        slots = [self._slot(s, p) for s, p in zip(seqs, positions)]
        context_lens = [len(s.token_ids) for s in seqs]
        graph_bs = next((bs for bs in sorted(self.graphs) if bs >= batch), None)
        if graph_bs is not None:
            return self._replay(graph_bs, seqs, input_ids, positions, slots, context_lens)
        max_blocks = -(-max(context_lens) // self.block_size)
        tables = [s.block_table[:max_blocks] + [0] * (max_blocks - len(s.block_table[:max_blocks])) for s in seqs]
        meta = self._with_slot_indices(AttentionMetadata(
            is_prefill=False,
            slot_mapping=self._tensor(slots),
            block_tables=self._tensor(tables, torch.int32),
            context_lens=self._tensor(context_lens, torch.int32),
            max_context_len=max(context_lens),
            use_triton=self.use_triton,
            kv_mirror=self.kv_mirror if use_mirror else None,
            context_lens_list=context_lens,
        ))
        if use_mirror:
            meta.decode_mask = context_mask(meta.context_lens, max(context_lens))
            self.kv_mirror.begin_step(context_lens)
        logits = self.model(self._tensor(input_ids), self._tensor(positions), meta, self.kv_pool)
        if use_mirror:
            self.kv_mirror.write_step_to_pool(self.kv_pool.tensor, meta.slot_blocks, meta.slot_rows)
            self.kv_mirror.advance(context_lens)
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
            meta = AttentionMetadata(
                is_prefill=False,
                slot_mapping=self.g_slots[:bs],
                block_tables=self.g_tables[:bs],
                context_lens=self.g_context_lens[:bs],
                max_context_len=self.max_blocks_per_seq * self.block_size,
                use_triton=True,
            )
            args = (self.g_input_ids[:bs], self.g_positions[:bs], meta, self.kv_pool)
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
        width = -(-max(context_lens) // self.block_size)
        tables = [s.block_table[:width] + [0] * (width - len(s.block_table[:width])) for s in seqs]
        tables += [[0] * width] * pad
        self.g_tables[:bs, :width].copy_(self._tensor(tables, torch.int32))
        self.graphs[bs].replay()
        return self.g_logits[bs][:batch]
