"""Admission control: a service holds at most so many requests and so many prompt tokens waiting
for prefill; past either bound it refuses at once with RESOURCE_EXHAUSTED and a retry-after hint
(trailing metadata, seconds), instead of queueing without end.

    admission = Admission("router", max_requests=2048, max_queued_tokens=1 << 20, refusals=counter)
    ticket = admission.admit(prompt_tokens)   # ServiceError RESOURCE_EXHAUSTED past a bound
    ticket.prefilled()                        # its prompt no longer waits (the first token came)
    ticket.release()                          # the request ended, however (idempotent)

Pure state: the caller counts on one thread (the asyncio loop). A bound of 0 is no bound. A prompt
larger than the token bound is still taken when nothing else waits, or it could never be served.
"""

from __future__ import annotations

from enum import StrEnum

import grpc
from prometheus_client import CollectorRegistry, Counter

from .errors import ServiceError

RETRY_AFTER_SECONDS = 1


class Refusal(StrEnum):
    """Which bound refused a request (`pdserve_admission_refusals_total{reason}`)."""

    REQUESTS = "inflight_requests"
    QUEUED_TOKENS = "queued_prompt_tokens"


def refusals_counter(registry: CollectorRegistry) -> Counter:
    counter = Counter(
        "pdserve_admission_refusals_total",
        "Requests refused with RESOURCE_EXHAUSTED because a bound was reached, by bound.",
        ["reason"],
        registry=registry,
    )
    for reason in Refusal:
        counter.labels(reason)
    return counter


class Admission:
    def __init__(self, service: str, max_requests: int, max_queued_tokens: int, refusals: Counter | None = None):
        self.service = service
        self.max_requests = max_requests
        self.max_queued_tokens = max_queued_tokens
        self.refusals = refusals
        self.requests = 0  # admitted, not yet released
        self.queued_tokens = 0  # prompt tokens of admitted requests not yet prefilled

    def check_requests(self) -> None:
        """Refuses if the request bound is reached: a check before any work on the request (a
        router tokenizes its prompt first), so that refusing stays cheap under a flood."""
        if self.max_requests and self.requests >= self.max_requests:
            raise self._refuse(Refusal.REQUESTS, f"{self.requests} requests in flight, the limit")

    def admit(self, prompt_tokens: int) -> Ticket:
        self.check_requests()
        if (
            self.max_queued_tokens
            and self.queued_tokens
            and self.queued_tokens + prompt_tokens > self.max_queued_tokens
        ):
            raise self._refuse(
                Refusal.QUEUED_TOKENS,
                f"{self.queued_tokens} prompt tokens wait for prefill; {prompt_tokens} more would pass "
                f"the limit of {self.max_queued_tokens}",
            )
        self.requests += 1
        self.queued_tokens += prompt_tokens
        return Ticket(self, prompt_tokens)

    def _refuse(self, why: Refusal, details: str) -> ServiceError:
        if self.refusals is not None:
            self.refusals.labels(why).inc()
        return ServiceError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{self.service} is overloaded: {details}; retry in {RETRY_AFTER_SECONDS} s",
            retry_after_seconds=RETRY_AFTER_SECONDS,
        )


class Ticket:
    """One admitted request's share of the bounds."""

    def __init__(self, admission: Admission, queued_tokens: int):
        self._admission = admission
        self._queued_tokens = queued_tokens
        self._released = False

    def prefilled(self) -> None:
        self._admission.queued_tokens -= self._queued_tokens
        self._queued_tokens = 0

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.prefilled()
            self._admission.requests -= 1
