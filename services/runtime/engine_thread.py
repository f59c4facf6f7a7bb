"""The engine thread: where a worker's engine and scheduler live.

The engine runs on its own thread so that the asyncio loop (gRPC, kvstore calls) stays responsive
while a forward pass runs (torch releases the GIL inside kernels). Every engine, block and
scheduler mutation happens on that thread. The two sides talk only through this class:

    asyncio side -> engine thread:  post(fn), or `await call(fn)` for fn's result;
                                    post_when_idle(fn) for housekeeping between requests
    engine thread -> asyncio side:  emit(fn, *args) for a plain callback (a queue put, a future's
                                    result), emit_at(when, fn, *args) for one at a given time,
                                    spawn(coroutine) to start async work (a KV pull)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import logging
import queue
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")
PR_SET_NAME = 15


class EngineThread:
    """Runs `step()` whenever `has_work()`, and the callables posted to it, on one thread."""

    def __init__(self, name: str, step: Callable[[], None], has_work: Callable[[], bool]):
        self._inbox: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._step = step
        self._has_work = has_work
        self._stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._spawned: set[concurrent.futures.Future] = set()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread.start()

    # ---- from the asyncio side ------------------------------------------------------------------
    def post(self, fn: Callable[[], object]) -> None:
        self._inbox.put(fn)

    def post_when_idle(self, fn: Callable[[], object]) -> None:
        """Runs fn on the engine thread if the engine has no work when its turn comes, else drops it:
        housekeeping that must not overlap or delay a step."""
        self.post(lambda: None if self._has_work() else fn())

    async def call(self, fn: Callable[[], T]) -> T:
        """Runs fn on the engine thread and returns its result (or raises its exception)."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()

        def run() -> None:
            try:
                result = fn()
            except BaseException as exc:
                self.emit(reject, future, exc)
            else:
                self.emit(resolve, future, result)

        self.post(run)
        return await future

    # ---- from the engine thread -----------------------------------------------------------------
    def emit(self, fn: Callable[..., object], *args: object) -> None:
        """Runs fn(*args) on the asyncio loop."""
        assert self._loop is not None, "not started"
        self._loop.call_soon_threadsafe(fn, *args)

    def emit_at(self, when: float, fn: Callable[..., object], *args: object) -> None:
        """Runs fn(*args) on the asyncio loop at time.monotonic() `when` (the loop's clock), or at
        once if that has passed."""
        assert self._loop is not None, "not started"
        self._loop.call_soon_threadsafe(self._loop.call_at, when, fn, *args)

    def spawn(self, coroutine: Coroutine[Any, Any, object]) -> None:
        """Runs a coroutine on the asyncio loop; an exception it raises is logged."""
        assert self._loop is not None, "not started"
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        self._spawned.add(future)
        future.add_done_callback(self._spawn_done)

    def _spawn_done(self, future: concurrent.futures.Future) -> None:
        self._spawned.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("task started by the engine thread failed", exc_info=future.exception())

    # ---- lifecycle ------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stopped = True
        self._inbox.put(lambda: None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        _name_os_thread(self._thread.name)
        with torch.inference_mode():
            while not self._stopped:
                try:
                    fn = self._inbox.get(timeout=None if not self._has_work() else 0)
                    fn()
                    while True:
                        self._inbox.get_nowait()()
                except queue.Empty:
                    pass
                except Exception:  # a bad callable must not kill the worker
                    log.exception("engine thread task failed")
                if self._stopped:
                    break
                if self._has_work():
                    try:
                        self._step()
                    except Exception:  # the step handles engine failures; this is a worker bug
                        log.exception("engine step failed")
                        time.sleep(0.1)


def _name_os_thread(name: str) -> None:
    """The thread's name where top -H and /proc/PID/task/*/comm show it (bench.overhead splits a
    worker's CPU time by thread with it). Linux only; 15 bytes."""
    try:
        ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def resolve(future: asyncio.Future, result: object) -> None:
    if not future.done():
        future.set_result(result)


def reject(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
