"""Turns sequences into the model's inputs, runs the model, and (with a backend that allows it, on
CUDA) replays captured decode graphs.

A step's inputs are first laid out as plain data (`ForwardInputs`), then run: in a tensor- or
pipeline-parallel instance rank 0 lays them out from its sequences and every rank runs the same
inputs on its shard of the model (engine/parallel.py). With pipeline stages, each stage takes the
previous one's hidden states; a decode pass may run as micro-batches of consecutive rows
(`EngineConfig.pipeline_micro_batches`), so that stage s computes micro-batch m while stage s+1
computes m-1. Decode graphs are captured only for an instance of one rank.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch

from services.common.arith import ceil_div

from .backends.base import Backend, CachedContext, StepInputs
from .block_manager import BlockManager
from .config import EngineConfig
from .kv_cache import KvPool
from .model import CausalLM
from .parallel import NO_PP, Pipeline
from .sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class ForwardInputs:
    """One forward pass as plain data (JSON for the other ranks, small: the tokens computed and block ids)."""

    kind: str  # "prefill", "mixed" (chunked prefill beside running sequences) or "decode"
    seq_ids: list[str]
    input_ids: list[int]
    positions: list[int]
    slots: list[int]  # block * block_size + row, where each token's K/V goes
    discarded: list[str]  # sequences whose blocks were given up since the last pass (backend.forget)
    cu_seqlens: list[int] | None = None  # prefill, mixed: row boundaries of the sequences
    logits_rows: list[int] | None = None  # mixed: the rows whose logits are wanted (prefill: last rows)
    block_tables: list[list[int]] | None = None  # decode; mixed: of its one-token rows
    context_lens: list[int] | None = None  # the same rows' contexts, including this step's token
    decode_rows: list[int] | None = None  # mixed: rows adding one token to a cached context
    chunks: list[tuple[int, int, int, list[int]]] | None = None  # mixed: (first row, rows, cached before, blocks)
    micro_batches: int = 1  # decode on a pipeline: consecutive rows cut into this many (rank 0 decides)

    def to_bytes(self) -> bytes:
        """The pass as JSON, for the other ranks (data only: nothing a peer sends is ever executed)."""
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, frame: bytes) -> ForwardInputs:
        return cls(**json.loads(frame))

    @property
    def num_logits(self) -> int:
        if self.kind == "decode":
            return len(self.seq_ids)
        if self.logits_rows is not None:
            return len(self.logits_rows)
        assert self.cu_seqlens is not None
        return len(self.cu_seqlens) - 1

    def split(self) -> list[ForwardInputs]:
        """A decode pass as its `micro_batches` passes of consecutive rows, as even as can be."""
        n, count = len(self.seq_ids), self.micro_batches
        bounds = [i * n // count for i in range(count + 1)]
        return [self.reordered(list(range(a, b))) for a, b in zip(bounds, bounds[1:]) if b > a]

    def reordered(self, order: list[int]) -> ForwardInputs:
        """A decode pass of the sequences at `order` (all of them, reordered, or some)."""
        assert self.block_tables is not None and self.context_lens is not None
        return replace(
            self,
            seq_ids=[self.seq_ids[i] for i in order],
            input_ids=[self.input_ids[i] for i in order],
            positions=[self.positions[i] for i in order],
            slots=[self.slots[i] for i in order],
            block_tables=[self.block_tables[i] for i in order],
            context_lens=[self.context_lens[i] for i in order],
        )


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
        pipeline: Pipeline = NO_PP,
    ):
        self.model = model
        self.backend = backend
        self.config = config
        self.kv_pool = kv_pool
        self.block_manager = block_manager
        self.pipeline = pipeline
        self.device = torch.device(config.device)
        self.block_size = kv_pool.layout.block_size
        self.max_blocks_per_seq = ceil_div(max_model_len, self.block_size)
        self.null_slot = null_block * self.block_size  # padded rows write here, never read
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # rank 0 of a tensor- or pipeline-parallel instance: sends each pass's inputs to the other ranks
        self.before_forward: Callable[[ForwardInputs], None] | None = None
        if backend.supports_cuda_graphs and config.enable_cuda_graphs and config.ranks == 1:
            self._capture_decode_graphs()

    def _tensor(self, data, dtype=torch.int64) -> torch.Tensor:
        return torch.tensor(data, dtype=dtype, pin_memory=self.device.type == "cuda").to(self.device, non_blocking=True)

    def _slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    # ---- sequences -> a forward pass's inputs (rank 0) ------------------------------------------
    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        """Packs the prompts (no padding), writes their K/V, returns last-token logits [N, V]."""
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
        return self._logits(
            ForwardInputs(
                "prefill", [s.seq_id for s in seqs], input_ids, positions, slots, self._discarded(), cu_seqlens=cu
            )
        )

    @torch.inference_mode()
    def mixed(self, seqs: list[Sequence], num_tokens: list[int], logits_of: list[int]) -> torch.Tensor:
        """A chunked-prefill step: sequence i computes its tokens num_cached..num_cached+num_tokens[i]-1
        (a prompt chunk, or the next token of a running sequence) in one forward pass. Returns the
        logits [len(logits_of), V] of the sequences at indices `logits_of` (those reaching their
        last token)."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu = [0]
        decode_rows: list[int] = []
        decode_seqs: list[Sequence] = []
        chunks: list[tuple[int, int, int, list[int]]] = []
        for seq, n in zip(seqs, num_tokens, strict=True):
            start, end = seq.num_cached, seq.num_cached + n
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(self._slot(seq, p) for p in range(start, end))
            if n == 1 and start > 0:
                decode_rows.append(cu[-1])
                decode_seqs.append(seq)
            else:
                chunks.append((cu[-1], n, start, seq.block_table[: ceil_div(end, self.block_size)]))
            cu.append(cu[-1] + n)
        lens = [s.num_cached + 1 for s in decode_seqs]
        return self._logits(
            ForwardInputs(
                "mixed",
                [s.seq_id for s in seqs],
                input_ids,
                positions,
                slots,
                self._discarded(),
                cu_seqlens=cu,
                logits_rows=[cu[i + 1] - 1 for i in logits_of],
                block_tables=self._tables(decode_seqs, lens),
                context_lens=lens,
                decode_rows=decode_rows,
                chunks=chunks,
            )
        )

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One step: feeds each sequence's last token at position len-1, returns logits [B, V]."""
        positions = [len(s.token_ids) - 1 for s in seqs]
        lens = [len(s.token_ids) for s in seqs]
        return self._logits(
            ForwardInputs(
                "decode",
                [s.seq_id for s in seqs],
                [s.token_ids[-1] for s in seqs],
                positions,
                [self._slot(s, p) for s, p in zip(seqs, positions, strict=True)],
                self._discarded(),
                block_tables=self._tables(seqs, lens),
                context_lens=lens,
                micro_batches=(self.config.pipeline_micro_batches or self.pipeline.stages)
                if self.pipeline.stages > 1
                else 1,
            )
        )

    def _logits(self, inputs: ForwardInputs) -> torch.Tensor:
        logits = self.forward(inputs)
        assert logits is not None  # rank 0 has them (from the last stage)
        return logits

    def _discarded(self) -> list[str]:
        return self.block_manager.take_discarded()

    def _tables(self, seqs: list[Sequence], context_lens: list[int]) -> list[list[int]]:
        """Each sequence's blocks up to the longest context's, padded with block 0 (never read)."""
        width = ceil_div(max(context_lens, default=1), self.block_size)
        return [s.block_table[:width] + [0] * (width - len(s.block_table[:width])) for s in seqs]

    # ---- a forward pass (every rank) -------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, inputs: ForwardInputs) -> torch.Tensor | None:
        """Runs one forward pass; the logits of its `logits_rows` (decode: every row), on rank 0
        (a rank of a later stage than the first returns its own, or None before the last stage).
        Rank 0 of a parallel instance hands the same inputs to its other ranks first
        (`before_forward`)."""
        if self.before_forward is None:
            return self._forward_and_gather(inputs)
        self.before_forward(inputs)
        try:
            return self._forward_and_gather(inputs)
        except BaseException:
            # the other ranks are in this pass's all-reduces: a rank 0 that went on would pair its
            # next pass with them (wrong sums, or a hang); the instance fails as a whole instead
            log.critical("parallel rank 0 failed in a forward pass: stopping this instance", exc_info=True)
            logging.shutdown()
            os._exit(1)

    def _forward_and_gather(self, inputs: ForwardInputs) -> torch.Tensor | None:
        logits = self._forward(inputs)
        if self.pipeline.stages == 1:
            return logits
        shape = (inputs.num_logits, self.model.config.vocab_size)
        return self.pipeline.logits_to_rank0(logits, shape, self._dtype, self.device)

    @property
    def _dtype(self) -> torch.dtype:
        return getattr(torch, self.config.dtype)

    def _model(self, input_ids: torch.Tensor, meta, logits_indices: torch.Tensor | None = None) -> torch.Tensor | None:
        """The model on this rank's layers: the logits on the last stage (None before it, whose
        output goes on to the next stage)."""
        pipeline = self.pipeline
        if pipeline.stages == 1:
            return self.model(input_ids, meta, self.kv_pool, logits_indices)
        carried = None
        if not pipeline.first:
            shape = (2, input_ids.shape[0], self.model.config.hidden_size)
            carried = pipeline.receive(shape, self._dtype, self.device)
        out = self.model(input_ids, meta, self.kv_pool, logits_indices, carried)
        if pipeline.last:
            return out
        pipeline.send_on(out)
        return None

    def _forward(self, inputs: ForwardInputs) -> torch.Tensor | None:
        for seq_id in inputs.discarded:
            self.backend.forget(seq_id)
        if inputs.kind == "decode":
            return self._decode(inputs)
        cached = None
        if inputs.kind == "mixed":
            assert inputs.block_tables is not None and inputs.context_lens is not None
            assert inputs.decode_rows is not None and inputs.chunks is not None
            cached = CachedContext(
                self._tensor(inputs.decode_rows),
                self._tensor(inputs.block_tables, torch.int32),
                self._tensor(inputs.context_lens, torch.int32),
                max(inputs.context_lens, default=0),
                [(first, rows, start, self._tensor(table)) for first, rows, start, table in inputs.chunks],
            )
        assert inputs.cu_seqlens is not None
        step = StepInputs(
            inputs.seq_ids,
            self._tensor(inputs.positions),
            self._tensor(inputs.slots),
            cu_seqlens=inputs.cu_seqlens,
            cached=cached,
        )
        meta = self.backend.prefill_metadata(step)
        last = inputs.logits_rows if inputs.logits_rows is not None else [c - 1 for c in inputs.cu_seqlens[1:]]
        return self._model(self._tensor(inputs.input_ids), meta, self._tensor(last))

    def _decode(self, inputs: ForwardInputs) -> torch.Tensor | None:
        if inputs.micro_batches == 1 or len(inputs.seq_ids) < 2:
            return self._decode_batch(inputs)
        # all the micro-batches go into the pipeline before the logits come back
        parts = [self._decode_batch(part) for part in inputs.split()]
        return torch.cat(parts) if self.pipeline.last else None  # type: ignore[arg-type]

    def _decode_batch(self, inputs: ForwardInputs) -> torch.Tensor | None:
        assert inputs.context_lens is not None
        order = self.backend.decode_order(inputs.seq_ids, inputs.context_lens)
        if order is None or order == list(range(len(order))):
            return self._decode_in_order(inputs)
        # run in the backend's order, hand the logits back in the caller's
        logits = self._decode_in_order(inputs.reordered(order))
        if logits is None:
            return None
        out = torch.empty_like(logits)
        out[torch.tensor(order)] = logits
        return out

    def _decode_in_order(self, inputs: ForwardInputs) -> torch.Tensor | None:
        assert inputs.block_tables is not None and inputs.context_lens is not None
        graph_bs = next((bs for bs in sorted(self.graphs) if bs >= len(inputs.seq_ids)), None)
        if graph_bs is not None:
            return self._replay(graph_bs, inputs)
        step = StepInputs(
            inputs.seq_ids,
            self._tensor(inputs.positions),
            self._tensor(inputs.slots),
            block_tables=self._tensor(inputs.block_tables, torch.int32),
            context_lens=self._tensor(inputs.context_lens, torch.int32),
            context_lens_list=inputs.context_lens,
        )
        meta = self.backend.decode_metadata(step)
        logits = self._model(self._tensor(inputs.input_ids), meta)
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

    def _replay(self, bs: int, inputs: ForwardInputs) -> torch.Tensor:
        assert inputs.block_tables is not None and inputs.context_lens is not None
        batch = len(inputs.seq_ids)
        pad = bs - batch
        self.g_input_ids[:bs].copy_(self._tensor(inputs.input_ids + [0] * pad))
        self.g_positions[:bs].copy_(self._tensor(inputs.positions + [0] * pad))
        self.g_slots[:bs].copy_(self._tensor(inputs.slots + [self.null_slot] * pad))
        self.g_context_lens[:bs].copy_(self._tensor(inputs.context_lens + [1] * pad, torch.int32))
        width = len(inputs.block_tables[0])
        self.g_tables[:bs, :width].copy_(self._tensor(inputs.block_tables + [[0] * width] * pad, torch.int32))
        self.graphs[bs].replay()
        return self.g_logits[bs][:batch]
