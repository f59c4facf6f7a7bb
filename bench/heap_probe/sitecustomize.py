"""bench.burst --heap puts this folder on the cluster's PYTHONPATH: on SIGUSR2 a service hands freed
memory back as when it turns idle (common/memory.py release_freed_memory: a collect, then
malloc_trim) and appends glibc's mallinfo2 (MiB) to $PDSERVE_HEAP_DIR/<pid>.txt, so that bytes in
use (live) can be told from free bytes the heap keeps (fragmentation)."""

import os
import signal


def _report(signum, frame):
    import ctypes

    from services.common.memory import release_freed_memory

    class Mallinfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
        ]

    release_freed_memory()
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = Mallinfo2
    info = mallinfo2()
    with open(os.path.join(os.environ["PDSERVE_HEAP_DIR"], f"{os.getpid()}.txt"), "a") as f:
        f.write(f"{info.arena / 2**20:.1f} {info.uordblks / 2**20:.1f} {info.fordblks / 2**20:.1f}\n")


if os.environ.get("PDSERVE_HEAP_DIR"):
    signal.signal(signal.SIGUSR2, _report)
