"""The host-memory overflow tier: daemon-owned copies of entries nobody pulled in time.

When an entry outlives --ttl-seconds in a prefill worker's pool, the daemon copies it here and
tells the worker to free its blocks, so a slow decode side cannot pin prefill memory. The tier is
bounded (--host-tier-bytes); to admit a new entry it evicts the oldest entries that no transfer is
reading. Entries expire after --host-ttl-seconds. This class does byte accounting and ordering
only; the daemon's EntryTable owns the entries themselves.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class HostSlot:
    nbytes: int
    since: float  # monotonic time the entry entered the tier


class HostTier:
    def __init__(self, capacity_bytes: int, ttl_seconds: float, clock: Callable[[], float] = time.monotonic):
        self.capacity_bytes = capacity_bytes
        self.ttl_seconds = ttl_seconds
        self.used_bytes = 0
        self._clock = clock
        self._slots: OrderedDict[str, HostSlot] = OrderedDict()  # oldest first

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, kv_id: str) -> bool:
        return kv_id in self._slots

    def plan_admission(self, nbytes: int, evictable: Callable[[str], bool]) -> list[str] | None:
        """The oldest evictable entries to drop so that `nbytes` fits (possibly none), or None
        when it cannot fit even after evicting everything evictable. Changes nothing."""
        if nbytes > self.capacity_bytes:
            return None
        free = self.capacity_bytes - self.used_bytes
        victims = []
        for kv_id, slot in self._slots.items():
            if free >= nbytes:
                break
            if evictable(kv_id):
                victims.append(kv_id)
                free += slot.nbytes
        return victims if free >= nbytes else None

    def allocate(self, kv_id: str, num_blocks: int, block_bytes: int, pin_memory: bool = False) -> torch.Tensor:
        """Reserves room for an entry (after plan_admission's victims were freed) and returns its
        `[num_blocks, block_bytes]` buffer. Pinned when the pools are on a GPU, so that copies
        and UCX sends to and from the device are direct DMA."""
        nbytes = num_blocks * block_bytes
        if self.used_bytes + nbytes > self.capacity_bytes:
            raise MemoryError(f"host tier full: {self.used_bytes}+{nbytes} > {self.capacity_bytes} bytes")
        buffer = torch.empty((num_blocks, block_bytes), dtype=torch.uint8, pin_memory=pin_memory)
        self._slots[kv_id] = HostSlot(nbytes, self._clock())
        self.used_bytes += nbytes
        return buffer

    def free(self, kv_id: str) -> None:
        slot = self._slots.pop(kv_id, None)
        if slot is not None:
            self.used_bytes -= slot.nbytes

    def expired(self) -> list[str]:
        """Entries older than the host TTL, oldest first."""
        deadline = self._clock() - self.ttl_seconds
        return [kv_id for kv_id, slot in self._slots.items() if slot.since <= deadline]
