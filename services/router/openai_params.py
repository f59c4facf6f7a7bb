"""The OpenAI-compatible API's request bodies, checked and turned into what the router serves.

Pure: a parsed JSON body in, an `OpenAiRequest` out, or an `ApiError` (HTTP status, OpenAI's error
JSON) naming the parameter at fault. Fields follow OpenAI's API reference: its fields are accepted
with OpenAI's ranges; fields pdserve cannot honour are accepted only at their neutral value (a
`frequency_penalty` of 0, no `tools`), anything else in them is a 400 saying so; a field OpenAI does
not know is a 400 too ("Unrecognized request argument supplied"), except the extras pdserve takes
as vLLM does (`top_k`, `ignore_eos`, `stop_token_ids`, `min_tokens`, ...) and its own SLO targets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pdserve.v1 import common_pb2
from services.common.validation import MAX_CACHE_SALT_CHARS, MAX_REQUEST_ID_CHARS

MAX_CHOICES = 128  # prompts x n in one request (OpenAI's limit on n)
MAX_TOKENS_LIMIT = (1 << 31) - 1
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An error answered in OpenAI's format: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, problem: str) -> ApiError:
    return ApiError(400, f"{param}: {problem}", param)


@dataclass
class OpenAiRequest:
    """A checked completions or chat request: `prompts` (text or token ids; for chat, filled in once
    the messages are rendered), each served `n` times."""

    chat: bool
    model: str | None
    prompts: list[str | list[int]]
    messages: list[dict[str, str]]
    sampling: common_pb2.SamplingParams
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:<id>" (vLLM's extra)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    skip_special_tokens: bool = True
    cache_salt: str = ""
    request_id: str = ""
    slo_ttft_seconds: float | None = None
    slo_tpot_seconds: float | None = None


# Each endpoint's fields: OpenAI's, then the extras pdserve takes.
_COMMON = {
    "model", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n", "presence_penalty", "seed",
    "stop", "stream", "stream_options", "temperature", "top_p", "user",
    "top_k", "ignore_eos", "stop_token_ids", "min_tokens", "skip_special_tokens", "cache_salt", "request_id",
    "slo_ttft_seconds", "slo_tpot_seconds", "return_tokens_as_token_ids",
}  # fmt: skip
COMPLETION_FIELDS = _COMMON | {"prompt", "best_of", "echo", "suffix", "add_special_tokens"}
CHAT_FIELDS = _COMMON | {
    "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
    "parallel_tool_calls", "functions", "function_call", "store", "metadata", "service_tier", "modalities",
    "add_generation_prompt", "continue_final_message",
}  # fmt: skip


class _Body:
    """Typed reads of a JSON object's fields; JSON null reads as absent (as OpenAI takes it)."""

    def __init__(self, data: Any, known: set[str]):
        if not isinstance(data, dict):
            raise ApiError(400, f"the request body must be a JSON object, got {_json_type(data)}")
        unknown = sorted(set(data) - known)
        if unknown:
            raise ApiError(400, f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
        for name, value in data.items():
            if not _encodable(value):  # JSON's \ud800 escapes decode to text no tokenizer takes
                raise bad(name, "holds a lone surrogate (\\ud800-\\udfff): not valid Unicode text")
        self.data = data

    def get(self, name: str) -> Any:
        return self.data.get(name)

    def integer(self, name: str, default: int | None, lo: int, hi: int) -> int | None:
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise bad(name, f"must be an integer, got {_json_type(value)}")
        if not lo <= value <= hi:
            raise bad(name, f"must be in [{lo}, {hi}], got {value}")
        return value

    def number(self, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
        value = self.data.get(name)
        if value is None:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise bad(name, f"must be a number, got {_json_type(value)}")
        if not math.isfinite(value) or not (lo < value if lo_open else lo <= value) or value > hi:
            raise bad(name, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value}")
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.data.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise bad(name, f"must be a boolean, got {_json_type(value)}")
        return value

    def string(self, name: str, max_chars: int) -> str:
        value = self.data.get(name)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise bad(name, f"must be a string, got {_json_type(value)}")
        if len(value) > max_chars:
            raise bad(name, f"{len(value)} characters, at most {max_chars} allowed")
        return value

    def neutral(self, name: str, is_neutral: Callable[[Any], bool], why: str) -> None:
        """A field pdserve cannot honour: taken only at a value that asks for nothing."""
        value = self.data.get(name)
        if value is not None and not is_neutral(value):
            raise bad(name, why)


def _encodable(value: Any) -> bool:
    """Every string in `value` is valid Unicode (encodes to UTF-8). Iterative: JSON nests deep."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item)
            pending.extend(item.values())
    return True


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array"}.get(
        type(value), "an object"
    )


def _token_list(name: str, value: Any) -> list[int]:
    if not value:
        raise bad(name, "must not be empty")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise bad(name, "must be a string, an array of strings, or an array of token ids (integers)")
    if any(not 0 <= t < 1 << 32 for t in value):
        raise bad(name, "token ids must be in [0, 2^32)")
    return value


def _prompts(value: Any) -> list[str | list[int]]:
    """OpenAI's `prompt`: a string, an array of strings, an array of token ids, or an array of those."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise bad("prompt", "must be a string, an array of strings, or an array of token ids, and not empty")
    if all(isinstance(p, str) for p in value):
        return list(value)
    if all(isinstance(p, list) for p in value):
        return [_token_list("prompt", p) for p in value]
    return [_token_list("prompt", value)]


def _stop(body: _Body) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "must be a string or an array of strings")
    return stops  # (how many, how long: validation.sampling, as for gRPC)


def _messages(value: Any) -> list[dict[str, str]]:
    """Chat messages, their content as text (text parts joined by newlines, as vLLM does)."""
    if not isinstance(value, list) or not value:
        raise bad("messages", "must be a non-empty array of messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(where, f"must be an object, got {_json_type(message)}")
        unknown = sorted(set(message) - {"role", "content", "name", "tool_call_id", "tool_calls", "refusal"})
        if unknown:
            raise bad(f"{where}.{unknown[0]}", "unrecognized message field")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise bad(f"{where}.role", f"must be one of {', '.join(CHAT_ROLES)}, got {role!r}")
        if message.get("tool_calls"):
            raise bad(f"{where}.tool_calls", "tool calls are not supported")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"{where}.content[{j}]", 'only text parts ({"type": "text", "text": ...}) are supported')
                texts.append(part["text"])
            content = "\n".join(texts)
        elif content is None and role == "assistant":
            content = ""
        elif not isinstance(content, str):
            raise bad(f"{where}.content", f"must be a string or an array of text parts, got {_json_type(content)}")
        rendered = {"role": role, "content": content}
        if isinstance(message.get("name"), str):
            rendered["name"] = message["name"]
        messages.append(rendered)
    return messages


def parse(data: Any, *, chat: bool) -> OpenAiRequest:
    """A `/v1/completions` (chat false) or `/v1/chat/completions` body, checked."""
    body = _Body(data, CHAT_FIELDS if chat else COMPLETION_FIELDS)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"must be a string, got {_json_type(model)}")
    if chat:
        messages, prompts = _messages(body.get("messages")), []
    else:
        if body.get("prompt") is None:
            raise bad("prompt", "is required")
        messages, prompts = [], _prompts(body.get("prompt"))

    n = body.integer("n", 1, 1, MAX_CHOICES)
    assert n is not None
    if len(prompts or [0]) * n > MAX_CHOICES:
        raise bad("n", f"{len(prompts)} prompts x n = {len(prompts) * n} choices, at most {MAX_CHOICES} allowed")
    stream = body.boolean("stream", False)
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise bad("stream_options", "is only allowed when stream is true")
        if not isinstance(options, dict) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise bad("stream_options", 'must be an object like {"include_usage": true}')
        include_usage = _Body(options, {"include_usage", "continuous_usage_stats"}).boolean("include_usage", False)

    sampling = common_pb2.SamplingParams()
    max_tokens = body.integer("max_tokens", None, 1, MAX_TOKENS_LIMIT)
    if chat:
        max_tokens = body.integer("max_completion_tokens", max_tokens, 1, MAX_TOKENS_LIMIT)
    sampling.max_tokens = max_tokens or 0  # 0: the router's --default-max-tokens
    temperature = body.number("temperature", 0, 2)
    if temperature is not None:
        sampling.temperature = temperature
    sampling.top_p = body.number("top_p", 0, 1, lo_open=True) or 0.0
    top_k = body.integer("top_k", 0, -1, MAX_TOKENS_LIMIT)
    sampling.top_k = max(top_k or 0, 0)  # vLLM's -1: off, as 0
    seed = body.integer("seed", None, -(1 << 63), (1 << 64) - 1)
    if seed is not None:
        sampling.seed = seed % (1 << 64)
    sampling.ignore_eos = body.boolean("ignore_eos", False)
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list):
            raise bad("stop_token_ids", f"must be an array of token ids, got {_json_type(stop_ids)}")
        sampling.stop_token_ids.extend(_token_list("stop_token_ids", stop_ids) if stop_ids else [])
    sampling.stop.extend(_stop(body))
    sampling.min_tokens = body.integer("min_tokens", 0, 0, MAX_TOKENS_LIMIT) or 0  # (<= max_tokens: validation)

    if chat:
        logprobs = body.boolean("logprobs", False)
        top = body.integer("top_logprobs", 0, 0, 20)
        if top and not logprobs:
            raise bad("top_logprobs", "requires logprobs to be true")
        if top:
            raise bad("top_logprobs", "must be 0: pdserve returns the chosen tokens' logprobs, not alternatives")
    else:
        top = body.integer("logprobs", None, 0, 5)
        if top:
            raise bad("logprobs", "must be 0 or null: pdserve returns the chosen tokens' logprobs, not alternatives")
        logprobs = top is not None

    def zero(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and value == 0

    body.neutral("frequency_penalty", zero, "only 0 is supported (no repetition penalties)")
    body.neutral("presence_penalty", zero, "only 0 is supported (no repetition penalties)")
    body.neutral("logit_bias", lambda v: v == {}, "is not supported")
    if body.get("user") is not None:
        body.string("user", 1 << 10)
    if chat:
        body.neutral("tools", lambda v: v == [], "tool calling is not supported")
        body.neutral("functions", lambda v: v == [], "function calling is not supported")
        body.neutral("tool_choice", lambda v: v in ("none", "auto"), "tool calling is not supported")
        body.neutral("function_call", lambda v: v in ("none", "auto"), "function calling is not supported")
        body.neutral("response_format", lambda v: v == {"type": "text"}, 'only {"type": "text"} is supported')
        body.neutral("modalities", lambda v: v == ["text"], 'only ["text"] is supported')
        body.boolean("parallel_tool_calls", True)
        body.neutral("store", lambda v: v is False, "storing completions is not supported")
        body.neutral("metadata", lambda v: isinstance(v, dict), "must be an object")
        body.neutral("service_tier", lambda v: v in ("auto", "default"), 'only "auto" and "default" are served')
    else:
        body.neutral("best_of", lambda v: v == n, "must equal n (pdserve returns every choice it samples)")
        body.neutral("echo", lambda v: v is False, "echoing the prompt is not supported")
        body.neutral("suffix", lambda v: v == "", "suffixes (insertion) are not supported")

    return OpenAiRequest(
        chat=chat,
        model=model,
        prompts=prompts,
        messages=messages,
        sampling=sampling,
        n=n,
        stream=stream,
        include_usage=include_usage,
        logprobs=logprobs,
        return_tokens_as_token_ids=body.boolean("return_tokens_as_token_ids", False),
        add_special_tokens=body.boolean("add_special_tokens", True),
        add_generation_prompt=body.boolean("add_generation_prompt", True),
        continue_final_message=body.boolean("continue_final_message", False),
        skip_special_tokens=body.boolean("skip_special_tokens", True),
        cache_salt=body.string("cache_salt", MAX_CACHE_SALT_CHARS),
        request_id=body.string("request_id", MAX_REQUEST_ID_CHARS),
        slo_ttft_seconds=body.number("slo_ttft_seconds", 0, math.inf, lo_open=True),
        slo_tpot_seconds=body.number("slo_tpot_seconds", 0, math.inf, lo_open=True),
    )
