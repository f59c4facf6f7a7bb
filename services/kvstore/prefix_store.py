"""The node's prefix tier: full KV blocks that workers offer (a decode worker, when a request
finishes: its prompt and its answer), kept in the daemon's host memory under their content hash
(common/block_hashes.py), and copied into any pool of the node with the same layout that asks for
a prefix. A conversation's next turn then finds its earlier answer here, though a decode worker
computed it, and a prefill worker finds what another worker of its node computed.

Bounded (--prefix-store-bytes); to store a block it evicts the least recently used one that no
copy is reading. Blocks of one-rank pools only (tp = pp = 1): a block is a pool row, byte for
byte. This class keeps the rows, the index and the order; the daemon does the copies, reading
rows it has pinned (`take`) and writing rows it has reserved (`reserve`) in worker threads.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from services.common.block_hashes import leading_held


@dataclass
class _Slab:
    """Every stored block of one layout: rows of `block_bytes`, allocated on first use."""

    rows: torch.Tensor  # [capacity, block_bytes] uint8 (its pages touched as rows are first written)
    free: list[int] = field(default_factory=list)  # rows given back; those from `unused` on never taken
    unused: int = 0
    row_of: OrderedDict[bytes, int] = field(default_factory=OrderedDict)  # hash -> row, least recent first
    pins: dict[int, int] = field(default_factory=dict)  # row -> copies reading or writing it


class PrefixStore:
    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self._slabs: dict[str, _Slab] = {}  # layout fingerprint -> its blocks
        self.evictions = 0

    @property
    def num_blocks(self) -> int:
        return sum(len(s.row_of) for s in self._slabs.values())

    @property
    def num_pinned(self) -> int:
        return sum(len(s.pins) for s in self._slabs.values())

    @property
    def used_bytes(self) -> int:
        return sum(len(s.row_of) * s.rows.shape[1] for s in self._slabs.values())

    def lookup(self, fingerprint: str, hashes: list[bytes]) -> int:
        """How many of the first `hashes` are stored (no order change, no pin)."""
        slab = self._slabs.get(fingerprint)
        return 0 if slab is None else leading_held(hashes, slab.row_of)

    def take(self, fingerprint: str, hashes: list[bytes]) -> tuple[torch.Tensor, list[int]]:
        """The rows of the stored leading `hashes`, pinned (they cannot be evicted until `unpin`)
        and made the most recently used; with the slab's tensor."""
        slab = self._slabs.get(fingerprint)
        if slab is None:
            return torch.empty(0, 0, dtype=torch.uint8), []
        held = hashes[: leading_held(hashes, slab.row_of)]
        rows = [slab.row_of[h] for h in held]
        self._touch(slab, held)
        self._pin(slab, rows)
        return slab.rows, rows

    def unpin(self, fingerprint: str, rows: list[int]) -> None:
        slab = self._slabs[fingerprint]
        for row in rows:
            slab.pins[row] -= 1
            if not slab.pins[row]:
                del slab.pins[row]

    def reserve(
        self, fingerprint: str, block_bytes: int, hashes: list[bytes], pin_memory: bool = False
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Rows for those of `hashes` not stored yet, as (index in `hashes`, row), pinned and not
        yet findable: write them, then `commit` (or `cancel`). Evicts the least recently used
        unpinned blocks for room; reserves fewer (the first ones) when too many are pinned."""
        slab = self._slab(fingerprint, block_bytes, pin_memory)
        self._touch(slab, [h for h in hashes if h in slab.row_of])
        reserved: list[tuple[int, int]] = []
        seen: set[bytes] = set()
        for i, block_hash in enumerate(hashes):
            if block_hash in slab.row_of or block_hash in seen:  # (a hash twice in one offer: its first block)
                continue
            seen.add(block_hash)
            row = self._free_row(slab)
            if row is None:
                row = self._evict(slab)
            if row is None:
                break
            reserved.append((i, row))
        self._pin(slab, [row for _, row in reserved])
        return slab.rows, reserved

    def commit(self, fingerprint: str, hashes: list[bytes], reserved: list[tuple[int, int]]) -> None:
        """The reserved rows hold their blocks now: findable, the prefix's first blocks the most
        recently used. A hash another offer committed meanwhile keeps that one's row."""
        slab = self._slabs[fingerprint]
        self.unpin(fingerprint, [row for _, row in reserved])
        for i, row in reversed(reserved):
            if hashes[i] in slab.row_of:
                slab.free.append(row)
            else:
                slab.row_of[hashes[i]] = row

    def cancel(self, fingerprint: str, reserved: list[tuple[int, int]]) -> None:
        rows = [row for _, row in reserved]
        self.unpin(fingerprint, rows)
        self._slabs[fingerprint].free.extend(rows)

    # ---- internals --------------------------------------------------------------------------
    def _slab(self, fingerprint: str, block_bytes: int, pin_memory: bool) -> _Slab:
        slab = self._slabs.get(fingerprint)
        if slab is None:
            # what other layouts left of the budget (one model per node in practice: all of it)
            taken = sum(s.rows.numel() for s in self._slabs.values())
            capacity = max(0, self.capacity_bytes - taken) // block_bytes
            rows = torch.empty((capacity, block_bytes), dtype=torch.uint8, pin_memory=pin_memory and capacity > 0)
            slab = self._slabs[fingerprint] = _Slab(rows)
        return slab

    @staticmethod
    def _free_row(slab: _Slab) -> int | None:
        if slab.free:
            return slab.free.pop()
        if slab.unused < slab.rows.shape[0]:
            slab.unused += 1
            return slab.unused - 1
        return None

    def _evict(self, slab: _Slab) -> int | None:
        for block_hash, row in slab.row_of.items():
            if row not in slab.pins:
                del slab.row_of[block_hash]
                self.evictions += 1
                return row
        return None

    @staticmethod
    def _touch(slab: _Slab, hashes: list[bytes]) -> None:
        """Most recently used, a prefix's first block last: the tail of a prefix is evicted before
        its head (a lookup stops at the first missing block)."""
        for block_hash in reversed(hashes):
            slab.row_of.move_to_end(block_hash)

    @staticmethod
    def _pin(slab: _Slab, rows: list[int]) -> None:
        for row in rows:
            slab.pins[row] = slab.pins.get(row, 0) + 1
