"""The router's one call per decode (or colocated) worker, carrying all its requests to that worker.

Each request is a stream on the call (worker.proto: DecodeWorker.Decode, ColocatedWorker.Generate):
`WorkerCall.open` starts it and returns a `RequestStream`, which yields the request's `Tokens` (what
a worker's per-request call would have sent as TokenChunks), and raises the same AioRpcError a per-request call would
(the worker's status for that request; UNAVAILABLE for all of them when the call breaks, so each
fails over as before). One task reads the call and sorts each step's update to its requests; it
never waits on a request, so a client that stops reading holds up nobody else: its tokens wait in
its RequestStream, merged into one chunk, until it reads or the router gives up on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from pdserve.v1 import common_pb2
from services.common.server import COLUMNS_METADATA

log = logging.getLogger(__name__)


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


_STATUS = {code.value[0]: code for code in grpc.StatusCode}


@dataclass(slots=True)
class Tokens:
    """What a request's worker sent it (a TokenChunk, or its entry in an update's columns), as plain
    values: the router reads each a few times per token, and a message's fields cost more to read."""

    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = ""
    queue_seconds: float = 0.0  # on the first token from a worker that prefilled it (colocated)
    prefill_seconds: float = 0.0
    # When the worker's message holding them reached the router (monotonic; merged, the oldest's):
    # how long they wait at the router is measured from it. 0 for a prefill call's first token.
    arrived: float = 0.0

    @classmethod
    def of(cls, chunk: common_pb2.TokenChunk, arrived: float) -> Tokens:
        return cls(
            list(chunk.token_ids),
            list(chunk.logprobs),
            chunk.finish_reason,
            chunk.queue_seconds,
            chunk.prefill_seconds,
            arrived,
        )

    def merge(self, later: Tokens) -> None:
        """Appends what came after (as TokenChunk.MergeFrom: tokens and logprobs added, a later end
        or timing taken, the earlier arrival kept)."""
        self.token_ids += later.token_ids
        self.logprobs += later.logprobs
        if later.finish_reason:
            self.finish_reason = later.finish_reason
        if later.queue_seconds:
            self.queue_seconds = later.queue_seconds
        if later.prefill_seconds:
            self.prefill_seconds = later.prefill_seconds


