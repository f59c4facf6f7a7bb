"""UCX plumbing for the kvstore: transfer addresses, connections to peer daemons, idle-connection waiting.

No listening socket of its own: a daemon's transfer address is its UCX worker address ("ucx:" and,
in base64, the address with its length and CRC-32), which names the transports' own endpoints (the
TCP transport listens on the interface of --transfer-host, on one of the ports from
--transfer-port). A pulling daemon opens an endpoint to that
address and says hello on HELLO_TAG with a connection id and its own worker address; the source
opens an endpoint back and acknowledges. A connection's messages carry tags made of its id, the
sending side and the message's tag, so they match no other connection's. (A sockaddr listener, the
usual way to accept UCX connections, binds every interface: ucxx does not let it bind one.)

Why pool connections: opening one (two endpoints, wire-up, the hello) costs far more than a pull's
messages (docs/kvstore.md has the figures). So a pulling daemon keeps a few idle connections per
peer and uses each for one transfer at a time (UCX matches tagged messages in order, so
interleaving two transfers on one connection would mix their messages).

Why not simply post a receive on every idle connection: in ucxx's default (thread) progress mode
an awaited request is a coroutine that checks it on every event-loop turn, so each idle connection
with a posted receive would keep the loop spinning. Instead RequestWaiter probes all idle
server-side connections from one task, backing off to IDLE_POLL_MAX_SECONDS when nothing arrives,
and the Acceptor probes for hellos, backing off to HELLO_POLL_BUSY_SECONDS while connections are
being opened and to HELLO_POLL_QUIET_SECONDS after a quiet minute (an idle daemon's CPU).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import json
import logging
import secrets
import struct
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import grpc
import numpy as np

from services.common.background import in_background
from services.common.errors import ServiceError

from .ucx_environment import ucxx_module

log = logging.getLogger(__name__)

# ucxx has no type information, so its endpoints are Any here
Endpoint: TypeAlias = Any

ADDRESS_PREFIX = "ucx:"
MAX_ADDRESS_BYTES = 8192  # a UCX worker address is ~200 bytes over tcp and sm, more with RDMA devices
HELLO_TAG = 0x7064_7365_7276_6501  # a new connection's first message, matched by the source's worker
CONTROL_TAG = 0  # the tag of control frames within a connection
CONNECTION_TAG_BITS = 23  # a connection's own tags are 0 .. 2**23 - 1
GOODBYE_TAG = (1 << CONNECTION_TAG_BITS) - 1  # the side that ends a connection says so
GOODBYE_SECONDS = 1.0
_GOODBYE = np.zeros(1, dtype=np.uint8)
PEER_POLL_MAX_SECONDS = 0.005  # worst delay in noticing, during a transfer, that the peer left
GOODBYE_POLL_SECONDS = 0.05  # and, between transfers, that it closed the connection
MIN_ADDRESS_BYTES = 16
ADDRESS_VERSION_MASK = 0x0F  # the low bits of a packed UCX worker address's first byte
MAX_CONTROL_BYTES = 16 << 20  # a frame longer than this is garbage, not a request
MAX_HELLO_BYTES = 4096  # a hello is ~400 bytes; UCX sends this much eagerly
IDLE_POLL_MAX_SECONDS = 0.002  # worst added latency of a request on an idle pooled connection
HELLO_POLL_BUSY_SECONDS = 0.01  # worst added latency of opening a connection, a minute after the last
HELLO_POLL_QUIET_SECONDS = 0.05  # and after that


def address_text(worker_address: bytes) -> str:
    """ "ucx:" and, in base64, the address's length, its CRC-32 and the address: UCX reads an
    address's bytes on trust (a cut or corrupted one can fail an assertion and end the process)."""
    envelope = struct.pack(">HI", len(worker_address), zlib.crc32(worker_address)) + worker_address
    return ADDRESS_PREFIX + base64.urlsafe_b64encode(envelope).decode()


def parse_address(text: str, field: str = "handle.transfer_address") -> bytes:
    """The UCX worker address in a transfer address; INVALID_ARGUMENT naming `field` if malformed."""
    if not text.startswith(ADDRESS_PREFIX) or len(text) > 2 * MAX_ADDRESS_BYTES:
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field}: expected {ADDRESS_PREFIX}<UCX worker address in base64>, got {text[:80]!r}",
        )
    try:
        envelope = base64.urlsafe_b64decode(text[len(ADDRESS_PREFIX) :].encode())
    except (binascii.Error, ValueError):
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: not base64") from None
    address = envelope[6:]
    if len(envelope) < 6 or struct.unpack(">HI", envelope[:6]) != (len(address), zlib.crc32(address)):
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: cut short or corrupted")
    return address


@functools.cache
def _own_address() -> bytes:
    return bytes(ucxx_module().get_worker_address())  # (fixed for the process's life)


