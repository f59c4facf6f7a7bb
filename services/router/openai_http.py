"""The OpenAI-compatible HTTP API: the router's second door, for the clients, benchmarks and
frameworks that speak OpenAI's API (docs/api.md).

Served by aiohttp on its own port (--http-port) in the router's process and event loop: a request
is checked (openai_params.py), its prompt tokenized or its messages rendered with the checkpoint's
chat template, and each of its choices served by RouterService.generate exactly as a gRPC request
is, counted in the same metrics under api="http". Streams are server-sent events, `data: [DONE]`
last. A client that disconnects cancels its handler (aiohttp's handler cancellation), which cancels
the worker calls and frees the request's KV. Errors are OpenAI's error JSON with the HTTP status a
client expects: 400 naming the parameter, 401, 404 for an unknown model or path, 413 for a body or
prompt too large, 429 when the cluster sheds load (Retry-After), 503 with no worker ready.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import ssl
import time
import uuid
from collections.abc import Callable

import grpc
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CollectorRegistry, Counter

from pdserve.v1 import router_pb2
from services.common import validation
from services.common.errors import PastContextError, ServiceError
from services.common.server import api_key_refusal
from services.common.tls import Reloading, TlsFiles

from .openai_params import ApiError, OpenAiRequest, parse
from .server import Api, Generation, RouterService

log = logging.getLogger(__name__)

_STATUS_OF = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


def api_error(exc: ServiceError) -> ApiError:
    """A ServiceError as the HTTP API answers it; a bad field's gRPC path ("sampling.top_p: ...")
    becomes OpenAI's parameter name ("top_p")."""
    status, kind = _STATUS_OF.get(exc.code, (500, "server_error"))
    param, code = None, None
    if exc.code is grpc.StatusCode.INVALID_ARGUMENT:
        field, sep, _ = exc.message.partition(":")
        if sep and " " not in field:
            param = field.removeprefix("sampling.")
        if isinstance(exc, PastContextError):
            status, code = 413, "context_length_exceeded"
    headers = {"Retry-After": str(math.ceil(exc.retry_after_seconds))} if exc.retry_after_seconds else {}
    return ApiError(status, exc.message, param, type=kind, code=code, headers=headers)


async def _follow_certificate(certificate: Reloading[None], interval: float = 2.0) -> None:
    """A renewed certificate (its files rewritten, as cert-manager or `pdserve up` renew them) is
    served from the next connection on, as on the gRPC port (common/tls.py): no restart."""
    while True:
        await asyncio.sleep(interval)
        certificate.get()


def _json(status: int, body: dict, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(body), content_type="application/json", headers=headers)


