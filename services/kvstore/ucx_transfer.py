"""Daemon-to-daemon KV transfer over UCX (ucxx), received straight into the destination pool.

The pulling daemon connects to the source daemon (KvHandle.transfer_address, its UCX worker
address), or reuses an idle connection to it (ucx_endpoints.py). A control frame is one tagged
message on the connection's tag 0 holding UTF-8 JSON (the receiver learns its length by probing the
tag). Data messages use tags 1, 2, ... One transfer on a connection:

    puller -> source   {"op": "fetch", "kv_id", "access_token", "fingerprint", "dst_blocks": [...],
                        "tensor_parallel", "pipeline_parallel",             (the destination's layout)
                        "src_tensor_parallel", "src_pipeline_parallel"}     (the source's, per the handle)
    source -> puller   {"ok": false, "code": "NOT_FOUND", "message": ...}        (end)
                    or {"ok": true, "runs": [[offset, count], ...],
                        "pieces": [[src_rank, dst_rank, first_layer, end_layer, first_head, end_head], ...],
                        "bytes": N}
    source -> puller   piece p of run i as one message on tag 1 + p * len(runs) + i: entry blocks
                       offset..offset+count-1, which are consecutive in the source pools and in the
                       destination pools. A piece that is a whole rank's shard on both sides (same
                       layouts) is sent from, and received into, the pools' memory directly; any
                       other piece is packed by the source and unpacked by the puller (shards.py
                       says which layers and heads go from which source rank to which destination
                       rank; both sides compute it and the puller checks that they agree)
    puller -> source   {"op": "commit"}      (every run has landed)
    source -> puller   {"ok": true}          (the source dropped the entry and told its worker)

A prefix-tier fetch (prefix_store.py) runs the same way:

    puller -> source   {"op": "prefix", "fingerprint", "hashes": [hex, ...], "block_bytes"}
    source -> puller   {"ok": true, "count": n}     (the leading n hashes it holds; their rows pinned)
    source -> puller   the n rows, packed, as one message on tag 1 (none when n is 0)
    puller -> source   {"op": "done"}
    source -> puller   {"ok": true}                 (rows unpinned)

Each side's last message is received before the other sends again, so a transfer ends with nothing
in flight and the connection can carry the next one. On any failure both sides close it.

The source holds the entry's lock from "fetch" to "commit", so the entry cannot be pulled twice,
moved to the host tier or freed while its bytes are on the wire. If anything fails before the
commit, the source keeps the entry (still pullable) and the puller reports an error; the
destination blocks then hold garbage, which is fine: they are the puller's and unused.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import grpc
import torch

from services.common.errors import ServiceError
from services.engine.kv_cache import KvLayout

from .block_runs import RankRows, contiguous_runs, piece_bytes, piece_view, to_the_end
from .entries import EntryTable
from .prefix_store import PrefixStore
from .shards import Piece, degrees, instance_shards, resharding_plan
from .ucx_endpoints import (
    Acceptor,
    Connection,
    ConnectionPool,
    RequestWaiter,
    recv_frame,
    send_frame,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_RUN_TAG = 1
FIRST_REQUEST_SECONDS = 10.0
# A source answers a request in milliseconds; on a pooled connection, no answer in this long means
# the connection is dead (see ask): a false alarm only costs opening a new one.
POOLED_ANSWER_SECONDS = 1.0


def _ucx_buffer(rows: torch.Tensor):
    """What ucxx can send from / receive into without a copy: numpy shares a CPU tensor's memory,
    a CUDA tensor is passed as is (__cuda_array_interface__)."""
    return rows if rows.is_cuda else rows.numpy()


def piece_list(piece: Piece) -> list[int]:
    return [piece.src_rank, piece.dst_rank, piece.layers.start, piece.layers.stop, piece.heads.start, piece.heads.stop]


def run_slices(side: RankRows, piece: Piece, runs: list[tuple[int, int]], layout: KvLayout) -> list[torch.Tensor]:
    """The piece's bytes in each run's blocks of one side's rows (views into the pool)."""
    view = piece_view(side, piece, layout.block_size, layout.head_bytes)
    return [view[side.ids[offset] : side.ids[offset] + count] for offset, count in runs]


LAYOUT_KEYS = ("tensor_parallel", "pipeline_parallel", "src_tensor_parallel", "src_pipeline_parallel")


def pieces_bytes(pieces: list[Piece], num_blocks: int, layout: KvLayout) -> int:
    return num_blocks * sum(piece_bytes(p, layout.block_size, layout.head_bytes) for p in pieces)


