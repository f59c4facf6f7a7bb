"""The public API: pdserve.v1.Router.

One request, disaggregated: pick a prefill worker (least queue delay) -> Prefill RPC returns the
first token and a KV handle -> the first token goes to the client at once -> pick a decode worker
(most free blocks) -> Decode stream -> tokens to the client as they come, detokenized
incrementally. Colocated: one Generate stream from a colocated worker.

Failover lives here, since workers never call each other: a worker that fails as if down
(UNAVAILABLE) is skipped, and the request resumes elsewhere: the same KV handle on another decode
worker if that stream had produced nothing yet, otherwise a re-prefill of prompt + tokens so far
(the tokens and their sampling stream continue exactly, seeds being per output index). A client
that cancels or whose deadline passes cancels the downstream call, which frees the blocks.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum

import grpc

from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2
from services.common import validation
from services.common.admission import RETRY_AFTER_SECONDS, Admission
from services.common.arith import ceil_div
from services.common.background import in_background
from services.common.enums import FinishReason, Role
from services.common.errors import PastContextError, ServiceError, invalid
from services.kvstore.client import KvStoreClient

from .detokenizer import IncrementalDetokenizer
from .policies import NoWorkerError, PrefillPolicy, pick_colocated, pick_decode, pick_prefill
from .prefix_index import NodePrefixes, PrefixRoutingMetrics, PromptPrefix
from .registry import Endpoint, WorkerRegistry
from .slo import RequestTimer, SloTracker
from .stop_strings import StopStrings
from .worker_calls import Tokens

log = logging.getLogger(__name__)

RETRYABLE = {grpc.StatusCode.UNAVAILABLE}
REFUSED_RETRY_SECONDS = 0.2  # between tries of a request every worker refused for load


class RouterService(router_pb2_grpc.RouterServicer):
    def __init__(
        self,
        registry: WorkerRegistry,
        tokenizer,
        *,
        model_id: str,
        max_model_len: int,
        vocab_size: int,
        slo: SloTracker,
        default_max_tokens: int = 256,
        max_retries: int = 2,
        client_stall_seconds: float = 10.0,
        worker_wait_seconds: float = 10.0,
        admission: Admission | None = None,
        prefill_policy: PrefillPolicy = PrefillPolicy.KV_AWARE,
        metrics_registry=None,
    ):
        self.registry = registry
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.limits = validation.ModelLimits(vocab_size, max_model_len)
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.slo = slo
        self.default_max_tokens = default_max_tokens
        self.max_retries = max_retries
        self.mode = "colocated" if Role.COLOCATED in registry.roles else "disaggregated"
        self.kvstore = KvStoreClient("")  # only for Release at whichever daemon holds an entry
        # A token covers at most this many characters of prompt (its longest vocabulary entry in
        # UTF-8 bytes, times 4 for what normalizers may fold into one character): a longer prompt
        # cannot fit max_model_len, and is refused before tokenizing it.
        self.max_prompt_chars = max_model_len * 4 * max(len(t.encode("utf-8")) for t in tokenizer.get_vocab())
        self.client_stall_seconds = client_stall_seconds
        # With no eligible worker of a role (its node's kvstore restarting, workers restarting), a
        # request waits this long for one rather than failing at once.
        self.worker_wait_seconds = worker_wait_seconds
        self.admission = admission or Admission("router", 0, 0)
        self.prefill_policy = prefill_policy
        self.prefix_metrics = PrefixRoutingMetrics(metrics_registry)
        self.node_prefixes = NodePrefixes()
        self.requests: set[_RequestState] = set()  # in progress
        self._stall_watch: asyncio.Task | None = None
        self.draining = False

    # ---- validation (what both APIs share) ----------------------------------------------------
    def check_open(self) -> None:
        """Refuses a request before any work on it: the router is draining, or holds its limit."""
        if self.draining:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "router is shutting down")
        self.admission.check_requests()

    async def prompt_from_text(self, field: str, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > self.max_prompt_chars:
            raise PastContextError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{field}: {len(text)} characters cannot fit in max_model_len {self.max_model_len} tokens",
            )
        if len(text) > 4096:  # long: tokenize off the event loop (the tokenizer drops the GIL)
            ids = await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)
        else:
            ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        if not ids:
            raise invalid(field, "encodes to no tokens")
        validation.context(field, len(ids), self.limits)
        return ids

    def prompt_from_ids(self, field: str, token_ids) -> list[int]:
        ids = validation.token_ids(field, token_ids, self.limits)
        validation.context(field, len(ids), self.limits)
        return ids

    def sampling_for(
        self, requested: common_pb2.SamplingParams, prompt_len: int, logprobs: bool = False
    ) -> tuple[common_pb2.SamplingParams, tuple[str, ...]]:
        """The sampling the workers get (defaults filled in) and the stop strings, which stay here."""
        validation.sampling(requested, self.limits)
        sp = common_pb2.SamplingParams()
        sp.CopyFrom(requested)
        del sp.stop[:]
        # the context limit caps generation; generation then ends with finish_reason "length"
        sp.max_tokens = min(
            sp.max_tokens or max(self.default_max_tokens, sp.min_tokens), self.max_model_len - prompt_len
        )
        sp.min_tokens = min(sp.min_tokens, sp.max_tokens)  # the context ends generation first
        if not sp.HasField("seed"):
            sp.seed = random.getrandbits(63)
        sp.logprobs = sp.logprobs or logprobs
        return sp, tuple(requested.stop)

    def slo_targets(self, ttft: float | None, tpot: float | None, field: str = "slo.") -> tuple[float, float]:
        validation.positive_seconds(f"{field}ttft_seconds", ttft)
        validation.positive_seconds(f"{field}tpot_seconds", tpot)
        return self.slo.targets(ttft, tpot)

    # ---- Generate -----------------------------------------------------------------------------
    async def Generate(self, request: router_pb2.GenerateRequest, context):
        # A coroutine writing with context.write rather than an async generator, so that a client
        # cancel always lands inside this code and the downstream call is cancelled at once.
        arrived = time.monotonic()
        self.check_open()
        has_text, has_ids = bool(request.prompt), len(request.token_ids) > 0
        if has_text == has_ids:
            raise invalid("prompt", "set exactly one of prompt and token_ids")
        if has_text:
            prompt = await self.prompt_from_text("prompt", request.prompt)
        else:
            prompt = self.prompt_from_ids("token_ids", request.token_ids)
        sampling, stop = self.sampling_for(request.sampling, len(prompt), request.logprobs)
        ttft_slo, tpot_slo = self.slo_targets(
            request.slo.ttft_seconds if request.slo.HasField("ttft_seconds") else None,
            request.slo.tpot_seconds if request.slo.HasField("tpot_seconds") else None,
        )
        remaining = context.time_remaining()
        generation = Generation(
            prompt,
            sampling,
            validation.request_id("request_id", request.request_id) or uuid.uuid4().hex,
            ttft_slo,
            tpot_slo,
            stop=stop,
            cache_salt=validation.cache_salt("cache_salt", request.cache_salt),
            skip_special_tokens=request.skip_special_tokens if request.HasField("skip_special_tokens") else True,
            api=Api.GRPC,
            deadline=None if remaining is None else time.monotonic() + remaining,
            arrived=arrived,
        )
        await self.generate(generation, context.write)

    async def generate(self, gen: Generation, write: Callable[[router_pb2.GenerateResponse], Awaitable[None]]) -> None:
        """Serves one validated request, handing each GenerateResponse to `write` (which waits while
        the client is slow to read); raises ServiceError for a status the client gets. Whatever ends
        it (the last token, an error, a cancel of the calling task) frees its KV on every worker."""
        timer = RequestTimer(arrived=gen.arrived)  # TTFT counts the tokenizing and checks before
        prompt, sampling, request_id = gen.prompt, gen.sampling, gen.request_id
        detok = IncrementalDetokenizer(self.tokenizer, prompt, gen.skip_special_tokens)
        stops = StopStrings(gen.stop, sampling.min_tokens) if gen.stop else None
        ticket = self.admission.admit(len(prompt))  # past a bound: RESOURCE_EXHAUSTED at once
        state = _RequestState(prompt, sampling, request_id, gen.deadline)
        state.cache_salt = gen.cache_salt
        judged = False  # slo.finish ran: a cancel during the last write must not count it twice
        self.requests.add(state)
        if self._stall_watch is None:
            self._stall_watch = asyncio.create_task(self._cancel_stalled_clients())
        slo = self.slo.of(gen.api)
        slo.inflight.inc()
        try:
            async for chunk in self._tokens(state, timer):
                if not timer.num_tokens:
                    ticket.prefilled()
                finish_reason = chunk.finish_reason
                token_ids, logprobs = chunk.token_ids, chunk.logprobs
                if stops is None:
                    text = detok.add(token_ids)
                    if finish_reason:
                        text += detok.flush()
                else:
                    text, kept = _until_stop(detok, stops, token_ids, bool(finish_reason), timer.num_tokens)
                    if stops.stopped:  # the tokens after the one that completed it are dropped
                        finish_reason = FinishReason.STOP
                        token_ids, logprobs = token_ids[:kept], logprobs[:kept]
                gap = timer.tokens(len(token_ids))
                if timer.num_tokens > len(token_ids):  # (the first token is TTFT's)
                    slo.itl.observe(gap)
                    if chunk.arrived:  # (0: a re-prefill's first token, after a failover)
                        slo.relay.observe(timer.last_token - chunk.arrived)
                response = router_pb2.GenerateResponse(token_ids=token_ids, text=text, request_id=request_id)
                if logprobs:  # present only when requested
                    response.logprobs.extend(logprobs)
                if finish_reason:
                    ttft_met, tpot_met = slo.finish(timer, finish_reason, len(prompt), gen.ttft_slo, gen.tpot_slo)
                    judged = True
                    if state.prefill_seconds:
                        self.slo.queue.observe(state.queue_seconds)
                        self.slo.router_overhead.observe(state.router_seconds(timer.ttft))
                    response.finish_reason = finish_reason
                    response.usage.CopyFrom(
                        router_pb2.Usage(
                            prompt_tokens=len(prompt), completion_tokens=timer.num_tokens, seed=sampling.seed
                        )
                    )
                    response.timing.CopyFrom(
                        router_pb2.Timing(
                            ttft_seconds=timer.ttft,
                            tpot_seconds=timer.tpot,
                            e2e_seconds=timer.e2e,
                            queue_seconds=state.queue_seconds,
                            prefill_seconds=state.prefill_seconds,
                            kv_transfer_seconds=state.kv_transfer_seconds,
                            slo_ttft_met=ttft_met,
                            slo_tpot_met=tpot_met,
                            slo_ttft_seconds=gen.ttft_slo,
                            slo_tpot_seconds=gen.tpot_slo,
                            retries=state.retries,
                            router_seconds=state.router_seconds(timer.ttft),
                        )
                    )
                # While the client is slow to read, the tokens that come meanwhile wait in the
                # worker call's RequestStream and go in the next message together.
                state.write_started = timer.last_token
                await write(response)
                state.write_started = 0.0
                if finish_reason:
                    return  # (after a stop string, the finally cancels the worker's call)
        except (asyncio.CancelledError, ConnectionError):  # the client went away (or its write failed)
            if not judged:
                slo.finish(timer, FinishReason.CANCELLED, len(prompt), gen.ttft_slo, gen.tpot_slo)
            if state.stalled:  # our cancel, not the client's: tell it why (when it reads again)
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()  # the cancel ends here, as this error
                raise ServiceError(
                    grpc.StatusCode.CANCELLED,
                    f"the client read nothing for {self.client_stall_seconds:g} s (--client-stall-seconds)",
                ) from None
            raise
        except NoWorkerError as exc:
            slo.finish(timer, FinishReason.ERROR, len(prompt), gen.ttft_slo, gen.tpot_slo)
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        except grpc.aio.AioRpcError as exc:
            slo.finish(timer, FinishReason.ERROR, len(prompt), gen.ttft_slo, gen.tpot_slo)
            raise ServiceError(exc.code(), f"worker call failed: {exc.details()}") from None
        except (grpc.aio.AbortError, grpc.aio.UsageError, ServiceError):
            raise  # an abort on its way out, the call already over, or a status already chosen
        except Exception as exc:
            if judged:
                raise
            log.exception("request %s failed", request_id)
            slo.finish(timer, FinishReason.ERROR, len(prompt), gen.ttft_slo, gen.tpot_slo)
            raise ServiceError(grpc.StatusCode.INTERNAL, f"router error: {exc!r}") from None
        finally:
            ticket.release()
            self.requests.discard(state)
            slo.inflight.dec()
            if state.handle_read is not None:
                # The first token went out, the KV handle has not come: the prefill worker is
                # publishing the KV. Take the handle when it comes and release the entry (cancelling
                # the call could miss a handle already on its way and leave the entry to its TTL).
                in_background(self._release_when_published(state.handle_read))
            elif state.call is not None:
                state.call.cancel()  # idempotent; frees the worker's blocks at once whatever ended us
            if state.handle is not None and not state.decode_started:
                # No decode worker has confirmed (by streaming a token) that it took the entry:
                # the request may have ended before the Decode call reached one, or one rejected
                # it. Release it now rather than leaving it to the TTL. Harmless if a worker did
                # pull it (the entry is gone) or is pulling it (the release waits for the pull).
                in_background(self._release(state.handle))

    async def _cancel_stalled_clients(self) -> None:
        """Cancels each request whose client has not taken a message for client_stall_seconds: it
        reads nothing (or its connection is stuck), and its sequence would hold blocks until done.
        Cancelling it frees them; other requests never wait on it (see worker_calls)."""
        while True:
            await asyncio.sleep(min(1.0, self.client_stall_seconds / 4))
            now = time.monotonic()
            for state in list(self.requests):
                if state.write_started and now - state.write_started > self.client_stall_seconds and state.task:
                    log.warning(
                        "request %s: the client read nothing for %.0f s; cancelling it",
                        state.request_id,
                        now - state.write_started,
                    )
                    self.slo.client_stalls.inc()
                    state.write_started, state.stalled = 0.0, True
                    state.task.cancel()

    async def _tokens(self, state: _RequestState, timer: RequestTimer):
        """Yields a request's Tokens until a finish_reason, failing over between workers."""
        while True:
            try:
                if self.mode == "colocated":
                    async for chunk in self._colocated(state, timer):
                        yield chunk
                else:
                    async for chunk in self._disaggregated(state, timer):
                        yield chunk
                return
            except grpc.aio.AioRpcError as exc:
                if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    await self._after_refusal(state, exc)
                    continue
                if exc.code() not in RETRYABLE or state.retries >= self.max_retries:
                    raise
                state.retries += 1
                self.slo.retries.inc()
                log.warning(
                    "request %s: %s; retrying elsewhere (%d/%d)",
                    state.request_id,
                    exc.details(),
                    state.retries,
                    self.max_retries,
                )

    async def _after_refusal(self, state: _RequestState, exc: grpc.aio.AioRpcError) -> None:
        """A worker refused the request (its own admission bound): it goes to another worker of
        the role. When every one has refused: before any token went out, the client gets the
        refusal (RESOURCE_EXHAUSTED, retry-after) as if from this router; after, the request may
        not fail for load, so it waits for room, up to worker_wait_seconds."""
        role = (
            Role.DECODE if state.handle is not None else (Role.PREFILL if self.mode != "colocated" else Role.COLOCATED)
        )
        if any(ep.address not in state.refused for ep in self.registry.eligible(role)):
            return
        if not state.outputs:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"every {role} worker is overloaded ({exc.details()})",
                retry_after_seconds=RETRY_AFTER_SECONDS,
            )
        if not state.waiting_since:
            state.waiting_since = time.monotonic()
        elif time.monotonic() - state.waiting_since > self.worker_wait_seconds:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"every {role} worker stayed overloaded for {self.worker_wait_seconds:g} s ({exc.details()})",
            )
        await asyncio.sleep(REFUSED_RETRY_SECONDS)
        state.refused.clear()

    async def _colocated(self, state: _RequestState, timer: RequestTimer):
        prompt = PromptPrefix(state.prompt + state.outputs, state.cache_salt)
        ep = pick_colocated(
            await self._eligible(Role.COLOCATED, state),
            exclude=state.failed | state.refused,
            prompt_tokens=len(prompt.token_ids),
            cached_tokens=self._cached_tokens(prompt),
        )
        self.prefix_metrics.record(Role.COLOCATED, self.prefill_policy, prompt, ep)
        request = worker_pb2.GenerateTokensRequest(
            request_id=state.request_id,
            token_ids=state.prompt,
            sampling=state.sampling,
            resumed_output_ids=state.outputs,
            cache_salt=state.cache_salt,
        )
        assert ep.call is not None
        async for chunk in self._stream(
            ep,
            ep.call.open(request, state.time_left()),
            state,
            len(state.prompt) + len(state.outputs),
        ):
            if chunk.prefill_seconds:  # the worker's own queue and prefill; after a failover, added up
                state.queue_seconds += chunk.queue_seconds
                state.prefill_seconds += chunk.prefill_seconds
            yield chunk

    async def _disaggregated(self, state: _RequestState, timer: RequestTimer):
        if state.handle is None:
            prompt = PromptPrefix(state.prompt + state.outputs, state.cache_salt)
            ep = pick_prefill(
                await self._eligible(Role.PREFILL, state),
                exclude=state.failed | state.refused,
                prompt_tokens=len(prompt.token_ids),
                cached_tokens=self._cached_tokens(prompt),
            )
            state.prefix_source = self.node_prefixes.source_for(prompt, ep)  # (before record enters the prompt)
            self.prefix_metrics.record(Role.PREFILL, self.prefill_policy, prompt, ep)
            # The first token comes first and goes to the client at once; the KV handle follows
            # once the worker has published the KV.
            first = await self._prefill(ep, state)
            state.prefill_seconds += first.compute_seconds
            state.queue_seconds += first.queue_seconds
            state.outputs.append(first.first_token_id)
            if not first.finish_reason:  # read on its own, so that the request's end cannot cancel it
                state.handle_read = asyncio.ensure_future(self._read_handle(ep, state))
            yield Tokens(
                [first.first_token_id],
                [first.first_logprob] if state.sampling.logprobs else [],
                finish_reason=first.finish_reason,
            )
            if first.finish_reason:
                return
            assert state.handle_read is not None
            try:
                state.handle = await asyncio.shield(state.handle_read)
            except asyncio.CancelledError:
                raise  # the request ended: Generate's finally releases the entry once published
            except BaseException:
                state.handle_read = None  # the worker failed: there is no entry to release
                raise
            state.handle_read = None
            state.handle_sent_at = time.monotonic()
            state.decode_started = False
        assert state.handle is not None  # set by the prefill above, or kept from an earlier try
        ep = pick_decode(
            await self._eligible(Role.DECODE, state), kv_node=state.handle.node_id, exclude=state.failed | state.refused
        )
        block_size = ep.stats.block_size if ep.stats and ep.stats.block_size else 16
        ep.reserved_blocks += ceil_div(state.handle.num_tokens + 1, block_size)
        request = worker_pb2.DecodeRequest(
            request_id=state.request_id,
            prompt_token_ids=state.prompt,
            output_token_ids=state.outputs,
            sampling=state.sampling,
            kv=state.handle,
            cache_salt=state.cache_salt,
        )
        produced = 0
        try:
            assert ep.call is not None
            async for chunk in self._stream(ep, ep.call.open(request, state.time_left()), state, 0):
                if produced == 0:
                    state.kv_transfer_seconds = time.monotonic() - state.handle_sent_at
                    state.decode_started = True  # the worker has the KV: the entry is its business
                produced += len(chunk.token_ids)
                if chunk.finish_reason:  # its blocks go to that node's prefix tier
                    self.node_prefixes.offered(ep, state.prompt + state.outputs, state.cache_salt)
                yield chunk
        except grpc.aio.AioRpcError:
            if produced:  # the KV behind the handle no longer matches the tokens: re-prefill
                state.handle = None
            raise

    def _cached_tokens(self, prompt: PromptPrefix):
        """What KV-aware dispatch scores workers by; least-loaded scores none."""
        if self.prefill_policy is PrefillPolicy.KV_AWARE:
            return prompt.cached_tokens
        return lambda ep: 0

    async def _eligible(self, role: Role, state: _RequestState) -> list[Endpoint]:
        """The workers of `role` that may take work; if none, waits for one up to
        worker_wait_seconds (or the request's deadline)."""
        endpoints = self.registry.eligible(role)
        if not endpoints:
            wait = min(self.worker_wait_seconds, state.time_left() or self.worker_wait_seconds)
            await self.registry.wait_for({role}, wait)
            endpoints = self.registry.eligible(role)
        return endpoints

    async def _prefill(self, ep: Endpoint, state: _RequestState) -> worker_pb2.PrefillResponse:
        """Starts the prefill call (state.call) and returns its first message: the first token."""
        tokens = len(state.prompt) + len(state.outputs)
        ep.inflight_requests += 1
        ep.inflight_prompt_tokens += tokens
        state.call = ep.stub.Prefill(
            worker_pb2.PrefillRequest(
                request_id=state.request_id,
                token_ids=state.prompt,
                sampling=state.sampling,
                resumed_output_ids=state.outputs,
                cache_salt=state.cache_salt,
                prefix_source=state.prefix_source,
            ),
            timeout=state.time_left(),
        )
        try:
            return await self._read(ep, state, state.call)
        finally:
            ep.inflight_requests -= 1
            ep.inflight_prompt_tokens -= tokens

    async def _read_handle(self, ep: Endpoint, state: _RequestState) -> common_pb2.KvHandle:
        """The prefill call's second message: where the published KV is."""
        assert state.call is not None
        response = await self._read(ep, state, state.call)
        if not response.HasField("kv"):
            raise _unavailable(f"prefill worker {ep.address} sent no KV handle")
        return response.kv

    async def _read(self, ep: Endpoint, state: _RequestState, call) -> worker_pb2.PrefillResponse:
        try:
            response = await call.read()
            if response is grpc.aio.EOF:
                raise _unavailable(f"prefill worker {ep.address} ended the call early")
            return response
        except grpc.aio.AioRpcError as exc:
            self._note_failure(ep, state, exc)
            raise

    def _note_failure(self, ep: Endpoint, state: _RequestState, exc: grpc.aio.AioRpcError) -> None:
        if exc.code() in RETRYABLE:
            self.registry.mark_failed(ep)
            state.failed.add(ep.address)
        elif exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
            state.refused.add(ep.address)  # busy, not down: other requests still go there

    async def _release_when_published(self, handle_read: asyncio.Future) -> None:
        try:
            handle = await handle_read
        except Exception:
            return  # the worker failed or gave up: it released the entry, or never had one
        await self._release(handle)

    async def _stream(self, ep: Endpoint, call, state: _RequestState, prompt_tokens: int):
        """Relays a worker's stream of Tokens; cancels the call if the client goes away."""
        ep.inflight_requests += 1
        ep.inflight_prompt_tokens += prompt_tokens
        state.call = call
        try:
            async for chunk in call:
                if prompt_tokens:
                    ep.inflight_prompt_tokens -= prompt_tokens
                    prompt_tokens = 0
                state.outputs.extend(chunk.token_ids)
                yield chunk
                if chunk.finish_reason:
                    return
            raise _unavailable(f"{ep.role} worker {ep.address} ended the stream early")
        except grpc.aio.AioRpcError as exc:
            self._note_failure(ep, state, exc)
            raise
        finally:
            call.cancel()
            ep.inflight_requests -= 1
            ep.inflight_prompt_tokens -= prompt_tokens

    async def _release(self, handle: common_pb2.KvHandle) -> None:
        """Drops a KV entry no decode worker will pull (the request ended before decode)."""
        try:
            await self.kvstore.release(handle)
        except grpc.aio.AioRpcError as exc:
            log.debug("release of %s failed: %s", handle.kv_id, exc.details())

    # ---- other RPCs ---------------------------------------------------------------------------
    async def ListModels(self, request, context):
        return router_pb2.ListModelsResponse(
            models=[
                router_pb2.ModelInfo(
                    id=self.model_id, max_model_len=self.max_model_len, vocab_size=self.vocab_size, mode=self.mode
                )
            ]
        )

    async def ListWorkers(self, request, context):
        workers = []
        for ep in self.registry.endpoints.values():
            info = router_pb2.WorkerInfo(address=ep.address, role=ep.role, healthy=ep.eligible)
            if ep.stats is not None:
                info.stats.CopyFrom(ep.stats)
            workers.append(info)
        return router_pb2.ListWorkersResponse(workers=workers)

    async def drain(self) -> None:
        self.draining = True
        while self.requests:
            await asyncio.sleep(0.05)
        if self._stall_watch is not None:
            self._stall_watch.cancel()
        await self.registry.close()
        await self.kvstore.close()


