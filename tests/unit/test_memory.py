"""common/memory.py: what an idle service hands back after a burst."""

import gc

from services.common.memory import release_freed_memory, resident_anonymous_bytes


class _Cycle:
    def __init__(self, size: int):
        self.buffer = bytearray(size)  # touched: resident
        self.me = self


def test_cyclic_garbage_is_released_though_the_collector_never_ran():
    """A burst's garbage in reference cycles stays resident until the collector's oldest
    generation runs, which a quiet process does not trigger (here: the collector off)."""
    gc.collect()
    gc.disable()
    try:
        garbage = [_Cycle(1 << 20) for _ in range(64)]  # 64 MiB, each piece its own cycle
        del garbage
        before = resident_anonymous_bytes()
        release_freed_memory()
        assert before - resident_anonymous_bytes() > 48 << 20
    finally:
        gc.enable()
