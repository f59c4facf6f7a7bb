"""What every pdserve gRPC server shares: health checking, reflection (off on internal services
unless --reflection on), TLS (common/tls.py), the Prometheus endpoint, one interceptor (API keys,
message sizes, unparseable requests, ServiceError -> its status), and graceful shutdown on
SIGTERM/SIGINT (stop taking work, drain, exit)."""

from __future__ import annotations

import asyncio
import hmac
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Gauge

from .errors import ServiceError
from .memory import trim_when_idle
from .metrics_http import MetricsTls, start_metrics_server
from .tls import TlsFiles, server_credentials

log = logging.getLogger(__name__)

# Control messages are small; KV never travels over gRPC. A generous cap still catches misuse.
MAX_MESSAGE_BYTES = 16 << 20
# A router's word, in the metadata of its call to a decode or colocated worker, that it reads
# StreamUpdate's columns (worker.proto): routers from before them do not, and may meet newer
# workers during a rolling upgrade.
COLUMNS_METADATA = ("pdserve-stream-columns", "1")
GRPC_OPTIONS = [
    # gRPC sets SO_REUSEPORT by default: a second server on a port in use would start "fine" and
    # the kernel would split connections between the two (two clusters on the default port).
    ("grpc.so_reuseport", 0),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    # The server side of the keepalive above: accept a ping every 10 s on an idle connection. The
    # default (5 minutes) answers the clients' 20 s pings with GOAWAY "too_many_pings" after a few
    # idle minutes, breaking every call on the connection (a kvstore pool watch among them).
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # Calls that arrived but that the Python server has not taken up yet: past 1000 gRPC starts
    # cancelling new ones at random (CANCELLED, no details, never seen by the handler). A burst of
    # thousands is normal at a router; its own admission bound refuses clearly (RESOURCE_EXHAUSTED).
    ("grpc.server.max_pending_requests", 1 << 16),
    ("grpc.server.max_pending_requests_hard_limit", 1 << 17),
    # and such a call is cancelled (CANCELLED, no details) after 30 s not taken up: the client's
    # deadline is the bound that should apply
    ("grpc.server_max_unrequested_time_in_server", 3600),
]


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Around every handler of a pdserve server:
    - with API keys, refuses calls to the protected service (the router's public API) that do not
      carry `authorization: Bearer <key>` of one of them (UNAUTHENTICATED); health stays open;
    - records the largest request and response message per method: evidence that no gRPC message
      carries KV (the e2e tests compare it with the size of one KV block);
    - turns a request that does not parse (e.g. a string field that is not UTF-8) into
      INVALID_ARGUMENT: grpc's own answer is UNKNOWN, which clients read as a server fault;
    - turns a ServiceError the handler raises into its status (handlers never abort themselves)."""

    def __init__(self, registry: CollectorRegistry, api_keys: frozenset[str] = frozenset(), protected: str = ""):
        self.api_keys = [key.encode() for key in api_keys]
        self.protected = f"/{protected}/"  # method names of the service that needs a key start with it
        self.largest = Gauge(
            "pdserve_grpc_largest_message_bytes",
            "Largest serialized gRPC message seen by this server, per method and direction.",
            ["method", "direction"],
            registry=registry,
        )
        self._max: dict[tuple[str, str], int] = {}

    def _recorder(self, method: str, direction: str) -> Callable[[int], None]:
        """Records one serialized message's size: read from the bytes gRPC sends or received, as
        the serializers see them (computing a message's size is a second serialization)."""
        key = (method, direction)

        def record(size: int) -> None:
            if size > self._max.get(key, -1):
                self._max[key] = size
                self.largest.labels(method, direction).set(size)

        return record

    def _unauthenticated(self, handler_call_details) -> str:
        """Why the call may not go on ("" when it may)."""
        if not self.api_keys or not handler_call_details.method.startswith(self.protected):
            return ""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                return api_key_refusal(value.encode() if isinstance(value, str) else value, self.api_keys, "metadata")
        return api_key_refusal(None, self.api_keys, "metadata")

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        refusal = self._unauthenticated(handler_call_details)
        if refusal:
            return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED, refusal)
        if handler.request_deserializer is not None:
            handler = handler._replace(
                request_deserializer=_measured_parse(
                    handler.request_deserializer,
                    self._recorder(method, "request"),
                    tolerant=bool(handler.unary_unary or handler.unary_stream),
                )
            )
        if handler.response_serializer is not None:
            handler = handler._replace(
                response_serializer=_measured_serialize(handler.response_serializer, self._recorder(method, "response"))
            )
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                await _reject_undecodable(request, context)
                try:
                    return await inner(request, context)
                except ServiceError as exc:
                    await context.abort(exc.code, exc.message, exc.trailing_metadata())

            return handler._replace(unary_unary=unary_unary)
        if handler.unary_stream:
            inner_stream = handler.unary_stream
            if inspect.isasyncgenfunction(inner_stream):

                async def yielded(request, context):
                    await _reject_undecodable(request, context)
                    try:
                        async for response in inner_stream(request, context):
                            yield response
                    except ServiceError as exc:
                        await context.abort(exc.code, exc.message, exc.trailing_metadata())

                return handler._replace(unary_stream=yielded)

            async def written(request, context):  # a coroutine that writes with context.write
                await _reject_undecodable(request, context)
                try:
                    return await inner_stream(request, context)
                except ServiceError as exc:
                    await context.abort(exc.code, exc.message, exc.trailing_metadata())

            return handler._replace(unary_stream=written)
        if handler.stream_stream and not inspect.isasyncgenfunction(handler.stream_stream):
            # the workers' calls carrying many requests (coroutines that write); not reflection's
            inner_call = handler.stream_stream

            async def call(requests, context):
                try:
                    return await inner_call(requests, context)
                except ServiceError as exc:
                    await context.abort(exc.code, exc.message, exc.trailing_metadata())

            return handler._replace(stream_stream=call)
        return handler


def api_key_refusal(authorization: bytes | None, api_keys: list[bytes], where: str) -> str:
    """Why a request with this `authorization` value (`Bearer <key>`, gRPC metadata or an HTTP
    header) may not go on: "" when it may."""
    if authorization is None:
        return f"an API key is required: {where} authorization: Bearer <key>"
    scheme, _, presented = authorization.partition(b" ")
    if scheme.lower() == b"bearer" and any(hmac.compare_digest(presented, k) for k in api_keys):
        return ""
    return f"the API key in the authorization {where} is not valid"


def _run_now(fn: Callable[[], None]) -> None:
    fn()


def _refusing(handler, code: grpc.StatusCode, details: str):
    """The handler, replaced by one that ends the call with `code` whatever it is sent."""

    async def refuse(request_or_iterator, context):
        await context.abort(code, details)

    async def refuse_stream(request_or_iterator, context):
        await context.abort(code, details)
        yield  # (an async generator, as a streaming handler)

    if handler.unary_unary:
        return handler._replace(unary_unary=refuse)
    if handler.unary_stream:
        return handler._replace(unary_stream=refuse_stream)
    if handler.stream_unary:
        return handler._replace(stream_unary=refuse)
    return handler._replace(stream_stream=refuse_stream)


class _Undecodable:
    def __init__(self, error: Exception):
        self.error = error


def _measured_parse(deserialize, record: Callable[[int], None], tolerant: bool):
    """The request deserializer, recording each message's size; a tolerant one answers a message
    that does not parse with _Undecodable, for the handler to refuse with INVALID_ARGUMENT."""

    def parse(data: bytes):
        record(len(data))
        if not tolerant:
            return deserialize(data)
        try:
            return deserialize(data)
        except Exception as exc:
            return _Undecodable(exc)

    return parse


def _measured_serialize(serialize, record: Callable[[int], None]):
    def serialized(message) -> bytes:
        data = serialize(message)
        record(len(data))
        return data

    return serialized


async def _reject_undecodable(request, context) -> None:
    if isinstance(request, _Undecodable):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"request: cannot be parsed ({request.error}); string fields must be valid UTF-8",
        )