def _until_stop(
    detok: IncrementalDetokenizer, stops: StopStrings, token_ids: list[int], final: bool, tokens_before: int
) -> tuple[str, int]:
    """The text of a chunk's tokens, stop strings matched token by token (a chunk may hold several
    when the client reads slower than they come); and how many of its tokens are output: up to the
    one that completed a stop string. No stop string is matched before sampling.min_tokens."""
    out = []
    for i, token in enumerate(token_ids):
        last = final and i == len(token_ids) - 1
        text = detok.add([token]) + (detok.flush() if last else "")
        out.append(stops.feed(text, last, tokens_before + i + 1))
        if stops.stopped:
            return "".join(out), i + 1
    return "".join(out), len(token_ids)


def _unavailable(details: str) -> grpc.aio.AioRpcError:
    """A worker that broke off is taken as down: the request fails over (RETRYABLE)."""
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


class Api(StrEnum):
    """Which door a request came in by (the `api` label of the request metrics)."""

    GRPC = "grpc"
    HTTP = "http"


@dataclass
class Generation:
    """One validated request, from either API: what RouterService.generate serves."""

    prompt: list[int]
    sampling: common_pb2.SamplingParams  # as the workers get it (no stop strings)
    request_id: str
    ttft_slo: float
    tpot_slo: float
    stop: tuple[str, ...] = ()  # matched here, on the output text (stop_strings.py)
    cache_salt: str = ""
    skip_special_tokens: bool = True
    api: Api = Api.GRPC
    deadline: float | None = None  # time.monotonic() by which the client wants the answer
    arrived: float = field(default_factory=time.monotonic)  # when the request reached the router


