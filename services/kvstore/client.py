"""What a prefill/decode worker uses to talk to its node's kvstore daemon.

    client = KvStoreClient("127.0.0.1:7100")
    pool_id = await client.register_pool("prefill-0", engine.instance_kv(), on_released)
    handle = await client.publish(kv_id, block_ids, num_tokens)      # prefill: blocks stay owned
    ...                                                               # until on_released(kv_id, ...)
    response = await client.pull(dst_block_ids, handle)              # decode: KV lands in its blocks
    await client.release(handle)                                     # nobody will pull it
    await client.offer_prefix(block_ids, hashes)                     # the node's prefix tier
    response = await client.fetch_prefix(hashes, dst_block_ids)      #   copies in, and back out
    await client.close()                                             # ends the watch: pool dropped

`on_released(kv_id, block_ids, reason)` (a function or a coroutine function) is where the worker
frees blocks. reason (a ReleaseReason) is the daemon's (pulled, moved_to_host, released, expired), or
daemon_lost when the watch stream ends while the client is open (the daemon stopped or
restarted): the daemon forgot every entry, so the client hands back all blocks it still holds for
published entries. It then registers the pool again, retrying with backoff until the daemon is
back (a restarted DaemonSet pod, or the launcher restarting a crashed daemon). The first
registration waits the same way for a daemon that is not up yet. While not registered,
`not_serving_reason` says so: the worker reports it in Stats and health (NOT_SERVING) and the
router sends it nothing, since its publishes and pulls would fail.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import grpc

from pdserve.v1 import common_pb2, kvstore_pb2, kvstore_pb2_grpc
from services.common.enums import ReleaseReason
from services.common.grpc_client import PeerChannel

if TYPE_CHECKING:  # the router uses this client (Release) and imports no torch
    from services.engine.kv_cache import InstanceKv

log = logging.getLogger(__name__)

OnReleased = Callable[[str, list[int], ReleaseReason], object]
DAEMON_DOWN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
# Between registration attempts: short, so that a worker serves again within about a second of its
# daemon's return (the channel's own reconnect backoff is capped alike: grpc_client.py).
RETRY_SECONDS = (0.1, 0.5)  # first, longest


class KvStoreClient:
    def __init__(self, address: str):
        self.address = address  # this node's daemon
        self.pool_id = ""
        self.node_id = ""
        self.transfer_address = ""  # the daemon's UCX worker address, as other nodes reach it
        self._stubs: dict[str, tuple[PeerChannel, kvstore_pb2_grpc.KvStoreStub]] = {}
        self._watch: asyncio.Task | None = None
        self._published: dict[str, list[int]] = {}  # kv_id -> blocks not yet released to us
        self._closing = False
        self.registered = False  # the daemon knows our pool (READY received, watch still open)
        self.registrations = 0  # how many times the pool was registered (1 + re-registrations)
        self.registrations_lost = 0  # how many times the watch ended while the client was open

    @property
    def not_serving_reason(self) -> str:
        """Why a worker using this client cannot take work now ("": it can)."""
        if self.registered:
            return ""
        if self.registrations_lost:
            return f"lost its registration with the kvstore daemon at {self.address}; registering again"
        return f"waiting to register with the kvstore daemon at {self.address}"

    def stub(self, address: str = "") -> kvstore_pb2_grpc.KvStoreStub:
        """The stub of the daemon at `address` (default: this node's), one channel per address."""
        address = address or self.address
        if address not in self._stubs:
            peer = PeerChannel(address)
            self._stubs[address] = (peer, kvstore_pb2_grpc.KvStoreStub(peer.channel))
        peer, stub = self._stubs[address]
        if peer.renewed():  # this process's certificate was: a new channel
            stub = kvstore_pb2_grpc.KvStoreStub(peer.channel)
            self._stubs[address] = (peer, stub)
        return stub

    async def register_pool(
        self, worker_id: str, instance_kv: InstanceKv, on_released: OnReleased, timeout: float = 30.0
    ) -> str:
        """Registers the instance's pools (one per rank) and opens their watch stream; returns once
        the daemon sent READY. A daemon that cannot be reached (not started yet) is retried until it
        can; other refusals
        (a layout it rejects) raise. From then on the pool is kept registered (re-registered after
        a daemon restart) until `close`."""
        if self._watch is not None:
            raise RuntimeError("this client already registered a pool")
        layout = instance_kv.layout
        request = kvstore_pb2.RegisterPoolRequest(
            worker_id=worker_id,
            layout=kvstore_pb2.PoolLayout(
                num_blocks=layout.num_blocks,
                num_layers=layout.num_layers,
                block_size=layout.block_size,
                num_kv_heads=layout.num_kv_heads,
                head_dim=layout.head_dim,
                dtype=layout.dtype,
                model_id=layout.model_id,
                tensor_parallel=instance_kv.tensor_parallel,
                pipeline_parallel=instance_kv.pipeline_parallel,
            ),
            memory_descriptors=[json.dumps(d) for d in instance_kv.descriptors],
        )
        await self._register_until_up(request, timeout, retry=DAEMON_DOWN)
        ready = asyncio.get_running_loop().create_future()
        self._watch = asyncio.create_task(
            self._keep_registered(request, on_released, ready, timeout), name=f"watch-{worker_id}"
        )
        await asyncio.wait_for(asyncio.shield(ready), timeout)
        return self.pool_id

    async def _register_until_up(
        self, request: kvstore_pb2.RegisterPoolRequest, timeout: float, retry: set[grpc.StatusCode] | None
    ) -> None:
        """Registers, retrying with backoff on the codes in `retry` (None: on every error)."""
        delay = RETRY_SECONDS[0]
        while True:
            try:
                await self._register(request, timeout)
                return
            except grpc.aio.AioRpcError as e:
                if retry is not None and e.code() not in retry:
                    raise
                log.info(
                    "kvstore daemon at %s: cannot register (%s); retrying in %.1f s", self.address, e.code().name, delay
                )
            await asyncio.sleep(delay)
            delay = min(2 * delay, RETRY_SECONDS[1])

    async def _register(self, request: kvstore_pb2.RegisterPoolRequest, timeout: float) -> None:
        response = await self.stub().RegisterPool(request, timeout=timeout)
        self.pool_id, self.node_id = response.pool_id, response.node_id
        self.transfer_address = response.transfer_address

    async def publish(
        self, kv_id: str, block_ids: list[int], num_tokens: int, timeout: float | None = 10.0
    ) -> common_pb2.KvHandle:
        # Recorded before the call so that a RELEASED racing the response finds the entry.
        self._published[kv_id] = list(block_ids)
        try:
            response = await self.stub().Publish(
                kvstore_pb2.PublishRequest(
                    pool_id=self.pool_id, kv_id=kv_id, block_ids=block_ids, num_tokens=num_tokens
                ),
                timeout=timeout,
            )
        except BaseException:
            self._published.pop(kv_id, None)
            raise
        return response.handle

    async def pull(
        self, dst_block_ids: list[int], handle: common_pb2.KvHandle, timeout: float | None = 60.0
    ) -> kvstore_pb2.PullResponse:
        """Asks this node's daemon to copy the entry into our blocks; raises grpc.aio.AioRpcError
        (NOT_FOUND: the entry is gone; UNAVAILABLE: its node cannot be reached)."""
        return await self.stub().Pull(
            kvstore_pb2.PullRequest(pool_id=self.pool_id, block_ids=dst_block_ids, handle=handle), timeout=timeout
        )

    async def release(self, handle: common_pb2.KvHandle, timeout: float | None = 10.0) -> bool:
        """Drops an entry nobody will pull, at the daemon holding it (the handle's access token
        says we may). False if it was gone."""
        response = await self.stub(handle.kvstore_address).Release(
            kvstore_pb2.ReleaseRequest(kv_id=handle.kv_id, access_token=handle.access_token), timeout=timeout
        )
        return response.released

    async def release_own(self, kv_id: str, timeout: float | None = 10.0) -> bool:
        """Drops an entry this client's pool published (no handle needed: a publish whose answer
        was lost). False if it was gone."""
        response = await self.stub().Release(
            kvstore_pb2.ReleaseRequest(kv_id=kv_id, pool_id=self.pool_id), timeout=timeout
        )
        return response.released

    async def offer_prefix(
        self, block_ids: list[int], block_hashes: list[bytes], timeout: float | None = 10.0
    ) -> kvstore_pb2.OfferPrefixResponse:
        """Has the node's prefix tier copy those of our blocks it lacks (keep them unchanged until
        this returns)."""
        return await self.stub().OfferPrefix(
            kvstore_pb2.OfferPrefixRequest(pool_id=self.pool_id, block_ids=block_ids, block_hashes=block_hashes),
            timeout=timeout,
        )

    async def fetch_prefix(
        self,
        block_hashes: list[bytes],
        block_ids: list[int] | None = None,
        source_transfer_address: str = "",
        timeout: float | None = 10.0,
    ) -> kvstore_pb2.FetchPrefixResponse:
        """How many leading blocks of the prefix the node's prefix tier holds; with `block_ids`,
        also copies them into those blocks of our pool (from another node's tier, over UCX, with
        `source_transfer_address`)."""
        return await self.stub().FetchPrefix(
            kvstore_pb2.FetchPrefixRequest(
                pool_id=self.pool_id,
                block_hashes=block_hashes,
                block_ids=block_ids or [],
                source_transfer_address=source_transfer_address,
            ),
            timeout=timeout,
        )

    async def stats(self, address: str = "") -> kvstore_pb2.KvStoreStats:
        return await self.stub(address).Stats(kvstore_pb2.KvStoreStatsRequest(), timeout=10.0)

    async def close(self) -> None:
        """Ends the watch stream (the daemon then drops the pool and its entries) and the channels."""
        self._closing = True
        if self._watch is not None:
            self._watch.cancel()
            try:
                await self._watch
            except (asyncio.CancelledError, Exception):
                pass
        for peer, _ in self._stubs.values():
            await peer.close()
        self._stubs.clear()

    async def _keep_registered(self, request, on_released: OnReleased, ready: asyncio.Future, timeout: float) -> None:
        """Watches the pool; when the watch ends while the client is open, hands back the blocks
        of every published entry and registers the pool again. The first registration's failure
        goes to register_pool's caller instead."""
        first = True
        while True:
            await self._watch_pool(on_released, ready)
            failed_before_ready = ready.exception() is not None  # (also marks it retrieved)
            if self._closing or (first and failed_before_ready):
                return
            first = False
            self.registrations_lost += 1
            await self._hand_back_everything(on_released)
            await asyncio.sleep(RETRY_SECONDS[0])  # (a watch that fails at once must not spin)
            await self._register_until_up(request, timeout, retry=None)
            ready = asyncio.get_running_loop().create_future()

    async def _watch_pool(self, on_released: OnReleased, ready: asyncio.Future) -> None:
        try:
            async for event in self.stub().WatchPool(kvstore_pb2.WatchPoolRequest(pool_id=self.pool_id)):
                if event.kind == kvstore_pb2.PoolEvent.READY:
                    self.registered = True
                    self.registrations += 1
                    if self.registrations > 1:
                        log.warning(
                            "pool registered again with the kvstore daemon at %s as %s", self.address, self.pool_id
                        )
                    if not ready.done():
                        ready.set_result(None)
                elif event.kind == kvstore_pb2.PoolEvent.RELEASED:
                    self._published.pop(event.kv_id, None)
                    await _call(on_released, event.kv_id, list(event.block_ids), _reason(event.reason))
        except grpc.aio.AioRpcError as e:
            if not ready.done():
                ready.set_exception(e)
            if not self._closing:
                log.warning("watch of pool %s failed: %s", self.pool_id, e.details())
        finally:
            self.registered = False
        if not ready.done():
            ready.set_exception(RuntimeError("the kvstore daemon closed the watch stream before READY"))

    async def _hand_back_everything(self, on_released: OnReleased) -> None:
        log.warning(
            "kvstore daemon at %s went away: freeing the blocks of %d published entries",
            self.address,
            len(self._published),
        )
        published, self._published = self._published, {}
        for kv_id, block_ids in published.items():
            await _call(on_released, kv_id, block_ids, ReleaseReason.DAEMON_LOST)


def _reason(name: str) -> ReleaseReason:
    """A daemon of another version may name a reason this one does not know: the blocks come back all
    the same."""
    try:
        return ReleaseReason(name)
    except ValueError:
        log.warning("unknown release reason %r from the kvstore daemon", name)
        return ReleaseReason.RELEASED


async def _call(callback: OnReleased, *args) -> None:
    try:
        result = callback(*args)
        if inspect.isawaitable(result):
            await result
    except Exception:  # a worker's bug must not end the watch (the daemon would drop the pool)
        log.exception("on_released%r failed", args)
