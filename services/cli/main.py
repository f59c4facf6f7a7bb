"""The `pdserve` command: up (a local cluster), demo, generate (a client), plan (the planner)."""

from __future__ import annotations

import argparse

from services.common.commands import run_command
from services.planner.cli import add_subparsers as add_plan

from .demo import add_demo_arguments, demo
from .generate import add_generate_arguments, generate
from .up import add_up_arguments, up


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pdserve", description="disaggregated prefill/decode LLM serving")
    sub = ap.add_subparsers(dest="command", required=True)
    up_parser = sub.add_parser("up", help="start a local cluster (router, workers, kvstore daemons)")
    add_up_arguments(up_parser)
    up_parser.set_defaults(func=up)
    demo_parser = sub.add_parser("demo", help="start a local cluster, stream a few requests, stop")
    add_demo_arguments(demo_parser)
    demo_parser.set_defaults(func=demo)
    generate_parser = sub.add_parser("generate", help="stream one request through a router")
    add_generate_arguments(generate_parser)
    generate_parser.set_defaults(func=generate)
    add_plan(sub)  # pdserve plan profile|simulate|search
    args = ap.parse_args(argv)
    return run_command(args.func, args)