def this_worker_address() -> str:
    return address_text(_own_address())


async def endpoint_to(address: bytes) -> Endpoint:
    """An endpoint to the UCX worker at `address`. UCX trusts the address's bytes (garbage can fail
    an assertion and end the process), so one not of this worker's format is refused first."""
    ucxx, own = ucxx_module(), _own_address()
    if len(address) < MIN_ADDRESS_BYTES or address[0] & ADDRESS_VERSION_MASK != own[0] & ADDRESS_VERSION_MASK:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "handle.transfer_address: not a UCX worker address")
    return await ucxx.create_endpoint_from_worker_address(ucxx.get_ucx_address_from_buffer(address))


T = TypeVar("T")


class Connection:
    """One conversation between two daemons: an endpoint to the peer's worker, and tags only this
    connection uses (its id, the sending side, the message's own tag).

    Each side has its own endpoint (UCX may carry both over one socket), so closing one tells the
    other nothing: a side that ends the connection says goodbye first (GOODBYE_TAG), and `closed`
    is true once the peer has said it or is gone."""

    def __init__(self, ep: Endpoint, connection_id: int, dialed: bool):
        self.ep = ep
        self.id = connection_id
        self._sends, self._receives = (0, 1) if dialed else (1, 0)
        self._peer_left = False
        self._ending = False

    def _tag(self, tag: int, side: int) -> int:
        if not 0 <= tag < 1 << CONNECTION_TAG_BITS:
            raise ValueError(f"tag {tag} out of a connection's range")
        return (self.id << (CONNECTION_TAG_BITS + 1)) | (side << CONNECTION_TAG_BITS) | tag

    def peer_left(self) -> bool:
        """The peer said goodbye or is gone."""
        if not self._peer_left and not self.ep.closed:
            self._peer_left = self.tag_probe(GOODBYE_TAG).matched
        return self._peer_left or self.ep.closed

    @property
    def closed(self) -> bool:
        return self._ending or self.peer_left()

    async def send(self, buffer, tag: int) -> None:
        await self.ep.send(buffer, tag=self._tag(tag, self._sends), force_tag=True)

    async def recv(self, buffer, tag: int) -> None:
        await self.ep.recv(buffer, tag=self._tag(tag, self._receives), force_tag=True)

    def tag_probe(self, tag: int, remove: bool = False):
        return self.ep.tag_probe(self._tag(tag, self._receives), force_tag=True, remove=remove)

    async def recv_with_handle(self, buffer, probe) -> None:
        await self.ep.recv_with_handle(buffer, probe)

    async def while_peer_stays(self, work: Awaitable[T]) -> T:
        """`work`'s result; if the peer leaves first, `work` is cancelled and ConnectionError
        raised (a transfer waits on messages that would never come)."""
        task = asyncio.ensure_future(work)
        delay = 0.0
        try:
            while not task.done():
                delay = min(max(2 * delay, 0.0001), PEER_POLL_MAX_SECONDS)
                await asyncio.wait([task], timeout=delay)
                if not task.done() and self.peer_left():
                    task.cancel()
                    await asyncio.wait([task])
                    if task.cancelled():
                        raise ConnectionError("the peer left the connection")
            return task.result()  # (its own error, if it ended in one meanwhile)
        finally:
            if not task.done():  # we were cancelled: so is the work, and it cleans up first
                task.cancel()
                await asyncio.wait([task])

    async def close(self) -> None:
        """Says goodbye (unless the peer is gone), then closes the endpoint, which also cancels the
        sends and receives still posted (after a failure). Idempotent; the endpoint is closed
        even if this is cancelled."""
        if self._ending:
            return
        self._ending = True
        try:
            if not self.peer_left():
                await asyncio.wait_for(self.send(_GOODBYE, GOODBYE_TAG), GOODBYE_SECONDS)
            # take the peer's goodbye, if it said one too, off UCX's queue of unexpected messages
            probe = self.tag_probe(GOODBYE_TAG, remove=True)
            if probe.matched:
                await asyncio.wait_for(self.recv_with_handle(np.empty(max(1, probe.length), np.uint8), probe), 1.0)
        except Exception:
            pass  # the peer's endpoint tells it, or its own timeout does
        finally:
            self.ep.abort()


def _frame(message: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(message).encode(), dtype=np.uint8)


def _message(body: np.ndarray) -> dict:
    message = json.loads(body.tobytes())
    if not isinstance(message, dict):
        raise ValueError("control frame is not a JSON object")
    return message


async def send_frame(connection: Connection, message: dict) -> None:
    await connection.send(_frame(message), CONTROL_TAG)


