"""What a process listens on, read from /proc (Linux)."""

from __future__ import annotations

import os
import socket
import subprocess


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """The (address, port) of each TCP socket process `pid` listens on, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        if not os.path.exists(f"/proc/{pid}/net/{table}"):  # (a kernel without IPv6)
            continue
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                    continue
                address, port = fields[1].split(":")
                raw = bytes.fromhex(address)  # 32-bit words, each little-endian
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.append((socket.inet_ntop(family, raw), int(port, 16)))
    return found


def ipv4_addresses() -> list[tuple[str, str]]:
    """(interface, address) of this machine's IPv4 addresses, from `ip -4 -o addr` ([] without it)."""
    try:
        out = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [(line.split()[1], line.split()[3].split("/")[0]) for line in out.splitlines()]


def is_up(interface: str) -> bool:
    try:
        with open(f"/sys/class/net/{interface}/operstate") as f:
            return f.read().strip() in ("up", "unknown")  # (lo says "unknown")
    except OSError:
        return False