def _packed(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each part as contiguous memory UCX can send (a copy where it is a strided piece of a shard),
    with the device's stream drained: UCX reads the memory without waiting for torch's stream."""
    packed = [part if part.is_contiguous() else part.contiguous() for part in parts]
    for device in {t.device for t in packed if t.is_cuda}:
        torch.cuda.synchronize(device)
    return packed


def _unpack(targets: list[torch.Tensor], landing: list[torch.Tensor]) -> None:
    for target, buffer in zip(targets, landing, strict=True):
        if buffer is not target:
            target.copy_(buffer)
    for device in {t.device for t in targets if t.is_cuda}:
        torch.cuda.synchronize(device)


def check_runs(runs, dst_ids: Sequence[int]) -> list[tuple[int, int]]:
    """The source's runs must tile the entry in order, each onto consecutive destination blocks."""
    checked, expected_offset = [], 0
    for run in runs:
        offset, count = int(run[0]), int(run[1])
        if offset != expected_offset or count <= 0 or offset + count > len(dst_ids):
            raise ValueError(f"bad run {run!r} from source")
        if any(dst_ids[offset + k] != dst_ids[offset] + k for k in range(count)):
            raise ValueError(f"run {run!r} is not contiguous in the destination")
        checked.append((offset, count))
        expected_offset += count
    if expected_offset != len(dst_ids):
        raise ValueError(f"source runs cover {expected_offset} of {len(dst_ids)} blocks")
    return checked


async def ask(connection: Connection, request: dict, within: float | None) -> dict:
    """Sends a request and returns the source's answer, which comes at once from a source that
    still serves the connection (it answers before it packs or sends anything). On a pooled
    connection, no answer arriving within `within` seconds means the connection no longer works
    although the puller has not seen it end (UCX closed the source's endpoint of it:
    docs/kvstore.md): ConnectionError, and the pull is retried on a new connection. (Only the
    answer's arrival is timed: a send or receive under way is not cut short.)"""
    await send_frame(connection, request)
    return await recv_frame(connection, within)


class UcxTransferServer:
    """The source side: serves this daemon's entries to pulling daemons on other nodes."""

    def __init__(self, table: EntryTable, prefix: PrefixStore, transfer_timeout: float, on_sent: Callable[[int], None]):
        self.table = table
        self.prefix = prefix
        self.transfer_timeout = transfer_timeout
        self.on_sent = on_sent
        self._acceptor = Acceptor(self._serve_connection)
        self._waiter = RequestWaiter()

    def start(self) -> None:
        self._acceptor.start()

    async def close(self) -> None:
        """Ends every connection (a transfer in progress fails; its entry stays as it was)."""
        self._waiter.close()
        await self._acceptor.close()

    async def _serve_connection(self, connection: Connection) -> None:
        """One peer connection: serves its transfers one after another until the peer closes it
        or leaves it idle."""
        first_wait: float | None = FIRST_REQUEST_SECONDS  # a puller asks at once: a stranger holds no slot long
        try:
            while await self._waiter.next_request(connection, first_wait):
                first_wait = None
                await asyncio.wait_for(connection.while_peer_stays(self._serve_one(connection)), self.transfer_timeout)
        except TimeoutError:
            log.warning("UCX transfer to a peer timed out after %.1fs", self.transfer_timeout)

    async def _serve_one(self, ep: Connection) -> None:
        request = await recv_frame(ep)
        if request.get("op") == "prefix":
            await self._serve_prefix(ep, request)
            return
        if request.get("op") != "fetch":
            raise ValueError(f"expected a fetch request, got {request.get('op')!r}")
        dst_ids = [int(b) for b in request["dst_blocks"]]
        try:
            entry = await self.table.begin_transfer(
                str(request["kv_id"]), str(request.get("access_token", "")), str(request["fingerprint"]), len(dst_ids)
            )
        except ServiceError as e:
            await send_frame(ep, {"ok": False, "code": e.code.name, "message": e.message})
            return
        committed = False
        messages: list[torch.Tensor] = []
        try:
            layouts = [int(request.get(key, 1)) for key in LAYOUT_KEYS]
            if tuple(layouts[2:]) != degrees(entry.shards):
                tp, pp = degrees(entry.shards)
                message = f"handle.tensor_parallel: the entry was published by a tp {tp} x pp {pp} instance"
                await send_frame(ep, {"ok": False, "code": "FAILED_PRECONDITION", "message": message})
                return
            try:
                dst_shards = instance_shards(entry.layout, layouts[0], layouts[1])
            except ValueError as e:
                await send_frame(ep, {"ok": False, "code": "INVALID_ARGUMENT", "message": f"tensor_parallel: {e}"})
                return
            pieces = resharding_plan(entry.shards, dst_shards)
            source = entry.source()
            runs = contiguous_runs(source[0].ids, dst_ids, entry.block_bytes)
            nbytes = pieces_bytes(pieces, len(dst_ids), entry.layout)
            slices = [
                part for piece in pieces for part in run_slices(source[piece.src_rank], piece, runs, entry.layout)
            ]
            # the answer first, at once: a puller on a pooled connection counts on it (ask)
            await send_frame(ep, {"ok": True, "runs": runs, "pieces": [piece_list(p) for p in pieces], "bytes": nbytes})
            messages = await to_the_end(_packed, slices)  # a copy of the pieces that are not whole shards
            await asyncio.gather(
                *(ep.send(_ucx_buffer(m.view(-1)), tag=FIRST_RUN_TAG + i) for i, m in enumerate(messages))
            )
            committed = (await recv_frame(ep)).get("op") == "commit"
        except BaseException:
            await ep.close()  # sends may still be posted on the packed buffers: stopped before they go
            raise
        finally:
            self.table.end_transfer(entry, succeeded=committed)
        if not committed:
            raise ValueError("expected a commit")
        self.on_sent(nbytes)
        await send_frame(ep, {"ok": True})

    async def _serve_prefix(self, ep: Connection, request: dict) -> None:
        fingerprint = str(request["fingerprint"])
        hashes = [bytes.fromhex(h) for h in request["hashes"]]
        rows_tensor, rows = self.prefix.take(fingerprint, hashes)
        try:
            if rows and rows_tensor.shape[1] != int(request["block_bytes"]):
                raise ValueError("block size differs for one fingerprint")
            await send_frame(ep, {"ok": True, "count": len(rows)})
            nbytes = 0
            if rows:
                packed = await to_the_end(lambda: rows_tensor[torch.tensor(rows)].contiguous())
                nbytes = packed.numel()
                await ep.send(_ucx_buffer(packed.view(-1)), tag=FIRST_RUN_TAG)
            done = (await recv_frame(ep)).get("op") == "done"
        except BaseException:
            await ep.close()
            raise
        finally:
            self.prefix.unpin(fingerprint, rows)
        if not done:
            raise ValueError("expected done")
        self.on_sent(nbytes)
        await send_frame(ep, {"ok": True})


class UcxPuller:
    """The pulling side: fetches one entry from a remote daemon into blocks of a local pool."""

    def __init__(self, connect_timeout: float, transfer_timeout: float):
        self.connections = ConnectionPool(connect_timeout)
        self.transfer_timeout = transfer_timeout

    async def fetch(
        self,
        address: str,
        kv_id: str,
        access_token: str,
        layout: KvLayout,
        source: tuple[int, int],
        destination: list[RankRows],
    ) -> int:
        """Pulls entry `kv_id` from the daemon at `address` into the destination ranks' rows, from
        the `source` layout (tp, pp: its handle's) into the destination's. Returns the bytes
        received. Raises ServiceError: the source's own status (NOT_FOUND...), UNAVAILABLE when it
        cannot be reached or the connection fails, DEADLINE_EXCEEDED on timeout."""
        return await self._exchange(
            address,
            f"transfer of {kv_id!r}",
            lambda ep, within: self._fetch(ep, within, kv_id, access_token, layout, source, destination),
        )

    async def _exchange(
        self, address: str, what: str, run: Callable[[Connection, float | None], Awaitable[tuple[T, bool]]]
    ) -> T:
        """`run(connection, within)` on a connection to the daemon at `address` (pooled, or new),
        which returns its result and whether the connection is clean for reuse (`within`: the
        limit of the source's first answer, on a pooled connection). Raises ServiceError:
        `run`'s own (the source said no: the connection goes back), INVALID_ARGUMENT for a malformed
        address, UNAVAILABLE when the daemon cannot be reached or the connection fails,
        DEADLINE_EXCEEDED past the transfer timeout."""
        pool = self.connections
        may_retry = True
        while True:
            try:
                connection, reused = await pool.acquire(address, new=not may_retry)
            except ServiceError:
                raise
            except Exception as e:
                raise ServiceError(
                    grpc.StatusCode.UNAVAILABLE, f"cannot reach the kvstore daemon at {address[:40]}...: {e!r}"
                ) from None
            try:
                within = POOLED_ANSWER_SECONDS if reused else None
                result, clean = await asyncio.wait_for(
                    connection.while_peer_stays(run(connection, within)), self.transfer_timeout
                )
            except ServiceError:  # the source said no: the conversation ended cleanly
                await pool.give_back(address, connection)
                raise
            except TimeoutError:
                await pool.discard(connection)
                raise ServiceError(
                    grpc.StatusCode.DEADLINE_EXCEEDED, f"{what} took over {self.transfer_timeout}s"
                ) from None
            except Exception as e:
                await pool.discard(connection)
                # Nothing was committed, so trying again is safe; a pooled connection may have died
                # idle (its peer restarted) without us noticing yet.
                if reused and may_retry:
                    log.warning("pooled connection for %s failed (%r): retrying on a new one", what, e)
                    may_retry = False
                    continue
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"{what} failed: {e!r}") from None
            except BaseException:  # cancelled: receives may still be posted on our blocks
                await pool.discard(connection)
                raise
            if clean:
                await pool.give_back(address, connection)
            else:
                await pool.discard(connection)
            return result

    async def _fetch(
        self,
        ep: Connection,
        within: float | None,
        kv_id: str,
        access_token: str,
        layout: KvLayout,
        source: tuple[int, int],
        destination: list[RankRows],
    ) -> tuple[int, bool]:
        """(bytes received, whether the endpoint is clean for reuse)."""
        dst_ids = list(destination[0].ids)
        dst_shards = [side.shard for side in destination]
        pieces = resharding_plan(instance_shards(layout, *source), dst_shards)
        request = {
            "op": "fetch",
            "kv_id": kv_id,
            "access_token": access_token,
            "fingerprint": layout.fingerprint(),
            "dst_blocks": dst_ids,
            **dict(zip(LAYOUT_KEYS, (*degrees(dst_shards), *source), strict=True)),
        }
        reply = await ask(ep, request, within)
        if not reply.get("ok"):
            code = grpc.StatusCode.__members__.get(str(reply.get("code")), grpc.StatusCode.UNKNOWN)
            raise ServiceError(code, f"source daemon: {reply.get('message', '')}")
        runs = check_runs(reply["runs"], dst_ids)
        if reply.get("pieces") != [piece_list(p) for p in pieces]:
            raise ValueError("the source daemon splits the entry differently (another version?)")
        targets = [part for piece in pieces for part in run_slices(destination[piece.dst_rank], piece, runs, layout)]
        # a piece that is not contiguous in our pool lands in a buffer first, unpacked below
        landing = [t if t.is_contiguous() else torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in targets]
        try:
            await asyncio.gather(
                *(ep.recv(_ucx_buffer(buffer.view(-1)), tag=FIRST_RUN_TAG + i) for i, buffer in enumerate(landing))
            )
        except BaseException:
            await ep.close()  # cancels the receives still posted, before the buffers go
            raise
        await to_the_end(_unpack, targets, landing)  # (a cancel waits: it writes our blocks)
        nbytes = pieces_bytes(pieces, len(dst_ids), layout)
        try:
            await send_frame(ep, {"op": "commit"})
            await recv_frame(ep)
        except Exception as e:
            # Every byte has landed, so the pull succeeded; the source may not have heard the
            # commit and then keeps the entry until its TTL runs out.
            log.warning("pull of %r: no commit acknowledgement from the source: %r", kv_id, e)
            return nbytes, False
        return nbytes, True

    async def fetch_prefix(
        self, address: str, fingerprint: str, hashes: list[bytes], pool_rows: torch.Tensor, dst_ids: list[int]
    ) -> tuple[int, int]:
        """Copies the leading blocks of `hashes` that the prefix tier of the daemon at `address`
        holds into `pool_rows[dst_ids[i]]`; returns (blocks, bytes). Raises ServiceError as fetch."""
        return await self._exchange(
            address,
            "prefix fetch",
            lambda ep, within: self._fetch_prefix(ep, within, fingerprint, hashes, pool_rows, dst_ids),
        )

    async def _fetch_prefix(
        self,
        ep: Connection,
        within: float | None,
        fingerprint: str,
        hashes: list[bytes],
        pool_rows: torch.Tensor,
        dst_ids: list[int],
    ) -> tuple[tuple[int, int], bool]:
        """((blocks, bytes) received, whether the endpoint is clean for reuse)."""
        block_bytes = pool_rows.shape[1]
        request = {"op": "prefix", "fingerprint": fingerprint, "hashes": [h.hex() for h in hashes]}
        reply = await ask(ep, {**request, "block_bytes": block_bytes}, within)
        count = int(reply.get("count", -1))
        if not reply.get("ok") or not 0 <= count <= len(hashes):
            raise ValueError(f"bad prefix reply {reply!r}")
        if count:
            landing = torch.empty((count, block_bytes), dtype=torch.uint8, device=pool_rows.device)
            try:
                await ep.recv(_ucx_buffer(landing.view(-1)), tag=FIRST_RUN_TAG)
            except BaseException:
                await ep.close()  # cancels the receive still posted, before the buffer goes
                raise

            def scatter() -> None:
                pool_rows[torch.tensor(dst_ids[:count], device=pool_rows.device)] = landing
                if pool_rows.is_cuda:
                    torch.cuda.synchronize(pool_rows.device)

            await to_the_end(scatter)
        await send_frame(ep, {"op": "done"})
        await recv_frame(ep)
        return (count, count * block_bytes), True

    async def close(self) -> None:
        await self.connections.close_idle(everything=True)
