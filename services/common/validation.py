"""Request validation, for the router (the public API) and every worker (the internal one): one
function per kind of field, one message per field. A bad value raises ServiceError
INVALID_ARGUMENT whose message starts with the field's path ("sampling.top_p: ...").

Workers check what they are sent even though the router checked it first: they are reachable by
anything on the cluster network, and a bad token id must not reach an embedding lookup.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from pdserve.v1 import common_pb2

from .errors import PastContextError, invalid

MAX_TEMPERATURE = 100.0
MAX_REQUEST_ID_CHARS = 128
MAX_CACHE_SALT_CHARS = 256
MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int
    max_model_len: int


def request_id(field: str, value: str) -> str:
    """At most MAX_REQUEST_ID_CHARS printable ASCII characters: it is echoed in every streamed
    message, becomes part of KV entry ids and is logged (no control characters in logs)."""
    if len(value) > MAX_REQUEST_ID_CHARS:
        raise invalid(field, f"{len(value)} characters, at most {MAX_REQUEST_ID_CHARS} allowed")
    bad = next((c for c in value if not " " <= c <= "~"), None)
    if bad is not None:
        raise invalid(field, f"character {bad!r} is not printable ASCII")
    return value


def cache_salt(field: str, value: str) -> str:
    if len(value) > MAX_CACHE_SALT_CHARS:
        raise invalid(field, f"{len(value)} characters, at most {MAX_CACHE_SALT_CHARS} allowed")
    return value


def token_ids(field: str, ids: Sequence[int], limits: ModelLimits) -> list[int]:
    """At least one token, every one inside the vocabulary."""
    tokens = list(ids)
    if not tokens:
        raise invalid(field, "must contain at least one token")
    bad = next((t for t in tokens if not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        raise invalid(field, f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})")
    return tokens


def context(field: str, num_tokens: int, limits: ModelLimits) -> None:
    """`num_tokens` leave room for at least one more under max_model_len."""
    if num_tokens >= limits.max_model_len:
        raise PastContextError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field}: {num_tokens} tokens leave no room under max_model_len {limits.max_model_len}",
        )


def sampling(sp: common_pb2.SamplingParams, limits: ModelLimits) -> None:
    if sp.HasField("temperature") and not 0 <= sp.temperature <= MAX_TEMPERATURE:  # NaN fails too
        raise invalid("sampling.temperature", f"must be in [0, {MAX_TEMPERATURE:g}], got {sp.temperature}")
    if not 0 <= sp.top_p <= 1:
        raise invalid("sampling.top_p", f"must be in (0, 1] (0: unset, meaning 1), got {sp.top_p}")
    if sp.top_k < 0:
        raise invalid("sampling.top_k", f"must be >= 0, got {sp.top_k}")
    bad = next((t for t in sp.stop_token_ids if t >= limits.vocab_size), None)
    if bad is not None:
        raise invalid("sampling.stop_token_ids", f"token id {bad} is outside the vocabulary [0, {limits.vocab_size})")
    if sp.max_tokens and sp.min_tokens > sp.max_tokens:
        raise invalid("sampling.min_tokens", f"must be at most max_tokens ({sp.max_tokens}), got {sp.min_tokens}")
    if len(sp.stop) > MAX_STOP_STRINGS:
        raise invalid("sampling.stop", f"{len(sp.stop)} stop strings, at most {MAX_STOP_STRINGS} allowed")
    for stop in sp.stop:
        if not 0 < len(stop) <= MAX_STOP_CHARS:
            raise invalid("sampling.stop", f"a stop string has {len(stop)} characters; 1 to {MAX_STOP_CHARS} allowed")


def positive_seconds(field: str, value: float | None) -> None:
    """An optional duration: unset, or > 0 (infinity: no limit; NaN is refused)."""
    if value is not None and not value > 0:
        raise invalid(field, f"must be > 0, got {value}")


def generation(
    limits: ModelLimits,
    prompt_field: str,
    prompt_ids: Sequence[int],
    output_field: str,
    output_ids: Sequence[int],
    sp: common_pb2.SamplingParams,
    *,
    max_tokens: int,
    need_output: bool = False,
) -> tuple[list[int], list[int]]:
    """A prompt, the tokens generated for it so far (a resumed or already-started request), and its
    sampling, checked together: the generated tokens count against max_model_len and max_tokens."""
    prompt = token_ids(prompt_field, prompt_ids, limits)
    outputs = list(output_ids)
    context(prompt_field, len(prompt) + len(outputs), limits)
    if need_output and not outputs:
        raise invalid(output_field, "must hold at least the prefill's first token")
    if outputs:
        token_ids(output_field, outputs, limits)
    sampling(sp, limits)
    if len(outputs) >= max_tokens:
        raise invalid(output_field, f"already {len(outputs)} tokens: as long as sampling.max_tokens ({max_tokens})")
    return prompt, outputs
