"""Handing freed heap memory back to the operating system after a burst of work.

glibc's malloc keeps memory a process has freed (in each thread's arena, below the top of the
heap) for reuse, so after an overload burst a service's resident memory stays near its peak.
`trim_when_idle` calls malloc_trim(0) once the process has been quiet for a while after a lot of
work, which returns those free pages; a worker first frees what its engine keeps between steps,
sized for the largest batch of the burst (Engine.release_idle_memory). It must not overlap a
worker's engine step: the trim
holds malloc's locks, and a step allocating meanwhile would be late (a worker emulating a GPU serves
one request at a time with almost no CPU, so "quiet" says nothing about whether it is serving). A
worker therefore runs it on its engine thread, and only while the engine has no work
(EngineThread.post_when_idle): a request that arrives during a trim waits for it, like any queue.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

CHECK_SECONDS = 2.0
IDLE_CPU_SHARE = 0.02  # below this share of one core over a check interval, the process is quiet
IDLE_CHECKS = 3  # quiet this many intervals in a row: idle
WORK_CPU_SECONDS = 10.0  # CPU time spent since the last trim that makes another one worth it


@functools.cache  # (find_library runs ldconfig in a subprocess: looked up once)
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def resident_anonymous_bytes() -> int:
    """RssAnon: the process's own memory, not the shared KV pools it maps."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def release_freed_memory() -> None:
    """Frees garbage in reference cycles, then hands freed heap pages back (malloc_trim(0)). The
    collector's oldest generation runs only after enough new allocations, which a quiet process
    does not make: without the collect, a burst's cyclic garbage (failed calls' exceptions with
    their tracebacks and frames, tasks, calls) would stay until the next load."""
    before = resident_anonymous_bytes()
    gc.collect()
    malloc_trim = _malloc_trim()
    if malloc_trim is not None:
        malloc_trim(0)
    log.debug("idle: returned %d MiB of freed memory", (before - resident_anonymous_bytes()) >> 20)


async def trim_when_idle(run: Callable[[Callable[[], None]], None]) -> None:
    """Runs until cancelled: release_freed_memory each time the process turns idle after a stretch
    of work, through `run` (which may run it later, elsewhere, or not at all: a worker's engine
    thread)."""
    if _malloc_trim() is None:
        return

    cpu_at_trim = last_cpu = time.process_time()
    quiet = 0
    while True:
        await asyncio.sleep(CHECK_SECONDS)
        cpu = time.process_time()
        quiet = quiet + 1 if cpu - last_cpu < IDLE_CPU_SHARE * CHECK_SECONDS else 0
        last_cpu = cpu
        if quiet >= IDLE_CHECKS and cpu - cpu_at_trim > WORK_CPU_SECONDS:
            quiet = 0
            run(release_freed_memory)
            cpu_at_trim = last_cpu = time.process_time()
