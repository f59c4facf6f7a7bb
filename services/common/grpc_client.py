"""Client-side channel settings shared by every service that calls another."""

from __future__ import annotations

import grpc

from .server import GRPC_OPTIONS

# A peer that went away (a restarted worker or daemon) is reconnected to within a second of its
# return: gRPC's default backoff grows to 120 s, and calls fail at once while it waits.
CLIENT_OPTIONS = GRPC_OPTIONS + [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def aio_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS)
