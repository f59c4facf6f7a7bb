"""The torch backend's CPU decode: a dense copy of the running batch's K/V, appended to one token
per step. (The cpu-kernels backend reads the paged pool in place and needs no mirror.)

The torch backend has no paged-attention kernel, so attention must first gather each sequence's
blocks into a dense tensor, every layer, every step: a full copy of the batch's K/V per step, a
large share of a small model's decode step. The mirror keeps that dense tensor between steps: a
sequence is gathered once when it joins the batch, then each step appends only the new token. The
paged pool stays the source of truth (transfers and preemption read it); the mirror is a cache of
it for attention, and a sequence is dropped from it when it leaves the batch or its blocks are
given up (BlockManager.take_discarded, read by the runner before each step).

Layout per layer: [2 (K, V), kv_heads, slots, capacity, head_dim]. Running sequences occupy slots
0..B-1 in batch order (the runner orders each step's batch by slot), so attention reads a plain view.

Dense attention pays for every row up to the batch's longest context, so one long conversation in
a batch of short ones would multiply attention's cost. So the slots are kept longest first, and
attention runs over groups of neighbouring slots, each only as wide as its own longest
(`attention_groups`): the cost follows the sum of the contexts, as the planner's latency model
assumes. The order holds by itself, since every running sequence grows by one token per step; a
sequence that joins is put in its place and the ones after it move down one slot (a copy of their
K/V, once per join or leave, not per step).

Each step's new K/V also go to the pool, but all layers at once after the forward pass: one scatter
instead of two per layer, each costing about the same whatever its size.

The measurements behind these choices are in docs/engine.md.
"""

from __future__ import annotations

import torch

