"""What every pdserve server shares (services/common/server.py), with real gRPC servers."""

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from services.common.server import ServiceRunner
from services.launcher import free_port


def test_a_port_in_use_is_refused_not_shared():
    """Without this, gRPC's default SO_REUSEPORT lets a second server bind the same port and the
    kernel splits connections between two unrelated clusters."""

    async def run():
        port = free_port()
        first = ServiceRunner("first", "127.0.0.1", port, -1, CollectorRegistry())
        await first.start(lambda server: [])
        try:
            second = ServiceRunner("second", "127.0.0.1", port, -1, CollectorRegistry())
            with pytest.raises(RuntimeError, match="bind"):
                await second.start(lambda server: [])
        finally:
            await first.server.stop(None)

    asyncio.run(run())
