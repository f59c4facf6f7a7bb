"""Copying an entry's blocks: runs that are contiguous on both sides, and pieces of shards.

A pool is a `[num_blocks, block_bytes]` byte array, so `count` blocks that are consecutive in
the source pool AND in the destination pool move as one contiguous copy (or one UCX message)
straight from source memory into destination memory, with no staging buffer.

An instance of several ranks has one pool per rank, each holding its shard (shards.py) of the same
blocks. Between instances of the same layout, rank r's pool goes whole into rank r's. Otherwise a
pull copies pieces (some layers x some heads of a block) from a source rank's pool into a
destination rank's: strided views of both pools, still run by run, still with no staging buffer on
one node (ucx_transfer.py packs a piece that is not contiguous before it goes on the wire).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .shards import Piece, Shard

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


@dataclass(frozen=True)
class RankRows:
    """One rank's side of a copy: its pool (or its part of a host-tier buffer) as
    `[n, rank_block_bytes]` bytes, where the entry's blocks are in it, and what the rank holds."""

    rows: torch.Tensor
    ids: Sequence[int]
    shard: Shard


def piece_bytes(piece: Piece, block_size: int, head_bytes: int) -> int:
    """Bytes of one block's part that a piece moves (K and V of its layers and heads)."""
    return len(piece.layers) * 2 * block_size * len(piece.heads) * head_bytes


def piece_view(side: RankRows, piece: Piece, block_size: int, head_bytes: int) -> torch.Tensor:
    """`[n, piece layers, 2, block_size, piece heads, head_bytes]`: the piece's bytes in every block
    of the rank's rows (a view: strided unless the piece is the whole shard)."""
    shard = side.shard
    blocks = side.rows.view(side.rows.shape[0], len(shard.layers), 2, block_size, len(shard.heads), head_bytes)
    first_layer = piece.layers.start - shard.layers.start
    first_head = piece.heads.start - shard.heads.start
    return blocks[:, first_layer : first_layer + len(piece.layers), :, :, first_head : first_head + len(piece.heads)]


def copy_pieces(
    src: Sequence[RankRows],
    dst: Sequence[RankRows],
    pieces: Sequence[Piece],
    block_size: int,
    head_bytes: int,
    stop: threading.Event | None = None,
) -> int:
    """Copies every piece of the entry from its source rank's rows into its destination rank's
    (rank-indexed lists); returns the bytes written into the destination. A piece that is a whole
    shard on both sides is copy_blocks; the others are strided copies of the same runs."""
    total = 0
    for piece in pieces:
        source, target = src[piece.src_rank], dst[piece.dst_rank]
        if _whole(source.shard, piece) and _whole(target.shard, piece):
            total += copy_blocks(source.rows, source.ids, target.rows, target.ids, stop)
            continue
        nbytes = piece_bytes(piece, block_size, head_bytes)
        src_view = piece_view(source, piece, block_size, head_bytes)
        dst_view = piece_view(target, piece, block_size, head_bytes)
        for offset, count in contiguous_runs(source.ids, target.ids, nbytes):
            if stop is not None and stop.is_set():
                _synchronize([source.rows, target.rows])
                raise CopyStopped(f"stopped in a piece after {offset} of {len(target.ids)} blocks")
            s, d = source.ids[offset], target.ids[offset]
            dst_view[d : d + count].copy_(src_view[s : s + count])
        total += len(target.ids) * nbytes
    _synchronize([side.rows for side in (*src, *dst)])  # the ranks' pools may be on several GPUs
    return total


def _whole(shard: Shard, piece: Piece) -> bool:
    return piece.layers == shard.layers and piece.heads == shard.heads


def _synchronize(tensors: Sequence[torch.Tensor]) -> None:
    for device in {t.device for t in tensors if t.is_cuda}:
        torch.cuda.synchronize(device)


async def to_the_end(fn, *args):
    """fn(*args) in a worker thread. A cancelled caller (its client's deadline, or it went away)
    still waits for the thread to end before it raises: the blocks and rows it copies may not be
    handed back while it does."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():  # a second cancellation (server stop) must not end the wait early
            try:
                await asyncio.wait([task])
            except asyncio.CancelledError:
                pass
        raise
