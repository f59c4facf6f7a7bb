"""The kvstore's UCX connections (ucx_endpoints.Connection, ConnectionPool) on a fake transport:
tagged messages between two in-process "workers", so that goodbyes, cancellation and pooling can be
driven step by step. Real UCX between real daemons: tests/integration/test_kvstore.py."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from services.kvstore import ucx_endpoints
from services.kvstore.ucx_endpoints import Connection, ConnectionPool, recv_frame, send_frame
from services.kvstore.ucx_transfer import UcxPuller


@dataclass
class Probe:
    matched: bool
    length: int = 0
    handle: bytes = b""


class FakeWorker:
    def __init__(self) -> None:
        self.unexpected: dict[int, list[bytes]] = {}  # tag -> messages no receive has taken yet


class FakeEndpoint:
    """An endpoint from `own` to `peer`: what it sends lands in the peer's queue; tag matching is
    the worker's, as in UCX."""

    def __init__(self, own: FakeWorker, peer: FakeWorker):
        self.own, self.peer = own, peer
        self.aborted = False
        self.block_sends = False
        self.posted = 0  # receives waiting

    @property
    def closed(self) -> bool:
        return self.aborted

    async def send(self, buffer, tag: int, force_tag: bool) -> None:
        assert force_tag and not self.aborted
        while self.block_sends:  # (a rendezvous send whose receiver never comes)
            await asyncio.sleep(0.001)
        self.peer.unexpected.setdefault(tag, []).append(bytes(np.asarray(buffer)))

    def tag_probe(self, tag: int, force_tag: bool, remove: bool = False) -> Probe:
        queue = self.own.unexpected.get(tag)
        if not queue:
            return Probe(False)
        message = queue.pop(0) if remove else queue[0]
        return Probe(True, len(message), message)

    async def recv_with_handle(self, buffer, probe: Probe) -> None:
        if len(probe.handle) > buffer.nbytes:
            raise RuntimeError("Message truncated")
        buffer.view(np.uint8).reshape(-1)[: len(probe.handle)] = np.frombuffer(probe.handle, np.uint8)

    async def recv(self, buffer, tag: int, force_tag: bool) -> None:
        self.posted += 1
        try:
            while not (probe := self.tag_probe(tag, True, remove=True)).matched:
                if self.aborted:
                    raise ConnectionError("endpoint closed")
                await asyncio.sleep(0.001)
            await self.recv_with_handle(buffer, probe)
        finally:
            self.posted -= 1

    def abort(self) -> None:
        self.aborted = True


def connected_pair(connection_id: int = 7) -> tuple[Connection, Connection]:
    puller, source = FakeWorker(), FakeWorker()
    dialed = Connection(FakeEndpoint(puller, source), connection_id, dialed=True)
    accepted = Connection(FakeEndpoint(source, puller), connection_id, dialed=False)
    return dialed, accepted


def test_frames_go_both_ways_and_a_goodbye_ends_the_peers_transfer_at_once():
    async def scenario():
        puller, source = connected_pair()
        await send_frame(puller, {"op": "fetch"})
        assert await recv_frame(source) == {"op": "fetch"}
        await send_frame(source, {"ok": True})
        assert await recv_frame(puller) == {"ok": True}

        # The puller waits for data that never comes; the source gives up and says goodbye.
        landing = np.empty(8, np.uint8)
        started = time.monotonic()
        waiting = asyncio.ensure_future(puller.while_peer_stays(puller.recv(landing, 1)))
        await asyncio.sleep(0.01)
        assert not waiting.done() and puller.ep.posted == 1
        await source.close()
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(waiting, 5.0)  # (without the goodbye: TimeoutError)
        assert time.monotonic() - started < 1.0 and puller.ep.posted == 0  # the receive was cancelled
        assert source.ep.aborted and puller.closed and not puller.ep.aborted
        await puller.close()  # takes the source's goodbye off the queue, says none back
        assert puller.ep.aborted and not any(puller.ep.own.unexpected.values())
        assert not any(source.ep.own.unexpected.values())

    asyncio.run(scenario())


