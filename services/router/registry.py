"""The router's view of its workers: where they are, whether they are healthy, how loaded.

Workers come from static addresses and from DNS names that resolve to many addresses (Kubernetes
headless services). A background task re-resolves the names and polls every worker's Stats; a
worker is eligible when its last poll succeeded, it is not draining and it does not report a reason
not to serve (a worker without its kvstore daemon). Between polls the router
adds what it dispatched itself (in-flight prompt tokens and reserved blocks), so a burst does not
all land on the worker that looked idlest at the last poll.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge

from pdserve.v1 import common_pb2, common_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.enums import Role
from services.common.grpc_client import PeerChannel

from .prefix_index import PrefixIndex
from .worker_calls import WorkerCall

log = logging.getLogger(__name__)

ROLE_STUBS = {
    Role.PREFILL: worker_pb2_grpc.PrefillWorkerStub,
    Role.DECODE: worker_pb2_grpc.DecodeWorkerStub,
    Role.COLOCATED: worker_pb2_grpc.ColocatedWorkerStub,
}


class Ejection(StrEnum):
    """Why the router stopped sending a worker work (`pdserve_router_worker_ejections_total{reason}`)."""

    UNREACHABLE = "unreachable"  # its Stats polls failed
    NOT_SERVING = "not_serving"  # it said so (Stats.not_serving_reason)
    CALL_FAILED = "call_failed"  # a call to it failed as if it were down


class RegistryMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.healthy = Gauge(
            "pdserve_router_worker_healthy",
            "1 while the router sends this worker work, else 0.",
            ["role", "worker"],
            registry=registry,
        )
        self.ejections = Counter(
            "pdserve_router_worker_ejections_total",
            "Times the router stopped sending a worker work, by reason.",
            ["role", "reason"],
            registry=registry,
        )


@dataclass(eq=False)
class Endpoint:
    address: str
    role: Role
    source: str  # "static" or the DNS name it came from
    peer: PeerChannel
    # on peer.channel (_make_stubs): the role's stub (ROLE_STUBS), and Worker for Stats
    stub: Any = None
    stats_stub: Any = None
    stats: common_pb2.WorkerStats | None = None
    healthy: bool = False
    last_ok: float = 0.0
    consecutive_failures: int = 0
    inflight_requests: int = 0
    inflight_prompt_tokens: int = 0
    reserved_blocks: int = 0
    draining: bool = field(default=False)
    not_serving_reason: str = ""  # the worker's own, from its last Stats
    call: WorkerCall | None = None  # decode and colocated: the one call carrying all requests to it
    prefix: PrefixIndex = field(default_factory=PrefixIndex)  # what its prefix cache holds

    @property
    def eligible(self) -> bool:
        return self.healthy and not self.draining and not self.not_serving_reason


async def _resolve_host(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def split_host_port(name: str) -> tuple[str, int]:
    host, _, port = name.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {name!r}")
    return host.strip("[]"), int(port)


class WorkerRegistry:
    def __init__(
        self,
        static: dict[Role, list[str]],
        dns: dict[Role, list[str]],
        poll_interval: float = 0.5,
        stats_timeout: float = 2.0,
        resolve_host=None,
        metrics: RegistryMetrics | None = None,
    ):
        self.static = {role: [a for a in addrs if a] for role, addrs in static.items()}
        self.dns = {role: [n for n in names if n] for role, names in dns.items()}
        self.poll_interval = poll_interval
        self.stats_timeout = stats_timeout
        self.endpoints: dict[tuple[str, str], Endpoint] = {}  # (role, address) -> endpoint
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()
        self._resolve_host = resolve_host or _resolve_host  # async (host, port) -> list of IP strings
        self.metrics = metrics or RegistryMetrics(CollectorRegistry())
        for role in self.roles:  # zero from the start: dashboards and alerts see the series
            for why in Ejection:
                self.metrics.ejections.labels(role, why)

    @property
    def roles(self) -> set[Role]:
        return {r for r, a in self.static.items() if a} | {r for r, n in self.dns.items() if n}

    def _add(self, role: Role, address: str, source: str) -> None:
        key = (role, address)
        if key in self.endpoints:
            return
        ep = self.endpoints[key] = Endpoint(address, role, source, PeerChannel(address))
        _make_stubs(ep)
        log.info("registered %s worker %s (%s)", role, address, source)

    def _follow_renewals(self) -> None:
        """After this process's certificate was renewed: new calls over new channels (PeerChannel);
        a decode or colocated worker's call ends once the requests on it have."""
        for ep in self.endpoints.values():
            if ep.peer.renewed():
                if ep.call is not None:
                    ep.call.retire()
                _make_stubs(ep)

    async def _resolve(self) -> None:
        for role, addrs in self.static.items():
            for address in addrs:
                self._add(role, address, "static")
        for role, names in self.dns.items():
            for name in names:
                host, port = split_host_port(name)
                try:
                    ips = await self._resolve_host(host, port)
                except OSError as exc:
                    log.warning("cannot resolve %s: %s", name, exc)
                    continue
                found = {f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips}
                for address in found:
                    self._add(role, address, name)
                for key, ep in list(self.endpoints.items()):
                    if ep.source == name and ep.address not in found and ep.inflight_requests == 0:
                        log.info("%s worker %s left %s", role, ep.address, name)
                        del self.endpoints[key]
                        self.metrics.healthy.remove(ep.role, ep.address)
                        await _close(ep)

    async def _poll(self, ep: Endpoint) -> None:
        reserved_before = ep.reserved_blocks  # dispatches during the poll may not be in its answer
        try:
            ep.stats = await ep.stats_stub.Stats(ep.prefix.stats_request(), timeout=self.stats_timeout)
        except grpc.aio.AioRpcError:
            ep.consecutive_failures += 1
            if ep.healthy and ep.consecutive_failures >= 2:
                self._eject(ep, Ejection.UNREACHABLE, "its Stats polls fail")
            return
        if ep.stats.HasField("prefix_cache"):
            ep.prefix.apply(ep.stats.prefix_cache)
        else:
            ep.prefix.clear()
        reason = ep.stats.not_serving_reason
        if reason and reason != ep.not_serving_reason:
            self._eject(ep, Ejection.NOT_SERVING, reason)
        elif not reason and (ep.not_serving_reason or not ep.healthy):
            log.info("%s worker %s is healthy", ep.role, ep.address)
            self._changed.set()
        ep.healthy, ep.draining, ep.consecutive_failures = True, ep.stats.draining, 0
        ep.not_serving_reason = reason
        ep.last_ok = time.monotonic()
        ep.reserved_blocks -= reserved_before  # the answer reflects what was dispatched before the poll
        self.metrics.healthy.labels(ep.role, ep.address).set(1 if ep.eligible else 0)

    def _eject(self, ep: Endpoint, why: Ejection, details: str) -> None:
        if ep.eligible:
            log.warning("%s worker %s: sending it nothing until it recovers: %s", ep.role, ep.address, details)
            self.metrics.ejections.labels(ep.role, why).inc()
        ep.healthy = False
        self.metrics.healthy.labels(ep.role, ep.address).set(0)

    async def refresh(self) -> None:
        await self._resolve()
        self._follow_renewals()
        await asyncio.gather(*(self._poll(ep) for ep in list(self.endpoints.values())))

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.refresh()
            except Exception:  # keep polling whatever one round hit
                log.exception("worker refresh failed")

    def mark_failed(self, ep: Endpoint) -> None:
        """A call to the worker failed as if it were down: skip it until a poll succeeds."""
        self._eject(ep, Ejection.CALL_FAILED, "a call to it failed")

    def eligible(self, role: Role) -> list[Endpoint]:
        return [ep for ep in self.endpoints.values() if ep.role == role and ep.eligible]

    async def wait_for(self, roles: set[Role], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.eligible(role) for role in roles):
                return True
            self._changed.clear()
            try:
                await asyncio.wait_for(
                    self._changed.wait(), timeout=min(self.poll_interval, deadline - time.monotonic())
                )
            except TimeoutError:
                pass
        return all(self.eligible(role) for role in roles)

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        for ep in self.endpoints.values():
            await _close(ep)


def _make_stubs(ep: Endpoint) -> None:
    channel = ep.peer.channel
    ep.stub = ROLE_STUBS[ep.role](channel)
    ep.stats_stub = common_pb2_grpc.WorkerStub(channel)
    if ep.role is Role.DECODE:
        ep.call = WorkerCall(ep.address, ep.stub.Decode, worker_pb2.DecodeStreamRequest)
    elif ep.role is Role.COLOCATED:
        ep.call = WorkerCall(ep.address, ep.stub.Generate, worker_pb2.GenerateStreamRequest)


async def _close(ep: Endpoint) -> None:
    if ep.call is not None:
        await ep.call.close()
    await ep.peer.close()