from services.common.arith import ceil_div


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
        self.groups: list[tuple[int, int, int]] = []  # this step's attention groups (attention_groups)

    def _bytes(self, slots: int, capacity: int) -> int:
        return (
            2
            * self.num_layers
            * self.kv_heads
            * slots
            * capacity
            * self.head_dim
            * torch.empty((), dtype=self.dtype).element_size()
        )

    def clear(self) -> None:
        self.seq_ids, self.lengths, self.caches = [], [], []

    @torch.inference_mode()  # the caches are inference tensors (created during decode)
    def drop(self, seq_id: str) -> None:
        if seq_id in self.seq_ids:
            self._keep([slot for slot, sid in enumerate(self.seq_ids) if sid != seq_id])

    def _move(self, src: int, dst: int) -> None:
        n = self.lengths[src]
        for cache in self.caches:
            cache[:, :, dst, :n] = cache[:, :, src, :n]

    def _keep(self, slots: list[int]) -> None:
        """Keeps these slots (ascending), closing the gaps without changing their order."""
        for new, old in enumerate(slots):
            if new != old:  # new < old, and every slot below old has been read already
                self._move(old, new)
        self.seq_ids = [self.seq_ids[k] for k in slots]
        self.lengths = [self.lengths[k] for k in slots]

    def prepare(self, seq_ids: list[str], context_lens: list[int]) -> list[int] | None:
        """Makes the batch occupy slots 0..B-1, longest context first. Returns, for each slot, the
        batch index of its sequence, or None when the batch would exceed the memory budget (use
        the gather path)."""
        length_of = dict(zip(seq_ids, context_lens))
        if any(sid not in length_of for sid in self.seq_ids):
            self._keep([slot for slot, sid in enumerate(self.seq_ids) if sid in length_of])
        present = set(self.seq_ids)
        joining = sorted((sid for sid in seq_ids if sid not in present), key=lambda sid: -length_of[sid])
        need_slots, need_capacity = len(self.seq_ids) + len(joining), max(context_lens)
        have_slots = self.caches[0].shape[2] if self.caches else 0
        have_capacity = self.caches[0].shape[3] if self.caches else 0
        if need_slots > have_slots or need_capacity > have_capacity:
            slots = max(need_slots, 2 * have_slots, 8)
            capacity = max(need_capacity + 64, 2 * have_capacity)
            if self._bytes(slots, capacity) > self.max_bytes:
                self.clear()
                return None
            self._grow(slots, capacity)
        if joining:
            self._insert(joining, length_of)
        index = {sid: i for i, sid in enumerate(seq_ids)}
        return [index[sid] for sid in self.seq_ids]

    def _insert(self, joining: list[str], length_of: dict[str, int]) -> None:
        """Merges the joining sequences (longest first) into the slots; they start empty and are
        gathered from the pool by `views`."""
        order: list[tuple[str, int | None]] = []  # (seq id, its slot now, or None for a new one)
        slot = 0
        for sid in joining:
            while slot < len(self.seq_ids) and length_of[self.seq_ids[slot]] >= length_of[sid]:
                order.append((self.seq_ids[slot], slot))
                slot += 1
            order.append((sid, None))
        order += [(self.seq_ids[k], k) for k in range(slot, len(self.seq_ids))]
        lengths = [0] * len(order)
        for new in range(len(order) - 1, -1, -1):  # downwards: a slot moves only after the one below it
            sid, old = order[new]
            if old is not None:
                if old != new:
                    self._move(old, new)
                lengths[new] = self.lengths[old]
        self.seq_ids = [sid for sid, _ in order]
        self.lengths = lengths

    def _grow(self, slots: int, capacity: int) -> None:
        def grown(old: torch.Tensor | None) -> torch.Tensor:
            # zeros, not empty: attention masks rows past each length, but 0 * NaN garbage is NaN
            new = torch.zeros(2, self.kv_heads, slots, capacity, self.head_dim, dtype=self.dtype)
            if old is not None:
                new[:, :, : old.shape[2], : old.shape[3]] = old
            return new

        olds: list[torch.Tensor | None] = list(self.caches) or [None] * self.num_layers
        self.caches = [grown(old) for old in olds]

    def begin_step(self, context_lens: list[int]) -> None:
        """Index tensors of this step's new tokens and the attention groups, shared by every layer."""
        batch = len(context_lens)
        self.groups = attention_groups(context_lens)
        self._step_slots = torch.arange(batch)
        self._step_positions = torch.tensor(context_lens) - 1
        self._step_kv = torch.empty(batch, self.num_layers, 2, self.kv_heads, self.head_dim, dtype=self.dtype)

    def _catch_up(self, layer: int, k_cache, v_cache, block_tables, context_lens: list[int]) -> None:
        """Gathers from the pool what each slot lacks before this step's token (a sequence that
        joined, or fell behind)."""
        cache = self.caches[layer]
        block_size = k_cache.shape[1]
        for slot, (have, ctx) in enumerate(zip(self.lengths, context_lens)):
            if have < ctx - 1:  # copy positions [have, ctx-1) from its blocks
                nb = ceil_div(ctx - 1, block_size)
                blocks = block_tables[slot, :nb].long()
                for i, pool in enumerate((k_cache, v_cache)):
                    gathered = pool[blocks].reshape(nb * block_size, self.kv_heads, self.head_dim)
                    cache[i, :, slot, have : ctx - 1] = gathered[have : ctx - 1].transpose(0, 1)

    def views(self, layer: int, k_cache, v_cache, block_tables, k_new, v_new, context_lens: list[int]):
        """Brings slot j up to date (gathering from the pool what it lacks, appending this step's
        token), then returns K, V as [B, kv_heads, span, head_dim] views."""
        self._catch_up(layer, k_cache, v_cache, block_tables, context_lens)
        cache = self.caches[layer]
        batch = len(context_lens)
        assert self._step_kv is not None, "begin_step first"
        step_kv = self._step_kv[:, layer]  # [B, 2, kv_heads, head_dim]
        step_kv[:, 0] = k_new
        step_kv[:, 1] = v_new
        cache[:, :, self._step_slots, self._step_positions] = step_kv.permute(1, 2, 0, 3)
        span = max(context_lens)
        return cache[0, :, :batch, :span].transpose(0, 1), cache[1, :, :batch, :span].transpose(0, 1)

    def attention(self, q, k, v, mask, scale, attend) -> torch.Tensor:
        """attend(q, k, v, mask, scale) per group of slots, each cut to its own longest context."""
        if len(self.groups) == 1:
            return attend(q, k, v, mask, scale)
        out = torch.empty_like(q)
        for start, end, span in self.groups:
            out[start:end] = attend(
                q[start:end], k[start:end, :, :span], v[start:end, :, :span], mask[start:end, :, :, :span], scale
            )
        return out

    def write_step_to_pool(self, pool: torch.Tensor, slot_blocks: torch.Tensor, slot_rows: torch.Tensor) -> None:
        """Scatters this step's K/V of every layer into the paged pool
        [blocks, layers, 2, block_size, kv_heads, head_dim] (one index_put for the whole step)."""
        assert self._step_kv is not None, "begin_step first"
        pool[slot_blocks, :, :, slot_rows] = self._step_kv
        self._step_kv = None

    def advance(self, context_lens: list[int]) -> None:
        """Called once per step after all layers wrote: each slot now holds ctx tokens."""
        self.lengths[: len(context_lens)] = list(context_lens)


# A group costs one more attention call per layer, about what GROUP_SPLIT_ROWS rows of padding
# cost, so a batch is split only where that saves more padded rows than this.
GROUP_SPLIT_ROWS = 128
GROUP_LENGTH_RATIO = 1.5  # within a group the longest context is at most ~this times the shortest


def attention_groups(context_lens: list[int]) -> list[tuple[int, int, int]]:
    """Splits slots 0..B-1 (longest context first) into (start, end, longest context) groups.

    Greedy: a new group starts where the context has fallen by GROUP_LENGTH_RATIO since the
    group's first slot and cutting there saves more than GROUP_SPLIT_ROWS padded rows. The span
    is the group's true maximum, so an out-of-order batch is still attended correctly."""
    groups, start = [], 0
    batch = len(context_lens)
    for i in range(1, batch):
        head, here = context_lens[start], context_lens[i]
        if here * GROUP_LENGTH_RATIO <= head and (head - here) * (batch - i) > GROUP_SPLIT_ROWS:
            groups.append((start, i, max(context_lens[start:i])))
            start = i
    groups.append((start, batch, max(context_lens[start:batch])))
    return groups
