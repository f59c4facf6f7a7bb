"""python -m services.kvstore: the node-local KV-transfer daemon (one per node).

Every flag also reads PDSERVE_<FLAG> (e.g. PDSERVE_NODE_ID, PDSERVE_TTL_SECONDS). Stops on
SIGTERM: in-flight pulls finish, watch streams end, the process exits 0.
"""

from __future__ import annotations

import logging
import os
import socket

from services.common.flags import FlagParser, common_server_flags, setup_process
from services.common.metrics import new_registry
from services.common.server import ServiceRunner, run_event_loop

from .daemon import KvStoreConfig, KvStoreDaemon
from .ucx_environment import TRANSFER_PORTS, configure_ucx_environment

log = logging.getLogger("services.kvstore")


def parser() -> FlagParser:
    p = FlagParser(prog="python -m services.kvstore", description=__doc__.splitlines()[0])
    common_server_flags(p, port=7100, metrics_port=9100)
    p.add_flag("--node-id", default=socket.gethostname(), help="this node's name (Kubernetes: spec.nodeName)")
    p.add_flag(
        "--advertise-address",
        default="",
        help="gRPC host:port other nodes use to reach this daemon (default: transfer host and --port)",
    )
    p.add_flag(
        "--transfer-host",
        default="",
        help="an address of this node's interface that peers reach for UCX transfers: UCX listens on that "
        "interface only (default: this host's IP)",
    )
    p.add_flag(
        "--transfer-port",
        default=0,
        type=int,
        help="UCX's TCP transport listens on one of the 16 ports from this one, on --transfer-host's "
        "interface (0: any free port)",
    )
    p.add_flag(
        "--ucx-tls",
        default="",
        help="UCX transports (default: $UCX_TLS, else tcp,self,sm; GPU: rc,cuda_copy,cuda_ipc,tcp,sm,self)",
    )
    p.add_flag("--ttl-seconds", default=30.0, type=float, help="unpulled entries move to the host tier after this")
    p.add_flag("--host-tier-bytes", default=1 << 30, type=int, help="host-memory tier capacity (0: off)")
    p.add_flag("--host-ttl-seconds", default=600.0, type=float, help="host-tier entries expire after this")
    p.add_flag(
        "--prefix-store-bytes",
        default=1 << 30,
        type=int,
        help="host memory of the prefix tier: full blocks workers offer, for any worker of the node (0: off)",
    )
    p.add_flag("--transfer-timeout-seconds", default=30.0, type=float, help="limit of one UCX transfer")
    p.add_flag("--connect-timeout-seconds", default=5.0, type=float, help="limit of connecting to a peer daemon")
    p.add_flag(
        "--watch-grace-seconds",
        default=30.0,
        type=float,
        help="a registered pool that nobody watches is dropped after this",
    )
    return p


def parse_args(argv=None):
    p = parser()
    args = p.parse_args(argv)
    if args.transfer_port:  # UCX takes one of the 16 ports from it, at random
        ucx_ports = range(args.transfer_port, args.transfer_port + TRANSFER_PORTS)
        if ucx_ports.stop > 65536:
            p.error(f"--transfer-port: at most {65536 - TRANSFER_PORTS} (UCX may take any of {TRANSFER_PORTS} ports)")
        for flag, port in (("--port", args.port), ("--metrics-port", args.metrics_port)):
            if port in ucx_ports:
                p.error(f"{flag} {port} is among --transfer-port's {ucx_ports.start}-{ucx_ports.stop - 1}")
    return args


def default_transfer_host() -> str:
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


async def serve(args) -> None:
    grpc_host = args.host if args.host not in ("0.0.0.0", "::", "[::]", "") else args.transfer_host
    config = KvStoreConfig(
        node_id=args.node_id,
        advertise_address=args.advertise_address or f"{grpc_host}:{args.port}",
        ttl_seconds=args.ttl_seconds,
        host_tier_bytes=args.host_tier_bytes,
        host_ttl_seconds=args.host_ttl_seconds,
        prefix_store_bytes=args.prefix_store_bytes,
        transfer_timeout_seconds=args.transfer_timeout_seconds,
        connect_timeout_seconds=args.connect_timeout_seconds,
        watch_grace_seconds=args.watch_grace_seconds,
    )
    registry = new_registry()
    daemon = KvStoreDaemon(config, registry)
    runner = ServiceRunner.from_flags("kvstore", args, registry)
    await daemon.start()
    try:
        await runner.start(lambda server: [daemon.add_to_server(server)])
        if not args.advertise_address and args.port == 0:
            config.advertise_address = f"{grpc_host}:{runner.bound_port}"
        runner.install_signal_handlers()
        log.info("node %s: kvstore at %s", config.node_id, config.advertise_address)
        await runner.wait_and_drain(daemon.drain)
    finally:
        await daemon.close()


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_process(args, "kvstore")
    logging.getLogger("ucx").setLevel(logging.WARNING)  # ucxx logs its own env defaults at INFO
    args.transfer_host = args.transfer_host or default_transfer_host()  # (resolved once)
    tls = configure_ucx_environment(args.ucx_tls, args.transfer_host, args.transfer_port)
    log.info(
        "UCX_TLS=%s UCX_NET_DEVICES=%s UCX_TCP_PORT_RANGE=%s",
        tls,
        os.environ.get("UCX_NET_DEVICES", "(all)"),
        os.environ.get("UCX_TCP_PORT_RANGE", "(any)"),
    )
    run_event_loop(serve(args))


if __name__ == "__main__":
    main()
