"""The kvstore's UCX environment: which transports, on which interface and ports, set in UCX_*
variables before ucxx starts (UCX reads them once per process)."""

from __future__ import annotations

import ctypes
import importlib
import ipaddress
import logging
import os
import socket

log = logging.getLogger(__name__)

DEFAULT_CPU_TLS = "tcp,self,sm"
RDMA_TRANSPORTS = ("rc", "ud", "dc", "ib")  # UCX_TLS names (and prefixes) of InfiniBand/RoCE transports
# A daemon restarted at once finds its last port held by its connections in TIME_WAIT (UCX binds
# without SO_REUSEADDR) for a minute: it takes another of the range.
TRANSFER_PORTS = 16


def configure_ucx_environment(tls: str = "", transfer_host: str = "", transfer_port: int = 0) -> str:
    """Sets UCX_* variables before ucxx is first used; returns the UCX_TLS in effect.

    `tls` wins, then an existing UCX_TLS, then tcp,self,sm (CPU pools). On GPU nodes use e.g.
    "rc,cuda_copy,cuda_ipc,tcp,sm,self" (RDMA NIC) so GPU buffers go device to device.
    UCX's TCP transport listens on the interface of `transfer_host` only (UCX_NET_DEVICES), on
    one of TRANSFER_PORTS ports from `transfer_port` when one is given (UCX_TCP_PORT_RANGE), unless
    those variables are set. With
    an RDMA transport UCX_NET_DEVICES is the operator's: it also names the RDMA devices."""
    if tls:
        os.environ["UCX_TLS"] = tls
    else:
        os.environ.setdefault("UCX_TLS", DEFAULT_CPU_TLS)
    listed = os.environ["UCX_TLS"]  # "all" or "^..." (all but those) may include RDMA too
    rdma = listed == "all" or listed.startswith("^") or any(t.startswith(RDMA_TRANSPORTS) for t in listed.split(","))
    if transfer_host and not rdma and "UCX_NET_DEVICES" not in os.environ:
        device = interface_of(transfer_host)
        if device:
            os.environ["UCX_NET_DEVICES"] = device
        else:
            log.warning("no interface holds %s: UCX may listen on every interface", transfer_host)
    if transfer_port:
        os.environ.setdefault("UCX_TCP_PORT_RANGE", f"{transfer_port}-{transfer_port + TRANSFER_PORTS - 1}")
    # ucxx sets variables (UCX_MEMTYPE_CACHE...) that this UCX build does not know; UCX would warn
    # about each of them at start-up.
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    return os.environ["UCX_TLS"]


def interface_of(host: str) -> str:
    """The name of the network interface that holds `host`'s address ("" if none does)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None, type=socket.SOCK_STREAM)
    except OSError:
        return ""
    wanted = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
    return next((name for name, address in interface_addresses() if address in wanted), "")


class _SockAddr(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("data", ctypes.c_ubyte * 26)]


class _IfAddrs(ctypes.Structure):
    pass


_IfAddrs._fields_ = [
    ("next", ctypes.POINTER(_IfAddrs)),
    ("name", ctypes.c_char_p),
    ("flags", ctypes.c_uint),
    ("addr", ctypes.POINTER(_SockAddr)),
    ("netmask", ctypes.POINTER(_SockAddr)),
    ("ifu", ctypes.c_void_p),
    ("data", ctypes.c_void_p),
]


def interface_addresses() -> list[tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address]]:
    """(interface, address) for every IP address of this machine, secondary ones included
    (getifaddrs(3): sockaddr_in holds the address at bytes 2..6, sockaddr_in6 at 6..22)."""
    libc = ctypes.CDLL(None, use_errno=True)
    head = ctypes.POINTER(_IfAddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        return []
    found: list[tuple[str, ipaddress.IPv4Address | ipaddress.IPv6Address]] = []
    try:
        entry = head
        while entry:
            item = entry.contents
            if item.addr and item.name:
                family, data = item.addr.contents.family, bytes(item.addr.contents.data)
                if family == socket.AF_INET:
                    # (an alias label, "eth0:1", names its device before the colon)
                    found.append((item.name.decode().split(":")[0], ipaddress.IPv4Address(data[2:6])))
                elif family == socket.AF_INET6:
                    found.append((item.name.decode(), ipaddress.IPv6Address(data[6:22])))
            entry = item.next
    finally:
        libc.freeifaddrs(head)
    return found


def ucxx_module():
    import ucxx  # imported late, after configure_ucx_environment: UCX reads UCX_* when it starts

    try:  # ucxx's progress thread imports cuda.core as it starts; loading its libraries there while
        # the main thread looked a name up (NSS) crashed a daemon once: they load here first
        importlib.import_module("cuda.core")
    except ImportError:
        pass
    return ucxx
