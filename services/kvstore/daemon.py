"""The kvstore daemon: the KvStore gRPC servicer, pulls (local copy or UCX), and the TTL sweeper.

One asyncio loop runs everything: gRPC handlers, the UCX connections' handlers and the sweeper.
Block copies between mapped pools run in worker threads (torch releases the GIL), so a large
copy does not stall the loop. See docs/kvstore.md for the protocol and the entry lifecycle.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
from dataclasses import dataclass

import grpc
import torch
from prometheus_client import CollectorRegistry

from pdserve.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc
from services.common.block_hashes import HASH_BYTES
from services.common.enums import ReleaseReason
from services.common.errors import ServiceError, invalid
from services.engine.kv_cache import OWNER_PROOF_BYTES, SHM_DIR, KvLayout, KvPool

from .block_runs import CopyStopped, RankRows, copy_pieces, to_the_end
from .entries import EntryTable, KvEntry, PoolRecord, check_block_ids, host_parts
from .host_tier import HostTier
from .metrics import KvStoreMetrics
from .prefix_store import PrefixStore
from .shards import Piece, degrees, instance_shards, rank_layout, resharding_plan
from .ucx_endpoints import parse_address, this_worker_address
from .ucx_transfer import UcxPuller, UcxTransferServer

log = logging.getLogger(__name__)

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class KvStoreConfig:
    node_id: str
    advertise_address: str = ""  # gRPC host:port other nodes use; set once the port is bound
    ttl_seconds: float = 30.0
    host_tier_bytes: int = 1 << 30
    host_ttl_seconds: float = 600.0
    prefix_store_bytes: int = 1 << 30
    transfer_timeout_seconds: float = 30.0
    connect_timeout_seconds: float = 5.0
    watch_grace_seconds: float = 30.0  # a registered pool nobody watches is dropped after this

    @property
    def sweep_interval(self) -> float:
        return max(0.05, min(1.0, self.ttl_seconds / 4, self.host_ttl_seconds / 4))


class KvStoreDaemon(kvstore_pb2_grpc.KvStoreServicer):
    def __init__(self, config: KvStoreConfig, registry: CollectorRegistry):
        self.config = config
        self.table = EntryTable(HostTier(config.host_tier_bytes, config.host_ttl_seconds))
        self.prefix = PrefixStore(config.prefix_store_bytes)
        self.metrics = KvStoreMetrics(registry)
        self.metrics.bind_state(
            self.table.count, lambda: self.table.host.used_bytes, lambda: len(self.table.pools), self.prefix
        )
        self.ucx_server = UcxTransferServer(self.table, self.prefix, config.transfer_timeout_seconds, self._count_sent)
        self.puller = UcxPuller(config.connect_timeout_seconds, config.transfer_timeout_seconds)
        self.transfer_address = ""
        self.totals = {
            "bytes_local": 0,
            "bytes_ucx_sent": 0,
            "bytes_ucx_received": 0,
            "pulls": 0,
            "failures": 0,
            "ttl_moves": 0,
        }
        self._pulls_in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._sweeper: asyncio.Task | None = None

    # ---- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        self.ucx_server.start()
        self.transfer_address = this_worker_address()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="kvstore-sweeper")
        log.info("node %s: UCX transfers at worker address %s", self.config.node_id, self.transfer_address)

    def add_to_server(self, server: grpc.aio.Server) -> str:
        kvstore_pb2_grpc.add_KvStoreServicer_to_server(self, server)
        return kvstore_pb2.DESCRIPTOR.services_by_name["KvStore"].full_name

    async def drain(self) -> None:
        """On SIGTERM: let pulls in flight finish, then end every watch stream."""
        await self._idle.wait()
        for record in self.table.pools.values():
            record.events.put_nowait(None)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.ucx_server.close()
        await self.puller.close()

    # ---- RPCs -------------------------------------------------------------------------------
    async def RegisterPool(self, request, context):
        if not request.worker_id:
            raise invalid("worker_id", "empty")
        layout = layout_from_proto(request.layout)
        tp, pp = request.layout.tensor_parallel or 1, request.layout.pipeline_parallel or 1
        try:
            shards = instance_shards(layout, tp, pp)
        except ValueError as e:
            raise invalid("layout.tensor_parallel", str(e)) from None
        if len(request.memory_descriptors) != len(shards):
            raise invalid(
                "memory_descriptors", f"{len(request.memory_descriptors)} given for an instance of {len(shards)} ranks"
            )
        kv_pools = [
            map_pool(rank_layout(layout, shard), descriptor, f"memory_descriptors[{rank}]")
            for rank, (shard, descriptor) in enumerate(zip(shards, request.memory_descriptors, strict=True))
        ]
        record = self.table.add_pool(request.worker_id, layout, shards, kv_pools)
        log.info(
            "registered pool %s (%d blocks of %d bytes on %d ranks: tp %d, pp %d)",
            record.pool_id,
            layout.num_blocks,
            sum(record.rank_block_bytes),
            len(shards),
            tp,
            pp,
        )
        return kvstore_pb2.RegisterPoolResponse(
            pool_id=record.pool_id,
            node_id=self.config.node_id,
            advertise_address=self.config.advertise_address,
            transfer_address=self.transfer_address,
        )

    async def WatchPool(self, request, context):
        record = self.table.pools.get(request.pool_id)
        if record is None:
            raise ServiceError(grpc.StatusCode.NOT_FOUND, f"pool_id: unknown pool {request.pool_id!r}")
        if record.watched:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, f"pool_id: {request.pool_id!r} is already watched")
        record.watched = True
        try:
            yield kvstore_pb2.PoolEvent(kind=kvstore_pb2.PoolEvent.READY)
            while (event := await record.events.get()) is not None:
                yield kvstore_pb2.PoolEvent(
                    kind=kvstore_pb2.PoolEvent.RELEASED,
                    kv_id=event.kv_id,
                    reason=event.reason,
                    block_ids=event.block_ids,
                )
        finally:  # the worker is gone (stream cancelled) or the daemon is stopping
            dropped = self.table.drop_pool(record.pool_id)
            log.info("pool %s unwatched: dropped with %d entries", record.pool_id, dropped)

    async def Publish(self, request, context):
        entry = self.table.publish(request.pool_id, request.kv_id, request.block_ids, request.num_tokens)
        tp, pp = degrees(entry.shards)
        return kvstore_pb2.PublishResponse(
            handle=common_pb2.KvHandle(
                kv_id=entry.kv_id,
                node_id=self.config.node_id,
                kvstore_address=self.config.advertise_address,
                transfer_address=self.transfer_address,
                num_tokens=entry.num_tokens,
                num_blocks=entry.num_blocks,
                layout_fingerprint=entry.fingerprint,
                access_token=entry.access_token,
                tensor_parallel=tp,
                pipeline_parallel=pp,
            )
        )

    async def Pull(self, request, context):
        started = time.perf_counter()
        try:
            nbytes, path = await self._counted_pull(request)
        except ServiceError as e:
            log.info("pull of %r failed: %s %s", request.handle.kv_id, e.code.name, e.message)
            self.totals["failures"] += 1
            self.metrics.failures.labels(e.code.name.lower()).inc()
            raise
        seconds = time.perf_counter() - started
        self.totals["pulls"] += 1
        self.totals["bytes_ucx_received" if path == "ucx" else "bytes_local"] += nbytes
        self.metrics.pulls.labels(path).inc()
        self.metrics.transferred_bytes.labels(path).inc(nbytes)
        self.metrics.transfer_duration.labels(path).observe(seconds)
        return kvstore_pb2.PullResponse(bytes=nbytes, path=path, seconds=seconds)

    async def Release(self, request, context):
        released = self.table.release(request.kv_id, request.access_token, request.pool_id)
        return kvstore_pb2.ReleaseResponse(released=released)

    async def Stats(self, request, context):
        return kvstore_pb2.KvStoreStats(
            node_id=self.config.node_id,
            pools=len(self.table.pools),
            entries_device=self.table.count("device"),
            entries_host=self.table.count("host"),
            host_tier_bytes=self.table.host.used_bytes,
            prefix_blocks=self.prefix.num_blocks,
            prefix_pinned_rows=self.prefix.num_pinned,
            **self.totals,
        )

    # ---- the prefix tier --------------------------------------------------------------------
    async def OfferPrefix(self, request, context):
        record, pool, hashes = self._prefix_request(request)
        ids = check_block_ids("block_ids", request.block_ids, record.layout.num_blocks)
        if len(ids) != len(hashes):
            raise invalid("block_ids", f"{len(ids)} blocks for {len(hashes)} block_hashes")
        fingerprint = record.layout.fingerprint()
        evictions = self.prefix.evictions
        rows, reserved = self.prefix.reserve(fingerprint, pool.layout.block_bytes, hashes, pin_memory=record.on_cuda)
        self.metrics.prefix_evicted.inc(self.prefix.evictions - evictions)
        try:
            await to_the_end(
                copy_rows, pool.block_bytes_view(), [ids[i] for i, _ in reserved], rows, [r for _, r in reserved]
            )
        except BaseException:
            self.prefix.cancel(fingerprint, reserved)
            raise
        self.prefix.commit(fingerprint, hashes, reserved)
        self.metrics.prefix_offered.labels("stored").inc(len(reserved))
        self.metrics.prefix_offered.labels("present").inc(len(hashes) - len(reserved))
        return kvstore_pb2.OfferPrefixResponse(stored=len(reserved), present=len(hashes) - len(reserved))

    async def FetchPrefix(self, request, context):
        record, pool, hashes = self._prefix_request(request)
        fingerprint = record.layout.fingerprint()
        if request.source_transfer_address:
            parse_address(request.source_transfer_address, "source_transfer_address")
            if not request.block_ids:
                raise invalid("block_ids", "needed with source_transfer_address")
        if not request.block_ids:
            return kvstore_pb2.FetchPrefixResponse(num_blocks=self.prefix.lookup(fingerprint, hashes))
        ids = check_block_ids("block_ids", request.block_ids, record.layout.num_blocks)
        if len(ids) > len(hashes):
            raise invalid("block_ids", f"{len(ids)} blocks for {len(hashes)} block_hashes")
        started = time.perf_counter()
        if request.source_transfer_address:  # another node's tier, over UCX
            count, nbytes = await self.puller.fetch_prefix(
                request.source_transfer_address, fingerprint, hashes[: len(ids)], pool.block_bytes_view(), ids
            )
            seconds = time.perf_counter() - started
            self.metrics.prefix_fetched.inc(count)
            self.totals["bytes_ucx_received"] += nbytes
            if count:
                self.metrics.pulls.labels("prefix-ucx").inc()
                self.metrics.transferred_bytes.labels("prefix-ucx").inc(nbytes)
                self.metrics.transfer_duration.labels("prefix-ucx").observe(seconds)
            return kvstore_pb2.FetchPrefixResponse(num_blocks=count, bytes=nbytes, seconds=seconds)
        rows_tensor, rows = self.prefix.take(fingerprint, hashes[: len(ids)])
        try:
            nbytes = await to_the_end(copy_rows, rows_tensor, rows, pool.block_bytes_view(), ids[: len(rows)])
        finally:
            self.prefix.unpin(fingerprint, rows)
        seconds = time.perf_counter() - started
        self.metrics.prefix_fetched.inc(len(rows))
        if rows:
            self.metrics.pulls.labels("prefix").inc()
            self.metrics.transferred_bytes.labels("prefix").inc(nbytes)
            self.metrics.transfer_duration.labels("prefix").observe(seconds)
        return kvstore_pb2.FetchPrefixResponse(num_blocks=len(rows), bytes=nbytes, seconds=seconds)

    def _prefix_request(self, request) -> tuple[PoolRecord, KvPool, list[bytes]]:
        record = self.table.pool(request.pool_id)
        if len(record.kv_pools) != 1:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"pool_id: the prefix tier holds blocks of one-rank pools; {request.pool_id!r} has "
                f"{len(record.kv_pools)} ranks",
            )
        if not request.block_hashes:
            raise invalid("block_hashes", "empty")
        bad = next((i for i, h in enumerate(request.block_hashes) if len(h) != HASH_BYTES), None)
        if bad is not None:
            raise invalid(
                f"block_hashes[{bad}]", f"{len(request.block_hashes[bad])} bytes, a block hash has {HASH_BYTES}"
            )
        return record, record.kv_pools[0], list(request.block_hashes)

    # ---- pulls ------------------------------------------------------------------------------
    async def _counted_pull(self, request) -> tuple[int, str]:
        """_pull, counted as in flight (SIGTERM lets these finish); any failure becomes a ServiceError."""
        self._pulls_in_flight += 1
        self._idle.clear()
        try:
            return await self._pull(request)
        except ServiceError:
            raise
        except Exception as e:  # a bug or a failing copy: still a counted, reported failure
            log.exception("pull of %r failed", request.handle.kv_id)
            raise ServiceError(grpc.StatusCode.INTERNAL, f"pull failed: {e!r}") from e
        finally:
            self._pulls_in_flight -= 1
            if self._pulls_in_flight == 0:
                self._idle.set()

    async def _pull(self, request) -> tuple[int, str]:
        handle = request.handle
        record = self.table.pool(request.pool_id)
        if not handle.kv_id:
            raise invalid("handle.kv_id", "empty")
        dst_ids = check_block_ids("block_ids", request.block_ids, record.layout.num_blocks)
        layout = record.layout
        fingerprint = layout.fingerprint()
        if handle.layout_fingerprint != fingerprint:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"layout mismatch: handle.layout_fingerprint {handle.layout_fingerprint!r}, "
                f"destination pool {fingerprint!r}",
            )
        if len(dst_ids) != handle.num_blocks:
            raise invalid("block_ids", f"{len(dst_ids)} destination blocks for an entry of {handle.num_blocks} blocks")
        destination = record.rank_rows(dst_ids)
        if handle.node_id != self.config.node_id:
            source = (handle.tensor_parallel or 1, handle.pipeline_parallel or 1)
            try:
                instance_shards(layout, *source)
            except ValueError as e:
                raise invalid("handle.tensor_parallel", str(e)) from None
            nbytes = await self.puller.fetch(
                handle.transfer_address, handle.kv_id, handle.access_token, layout, source, destination
            )
            return nbytes, "ucx"
        entry = await self.table.begin_transfer(handle.kv_id, handle.access_token, fingerprint, len(dst_ids))
        path = "host" if entry.in_host_tier else "local"
        succeeded = False
        try:
            pieces = resharding_plan(entry.shards, record.shards)
            nbytes = await copy_until_cancelled(entry.source(), destination, pieces, layout)
            succeeded = True
        finally:
            self.table.end_transfer(entry, succeeded)
        return nbytes, path

    def _count_sent(self, nbytes: int) -> None:
        self.totals["bytes_ucx_sent"] += nbytes
        self.metrics.served_bytes.inc(nbytes)

    # ---- TTL sweeper ------------------------------------------------------------------------
    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.config.sweep_interval)
            try:
                await self.sweep()
            except Exception:
                log.exception("TTL sweep failed")

    async def sweep(self) -> None:
        cfg, table = self.config, self.table
        for kv_id in table.host.expired():
            entry = table.entries.get(kv_id)
            if entry is not None and not entry.lock.locked():
                table.drop(entry, reason=None)  # its worker already freed the blocks (moved_to_host)
                self.metrics.expired.inc()
        for entry in table.device_entries_older_than(cfg.ttl_seconds):
            if (
                not await self._move_to_host(entry)
                and time.monotonic() - entry.published_at > cfg.ttl_seconds + cfg.host_ttl_seconds
            ):
                table.drop(entry, ReleaseReason.EXPIRED)  # the host tier never had room: give the blocks back
                self.metrics.expired.inc()
        await self.puller.connections.close_idle()
        now = time.monotonic()
        for record in list(table.pools.values()):
            if not record.watched and now - record.registered_at > cfg.watch_grace_seconds:
                log.warning("pool %s was never watched: dropping it", record.pool_id)
                table.drop_pool(record.pool_id)

    async def _move_to_host(self, entry: KvEntry) -> bool:
        """Copies a device entry into the host tier, evicting the oldest idle host entries if
        needed. When the tier cannot make room the entry stays in its worker's pool (returns
        False): dropping newer work to keep older work would be the wrong way round."""
        table = self.table
        victims = table.host.plan_admission(entry.nbytes, lambda kv: not table.entries[kv].lock.locked())
        if victims is None:
            return False
        for kv_id in victims:
            table.drop(table.entries[kv_id], reason=None)  # its worker freed the blocks long ago
            self.metrics.evicted.inc()
        async with entry.lock:
            if entry.dropped:
                return True
            assert entry.pool is not None  # a device-tier entry: only move_to_host, under this lock, clears it
            buffer = table.host.allocate(
                entry.kv_id, entry.num_blocks, entry.block_bytes, pin_memory=entry.pool.on_cuda
            )
            whole = resharding_plan(entry.shards, entry.shards)  # every rank's part as it is
            parts = host_parts(buffer, entry.shards, entry.rank_block_bytes)
            try:
                await asyncio.to_thread(
                    copy_pieces, entry.source(), parts, whole, entry.layout.block_size, entry.layout.head_bytes
                )
            except Exception:  # the entry stays on the device: a later sweep retries, or it expires
                log.exception("moving %s to the host tier failed", entry.kv_id)
                table.host.free(entry.kv_id)
                return False
            except BaseException:
                table.host.free(entry.kv_id)
                raise
            if entry.dropped:  # released or its pool went away during the copy
                table.host.free(entry.kv_id)
                return True
            table.move_to_host(entry, buffer)
            if entry.release_pending:
                table.drop(entry, reason=None)
        self.totals["ttl_moves"] += 1
        self.metrics.ttl_moves.inc()
        return True


async def copy_until_cancelled(src: list[RankRows], dst: list[RankRows], pieces: list[Piece], layout: KvLayout) -> int:
    """copy_pieces in a thread. If the caller is cancelled (the puller's deadline passed, or it went
    away), the copy stops at its next run and this returns (raising CancelledError) only once the
    thread has stopped: until then the destination blocks are still being written, and the source
    blocks read, so neither may be handed back before. (The decode worker also waits a grace period
    before reusing the blocks of a pull that failed this way: its own deadline fires on its side.)"""
    stop = threading.Event()
    copy = asyncio.ensure_future(
        asyncio.to_thread(copy_pieces, src, dst, pieces, layout.block_size, layout.head_bytes, stop)
    )
    try:
        return await asyncio.shield(copy)
    except asyncio.CancelledError:
        stop.set()
        while not copy.done():  # a second cancellation (server stop) must not end the wait early
            try:
                await asyncio.wait([copy])
            except asyncio.CancelledError:
                pass
        error = None if copy.cancelled() else copy.exception()
        if error is not None and not isinstance(error, CopyStopped):
            log.error("copy of a cancelled pull failed: %r", error)
        raise


def copy_rows(src: torch.Tensor, src_rows: list[int], dst: torch.Tensor, dst_rows: list[int]) -> int:
    """dst[dst_rows] = src[src_rows], raw block rows between a pool and the prefix tier (either way,
    a GPU pool included); returns the bytes copied."""
    if not src_rows:
        return 0
    data = src[torch.tensor(src_rows, device=src.device)]
    dst[torch.tensor(dst_rows, device=dst.device)] = data.to(dst.device)
    if src.is_cuda or dst.is_cuda:
        torch.cuda.synchronize()
    return data.numel()


def layout_from_proto(layout: kvstore_pb2.PoolLayout) -> KvLayout:
    for name in ("num_blocks", "num_layers", "block_size", "num_kv_heads", "head_dim"):
        if getattr(layout, name) == 0:
            raise invalid(f"layout.{name}", "must be > 0")
    if layout.dtype not in DTYPES:
        raise invalid("layout.dtype", f"{layout.dtype!r} is not one of {', '.join(DTYPES)}")
    return KvLayout(
        layout.num_blocks,
        layout.num_layers,
        layout.block_size,
        layout.num_kv_heads,
        layout.head_dim,
        layout.dtype,
        layout.model_id,
    )


def check_pool_owner(path: str, size: int, proof: object, name: str) -> None:
    """The registrant must know the secret its pool file holds after the pool (kv_cache.py
    allocate): only a process that can read the worker's 0600 file does, so nobody can have the
    daemon (which may read any file) map, and serve over UCX, a pool they could not read themselves."""
    try:
        expected = bytes.fromhex(proof) if isinstance(proof, str) else b""
    except ValueError:
        expected = b""
    with open(path, "rb") as f:
        stored = os.pread(f.fileno(), OWNER_PROOF_BYTES, size)
    if len(expected) != OWNER_PROOF_BYTES or not hmac.compare_digest(stored, expected):
        raise ServiceError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{name}.proof: does not match the pool file: only the worker that created a pool may register it",
        )


def map_pool(layout: KvLayout, memory_descriptor: str, name: str = "memory_descriptors[0]") -> KvPool:
    """Maps one rank's pool after checking its descriptor (`name`, the request's field) field by
    field: errors name the field."""
    try:
        descriptor = json.loads(memory_descriptor)
    except ValueError as e:
        raise invalid(name, f"not valid JSON ({e})") from None
    if not isinstance(descriptor, dict):
        raise invalid(name, "must be a JSON object")
    kind = descriptor.get("kind")
    if kind == "shm":
        path, size = descriptor.get("path"), descriptor.get("size")
        if not isinstance(path, str) or not os.path.realpath(path).startswith(SHM_DIR + "/"):
            raise invalid(f"{name}.path", f"must be a file under {SHM_DIR}, got {path!r}")
        if not os.path.isfile(path):
            raise invalid(f"{name}.path", f"{path} does not exist")
        if not isinstance(size, int) or size != layout.total_bytes:
            raise invalid(f"{name}.size", f"{size!r} does not match the layout ({layout.total_bytes} bytes)")
        if os.path.getsize(path) < size:
            raise invalid(f"{name}.size", f"{path} is smaller than {size} bytes")
        check_pool_owner(path, size, descriptor.get("proof"), name)
    elif kind == "cuda_ipc":
        if not torch.cuda.is_available():
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{name}.kind: cuda_ipc pool, but this daemon sees no GPU",
            )
    else:
        raise invalid(f"{name}.kind", f"{kind!r} is not one of shm, cuda_ipc")
    try:
        return KvPool.attach(layout, descriptor)
    except (ValueError, KeyError, TypeError, OSError, RuntimeError) as e:
        raise invalid(name, f"cannot map the pool: {e}") from None
