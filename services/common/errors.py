"""The one error type of every service: a failure carrying the gRPC status it maps to.

Handlers raise it and the server's interceptor (server.py) turns it into that status, so no
handler calls context.abort itself; the kvstore also carries it across UCX by the status's name.
A message about a bad request starts with the field at fault ("sampling.top_p: ..."), which is
what `invalid` writes.
"""

from __future__ import annotations

import grpc


class ServiceError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, retry_after_seconds: float = 0):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_seconds = retry_after_seconds  # > 0: sent as trailing metadata "retry-after"

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("retry-after", f"{self.retry_after_seconds:g}"),) if self.retry_after_seconds > 0 else ()

    def __str__(self) -> str:
        return self.message


class PastContextError(ServiceError):
    """INVALID_ARGUMENT for a prompt that does not fit the model's context (HTTP 413, not 400)."""


def invalid(field: str, problem: str) -> ServiceError:
    """INVALID_ARGUMENT naming the field: `invalid("sampling.top_k", "must be >= 0, got -1")`."""
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {problem}")