async def recv_frame(connection: Connection, within: float | None = None) -> dict:
    """The next control frame. Probing the tag tells its length, so a frame is a single message.
    `within`: the seconds it may take to arrive (ConnectionError past them); once it has arrived,
    its receive is never cut short."""
    deadline = None if within is None else time.monotonic() + within
    while not (probe := connection.tag_probe(CONTROL_TAG, remove=True)).matched:
        if connection.closed:
            raise ConnectionError("the peer closed the connection")
        if deadline is not None and time.monotonic() > deadline:
            raise ConnectionError(f"no answer within {within}s")
        await asyncio.sleep(0)
    body = np.empty(max(1, min(probe.length, MAX_CONTROL_BYTES)), dtype=np.uint8)
    await connection.recv_with_handle(body, probe)  # (a longer one raises: truncated)
    return _message(body[: probe.length])


class ConnectionPool:
    """The dialing side: idle connections to peer daemons, keyed by transfer address; one transfer
    per connection at a time."""

    def __init__(self, connect_timeout: float, max_idle_per_peer: int = 4, idle_seconds: float = 30.0):
        self.connect_timeout = connect_timeout
        self.max_idle_per_peer = max_idle_per_peer
        self.idle_seconds = idle_seconds  # the source closes connections idle 3x as long
        self._idle: dict[str, list[tuple[Connection, float]]] = {}  # address -> [(connection, idle since)]

    async def acquire(self, address: str, new: bool = False) -> tuple[Connection, bool]:
        """(connection, reused): an idle connection to the peer if one is alive (unless `new`),
        else a new one. Raises ServiceError INVALID_ARGUMENT for a malformed address, else
        whatever connecting raises (the caller maps it to UNAVAILABLE)."""
        peer = parse_address(address)
        idle, fresh_since = [] if new else self._idle.get(address, []), time.monotonic() - self.idle_seconds
        reused, stale = None, []
        while idle and reused is None:  # (no await until it is out of the pool: see close_idle)
            connection, since = idle.pop()
            if not connection.closed and since > fresh_since:
                reused = connection
            else:
                stale.append(connection)
        for connection in stale:  # (in the background: a cancel here would lose `reused`)
            in_background(self.discard(connection))
        if reused is not None:
            return reused, True
        ep = await asyncio.wait_for(endpoint_to(peer), self.connect_timeout)
        connection = Connection(ep, secrets.randbits(64 - CONNECTION_TAG_BITS - 1), dialed=True)
        try:
            hello = {"connection": connection.id, "reply_to": this_worker_address()}
            await asyncio.wait_for(self._hello(connection, hello), self.connect_timeout)
        except BaseException:
            await self.discard(connection)
            raise
        return connection, False

    @staticmethod
    async def _hello(connection: Connection, hello: dict) -> None:
        await connection.ep.send(_frame(hello), tag=HELLO_TAG, force_tag=True)
        reply = await recv_frame(connection)
        if not reply.get("ok"):
            raise ConnectionError(f"the peer refused the connection: {reply.get('message', '')}")

    async def give_back(self, address: str, connection: Connection) -> None:
        """Returns a connection whose last transfer ended cleanly (no message in flight)."""
        idle = self._idle.setdefault(address, [])
        if connection.closed or len(idle) >= self.max_idle_per_peer:
            await self.discard(connection)
        else:
            idle.append((connection, time.monotonic()))

    @staticmethod
    async def discard(connection: Connection) -> None:
        await connection.close()

    async def close_idle(self, everything: bool = False) -> None:
        """Closes connections idle for longer than idle_seconds (all of them when `everything`)."""
        deadline, stale = time.monotonic() - self.idle_seconds, []
        for address, idle in list(self._idle.items()):  # (sorted out before the first await)
            keep = [] if everything else [(c, t) for c, t in idle if t > deadline and not c.closed]
            stale += [c for c, t in idle if (c, t) not in keep]
            if keep:
                self._idle[address] = keep
            else:
                del self._idle[address]
        for connection in stale:
            await self.discard(connection)