class RequestStream:
    """One request on a WorkerCall: an async iterator of its Tokens, ending after those with a
    finish_reason. What arrived while the reader was away comes merged, as one. Its deadline is one
    timer for the whole request, not one per token: past it the request is cancelled at the worker
    and the iterator raises DEADLINE_EXCEEDED once the tokens that came before are taken."""

    def __init__(self, owner: WorkerCall, stream_id: int, deadline: float | None):
        self._owner = owner
        self.stream_id = stream_id
        self._pending: Tokens | None = None
        self._error: grpc.aio.AioRpcError | None = None
        self._waiter: asyncio.Future | None = None  # the request's coroutine, waiting for either
        self._timer = None if deadline is None else asyncio.get_running_loop().call_at(deadline, self._expire)
        self.done = False  # the worker ended it (a finish_reason or an error), or it was cancelled

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # ---- from the reader task --------------------------------------------------------------------
    def deliver(self, tokens: Tokens) -> None:
        if self._pending is None:
            self._pending = tokens
        else:
            self._pending.merge(tokens)
        self._wake()

    def fail(self, error: grpc.aio.AioRpcError) -> None:
        self._error = error
        self._stop_timer()
        self._wake()

    def _expire(self) -> None:
        self._timer = None
        if not self.done and self._error is None:
            self._owner.cancel(self.stream_id)  # (idempotent: the worker may have just ended it)
            self.fail(_error(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"))

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ---- from the request's coroutine -------------------------------------------------------------
    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Tokens:
        if self.done:
            raise StopAsyncIteration
        if self._pending is None and self._error is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk, self._pending = self._pending, None
        if chunk is not None:
            if chunk.finish_reason:
                self.done = True
                self._stop_timer()
            return chunk  # the tokens before an error still count (the failover resumes after them)
        assert self._error is not None
        self.done = True
        raise self._error

    def cancel(self) -> None:
        """Stops the request at the worker (freeing its blocks) unless it has ended. Idempotent."""
        self._stop_timer()
        if not self.done:
            self.done = True
            self._owner.cancel(self.stream_id)


class WorkerCall:
    """The router's call to one worker. Opened on first use and again after it broke."""

    def __init__(self, name: str, method: Callable, stream_request_type):
        self.name = name  # the worker's address, for messages
        self._method = method  # the stub's multi-request method: stub.Decode or stub.Generate
        self._request_type = stream_request_type  # DecodeStreamRequest or GenerateStreamRequest
        self._streams: dict[int, RequestStream] = {}
        self._next_id = 0
        self._outbox: asyncio.Queue | None = None  # requests to send; None: not open
        self._reader: asyncio.Task | None = None
        self._retired = False  # takes no new request; its side of the call closes once none is left

    def open(self, start, timeout: float | None) -> RequestStream:
        """Starts a request (a DecodeRequest or GenerateTokensRequest) on the call."""
        assert not self._retired, "a retired call takes no new request"
        if self._outbox is None:
            self._connect()
        assert self._outbox is not None
        self._next_id = (self._next_id + 1) & 0xFFFFFFFF
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, self._next_id, None if timeout is None else loop.time() + timeout)
        self._streams[stream.stream_id] = stream
        self._outbox.put_nowait(self._request_type(stream_id=stream.stream_id, start=start))
        return stream

    def cancel(self, stream_id: int) -> None:
        if self._streams.pop(stream_id, None) is not None and self._outbox is not None:
            self._outbox.put_nowait(self._request_type(stream_id=stream_id, cancel=True))
            self._end_if_retired()

    def retire(self) -> None:
        """Takes no new request (the router opens another call, e.g. over a renewed channel): the
        requests on it run to their end, then the call ends (the worker ends it once the router
        has closed its side and no request is left, streaming.py)."""
        self._retired = True
        self._end_if_retired()

    def _end_if_retired(self) -> None:
        if self._retired and not self._streams and self._outbox is not None:
            self._outbox.put_nowait(None)  # closes our side of the call
            self._outbox = None

    def _connect(self) -> None:
        outbox: asyncio.Queue = asyncio.Queue()

        async def requests():
            while True:
                request = await outbox.get()
                if request is None:
                    return
                yield request

        self._outbox = outbox
        call = self._method(requests(), metadata=(COLUMNS_METADATA,))
        self._reader = asyncio.create_task(self._read(call, outbox))

    async def _read(self, call, outbox: asyncio.Queue) -> None:
        error = _error(grpc.StatusCode.UNAVAILABLE, f"worker {self.name} ended the call")
        try:
            async for update in call:
                arrived = time.monotonic()
                if update.stream_ids or update.token_ids:  # plain next tokens (worker.proto StreamUpdate)
                    stream_ids, counts, tokens = (
                        list(update.stream_ids),
                        list(update.token_counts),
                        list(update.token_ids),
                    )
                    if len(counts) != len(stream_ids) or sum(counts) != len(tokens) or min(counts, default=0) < 1:
                        raise _error(
                            grpc.StatusCode.INTERNAL, f"worker {self.name} sent an update whose columns differ"
                        )
                    start = 0
                    for stream_id, count in zip(stream_ids, counts):
                        stream = self._streams.get(stream_id)
                        if stream is not None:  # (else cancelled here meanwhile)
                            stream.deliver(Tokens(tokens[start : start + count], arrived=arrived))
                        start += count
                for item in update.chunks:
                    stream = self._streams.get(item.stream_id)
                    if stream is None:
                        continue  # cancelled here meanwhile
                    if item.status_code:
                        del self._streams[item.stream_id]
                        stream.fail(_error(_STATUS.get(item.status_code, grpc.StatusCode.UNKNOWN), item.details))
                        if item.chunk.token_ids:
                            stream.deliver(Tokens.of(item.chunk, arrived))
                        continue
                    if item.chunk.finish_reason:
                        del self._streams[item.stream_id]
                    stream.deliver(Tokens.of(item.chunk, arrived))
                self._end_if_retired()
        except grpc.aio.AioRpcError as exc:
            error = exc
        except asyncio.CancelledError:
            error = _error(grpc.StatusCode.CANCELLED, "router is shutting down")
            raise
        finally:
            if self._outbox is outbox:  # the next request opens a new call
                self._outbox, self._reader = None, None
            outbox.put_nowait(None)
            call.cancel()
            broken, self._streams = self._streams, {}
            for stream in broken.values():
                stream.fail(error)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
