"""Client-side channel settings shared by every service that calls another."""

from __future__ import annotations

import grpc

from .server import GRPC_OPTIONS


def aio_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=GRPC_OPTIONS)
