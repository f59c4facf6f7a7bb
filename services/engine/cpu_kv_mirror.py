"""CPU decode: a dense copy of the running batch's K/V, appended to one token per step.

On CPU there is no paged-attention kernel, so attention must first gather each sequence's blocks
into a dense tensor, every layer, every step: a full copy of the batch's KV per step (~20% of a
decode step for a 50M model at batch 16). The mirror keeps that dense tensor between steps:
a sequence is gathered once when it joins the batch, then each step appends only the new token.
The paged pool stays the source of truth (transfers and preemption read it); the mirror is a cache
of it for attention and is dropped whenever it could be stale.

Layout per layer: [2 (K, V), kv_heads, slots, capacity, head_dim]. Running sequences occupy slots
0..B-1 in batch order (the runner orders each step's batch by slot), so attention reads a plain view.

Each step's new K/V also go to the pool, but all layers at once after the forward pass (one
scatter instead of two per layer: on CPU each scatter costs ~40 us whatever its size).
"""

from __future__ import annotations

import torch


class DecodeKvMirror:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, max_bytes: int):
        self.num_layers = num_layers
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.max_bytes = max_bytes
        self.seq_ids: list[str] = []  # slot -> sequence id
        self.lengths: list[int] = []  # slot -> tokens of K/V present
        self.caches: list[torch.Tensor] = []  # per layer [2, kv_heads, slots, capacity, head_dim]
        self._step_kv: torch.Tensor | None = None  # this step's new K/V [B, layers, 2, kv_heads, head_dim]

    def _bytes(self, slots: int, capacity: int) -> int:
        return 2 * self.num_layers * self.kv_heads * slots * capacity * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def clear(self) -> None:
        self.seq_ids, self.lengths, self.caches = [], [], []

    @torch.inference_mode()  # the caches are inference tensors (created during decode)
    def drop(self, seq_id: str) -> None:
        if seq_id in self.seq_ids:
            self._remove_slot(self.seq_ids.index(seq_id))

    def _remove_slot(self, slot: int) -> None:
        last = len(self.seq_ids) - 1
        if slot != last:  # move the last slot into the hole so slots stay 0..B-1
            n = self.lengths[last]
            for cache in self.caches:
                cache[:, :, slot, :n] = cache[:, :, last, :n]
            self.seq_ids[slot], self.lengths[slot] = self.seq_ids[last], self.lengths[last]
        self.seq_ids.pop()
        self.lengths.pop()

    def prepare(self, seq_ids: list[str], context_lens: list[int]) -> list[int] | None:
        """Makes the batch occupy slots 0..B-1. Returns, for each slot, the batch index of its
        sequence, or None when the batch would exceed the memory budget (use the gather path)."""
        wanted = set(seq_ids)
        for slot in range(len(self.seq_ids) - 1, -1, -1):
            if self.seq_ids[slot] not in wanted:
                self._remove_slot(slot)
        present = set(self.seq_ids)
        for sid in seq_ids:
            if sid not in present:
                self.seq_ids.append(sid)
                self.lengths.append(0)
        need_slots, need_capacity = len(self.seq_ids), max(context_lens)
        have_slots = self.caches[0].shape[2] if self.caches else 0
        have_capacity = self.caches[0].shape[3] if self.caches else 0
        if need_slots > have_slots or need_capacity > have_capacity:
            slots = max(need_slots, 2 * have_slots, 8)
            capacity = max(need_capacity + 64, 2 * have_capacity)
            if self._bytes(slots, capacity) > self.max_bytes:
                self.clear()
                return None
            self._grow(slots, capacity)
        index = {sid: i for i, sid in enumerate(seq_ids)}
        return [index[sid] for sid in self.seq_ids]

    def _grow(self, slots: int, capacity: int) -> None:
        def grown(old: torch.Tensor | None) -> torch.Tensor:
            # zeros, not empty: attention masks rows past each length, but 0 * NaN garbage is NaN
            new = torch.zeros(2, self.kv_heads, slots, capacity, self.head_dim, dtype=self.dtype)
            if old is not None:
                new[:, :, : old.shape[2], : old.shape[3]] = old
            return new

        self.caches = [grown(old) for old in (self.caches or [None] * self.num_layers)]

    def begin_step(self, context_lens: list[int]) -> None:
        """Index tensors of this step's new tokens, shared by every layer."""
        batch = len(context_lens)
        self._step_slots = torch.arange(batch)
        self._step_positions = torch.tensor(context_lens) - 1
        self._step_kv = torch.empty(batch, self.num_layers, 2, self.kv_heads, self.head_dim, dtype=self.dtype)

    def views(self, layer: int, k_cache, v_cache, block_tables, k_new, v_new, context_lens: list[int]):
        """Brings slot j up to date (gathering from the pool what it lacks, appending this step's
        token), then returns K, V as [B, kv_heads, span, head_dim] views."""
        cache = self.caches[layer]
        block_size = k_cache.shape[1]
        batch = len(context_lens)
        for slot, (have, ctx) in enumerate(zip(self.lengths, context_lens)):
            if have < ctx - 1:  # joined (or fell behind): copy positions [have, ctx-1) from its blocks
                nb = -(-(ctx - 1) // block_size)
                blocks = block_tables[slot, :nb].long()
                for i, pool in enumerate((k_cache, v_cache)):
                    gathered = pool[blocks].reshape(nb * block_size, self.kv_heads, self.head_dim)
                    cache[i, :, slot, have : ctx - 1] = gathered[have : ctx - 1].transpose(0, 1)
        step_kv = self._step_kv[:, layer]  # [B, 2, kv_heads, head_dim]
        step_kv[:, 0] = k_new
        step_kv[:, 1] = v_new
        cache[:, :, self._step_slots, self._step_positions] = step_kv.permute(1, 2, 0, 3)
        span = max(context_lens)
        return cache[0, :, :batch, :span].transpose(0, 1), cache[1, :, :batch, :span].transpose(0, 1)

    def write_step_to_pool(self, pool: torch.Tensor, slot_blocks: torch.Tensor, slot_rows: torch.Tensor) -> None:
        """Scatters this step's K/V of every layer into the paged pool
        [blocks, layers, 2, block_size, kv_heads, head_dim] (one index_put for the whole step)."""
        pool[slot_blocks, :, :, slot_rows] = self._step_kv
        self._step_kv = None

    def advance(self, context_lens: list[int]) -> None:
        """Called once per step after all layers wrote: each slot now holds ctx tokens."""
        self.lengths[: len(context_lens)] = list(context_lens)
