"""What every command line shares: `pdserve` and its subcommands, `python -m services.planner`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable


def run_command(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Runs a subcommand; a user's mistake (bad value, missing or malformed file) becomes one line on
    stderr and exit status 2, not a traceback."""
    try:
        return func(args) or 0
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse
