"""Every service's Prometheus endpoint (/metrics), in a thread of its own.

Under TLS (`--tls-*`, common/tls.py) it is HTTPS with the service's certificate, and by default
(`--metrics-tls mutual`) answers only scrapers presenting a client certificate of the cluster's CA,
as the internal gRPC ports do: metrics name workers, addresses and load, and a scrape costs the
service CPU. Prometheus scrapes it with `scheme: https` and a `tls_config` holding a cluster
certificate (docs/deploy.md); `server` serves HTTPS to any scraper, `off` plaintext. Renewed
certificate files are served from the next connection on, without a restart.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import threading
from enum import StrEnum
from typing import cast
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from .tls import Reloading, TlsFiles, server_context

log = logging.getLogger(__name__)

HANDSHAKE_SECONDS = 10.0  # a connection that neither completes its handshake nor asks in this time is dropped


class MetricsTls(StrEnum):
    MUTUAL = "mutual"  # HTTPS; the scraper needs a client certificate of the cluster's CA
    SERVER = "server"  # HTTPS; any scraper
    OFF = "off"  # plaintext HTTP


class _QuietHandler(WSGIRequestHandler):
    timeout = HANDSHAKE_SECONDS

    def log_message(self, format, *args) -> None:
        pass  # a line per scrape would drown the service's log


class _MetricsServer(ThreadingWSGIServer):
    https: Reloading[ssl.SSLContext] | None = None

    def server_bind(self) -> None:
        # HTTPServer's looks the host's name up (socket.getfqdn, a reverse lookup through NSS: it
        # can hang without a resolver, and it crashed a kvstore starting on a non-loopback address)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])
        self.setup_environ()

    def get_request(self) -> tuple[socket.socket, object]:
        sock, address = super().get_request()
        if self.https is not None:
            # the handshake happens at the first read, in the connection's own thread: a slow or
            # silent client does not hold up the accepting one
            sock = self.https.get().wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def handle_error(self, request, client_address) -> None:
        # a scraper without a client certificate, or one that hung up: its problem, not the service's
        log.debug("metrics: connection from %s failed", client_address, exc_info=True)


def start_metrics_server(
    host: str, port: int, registry: CollectorRegistry, tls: TlsFiles | None, mode: MetricsTls
) -> int:
    """Serves /metrics on host:port (port 0: a free one) until the process exits; returns the port."""
    host = host.strip("[]")  # ("[::1]", as --host takes an IPv6 address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("MetricsServer", (_MetricsServer,), {"address_family": family})
    server = cast(_MetricsServer, make_server(host, port, make_wsgi_app(registry), server_class, _QuietHandler))
    if tls is not None and mode is not MetricsTls.OFF:
        mutual = mode is MetricsTls.MUTUAL
        server.https = Reloading(tls, lambda files: server_context(files, mutual))
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server.server_port
