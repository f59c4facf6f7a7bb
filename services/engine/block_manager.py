"""KV block accounting, kept apart from the tensors (as vLLM's block pool is).

Blocks are integers indexing the pool (see kv_cache.py). A block is free when its reference count
is zero. Reference counts let a block be held by more than one owner: a sequence and a published
KV entry awaiting transfer, or two sequences sharing a prefix.

Token t of a sequence lives in block `seq.block_table[t // block_size]`. Every sequence whose
blocks are given back is logged (`take_discarded`): the model runner drops what it cached about
them (the torch backend's K/V mirror) before its next step, so a cache can never outlive the KV
it copies, whoever freed the blocks.
"""

from __future__ import annotations

from collections import deque

from services.common.arith import ceil_div

from .sequence import Sequence


class OutOfBlocksError(RuntimeError):
    pass


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts = [0] * num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._discarded: list[str] = []  # ids of sequences whose blocks were taken from them

    # ---- blocks -----------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return ceil_div(num_tokens, self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self._free):
            raise OutOfBlocksError(f"need {num_blocks} KV blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(num_blocks)]
        for b in blocks:
            self._ref_counts[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """Adds one owner to blocks that are already allocated."""
        for b in blocks:
            if self._ref_counts[b] <= 0:
                raise ValueError(f"block {b} is free and cannot be shared")
            self._ref_counts[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drops one owner from each block; a block returns to the free list with its last owner."""
        for b in blocks:
            if self._ref_counts[b] <= 0:
                raise ValueError(f"block {b} freed twice")
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free.append(b)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    # ---- sequences --------------------------------------------------------------------------------
    def allocate_seq(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Gives `seq` blocks for its first `num_tokens` tokens (default: all); allocates only what
        it lacks."""
        need = self.blocks_for_tokens(len(seq.token_ids) if num_tokens is None else num_tokens)
        if need > len(seq.block_table):
            seq.block_table.extend(self.allocate(need - len(seq.block_table)))

    def blocks_needed_for_step(self, seq: Sequence) -> int:
        """Blocks a decode step of `seq` would allocate (0 or 1)."""
        return int(self.blocks_for_tokens(len(seq.token_ids)) > len(seq.block_table))

    def free_seq(self, seq: Sequence) -> None:
        self.free(self.detach(seq))

    def detach(self, seq: Sequence) -> list[int]:
        """Takes the sequence's blocks from it without freeing them (give them back with `free`):
        for blocks that something outside the engine may still be writing."""
        if seq.block_table:
            self._discarded.append(seq.seq_id)
        blocks, seq.block_table, seq.num_cached = seq.block_table, [], 0
        return blocks

    def take_discarded(self) -> list[str]:
        """The sequences whose KV was given up since the last call (for caches of it)."""
        ids, self._discarded = self._discarded, []
        return ids
