"""Client-side channel settings shared by every service that calls another."""

from __future__ import annotations

import grpc

from .server import GRPC_OPTIONS
from .tls import TlsFiles, channel_credentials, channel_options

# A peer that went away (a restarted worker or daemon) is reconnected to within a second of its
# return: gRPC's default backoff grows to 120 s, and calls fail at once while it waits. The minimum
# backoff stays at its default: gRPC core also uses it as the timeout of a connection attempt, and
# at 100 ms a busy peer's handshake failed ("timed out before receiving SETTINGS frame").
CLIENT_OPTIONS = GRPC_OPTIONS + [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


_tls: TlsFiles | None = None  # this process's identity for its calls (use_tls), or plaintext


def use_tls(files: TlsFiles | None) -> None:
    """Every channel this process opens from now on uses TLS with this certificate (services/common/tls.py)."""
    global _tls
    _tls = files


def aio_channel(address: str) -> grpc.aio.Channel:
    if _tls is None:
        return grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS)
    return grpc.aio.secure_channel(address, channel_credentials(_tls), options=CLIENT_OPTIONS + channel_options(_tls))


def sync_channel(address: str, tls: TlsFiles | None = None) -> grpc.Channel:
    """A blocking channel (launcher health checks, tests, scripts)."""
    if tls is None:
        return grpc.insecure_channel(address, options=CLIENT_OPTIONS)
    return grpc.secure_channel(address, channel_credentials(tls), options=CLIENT_OPTIONS + channel_options(tls))
