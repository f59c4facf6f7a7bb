"""Admission bounds (services/common/admission.py): pure state, so checked alone."""

from __future__ import annotations

import grpc
import pytest
from prometheus_client import CollectorRegistry

from services.common.admission import Admission, refusals_counter
from services.common.errors import ServiceError


def test_requests_past_the_bound_are_refused_with_a_retry_after_and_counted():
    registry = CollectorRegistry()
    admission = Admission("router", max_requests=2, max_queued_tokens=0, refusals=refusals_counter(registry))
    first, _ = admission.admit(10), admission.admit(10)
    with pytest.raises(ServiceError) as refused:
        admission.admit(10)
    assert refused.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "router is overloaded" in refused.value.message
    assert refused.value.trailing_metadata() == (("retry-after", "1"),)
    assert registry.get_sample_value("pdserve_admission_refusals_total", {"reason": "inflight_requests"}) == 1
    first.release()
    first.release()  # idempotent: a second end does not free a slot twice
    admission.admit(10)
    assert admission.requests == 2


def test_queued_prompt_tokens_are_bounded_until_prefilled():
    admission = Admission("prefill worker", max_requests=0, max_queued_tokens=100)
    a = admission.admit(60)
    with pytest.raises(ServiceError):
        admission.admit(50)
    a.prefilled()  # its prompt no longer waits: room for more
    b = admission.admit(50)
    assert admission.queued_tokens == 50 and admission.requests == 2
    b.release()
    a.release()
    assert admission.queued_tokens == 0 and admission.requests == 0


def test_a_prompt_larger_than_the_token_bound_is_taken_when_nothing_waits():
    admission = Admission("router", max_requests=0, max_queued_tokens=100)
    big = admission.admit(500)  # else it could never be served
    with pytest.raises(ServiceError):
        admission.admit(1)
    big.release()


def test_zero_means_no_bound():
    admission = Admission("router", 0, 0)
    for _ in range(10_000):
        admission.admit(1_000_000)
    assert admission.requests == 10_000
