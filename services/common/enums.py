"""Names shared by several services, as enums (they are also str: metric labels, proto fields and
JSON take them as they are)."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """What a pdserve process does (the `role` of WorkerStats, metric labels, the launcher's services)."""

    ROUTER = "router"
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"
    KVSTORE = "kvstore"


WORKER_ROLES = (Role.PREFILL, Role.DECODE, Role.COLOCATED)


class FinishReason(StrEnum):
    """Why a request's stream ended. The engine ends sequences with STOP or LENGTH; the router also
    counts requests that ended otherwise (`pdserve_requests_total{finish_reason}`)."""

    STOP = "stop"  # an EOS or stop token
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"
    CANCELLED = "cancelled"  # the client went away or its deadline passed
    ERROR = "error"
