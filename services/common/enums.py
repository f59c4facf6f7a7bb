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


class ReleaseReason(StrEnum):
    """Why a published KV entry's blocks went back to the prefill worker that holds them (the
    kvstore's RELEASED event, or the worker's own conclusion)."""

    PULLED = "pulled"  # a decode worker's pull copied it
    RELEASED = "released"  # nobody will pull it (a Release call)
    MOVED_TO_HOST = "moved_to_host"  # unpulled past the TTL: copied into the daemon's host tier
    EXPIRED = "expired"  # unpulled past the TTL and the host tier had no room
    DAEMON_LOST = "daemon_lost"  # the daemon went away and forgot every entry


class FinishReason(StrEnum):
    """Why a request's stream ended. The engine ends sequences with STOP or LENGTH; the router also
    counts requests that ended otherwise (`pdserve_requests_total{finish_reason}`)."""

    STOP = "stop"  # an EOS or stop token
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"
    CANCELLED = "cancelled"  # the client went away or its deadline passed
    ERROR = "error"