class _RequestState:
    def __init__(
        self, prompt: list[int], sampling: common_pb2.SamplingParams, request_id: str, deadline: float | None
    ) -> None:
        self.prompt = prompt
        self.sampling = sampling
        self.request_id = request_id
        self.deadline = deadline  # time.monotonic() by which the client wants the answer; None: no limit
        self.cache_salt = ""
        self.prefix_source: worker_pb2.PrefixSource | None = None  # another node's prefix tier to fetch from
        self.task = asyncio.current_task()  # the Generate handler's
        self.write_started = 0.0  # when the message being written to the client was handed over; 0: none
        self.stalled = False  # cancelled because the client read nothing for client_stall_seconds
        self.outputs: list[int] = []
        self.handle: common_pb2.KvHandle | None = None
        self.handle_sent_at = 0.0
        self.decode_started = False  # a decode worker streamed a token from the current handle
        self.call = None  # the worker call in progress, cancelled when the request ends
        # reading the prefill call's KV handle, after the first token came: a task of its own
        self.handle_read: asyncio.Future[common_pb2.KvHandle] | None = None
        self.failed: set[str] = set()
        self.refused: set[str] = set()  # workers that refused it for load (cleared when it retries them)
        self.waiting_since = 0.0  # since when it waits for room at an overloaded worker (tokens already sent)
        self.retries = 0
        self.queue_seconds = 0.0  # in the workers' queues (prefill, or colocated) before compute
        self.prefill_seconds = 0.0
        self.kv_transfer_seconds = 0.0

    def time_left(self) -> float | None:
        """The timeout for a worker call: what is left of the client's deadline."""
        return None if self.deadline is None else max(self.deadline - time.monotonic(), 0.001)

    def router_seconds(self, ttft: float) -> float:
        """What the router and its calls added to TTFT (0 when no worker reported its prefill)."""
        return max(0.0, ttft - self.queue_seconds - self.prefill_seconds) if self.prefill_seconds else 0.0
