"""Command-line flags that also read environment variables (for containers).

Every flag `--some-flag` falls back to `PDSERVE_SOME_FLAG`; a flag given on the command line wins.
"""

from __future__ import annotations

import argparse
import logging
import os


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
        if kwargs.get("action") in ("store_true", "append"):
            if kwargs["action"] == "append":
                kwargs.setdefault("type", type)
            return self.add_argument(flag, default=default, help=text, **kwargs)
        return self.add_argument(flag, default=default, type=type, help=text, **kwargs)


def common_server_flags(parser: FlagParser, *, port: int, metrics_port: int) -> None:
    parser.add_flag("--host", default="0.0.0.0", help="address to bind")
    parser.add_flag("--port", default=port, type=int, help="gRPC port")
    parser.add_flag("--metrics-port", default=metrics_port, type=int, help="Prometheus /metrics port (-1: off)")
    parser.add_flag("--grace-seconds", default=30.0, type=float, help="drain time on SIGTERM")
    parser.add_flag("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")


def setup_logging(level: str, service: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s",
    )
