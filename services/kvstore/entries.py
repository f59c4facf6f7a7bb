"""The daemon's state: registered pools and published KV entries, and their lifecycle.

    published (device tier: blocks in a worker's pool, owned by the worker until RELEASED)
      -> pulled          RELEASED(reason="pulled") to the pool's watcher; entry gone
      -> released        RELEASED(reason="released"); entry gone
      -> moved_to_host   (TTL) copied into the host tier, RELEASED(reason="moved_to_host");
                           -> pulled / released / evicted (tier full) / expired: entry gone
      -> expired         (TTL + host TTL, when the host tier never had room) RELEASED("expired")
    pool dropped (its watch stream ended): its device entries vanish without events.

One transfer at a time reads an entry: `begin_transfer` takes the entry's lock, `end_transfer`
releases it and, on success, drops the entry. A second pull of the same entry waits and then finds
it gone (NOT_FOUND). A Release that arrives mid-transfer is remembered and applied when the
transfer fails (a successful pull releases the blocks anyway). Nothing here does I/O; the daemon
(daemon.py) and the UCX server (ucx_transfer.py) drive it from one asyncio loop, so no thread
locks are needed.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import torch

from services.common.arith import ceil_div
from services.common.enums import ReleaseReason
from services.common.errors import ServiceError, invalid
from services.engine.kv_cache import KvLayout, KvPool

from .block_runs import RankRows
from .host_tier import HostTier
from .shards import Shard, rank_layout


@dataclass(frozen=True)
class ReleasedEvent:
    kv_id: str
    block_ids: list[int]
    reason: ReleaseReason


@dataclass
class PoolRecord:
    """A worker's registered KV memory: one pool per rank of its instance, the same blocks in each."""

    pool_id: str
    worker_id: str
    layout: KvLayout  # the instance's as a whole: the model's layers and K/V heads
    shards: list[Shard]  # rank r's layers and heads
    kv_pools: list[KvPool]  # the daemon's mappings of each rank's pool; unmapped with the last reference
    events: asyncio.Queue  # ReleasedEvent, or None to end the watch stream
    registered_at: float
    watched: bool = False

    @property
    def rank_block_bytes(self) -> tuple[int, ...]:
        return tuple(pool.layout.block_bytes for pool in self.kv_pools)

    @property
    def on_cuda(self) -> bool:
        return self.kv_pools[0].tensor.is_cuda

    def rank_rows(self, ids: Sequence[int]) -> list[RankRows]:
        return [
            RankRows(pool.block_bytes_view(), ids, shard)
            for pool, shard in zip(self.kv_pools, self.shards, strict=True)
        ]


@dataclass
class KvEntry:
    kv_id: str
    layout: KvLayout  # its instance's as a whole
    shards: list[Shard]  # which layers and heads each rank's part of a block holds
    rank_block_bytes: tuple[int, ...]  # each rank's part of a block
    num_tokens: int
    block_ids: list[int]  # in the source pools, token order
    published_at: float
    pool: PoolRecord | None  # device tier: the pool holding the blocks
    host_buffer: torch.Tensor | None = None  # host tier: [num_blocks, block_bytes]
    access_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))  # KvHandle.access_token
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # held by the one transfer/move reading it
    release_pending: bool = False
    dropped: bool = False

    @property
    def fingerprint(self) -> str:
        return self.layout.fingerprint()

    @property
    def block_bytes(self) -> int:
        """One block on all ranks together."""
        return sum(self.rank_block_bytes)

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_bytes

    @property
    def in_host_tier(self) -> bool:
        return self.host_buffer is not None

    def source(self) -> list[RankRows]:
        """Where each rank's part of the entry is now: block i of the entry in rows[ids[i]]. In the
        host tier, a block is one row of the buffer, the ranks' parts side by side."""
        if self.host_buffer is None:
            assert self.pool is not None  # a live entry not in the host tier is in a worker's pool
            return self.pool.rank_rows(self.block_ids)
        return host_parts(self.host_buffer, self.shards, self.rank_block_bytes)


