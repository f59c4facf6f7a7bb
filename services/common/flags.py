"""Command-line flags that also read environment variables (for containers).

Every flag `--some-flag` falls back to `PDSERVE_SOME_FLAG`; a flag given on the command line wins
(for a repeatable flag, the values on the command line replace the environment's list).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal

from .grpc_client import use_tls
from .tls import TlsFiles, add_tls_flags


def env_name(flag: str) -> str:
    return "PDSERVE_" + flag.lstrip("-").upper().replace("-", "_")


class FlagParser(argparse.ArgumentParser):
    def add_flag(self, flag: str, *, default=None, type=str, help: str = "", **kwargs):
        env = env_name(flag)
        if env in os.environ:
            raw = os.environ[env]
            if kwargs.get("action") == "store_true":
                default = raw.lower() in ("1", "true", "yes", "on")
            elif kwargs.get("action") == "append":
                default = [type(v) for v in raw.split(",") if v]
            else:
                default = type(raw)
        text = f"{help} [env {env}]" if help else f"[env {env}]"
        if kwargs.get("action") == "append":
            kwargs.update(action=_AppendOverridingDefault, type=kwargs.get("type", type))
            return self.add_argument(flag, default=default, help=text, **kwargs)
        if kwargs.get("action") == "store_true":
            return self.add_argument(flag, default=default, help=text, **kwargs)
        return self.add_argument(flag, default=default, type=type, help=text, **kwargs)

    def flags(self) -> set[str]:
        """Every option string it takes ("--port", "-h", ...)."""
        return {option for action in self._actions for option in action.option_strings}


class _AppendOverridingDefault(argparse.Action):
    """argparse's "append", except that the first value on the command line starts a new list
    instead of extending the default (argparse would append to the environment's list)."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        items = [] if current is None or current is self.default else list(current)
        setattr(namespace, self.dest, items + [values])


def common_server_flags(parser: FlagParser, *, port: int, metrics_port: int, reflection: str = "off") -> None:
    parser.add_flag(
        "--host",
        default="127.0.0.1",
        help="address every port of this service binds (0.0.0.0: all interfaces, as in a pod)",
    )
    parser.add_flag("--port", default=port, type=int, help="gRPC port")
    parser.add_flag("--metrics-port", default=metrics_port, type=int, help="Prometheus /metrics port (-1: off)")
    parser.add_flag("--grace-seconds", default=30.0, type=float, help="drain time on SIGTERM")
    parser.add_flag("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_flag("--cpu-affinity", default="", help="pin this process to these CPU cores, e.g. 0 or 0,1 or 0-3")
    parser.add_flag(
        "--reflection",
        default=reflection,
        choices=["on", "off"],
        help="gRPC server reflection (lists this server's services to anyone who asks)",
    )
    add_tls_flags(parser)


def setup_process(args, service: str) -> None:
    """What every service does first: logging, CPU pinning (--cpu-affinity), and, when a launcher
    asks (PDSERVE_EXIT_WITH_PARENT=its pid), a SIGTERM when that launcher dies."""
    setup_logging(args.log_level, service)
    use_tls(TlsFiles.from_args(args))  # every call this process makes
    if args.cpu_affinity:
        pin_to_cpus(parse_cpu_list(args.cpu_affinity))
    parent = os.environ.get("PDSERVE_EXIT_WITH_PARENT")
    if parent:
        exit_with_parent(int(parent))


def exit_with_parent(parent_pid: int) -> None:
    """SIGTERM (a graceful drain) when the parent process dies, however it dies: `pdserve up`
    killed with SIGKILL must not leave its services running. Linux only (prctl)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def parse_cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            cpus.update(range(int(lo), int(hi) + 1))
        elif part.strip():
            cpus.add(int(part))
    return cpus


def pin_to_cpus(cpus: set[int]) -> None:
    """Pins every thread of this process (sched_setaffinity(0) would pin the calling thread only;
    imports may already have started others, e.g. OpenMP or gRPC pools)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # the thread has exited
            pass


def setup_logging(level: str, service: str) -> None:
    # A crash in native code (UCX, gRPC, torch) leaves every thread's Python stack in the log, and
    # `kill -USR1` prints them from a live process that seems stuck.
    faulthandler.enable()
    faulthandler.register(signal.SIGUSR1)
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
    )
