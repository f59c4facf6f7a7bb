"""CPU KV pools are /dev/shm files, which outlive a worker killed by SIGKILL (or the OOM killer):
the next pool created on the node removes them, and never the pool of a worker still alive.
Real processes, real /dev/shm, real signals."""

import os
import signal
import subprocess
import sys

from services.engine.kv_cache import KvLayout, KvPool, remove_stale_pools

LAYOUT = KvLayout(
    num_blocks=8, num_layers=2, block_size=16, num_kv_heads=2, head_dim=16, dtype="float32", model_id="stale-pool-test"
)

CHILD = f"""
import sys, time
from services.engine.kv_cache import KvLayout, KvPool
pool = KvPool.allocate(KvLayout(**{LAYOUT.to_dict()!r}), "cpu")
print(pool.descriptor["path"], flush=True)
time.sleep(120)
"""


def _start_pool_owner() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    return proc, proc.stdout.readline().strip()


def test_a_killed_workers_pool_is_removed_and_a_live_ones_is_kept():
    dead, dead_path = _start_pool_owner()
    alive, alive_path = _start_pool_owner()
    mine = None
    try:
        assert os.path.exists(dead_path) and os.path.exists(alive_path)
        dead.send_signal(signal.SIGKILL)
        dead.wait(10)
        assert os.path.exists(dead_path), "SIGKILL leaves the file behind (the reason for the sweep)"

        mine = KvPool.allocate(LAYOUT, "cpu")  # what a restarted worker does
        assert not os.path.exists(dead_path)
        assert os.path.exists(alive_path), "a live worker's pool must never be removed"
        assert remove_stale_pools() == [], "this process's own pool is held too"
        assert os.path.exists(mine.descriptor["path"])

        alive.send_signal(signal.SIGKILL)
        alive.wait(10)
        assert alive_path in remove_stale_pools()
        assert not os.path.exists(alive_path)
    finally:
        for proc in (dead, alive):
            proc.kill()
            proc.wait(10)
        if mine is not None:
            mine.close()
    assert not os.path.exists(mine.descriptor["path"])