def _status(serving: bool) -> int:
    return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING


def run_event_loop(main: Coroutine[Any, Any, object]) -> None:
    """Runs a service's main coroutine to completion on uvloop, where grpc.aio's cost per message is
    markedly lower than on asyncio's default loop (docs/benchmarks.md, "Serving path")."""
    uvloop.run(main)


class ServiceRunner:
    """Runs one gRPC server and its metrics endpoint until SIGTERM, then drains.

    `add_servicers(server)` registers the service implementations and returns their full names
    (for health and reflection). `drain()` is awaited after health turns NOT_SERVING and before the
    server stops; in-flight RPCs get `grace_seconds` more to finish.
    """

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        metrics_port: int,
        registry: CollectorRegistry,
        grace_seconds: float = 30.0,
        shared_port: int = 0,
        *,
        tls: TlsFiles | None = None,
        require_client_cert: bool = True,
        reflection: bool = True,
        api_keys: frozenset[str] = frozenset(),
        protected_service: str = "",
        health_port: int = 0,
        metrics_tls: MetricsTls = MetricsTls.MUTUAL,
    ):
        self.name = name
        self.host = host
        self.port = port
        # A port this server shares with other processes (SO_REUSEPORT: the kernel spreads
        # connections over them): `pdserve up --routers N` serves N routers at one address.
        self.shared_port = shared_port
        self.metrics_port = metrics_port
        self.metrics_tls = metrics_tls  # with TLS on: who may scrape (common/metrics_http.py)
        self.registry = registry
        self.grace_seconds = grace_seconds
        # TLS on its ports (common/tls.py); an internal service requires a client certificate
        self.tls = tls
        self.require_client_cert = require_client_cert
        self.reflection = reflection
        self.api_keys = api_keys
        self.protected_service = protected_service
        # With TLS: a plaintext port serving only the health service, for probes that cannot do
        # TLS (Kubernetes' gRPC probes); 0: none
        self.health_port = health_port
        self._health_server: grpc.aio.Server | None = None
        self.health = HealthServicer()
        self.server: grpc.aio.Server | None = None
        self._serving = True  # the overall health status ("") once started (set_serving)
        # Where memory housekeeping runs (common/memory.py): here, or, for a worker, on its engine
        # thread between requests; set before start()
        self.run_housekeeping: Callable[[Callable[[], None]], None] = _run_now
        self._trimmer: asyncio.Task | None = None
        self._stop = asyncio.Event()
        self.bound_port = 0

    @classmethod
    def from_flags(cls, name: str, args, registry: CollectorRegistry, **options) -> ServiceRunner:
        """A runner for a service's common_server_flags (flags.py); `options`: the rest of __init__'s."""
        return cls(
            name,
            args.host,
            args.port,
            args.metrics_port,
            registry,
            args.grace_seconds,
            tls=TlsFiles.from_args(args),
            reflection=args.reflection == "on",
            health_port=args.health_port,
            metrics_tls=MetricsTls(args.metrics_tls),
            **options,
        )

    async def start(self, add_servicers: Callable[[grpc.aio.Server], Iterable[str]]) -> None:
        options = GRPC_OPTIONS
        if self.shared_port:  # (grpc reads the first value of a repeated option)
            options = [("grpc.so_reuseport", 1)] + [o for o in GRPC_OPTIONS if o[0] != "grpc.so_reuseport"]
        interceptor = ServiceInterceptor(self.registry, self.api_keys, self.protected_service)
        self.server = grpc.aio.server(interceptors=[interceptor], options=options)
        names = list(add_servicers(self.server))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.reflection:
            reflection.enable_server_reflection(
                names + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
                self.server,
            )
        self.bound_port = self._add_port(self.port)
        if self.bound_port == 0:
            raise RuntimeError(f"{self.name}: cannot bind gRPC port {self.host}:{self.port}")
        if self.shared_port and self._add_port(self.shared_port) == 0:
            raise RuntimeError(f"{self.name}: cannot bind the shared gRPC port {self.host}:{self.shared_port}")
        await self.server.start()
        if self.health_port:
            self._health_server = grpc.aio.server(options=GRPC_OPTIONS)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self._health_server)
            if self._health_server.add_insecure_port(f"{self.host}:{self.health_port}") == 0:
                raise RuntimeError(f"{self.name}: cannot bind the health port {self.host}:{self.health_port}")
            await self._health_server.start()
        self._trimmer = asyncio.create_task(trim_when_idle(self.run_housekeeping))
        if self.metrics_port >= 0:
            self.metrics_port = start_metrics_server(
                self.host if self.host not in ("[::]", "") else "0.0.0.0",
                self.metrics_port,
                self.registry,
                self.tls,
                self.metrics_tls,
            )
        for n in names:
            await self.health.set(n, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", _status(self._serving))
        log.info("%s serving gRPC on %s:%d, metrics on :%d", self.name, self.host, self.bound_port, self.metrics_port)

    def _add_port(self, port: int) -> int:
        assert self.server is not None
        address = f"{self.host}:{port}"
        if self.tls is None:
            return self.server.add_insecure_port(address)
        return self.server.add_secure_port(address, server_credentials(self.tls, self.require_client_cert))

    async def set_serving(self, serving: bool) -> None:
        """Readiness: a service that cannot do its job yet (the router without workers, a worker
        without its kvstore daemon) reports NOT_SERVING while its server is up, so liveness probes
        pass and readiness ones wait. Before start(), it sets the status start() will report."""
        if serving == self._serving:
            return
        self._serving = serving
        # Only the server's overall status (""): the services' own names stay SERVING while the
        # process is up, because startup and liveness probes ask for them (deploy/helm) and a
        # router waiting for workers must not be restarted for it.
        await self.health.set("", _status(serving))

    async def follow_readiness(self, not_serving_reason: Callable[[], str], interval: float) -> None:
        """Keeps the health status on what `not_serving_reason()` says ("" when ready), checked every
        `interval`; logs each change with its reason. Runs until cancelled."""
        reported = None
        while True:
            reason = not_serving_reason()
            if reason != reported:
                if reason:
                    log.warning("%s: not serving: %s", self.name, reason)
                elif reported is not None:
                    log.info("%s: serving again", self.name)
                reported = reason
                await self.set_serving(not reason)
            await asyncio.sleep(interval)

    async def unless_stopped(self, work: Awaitable[object]) -> bool:
        """Awaits `work` (a startup step that may wait for a peer) unless a stop is requested first,
        which cancels it. True if it finished; its exception, if any, propagates."""
        task = asyncio.ensure_future(work)
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if task.done():
            task.result()
            return True
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        return False

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)

    def request_stop(self) -> None:
        self._stop.set()

    async def wait_and_drain(self, drain: Callable[[], Awaitable[None]] | None = None) -> None:
        await self._stop.wait()
        log.info("%s: stopping: no new work, draining", self.name)
        await self.health.enter_graceful_shutdown()
        if drain is not None:
            try:
                await asyncio.wait_for(drain(), timeout=self.grace_seconds)
            except TimeoutError:
                log.warning("%s: drain did not finish within %.0fs", self.name, self.grace_seconds)
        assert self.server is not None, "not started"
        await self.server.stop(grace=min(5.0, self.grace_seconds))
        if self._health_server is not None:
            await self._health_server.stop(grace=0)
        if self._trimmer is not None:
            self._trimmer.cancel()
        log.info("%s: stopped", self.name)
