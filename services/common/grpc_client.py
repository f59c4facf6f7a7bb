"""Client-side channel settings shared by every service that calls another, and this process's TLS
identity for those calls, followed through renewals."""

from __future__ import annotations

import asyncio

import grpc

from .server import GRPC_OPTIONS
from .tls import Reloading, TlsFiles, channel_credentials, channel_options

# A peer that went away (a restarted worker or daemon) is reconnected to within a second of its
# return: gRPC's default backoff grows to 120 s, and calls fail at once while it waits. The minimum
# backoff stays at its default: gRPC core also uses it as the timeout of a connection attempt, and
# at 100 ms a busy peer's handshake failed ("timed out before receiving SETTINGS frame").
CLIENT_OPTIONS = GRPC_OPTIONS + [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


# This process's certificate for its calls (use_tls), read again when its files are renewed; None:
# plaintext
_identity: Reloading[grpc.ChannelCredentials] | None = None


def use_tls(files: TlsFiles | None) -> None:
    """Every channel this process opens from now on uses TLS with this certificate (services/common/tls.py)."""
    global _identity
    _identity = None if files is None else Reloading(files, channel_credentials)


def identity_generation() -> int:
    """Changes when this process's certificate files have been renewed (looked at no more than once
    a second). A channel keeps the credentials it was opened with for every connection it makes,
    so channels opened before then should be replaced (PeerChannel)."""
    if _identity is None:
        return 0
    _identity.get()
    return _identity.generation


def aio_channel(address: str) -> grpc.aio.Channel:
    if _identity is None:
        return grpc.aio.insecure_channel(address, options=CLIENT_OPTIONS)
    options = CLIENT_OPTIONS + channel_options(_identity.files)
    return grpc.aio.secure_channel(address, _identity.get(), options=options)


def sync_channel(address: str, tls: TlsFiles | None = None) -> grpc.Channel:
    """A blocking channel (launcher health checks, tests, scripts)."""
    if tls is None:
        return grpc.insecure_channel(address, options=CLIENT_OPTIONS)
    return grpc.secure_channel(address, channel_credentials(tls), options=CLIENT_OPTIONS + channel_options(tls))


_closing: set[asyncio.Task] = set()  # closes of retired channels under way (the loop keeps only weak references)


class PeerChannel:
    """The channel to one peer, opened again once this process's certificate is renewed (cert-manager
    rewrites the files well before the old one expires; a peer that restarts after it has expired
    would refuse a connection presenting it). Calls from then on go over the new channel. The old
    one stays open for the calls still on it (a long stream keeps its connection, whose handshake is
    done) and is closed once gRPC reports it idle: no call on it for grpc.client_idle_timeout_ms
    (30 minutes by default), or its connection gone."""

    def __init__(self, address: str):
        self.address = address
        self._generation = identity_generation()
        self.channel = aio_channel(address)
        self._retired: list[grpc.aio.Channel] = []

    def renewed(self) -> bool:
        """Whether it has just opened a new channel: stubs made on the old one should be made again."""
        idle = (grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.SHUTDOWN)
        for channel in [c for c in self._retired if c.get_state() in idle]:
            self._retired.remove(channel)
            task = asyncio.get_running_loop().create_task(channel.close())
            _closing.add(task)
            task.add_done_callback(_closing.discard)
        generation = identity_generation()
        if generation == self._generation:
            return False
        self._generation = generation
        self._retired.append(self.channel)
        self.channel = aio_channel(self.address)
        return True

    async def close(self) -> None:
        for channel in [self.channel, *self._retired]:
            await channel.close()
        self._retired.clear()
