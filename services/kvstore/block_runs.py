"""Coalescing an entry's blocks into runs that are contiguous on both sides of a copy.

A pool is a `[num_blocks, block_bytes]` byte array, so `count` blocks that are consecutive in
the source pool AND in the destination pool move as one contiguous copy (or one UCX message)
straight from source memory into destination memory, with no staging buffer.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

# One UCX message (or one copy) carries at most this much: big runs are split so that several
# messages can be in flight and a single message never needs a huge bounce buffer in UCX.
MAX_RUN_BYTES = 64 << 20


def contiguous_runs(
    src_ids: Sequence[int], dst_ids: Sequence[int], block_bytes: int, max_run_bytes: int = MAX_RUN_BYTES
) -> list[tuple[int, int]]:
    """Splits the entry (block i of the entry: src_ids[i] -> dst_ids[i]) into `(offset, count)`
    runs: entry blocks offset..offset+count-1 are consecutive in both pools."""
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
    max_blocks = max(1, max_run_bytes // max(1, block_bytes))
    runs: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(src_ids) + 1):
        run_ends = (
            i == len(src_ids)
            or src_ids[i] != src_ids[i - 1] + 1
            or dst_ids[i] != dst_ids[i - 1] + 1
            or i - start == max_blocks
        )
        if run_ends:
            runs.append((start, i - start))
            start = i
    return runs


class CopyStopped(Exception):
    """copy_blocks saw its stop event between two runs."""


def copy_blocks(
    src_rows: torch.Tensor,
    src_ids: Sequence[int],
    dst_rows: torch.Tensor,
    dst_ids: Sequence[int],
    stop: threading.Event | None = None,
) -> int:
    """Copies block src_ids[i] of `src_rows` into block dst_ids[i] of `dst_rows` (both
    `[n, block_bytes]` uint8) run by run. Returns the bytes copied. Runs in a worker thread:
    torch releases the GIL while copying. With `stop` set, raises CopyStopped before the next run
    (runs are at most MAX_RUN_BYTES, so it stops within one run's copy)."""
    block_bytes = dst_rows.shape[1]
    for offset, count in contiguous_runs(src_ids, dst_ids, block_bytes):
        if stop is not None and stop.is_set():
            if dst_rows.is_cuda or src_rows.is_cuda:  # the runs already queued finish first
                torch.cuda.synchronize(dst_rows.device if dst_rows.is_cuda else src_rows.device)
            raise CopyStopped(f"stopped after {offset} of {len(dst_ids)} blocks")
        s, d = src_ids[offset], dst_ids[offset]
        dst_rows[d : d + count].copy_(src_rows[s : s + count], non_blocking=False)
    if dst_rows.is_cuda or src_rows.is_cuda:
        torch.cuda.synchronize(dst_rows.device if dst_rows.is_cuda else src_rows.device)
    return len(dst_ids) * block_bytes
