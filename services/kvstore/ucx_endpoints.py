"""UCX plumbing for the kvstore: environment, pooled endpoints to peers, idle-connection waiting.

Why pool endpoints: opening a UCX endpoint (connect + wire-up + ucxx's tag exchange) costs far more
than a pull's messages (docs/kvstore.md has the figures). So a pulling daemon keeps a few idle
endpoints per peer and uses each for one transfer at a time (ucxx tagged messages on one endpoint match in
order, so interleaving two transfers on one endpoint would mix their messages).

Why not simply post a receive on every idle endpoint: in ucxx's default (thread) progress mode an
awaited request is a coroutine that checks it on every event-loop turn, so each idle endpoint with
a posted receive would keep the loop spinning. Instead RequestWaiter probes all idle server-side
endpoints from one task, backing off to IDLE_POLL_MAX_SECONDS when nothing arrives.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, TypeAlias

log = logging.getLogger(__name__)

# ucxx has no type information, so its endpoints and listeners are Any here
Endpoint: TypeAlias = Any
Listener: TypeAlias = Any

DEFAULT_CPU_TLS = "tcp,self,sm"
CONTROL_TAG = 0  # the tag of control frames (ucxx mixes it with the endpoint's own tag)
IDLE_POLL_MAX_SECONDS = 0.002  # worst added latency of a request on an idle pooled endpoint


def configure_ucx_environment(tls: str = "", loopback_only: bool = False) -> str:
    """Sets UCX_* variables before ucxx is first used; returns the UCX_TLS in effect.

    `tls` wins, then an existing UCX_TLS, then tcp,self,sm (CPU pools). On GPU nodes use e.g.
    "rc,cuda_copy,cuda_ipc,tcp,sm,self" (RDMA NIC) so GPU buffers go device to device.
    `loopback_only` (the daemon serves and transfers on a loopback address): UCX's network
    transports open their sockets on `lo` only (UCX_NET_DEVICES, unless set), not on every
    interface; elsewhere UCX_NET_DEVICES is the operator's (it also picks RDMA devices)."""
    if tls:
        os.environ["UCX_TLS"] = tls
    else:
        os.environ.setdefault("UCX_TLS", DEFAULT_CPU_TLS)
    if loopback_only:
        os.environ.setdefault("UCX_NET_DEVICES", "lo")
    # ucxx sets variables (UCX_MEMTYPE_CACHE...) that this UCX build does not know; UCX would warn
    # about each of them at start-up.
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    return os.environ["UCX_TLS"]


def ucxx_module():
    import ucxx  # imported late, after configure_ucx_environment: UCX reads UCX_* when it starts

    return ucxx


class EndpointPool:
    """Idle endpoints to peer daemons, keyed by "host:port"; one transfer per endpoint at a time."""

    def __init__(self, connect_timeout: float, max_idle_per_peer: int = 4, idle_seconds: float = 30.0):
        self.connect_timeout = connect_timeout
        self.max_idle_per_peer = max_idle_per_peer
        self.idle_seconds = idle_seconds
        self._idle: dict[str, list[tuple[Endpoint, float]]] = {}  # address -> [(endpoint, idle since)]

    async def acquire(self, host: str, port: int) -> tuple[Endpoint, bool]:
        """(endpoint, reused): an idle endpoint to the peer if one is alive, else a new one.
        Raises whatever connecting raises (the caller maps it to UNAVAILABLE)."""
        idle = self._idle.get(f"{host}:{port}", [])
        while idle:
            ep, _ = idle.pop()
            if not ep.closed:
                return ep, True
        ep = await asyncio.wait_for(
            ucxx_module().create_endpoint(host, port, connect_timeout=self.connect_timeout), self.connect_timeout
        )
        return ep, False

    async def give_back(self, host: str, port: int, ep) -> None:
        """Returns an endpoint whose last transfer ended cleanly (no message in flight)."""
        idle = self._idle.setdefault(f"{host}:{port}", [])
        if ep.closed or len(idle) >= self.max_idle_per_peer:
            await self.discard(ep)
        else:
            idle.append((ep, time.monotonic()))

    @staticmethod
    async def discard(ep) -> None:
        if not ep.closed:
            await ep.close()  # also cancels receives still posted (after a failure)

    async def close_idle(self, everything: bool = False) -> None:
        """Closes endpoints idle for longer than idle_seconds (all of them when `everything`)."""
        deadline = time.monotonic() - self.idle_seconds
        for address, idle in list(self._idle.items()):
            keep = [] if everything else [(ep, t) for ep, t in idle if t > deadline and not ep.closed]
            for ep, t in idle:
                if (ep, t) not in keep:
                    await self.discard(ep)
            self._idle[address] = keep


class RequestWaiter:
    """Server side: tells each connection handler when its endpoint has a new request (True) or
    its peer went away (False), probing all waiting endpoints from one polling task."""

    def __init__(self) -> None:
        self._waiting: dict[Endpoint, asyncio.Future] = {}
        self._task: asyncio.Task | None = None
        self._delay = 0.0

    async def next_request(self, ep) -> bool:
        future = asyncio.get_running_loop().create_future()
        self._waiting[ep] = future
        self._delay = 0.0  # a request is often on its way (a new connection): look again soon
        if self._task is None:
            self._task = asyncio.create_task(self._poll(), name="kvstore-ucx-request-waiter")
        try:
            return await future
        finally:
            self._waiting.pop(ep, None)

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for future in self._waiting.values():
            if not future.done():
                future.set_result(False)

    async def _poll(self) -> None:
        while self._waiting:
            arrived = False
            for ep, future in list(self._waiting.items()):
                if future.done():
                    continue
                if ep.closed:
                    future.set_result(False)
                elif ep.tag_probe(CONTROL_TAG).matched:
                    future.set_result(True)
                    arrived = True
            # Busy: look again at once. Quiet: back off to IDLE_POLL_MAX_SECONDS between looks.
            self._delay = 0.0 if arrived else min(max(2 * self._delay, 0.0001), IDLE_POLL_MAX_SECONDS)
            await asyncio.sleep(self._delay)
        self._task = None
