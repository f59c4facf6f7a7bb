"""Dispatch policies. Pure functions of the registry's endpoints, so they are unit-tested alone.

- prefill: least estimated time to the first token. A prefill worker runs one batch at a time, so
  the wait of a new prompt is roughly the prompt tokens ahead of it times the worker's recent
  seconds/token; KV-aware (the default), its own compute is the prompt's tokens less those of its
  longest prefix that the worker has cached (its PrefixIndex), at one rate for all candidates (the
  fastest's): each worker's rate comes from its recent batches and is noisy for short prompts, so
  comparing uncached tokens at different rates would let that noise outweigh a cached prefix.
  Least-loaded leaves that out: the queue alone decides.
- decode: most free KV blocks (less those promised to requests waiting there, whichever router sent
  them, and what this router has just sent there), then the smaller
  running batch; a worker on the KV's own node wins ties, since its pull is a local copy.
- colocated: least outstanding work: prompt tokens not yet prefilled plus requests in flight (a
  new prompt waits behind the queued prompts, prefill first, then shares the decode batch), and
  KV-aware, the prompt's own tokens not cached there. The planner's simulator dispatches the same
  way (ColocatedInstance.load).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Set as AbstractSet
from enum import StrEnum

from .registry import Endpoint


class PrefillPolicy(StrEnum):
    """How prompts go to prefill (and colocated) workers."""

    KV_AWARE = "kv-aware"
    LEAST_LOADED = "least-loaded"


def _no_cache(ep: Endpoint) -> int:
    return 0


class NoWorkerError(RuntimeError):
    pass


def estimated_prefill_delay(ep: Endpoint) -> float:
    stats = ep.stats
    queued = max(ep.inflight_prompt_tokens, stats.queued_prompt_tokens if stats else 0)
    return queued * seconds_per_prefill_token(ep)


def seconds_per_prefill_token(ep: Endpoint) -> float:
    stats = ep.stats
    return stats.prefill_seconds_per_token if stats and stats.prefill_seconds_per_token > 0 else 1e-4


def pick_prefill(
    endpoints: list[Endpoint],
    exclude: AbstractSet[str] = frozenset(),
    prompt_tokens: int = 0,
    cached_tokens: Callable[[Endpoint], int] = _no_cache,
) -> Endpoint:
    """`cached_tokens(ep)`: the prompt's tokens whose K/V worker `ep` holds (KV-aware dispatch)."""
    candidates = [ep for ep in endpoints if ep.address not in exclude] or endpoints
    if not candidates:
        raise NoWorkerError("no healthy prefill worker")

    rate = min(seconds_per_prefill_token(ep) for ep in candidates)

    def key(ep: Endpoint):
        compute = (prompt_tokens - cached_tokens(ep)) * rate
        return (estimated_prefill_delay(ep) + compute, ep.inflight_requests, ep.address)

    return min(candidates, key=key)


def free_blocks_after_dispatch(ep: Endpoint) -> int:
    """The worker's free blocks less those promised to requests waiting there (from any router) and
    those this router sent since its last poll."""
    stats = ep.stats
    return (stats.kv_blocks_free - stats.kv_blocks_promised if stats else 0) - ep.reserved_blocks


def pick_decode(endpoints: list[Endpoint], kv_node: str = "", exclude: AbstractSet[str] = frozenset()) -> Endpoint:
    candidates = [ep for ep in endpoints if ep.address not in exclude] or endpoints
    if not candidates:
        raise NoWorkerError("no healthy decode worker")

    def key(ep: Endpoint):
        running = (ep.stats.running + ep.stats.waiting if ep.stats else 0) + ep.inflight_requests
        return (-free_blocks_after_dispatch(ep), running, ep.stats.node_id != kv_node if ep.stats else True, ep.address)

    return min(candidates, key=key)


def pick_colocated(
    endpoints: list[Endpoint],
    exclude: AbstractSet[str] = frozenset(),
    prompt_tokens: int = 0,
    cached_tokens: Callable[[Endpoint], int] = _no_cache,
) -> Endpoint:
    candidates = [ep for ep in endpoints if ep.address not in exclude] or endpoints
    if not candidates:
        raise NoWorkerError("no healthy colocated worker")

    def key(ep: Endpoint):
        return (ep.inflight_prompt_tokens + ep.inflight_requests + prompt_tokens - cached_tokens(ep), ep.address)

    return min(candidates, key=key)