class OpenAiServer:
    def __init__(
        self,
        service: RouterService,
        *,
        model_name: str,
        api_keys: frozenset[str] = frozenset(),
        not_serving_reason: Callable[[], str] = lambda: "",
        max_body_bytes: int = 0,
        registry: CollectorRegistry | None = None,
    ):
        self.service = service
        self.model_name = model_name
        self.api_keys = [key.encode() for key in api_keys]
        self.not_serving_reason = not_serving_reason
        # Room for a prompt as long as the context, as JSON-escaped text or token ids, and the rest
        # of the body; bodies are parsed on the event loop, so the bound is also the loop's protection.
        self.max_body_bytes = max_body_bytes or (1 << 20) + 64 * service.max_model_len
        self.created = int(time.time())
        self.responses = Counter(
            "pdserve_http_responses_total",
            "Responses of the OpenAI-compatible HTTP API, by path and status.",
            ["path", "status"],
            registry=registry,
        )
        self._runner: web.AppRunner | None = None
        self._reloader: asyncio.Task | None = None
        self.bound_port = 0

    # ---- serving ------------------------------------------------------------------------------
    def application(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes, middlewares=[self._errors])
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.model)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        return app

    async def start(self, host: str, port: int, *, tls: TlsFiles | None = None, reuse_port: bool = False) -> int:
        """Serves on host:port (TLS with the router's certificate when given); returns the port."""
        context = None
        if tls is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            # aiohttp keeps this context: a renewal is loaded into it
            certificate = Reloading(tls, lambda files: context.load_cert_chain(files.cert, files.key), interval=0.0)
            self._reloader = asyncio.create_task(_follow_certificate(certificate))
        # handler_cancellation: a client that goes away cancels its handler, and so its request
        self._runner = web.AppRunner(self.application(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host or None, port, ssl_context=context, reuse_port=reuse_port or None)
        await site.start()
        self.bound_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("router serving the OpenAI-compatible HTTP API on %s:%d", host, self.bound_port)
        return self.bound_port

    async def stop(self) -> None:
        if self._reloader is not None:
            self._reloader.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        """Authentication, and every failure as OpenAI's error JSON (never aiohttp's HTML pages)."""
        path = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
        try:
            if self.api_keys and request.path != "/health":
                header = request.headers.get("Authorization")  # (its bytes as aiohttp decoded them)
                presented = None if header is None else header.encode("utf-8", "surrogateescape")
                refusal = api_key_refusal(presented, self.api_keys, "header")
                if refusal:
                    raise ApiError(401, refusal, type="authentication_error", code="invalid_api_key")
            response = await handler(request)
        except ApiError as exc:
            response = _json(exc.status, exc.body(), exc.headers)
        except ServiceError as exc:
            error = api_error(exc)
            response = _json(error.status, error.body(), error.headers)
        except web.HTTPException as exc:  # no such path, method, a body past client_max_size
            code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
            message = f"{request.method} {request.path}: {exc.reason}"
            if exc.status == 413:
                message = f"the request body is larger than {self.max_body_bytes} bytes"
            response = _json(exc.status, ApiError(exc.status, message, code=code).body())
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:
            log.exception("HTTP %s %s failed", request.method, request.path)
            response = _json(500, ApiError(500, f"internal error: {exc!r}", type="server_error").body())
        self.responses.labels(path, str(response.status)).inc()
        return response

    # ---- endpoints ----------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        reason = "router is shutting down" if self.service.draining else self.not_serving_reason()
        if reason:
            raise ApiError(503, reason, type="service_unavailable")
        return web.Response(status=200)

    def _model_card(self) -> dict:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "pdserve",
            "max_model_len": self.service.max_model_len,
        }

    async def models(self, request: web.Request) -> web.Response:
        return _json(200, {"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        self._check_model(request.match_info["model"])
        return _json(200, self._model_card())

    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise ApiError(404, f"The model `{model}` does not exist.", "model", code="model_not_found")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        arrived = time.monotonic()  # TTFT counts reading, parsing, rendering and tokenizing too
        self.service.check_open()
        try:
            raw = await request.read()
        except (HttpProcessingError, RequestPayloadError) as exc:  # a body aiohttp cannot frame or decode
            raise ApiError(400, f"the request body cannot be read: {exc}".strip()) from None
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, or nested past the parser's depth
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
        req = parse(data, chat=chat)
        self._check_model(req.model)
        prompts = await self._prompt_ids(req)
        reply_id = validation.request_id("request_id", req.request_id) or uuid.uuid4().hex
        choices = len(prompts) * req.n
        if choices > 1 and len(reply_id) > validation.MAX_REQUEST_ID_CHARS - len(f"-{choices - 1}"):
            raise ApiError(400, "request_id: too long to number the choices (request_id-<index>)", "request_id")
        generations = self._generations(req, prompts, reply_id, arrived)
        reply = _Reply(req, self.model_name, generations, request, reply_id)
        return await reply.serve(self.service)

    async def _prompt_ids(self, req: OpenAiRequest) -> list[list[int]]:
        service = self.service
        if req.chat:
            try:
                text = service.tokenizer.apply_chat_template(
                    req.messages,
                    tokenize=False,
                    add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
                    continue_final_message=req.continue_final_message,
                )
            except Exception as exc:  # no template, or the template refused these messages
                raise ApiError(400, f"messages: the chat template cannot render them: {exc}", "messages") from None
            # the template writes the special tokens the model expects; the tokenizer adds none
            return [await service.prompt_from_text("messages", text, add_special_tokens=False)]
        return [
            await service.prompt_from_text("prompt", p, add_special_tokens=req.add_special_tokens)
            if isinstance(p, str)
            else service.prompt_from_ids("prompt", p)
            for p in req.prompts
        ]

    def _generations(
        self, req: OpenAiRequest, prompts: list[list[int]], base_id: str, arrived: float
    ) -> list[Generation]:
        """One per choice: each prompt n times."""
        service = self.service
        ttft_slo, tpot_slo = service.slo_targets(req.slo_ttft_seconds, req.slo_tpot_seconds, field="slo_")
        requested = req.sampling
        generations: list[Generation] = []
        for prompt in prompts:
            for j in range(req.n):
                sampling, stop = service.sampling_for(requested, len(prompt), req.logprobs)
                if j and requested.HasField("seed"):  # each choice its own draws, all reproducible
                    sampling.seed = (requested.seed + j) % (1 << 64)
                index = len(generations)
                generations.append(
                    Generation(
                        prompt,
                        sampling,
                        base_id if len(prompts) * req.n == 1 else f"{base_id}-{index}",
                        ttft_slo,
                        tpot_slo,
                        stop=stop,
                        cache_salt=req.cache_salt,
                        skip_special_tokens=req.skip_special_tokens,
                        api=Api.HTTP,
                        arrived=arrived,
                    )
                )
        return generations


class _Choice:
    def __init__(self) -> None:
        # gathered for the whole answer (not streamed)
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        # streamed: whether its first chunk went out, and the characters sent (logprobs.text_offset)
        self.started = False
        self.sent_chars = 0
        self.finish_reason: str | None = None
        self.usage = router_pb2.Usage()


class _Reply:
    """One request's answer: its choices' messages as server-sent events, or gathered into one JSON."""

    def __init__(
        self, req: OpenAiRequest, model: str, generations: list[Generation], request: web.Request, reply_id: str
    ):
        self.req = req
        self.model = model
        self.generations = generations
        self.request = request
        self.chat = req.chat
        self.id = ("chatcmpl-" if req.chat else "cmpl-") + reply_id
        self.created = int(time.time())
        self.choices = [_Choice() for _ in generations]
        self.stream: web.StreamResponse | None = None
        self.tokenizer = None
        head = json.dumps({"id": self.id, "object": self._object(chunk=True), "created": self.created, "model": model})
        self._head = "data: " + head[:-1] + ',"choices":['  # each chunk: this, then its choice

    def _object(self, chunk: bool) -> str:
        if self.chat:
            return "chat.completion.chunk" if chunk else "chat.completion"
        return "text_completion"

    async def serve(self, service: RouterService) -> web.StreamResponse:
        self.tokenizer = service.tokenizer
        try:
            if len(self.generations) == 1:  # (the common case: no task per choice)
                await service.generate(self.generations[0], functools.partial(self._write, 0))
            else:
                try:
                    async with asyncio.TaskGroup() as group:
                        for index, generation in enumerate(self.generations):
                            group.create_task(service.generate(generation, functools.partial(self._write, index)))
                except ExceptionGroup as failed:  # the first failure cancelled the other choices
                    raise failed.exceptions[0] from None
        except ConnectionError:  # the client went away while a message was being written
            return self.stream or web.Response(status=499)
        except ServiceError as exc:
            if self.stream is None:
                raise
            if exc.code is grpc.StatusCode.CANCELLED:  # it stopped reading: writing more would wait forever
                if self.request.transport is not None:
                    self.request.transport.close()
            else:
                await self._send_error(api_error(exc))  # the stream began: the error is its last event
            return self.stream
        if self.stream is None:
            return _json(200, self._whole())
        try:
            if self.req.include_usage:
                usage = {"id": self.id, "object": self._object(chunk=True), "created": self.created}
                usage["model"] = self.model
                await self.stream.write(_event({**usage, "choices": [], "usage": self._usage()}))
            await self.stream.write(b"data: [DONE]\n\n")
            await self.stream.write_eof()
        except ConnectionError:
            pass  # the client left after its last token
        return self.stream

    async def _write(self, index: int, response: router_pb2.GenerateResponse) -> None:
        choice = self.choices[index]
        if response.finish_reason:
            choice.finish_reason = response.finish_reason
            choice.usage = response.usage
        if not self.req.stream:
            choice.text.append(response.text)
            choice.token_ids.extend(response.token_ids)
            choice.logprobs.extend(response.logprobs)
            return
        if self.stream is None:
            self.stream = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await self.stream.prepare(self.request)
        first, choice.started = not choice.started, True
        if not first and not response.finish_reason and not response.logprobs:
            # the per-token path: one string to format, no dict to build. A message whose text is
            # held back (a partial character, a stop string's start) still goes out, as vLLM's do:
            # its tokens were generated, and the client sees the stream is alive.
            body = (
                f'{{"index":{index},"delta":{{"content":{json.dumps(response.text)}}},"logprobs":null,"finish_reason":null}}'
                if self.chat
                else f'{{"index":{index},"text":{json.dumps(response.text)},"logprobs":null,"finish_reason":null}}'
            )
            choice.sent_chars += len(response.text)
            await self.stream.write(f"{self._head}{body}]}}\n\n".encode())
            return
        if self.chat:
            delta = {"role": "assistant", "content": response.text} if first else {"content": response.text}
            entry = {"index": index, "delta": delta}
        else:
            entry = {"index": index, "text": response.text}
        entry["logprobs"] = self._logprobs(response.token_ids, response.logprobs, choice.sent_chars)
        entry["finish_reason"] = response.finish_reason or None
        choice.sent_chars += len(response.text)
        await self.stream.write(f"{self._head}{json.dumps(entry)}]}}\n\n".encode())

    async def _send_error(self, error: ApiError) -> None:
        assert self.stream is not None
        try:
            await asyncio.wait_for(self.stream.write(_event(error.body())), timeout=1.0)
            await asyncio.wait_for(self.stream.write(b"data: [DONE]\n\n"), timeout=1.0)
        except (TimeoutError, ConnectionError):
            pass  # the client is gone or reads nothing

    def _logprobs(self, token_ids, logprobs, text_offset: int) -> dict | None:
        """OpenAI's logprobs object for these tokens: per token, its text and logprob (and, for
        completions, where its text starts in the choice's text: from `text_offset`, the characters
        sent before them)."""
        if not self.req.logprobs:
            return None
        assert self.tokenizer is not None
        if self.req.return_tokens_as_token_ids:
            pieces = [f"token_id:{t}" for t in token_ids]
        else:
            pieces = [self.tokenizer.decode([t], skip_special_tokens=False) for t in token_ids]
        if self.chat:
            content = [
                {"token": p, "logprob": lp, "bytes": list(p.encode("utf-8", "replace")), "top_logprobs": []}
                for p, lp in zip(pieces, logprobs)
            ]
            return {"content": content, "refusal": None}
        offsets, at = [], text_offset
        for p in pieces:
            offsets.append(at)
            at += len(p)
        return {"tokens": pieces, "token_logprobs": list(logprobs), "top_logprobs": None, "text_offset": offsets}

    def _usage(self) -> dict:
        prompt = sum(c.usage.prompt_tokens for i, c in enumerate(self.choices) if i % self.req.n == 0)
        completion = sum(c.usage.completion_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _whole(self) -> dict:
        choices = []
        for index, c in enumerate(self.choices):
            text = "".join(c.text)
            entry: dict = {"index": index}
            if self.chat:
                entry["message"] = {"role": "assistant", "content": text}
            else:
                entry["text"] = text
            entry["logprobs"] = self._logprobs(c.token_ids, c.logprobs, 0)
            entry["finish_reason"] = c.finish_reason
            choices.append(entry)
        return {
            "id": self.id,
            "object": self._object(chunk=False),
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self._usage(),
            "system_fingerprint": None,
        }


def _event(body: dict) -> bytes:
    return f"data: {json.dumps(body)}\n\n".encode()
