"""Integer arithmetic shared by the services."""

from __future__ import annotations


def ceil_div(a: int, b: int) -> int:
    """⌈a / b⌉ for integers, b > 0 (blocks for a number of tokens, tiles for a number of columns)."""
    return -(-a // b)
