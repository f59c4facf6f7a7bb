"""TLS for every gRPC server and client of a cluster, mutual between services.

Each service has one certificate (`--tls-cert`, `--tls-key`), signed by the cluster's CA
(`--tls-ca`), which it presents both as a server and as a client of the services it calls. An
internal service (worker, kvstore) accepts only clients presenting a certificate of that CA; the
router's public port accepts any client (clients authenticate with an API key, router/__main__.py).
Servers read the files again when they change (a renewed certificate is served on the next
connection, no restart); clients read them when they open a channel.

Services are addressed by IP (pods, local ports), so clients check the server's certificate against
a fixed name, `--tls-server-name` (default "pdserve"), which every cluster certificate carries as
a DNS name; `pdserve up --tls` and the Helm charts issue them so.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

import grpc

log = logging.getLogger(__name__)

DEFAULT_SERVER_NAME = "pdserve"

T = TypeVar("T")


@dataclass(frozen=True)
class TlsFiles:
    cert: str
    key: str
    ca: str
    server_name: str = DEFAULT_SERVER_NAME

    @classmethod
    def from_args(cls, args) -> TlsFiles | None:
        """The --tls-* flags: all three files, or none (plaintext)."""
        given = {flag: getattr(args, flag.replace("-", "_")) for flag in ("tls-cert", "tls-key", "tls-ca")}
        if not any(given.values()):
            return None
        missing = [f"--{flag}" for flag, path in given.items() if not path]
        if missing:
            raise SystemExit(f"TLS needs --tls-cert, --tls-key and --tls-ca; missing {', '.join(missing)}")
        for flag, path in given.items():
            if not os.path.isfile(path):
                raise SystemExit(f"--{flag}: {path} is not a file")
        return cls(args.tls_cert, args.tls_key, args.tls_ca, args.tls_server_name or DEFAULT_SERVER_NAME)

    def read(self) -> tuple[bytes, bytes, bytes]:
        with open(self.cert, "rb") as c, open(self.key, "rb") as k, open(self.ca, "rb") as a:
            return c.read(), k.read(), a.read()

    def stamp(self) -> tuple[float, ...]:
        """The files' modification times: a change means a renewal to load."""
        return tuple(os.stat(path).st_mtime_ns for path in (self.cert, self.key, self.ca))


def server_context(files: TlsFiles, require_client_cert: bool) -> ssl.SSLContext:
    """A TLS server presenting this service's certificate; with `require_client_cert`, only to
    clients presenting one of the cluster's CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=files.ca if require_client_cert else None)
    context.load_cert_chain(files.cert, files.key)
    if require_client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def socket_context(files: TlsFiles, server: bool) -> ssl.SSLContext:
    """For a plain socket between services (an instance's rendezvous, engine/parallel.py): mutual,
    the peer's certificate checked against the cluster's CA (and, by a client, the server name)."""
    if server:
        return server_context(files, require_client_cert=True)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=files.ca)
    context.load_cert_chain(files.cert, files.key)
    context.verify_mode = ssl.CERT_REQUIRED
    return context


class Reloading(Generic[T]):
    """What `build(files)` makes of the TLS files, made again once they change (a renewal: cert-manager
    or `pdserve up` rewrite them in place), looked at no more than every `interval` seconds. A
    build that fails (files half written) keeps the last one, and is tried again at the next look."""

    def __init__(self, files: TlsFiles, build: Callable[[TlsFiles], T], interval: float = 1.0):
        self.files = files
        self._build = build
        self._interval = interval
        self._stamp = files.stamp()
        self._value = build(files)
        self._looked_at = time.monotonic()
        self.generation = 0  # how many times it was made again

    def get(self) -> T:
        now = time.monotonic()
        if now - self._looked_at >= self._interval:
            self._looked_at = now
            try:
                stamp = self.files.stamp()
                if stamp != self._stamp:
                    self._value = self._build(self.files)
                    self._stamp = stamp
                    self.generation += 1
                    log.info("TLS files reloaded: %s", self.files.cert)
            except (OSError, ValueError, ssl.SSLError) as exc:
                log.warning("TLS files not reloaded yet: %s", exc)
        return self._value


def server_credentials(files: TlsFiles, require_client_cert: bool) -> grpc.ServerCredentials:
    """Credentials that pick up new files: gRPC asks the fetcher at each new connection."""

    def configuration(files: TlsFiles):
        cert, key, ca = files.read()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    current = Reloading(files, configuration, interval=0.0)
    served = [current.generation]

    def fetch():
        configuration = current.get()
        if current.generation == served[0]:
            return None  # unchanged: keep the current configuration
        served[0] = current.generation
        return configuration

    return grpc.dynamic_ssl_server_credentials(current.get(), fetch, require_client_authentication=require_client_cert)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    cert, key, ca = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def channel_options(files: TlsFiles) -> list[tuple[str, object]]:
    return [("grpc.ssl_target_name_override", files.server_name)]


def add_tls_flags(parser) -> None:
    parser.add_flag("--tls-cert", default="", help="this service's certificate (PEM): TLS on every port and call")
    parser.add_flag("--tls-key", default="", help="its private key (PEM)")
    parser.add_flag("--tls-ca", default="", help="the cluster's CA certificate (PEM): peers must be signed by it")
    parser.add_flag(
        "--health-port",
        default=0,
        type=int,
        help="also serve the health service alone, in plaintext, on this port (probes that cannot do TLS; 0: no)",
    )
    parser.add_flag(
        "--metrics-tls",
        default="mutual",
        choices=["mutual", "server", "off"],
        help="with TLS on, /metrics is HTTPS for scrapers with a cluster client certificate (mutual), "
        "for any scraper (server), or plaintext HTTP (off)",
    )
    parser.add_flag(
        "--tls-server-name",
        default=DEFAULT_SERVER_NAME,
        help="the name servers' certificates are checked against (a DNS name in every cluster certificate)",
    )
