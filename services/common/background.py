"""Tasks that run on their own after the coroutine that started them has moved on."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

_running: set[asyncio.Task] = set()


def in_background(coroutine: Coroutine[Any, Any, object]) -> asyncio.Task:
    """Runs `coroutine` as a task held here until it ends (the event loop keeps only weak
    references to tasks: an unheld one can be garbage-collected mid-way)."""
    task = asyncio.create_task(coroutine)
    _running.add(task)
    task.add_done_callback(_running.discard)
    return task