def host_parts(buffer: torch.Tensor, shards: list[Shard], rank_block_bytes: Sequence[int]) -> list[RankRows]:
    """A host-tier buffer `[num_blocks, sum of rank_block_bytes]` as each rank's part."""
    ids, parts, start = range(buffer.shape[0]), [], 0
    for shard, nbytes in zip(shards, rank_block_bytes, strict=True):
        parts.append(RankRows(buffer[:, start : start + nbytes], ids, shard))
        start += nbytes
    return parts


def check_block_ids(field_name: str, block_ids: Sequence[int], num_blocks: int) -> list[int]:
    ids = list(block_ids)
    if not ids:
        raise invalid(field_name, "no blocks given")
    bad = [b for b in ids if b >= num_blocks]
    if bad:
        raise invalid(field_name, f"block {bad[0]} out of range (pool has {num_blocks} blocks)")
    if len(set(ids)) != len(ids):
        raise invalid(field_name, "a block appears twice")
    return ids


class EntryTable:
    def __init__(self, host_tier: HostTier):
        self.host = host_tier
        self.pools: dict[str, PoolRecord] = {}
        self.entries: dict[str, KvEntry] = {}

    # ---- pools ------------------------------------------------------------------------------
    def add_pool(self, worker_id: str, layout: KvLayout, shards: list[Shard], kv_pools: list[KvPool]) -> PoolRecord:
        # unguessable: who knows it may publish into, watch and release from the pool
        pool_id = f"{worker_id}-{secrets.token_hex(16)}"
        if [pool.layout for pool in kv_pools] != [rank_layout(layout, shard) for shard in shards]:
            raise ValueError("the ranks' pools do not hold the shards of the layout")  # map_pool checked
        record = PoolRecord(pool_id, worker_id, layout, shards, kv_pools, asyncio.Queue(), time.monotonic())
        self.pools[pool_id] = record
        return record

    def pool(self, pool_id: str) -> PoolRecord:
        record = self.pools.get(pool_id)
        if record is None:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"pool_id: pool {pool_id!r} is not registered here (register it again)",
            )
        return record

    def drop_pool(self, pool_id: str) -> int:
        """Forgets a pool and its device-tier entries (the worker is gone: nobody to notify).
        Host-tier entries survive: their bytes are the daemon's own. Returns entries dropped."""
        record = self.pools.pop(pool_id, None)
        if record is None:
            return 0
        doomed = [e for e in self.entries.values() if e.pool is record]
        for entry in doomed:
            self._forget(entry)
        record.events.put_nowait(None)  # ends a watch stream that is still open
        return len(doomed)

    # ---- entries ----------------------------------------------------------------------------
    def publish(self, pool_id: str, kv_id: str, block_ids: Sequence[int], num_tokens: int) -> KvEntry:
        """Entries of one pool may share blocks (a prefix cached by the worker backs several
        requests' KV at once): the worker counts their owners, and frees a block when the last
        entry holding it is released."""
        record = self.pool(pool_id)
        layout = record.layout
        if not kv_id:
            raise invalid("kv_id", "empty")
        if kv_id in self.entries:
            raise ServiceError(grpc.StatusCode.ALREADY_EXISTS, f"kv_id: {kv_id!r} is already published")
        ids = check_block_ids("block_ids", block_ids, layout.num_blocks)
        if num_tokens <= 0:
            raise invalid("num_tokens", "must be > 0")
        needed = ceil_div(num_tokens, layout.block_size)
        if needed != len(ids):
            raise invalid(
                "num_tokens",
                f"{num_tokens} tokens need {needed} blocks of {layout.block_size}, got {len(ids)} block_ids",
            )
        entry = KvEntry(
            kv_id, layout, record.shards, record.rank_block_bytes, num_tokens, ids, time.monotonic(), record
        )
        self.entries[kv_id] = entry
        return entry

    def get(self, kv_id: str, access_token: str) -> KvEntry:
        """The entry, if the token is its own: a wrong token reads as no entry (nothing to probe)."""
        entry = self.entries.get(kv_id)
        if entry is None or not hmac.compare_digest(entry.access_token, access_token):
            raise ServiceError(
                grpc.StatusCode.NOT_FOUND,
                f"no KV entry {kv_id!r} here (already pulled, released, expired, or its worker is gone)",
            )
        return entry

    async def begin_transfer(self, kv_id: str, access_token: str, fingerprint: str, num_dst_blocks: int) -> KvEntry:
        """Checks a pull against the entry and takes the entry's lock; pair with end_transfer."""
        entry = self.get(kv_id, access_token)
        if entry.fingerprint != fingerprint:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"layout mismatch: entry {kv_id!r} has layout {entry.fingerprint!r}, "
                f"destination pool has {fingerprint!r}",
            )
        if entry.num_blocks != num_dst_blocks:
            raise invalid("block_ids", f"{num_dst_blocks} destination blocks for an entry of {entry.num_blocks} blocks")
        await entry.lock.acquire()
        if entry.dropped:  # another pull won, or it was released, while we waited
            entry.lock.release()
            raise self._gone(kv_id)
        return entry

    def end_transfer(self, entry: KvEntry, succeeded: bool) -> None:
        try:
            if succeeded:
                self.drop(entry, ReleaseReason.PULLED)
            elif entry.release_pending:
                self.drop(entry, ReleaseReason.RELEASED)
        finally:
            entry.lock.release()

    def release(self, kv_id: str, access_token: str = "", pool_id: str = "") -> bool:
        """Drops the entry for a caller holding its handle's token, or for the worker whose pool
        publishes it. False if there is no such entry (or the caller may not know of it)."""
        entry = self.entries.get(kv_id)
        if entry is None:
            return False
        own_pool = bool(pool_id) and entry.pool is not None and hmac.compare_digest(entry.pool.pool_id, pool_id)
        if not (own_pool or hmac.compare_digest(entry.access_token, access_token)):
            return False
        if entry.lock.locked():
            entry.release_pending = True  # applied when the transfer reading it ends
        else:
            self.drop(entry, ReleaseReason.RELEASED)
        return True

    def move_to_host(self, entry: KvEntry, host_buffer: torch.Tensor) -> None:
        """The entry's bytes are now in `host_buffer`: the worker may free its blocks."""
        record = entry.pool
        assert record is not None  # only a device-tier entry moves to the host
        entry.host_buffer = host_buffer
        entry.pool = None
        self._notify(record, entry, ReleaseReason.MOVED_TO_HOST)

    def drop(self, entry: KvEntry, reason: ReleaseReason | None) -> None:
        """Removes an entry; a device-tier entry's worker hears RELEASED(reason)."""
        if entry.dropped:
            return
        record = entry.pool
        self._forget(entry)
        if record is not None and reason is not None and record.pool_id in self.pools:
            self._notify(record, entry, reason)

    # ---- queries for the sweeper and Stats ----------------------------------------------------
    def device_entries_older_than(self, age_seconds: float) -> list[KvEntry]:
        """Idle device-tier entries published more than `age_seconds` ago, oldest first."""
        deadline = time.monotonic() - age_seconds
        old = [
            e
            for e in self.entries.values()
            if e.pool is not None and e.published_at <= deadline and not e.lock.locked()
        ]
        return sorted(old, key=lambda e: e.published_at)

    def count(self, tier: str) -> int:
        in_host = tier == "host"
        return sum(1 for e in self.entries.values() if e.in_host_tier == in_host)

    # ---- internals --------------------------------------------------------------------------
    def _forget(self, entry: KvEntry) -> None:
        entry.dropped = True
        self.entries.pop(entry.kv_id, None)
        if entry.host_buffer is not None:
            self.host.free(entry.kv_id)
            entry.host_buffer = None

    def _notify(self, record: PoolRecord, entry: KvEntry, reason: ReleaseReason) -> None:
        record.events.put_nowait(ReleasedEvent(entry.kv_id, list(entry.block_ids), reason))

    @staticmethod
    def _gone(kv_id: str) -> ServiceError:
        return ServiceError(grpc.StatusCode.NOT_FOUND, f"KV entry {kv_id!r} was pulled or released by another request")