class Acceptor:
    """The source side: takes each hello, opens the endpoint back to its sender and hands the new
    connection to `serve` (run as a task, which ends the connection when it returns)."""

    def __init__(self, serve: Callable[[Connection], Awaitable[None]], max_connections: int = 4096):
        self._serve = serve
        self.max_connections = max_connections
        self.connections: set[int] = set()  # the ids of the connections open
        self._hellos: set[asyncio.Task] = set()  # each hello's task, from its arrival to its end
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        ucxx_module().continuous_ucx_progress()
        self._task = asyncio.create_task(self._accept_forever(), name="kvstore-ucx-acceptor")

    async def close(self) -> None:
        """Stops accepting, then ends every connection (a transfer in progress fails)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for task in self._hellos:
            task.cancel()
        if self._hellos:
            await asyncio.wait(list(self._hellos), timeout=5.0)

    async def _accept_forever(self) -> None:
        # ucxx's application context: its worker-level probe and receive are not in ucxx's API
        context, delay, last_hello = ucxx_module().core._get_ctx(), 0.0, 0.0
        while True:
            try:
                probe = context.tag_probe(HELLO_TAG, remove=True)
            except Exception:
                log.exception("probing for UCX hellos failed")
                probe = None
            if probe is None or not probe.matched:
                quiet = time.monotonic() - last_hello > 60.0
                delay = min(max(2 * delay, 0.0001), HELLO_POLL_QUIET_SECONDS if quiet else HELLO_POLL_BUSY_SECONDS)
                await asyncio.sleep(delay)
                continue
            delay, last_hello = 0.0, time.monotonic()
            # each in its own task: a hello whose bytes never come must not hold up the next
            task = asyncio.create_task(self._take_hello(context, probe))
            self._hellos.add(task)
            task.add_done_callback(self._hellos.discard)

    async def _take_hello(self, context, probe) -> None:
        # (a longer one is cut short: UCX reports it truncated; the buffer stays referenced until
        # the receive ends, as UCX writes into it until then)
        body = np.empty(max(1, min(probe.length, MAX_HELLO_BYTES)), dtype=np.uint8)
        try:
            await context.recv_with_handle(body, probe)
            hello = _message(body[: probe.length])
            connection_id, reply_to = int(hello["connection"]), parse_address(str(hello["reply_to"]))
            if not 0 <= connection_id < 1 << (64 - CONNECTION_TAG_BITS - 1):
                raise ValueError(f"connection id {connection_id} out of range")
            # Not answered (the puller's connect timeout tells it): an answer would go on the live
            # connection's tags (2**40 random ids: a peer's bug, not chance).
            if connection_id in self.connections:
                raise ValueError(f"connection id {connection_id} in use")
        except Exception as e:  # a stranger's garbage
            log.info("UCX hello not taken: %r", e)
            return
        self.connections.add(connection_id)  # (before any await: ids are checked against it)
        connection = None
        try:
            connection = Connection(await endpoint_to(reply_to), connection_id, dialed=False)
            if len(self.connections) > self.max_connections:
                await send_frame(connection, {"ok": False, "message": f"{self.max_connections} connections open"})
                return
            await send_frame(connection, {"ok": True})
            await self._serve(connection)
        except Exception as e:  # the peer went away or broke protocol: only this connection ends
            log.info("UCX connection from a peer failed: %r", e)
        finally:
            self.connections.discard(connection_id)
            if connection is not None:
                await connection.close()


class RequestWaiter:
    """Source side: tells each connection's handler when it has a new request (True), or its peer
    went away or it stayed idle for `idle_seconds` (False), probing all waiting connections from
    one polling task."""

    def __init__(self, idle_seconds: float = 90.0) -> None:
        self.idle_seconds = idle_seconds
        self._waiting: dict[Connection, tuple[asyncio.Future, float]] = {}  # -> (future, deadline)
        self._task: asyncio.Task | None = None
        self._delay = 0.0

    async def next_request(self, connection: Connection, idle_seconds: float | None = None) -> bool:
        """`idle_seconds`: this wait's own limit (a new connection's first request comes at once)."""
        future = asyncio.get_running_loop().create_future()
        limit = self.idle_seconds if idle_seconds is None else idle_seconds
        self._waiting[connection] = (future, time.monotonic() + limit)
        self._delay = 0.0  # a request is often on its way (a new connection): look again soon
        if self._task is None:
            self._task = asyncio.create_task(self._poll(), name="kvstore-ucx-request-waiter")
        try:
            return await future
        finally:
            self._waiting.pop(connection, None)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for future, _ in self._waiting.values():
            if not future.done():
                future.set_result(False)

    async def _poll(self) -> None:
        goodbyes_seen = 0.0
        while self._waiting:
            now = time.monotonic()
            arrived = False
            look_for_goodbyes = now - goodbyes_seen > GOODBYE_POLL_SECONDS  # (a second probe each)
            goodbyes_seen = now if look_for_goodbyes else goodbyes_seen
            for connection, (future, deadline) in list(self._waiting.items()):
                if future.done():
                    continue
                if connection.ep.closed or now > deadline or (look_for_goodbyes and connection.closed):
                    why = "endpoint closed" if connection.ep.closed else "idle" if now > deadline else "goodbye"
                    log.info("UCX connection %x from a peer ends: %s", connection.id, why)
                    future.set_result(False)
                elif connection.tag_probe(CONTROL_TAG).matched:
                    future.set_result(True)
                    arrived = True
            # Busy: look again at once. Quiet: back off to IDLE_POLL_MAX_SECONDS between looks.
            self._delay = 0.0 if arrived else min(max(2 * self._delay, 0.0001), IDLE_POLL_MAX_SECONDS)
            await asyncio.sleep(self._delay)
        self._task = None