def test_work_that_ended_wins_over_a_goodbye_after_it():
    async def scenario():
        puller, source = connected_pair()

        async def finished() -> str:
            await source.close()  # the peer leaves just as the work ends
            return "done"

        assert await puller.while_peer_stays(finished()) == "done"

        async def failed() -> None:
            raise ValueError("its own error")

        with pytest.raises(ValueError, match="its own error"):
            await puller.while_peer_stays(failed())

    asyncio.run(scenario())


def test_close_aborts_the_endpoint_even_when_cancelled_and_only_once():
    async def scenario():
        puller, source = connected_pair()
        puller.ep.block_sends = True  # the goodbye cannot go
        closing = asyncio.ensure_future(puller.close())
        await asyncio.sleep(0.01)
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        assert puller.ep.aborted and puller.closed
        await puller.close()  # idempotent

        # Cancelling the watcher cancels the work, and waits for it to clean up.
        cleaned = asyncio.Event()

        async def work() -> None:
            try:
                await asyncio.sleep(10)
            finally:
                await asyncio.sleep(0.01)
                cleaned.set()

        watching = asyncio.ensure_future(source.while_peer_stays(work()))
        await asyncio.sleep(0.01)
        watching.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watching
        assert cleaned.is_set()

    asyncio.run(scenario())


def test_the_pool_hands_out_only_fresh_live_connections_each_to_one_transfer(monkeypatch):
    monkeypatch.setattr(ucx_endpoints, "parse_address", lambda text: b"")  # (a fake peer's address)

    async def scenario():
        pool = ConnectionPool(connect_timeout=1.0, idle_seconds=30.0)
        address = "ucx:peer"
        live, dead, stale = (connected_pair(i)[0] for i in (1, 2, 3))
        dead.ep.abort()
        now = time.monotonic()
        pool._idle[address] = [(live, now), (dead, now), (stale, now - 31)]  # (taken from the end)
        assert await pool.acquire(address) == (live, True)
        await asyncio.sleep(0.01)  # (stale ones are closed in the background)
        assert stale.ep.aborted and not pool._idle.get(address)
        await pool.give_back(address, live)
        assert pool._idle[address][0][0] is live
        # The sweeper's close_idle and a pull's acquire interleave: never a connection both handed
        # out and closed (acquire took a connection out only after awaiting the stale ones' close).
        older = connected_pair(4)[0]
        pool._idle[address].append((older, now - 31))
        taken = await asyncio.gather(pool.acquire(address), pool.close_idle(everything=True))
        await asyncio.sleep(0.01)  # (stale ones are closed in the background)
        assert taken[0] == (live, True) and not live.closed and older.ep.aborted and not pool._idle.get(address)

    asyncio.run(scenario())


def test_a_pooled_connection_the_source_no_longer_serves_is_retried_on_a_new_one():
    """The source answers a request at once; on a pooled connection no answer within a second
    means the source's side ended without its goodbye reaching the puller: the pull goes on a new
    connection instead of waiting out the transfer timeout."""

    async def scenario():
        puller = UcxPuller(connect_timeout=5.0, transfer_timeout=30.0)
        stale, _ = connected_pair(1)  # (its source side is gone: nothing answers)
        fresh, source = connected_pair(2)
        handed = iter([(stale, True), (fresh, False)])
        asked_new = []

        async def acquire(address: str, new: bool = False):
            asked_new.append(new)
            return next(handed)

        puller.connections.acquire = acquire  # type: ignore[method-assign]

        async def serve() -> None:  # the source of the new connection: holds none of the blocks
            assert (await recv_frame(source))["op"] == "prefix"
            await send_frame(source, {"ok": True, "count": 0})
            assert (await recv_frame(source))["op"] == "done"
            await send_frame(source, {"ok": True})

        serving = asyncio.ensure_future(serve())
        started = time.monotonic()
        rows = torch.zeros((4, 8), dtype=torch.uint8)
        assert await puller.fetch_prefix("ucx:peer", "fp", [b"\x01" * 16], rows, [0]) == (0, 0)
        assert time.monotonic() - started < 5.0 and stale.closed  # (without the limit: the 30 s timeout)
        await serving
        assert puller.connections._idle["ucx:peer"][0][0] is fresh  # (back in the pool)
        assert asked_new == [False, True]  # (not another pooled one: it may be as dead)

    asyncio.run(scenario())
