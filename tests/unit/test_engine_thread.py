"""The engine thread's housekeeping hook: malloc_trim (common/memory.py) runs there so that it can
never overlap a step; these check it runs only while the engine has nothing to do."""

from __future__ import annotations

import asyncio
import threading

from services.runtime.engine_thread import EngineThread


def test_housekeeping_runs_on_the_engine_thread_only_while_it_has_no_work():
    busy = threading.Event()
    ran: list[tuple[str, bool]] = []  # (thread, busy then)

    def step():
        busy.wait(0.001)

    async def main():
        thread = EngineThread("test-engine", step, busy.is_set)
        thread.start(asyncio.get_running_loop())
        try:
            busy.set()  # the engine steps until this is cleared
            await thread.call(lambda: None)
            thread.post_when_idle(lambda: ran.append((threading.current_thread().name, busy.is_set())))
            await thread.call(busy.clear)  # the work ends
            busy_runs = list(ran)
            thread.post_when_idle(lambda: ran.append((threading.current_thread().name, busy.is_set())))
            await thread.call(lambda: None)
            return busy_runs
        finally:
            thread.stop()

    busy_runs = asyncio.run(main())
    assert busy_runs == []  # posted while the engine had work: dropped
    assert ran == [("test-engine", False)]
