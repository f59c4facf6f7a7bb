"""Which part of a request's KV each rank of an instance holds, and what a pull between two
instances of different parallelism moves: pure arithmetic, no I/O (the daemon's pulls use it:
block_runs.copy_pieces on one node, ucx_transfer.py between nodes; docs/kvstore.md).

An instance of (tp, pp) splits the model's layers into pp pipeline stages (contiguous; the first
stages take one more layer when they do not divide evenly) and its K/V heads among the tp ranks of
each stage (contiguous; a head is replicated on tp / heads ranks when there are more ranks than
heads, as layers/linear.py's QKVParallelLinear keeps them). Rank r is stage r // tp, position
r % tp. A rank's pool block holds [its layers, 2, block_size, its heads, head_dim].

A pull into another layout copies, for each destination rank, exactly the layers and heads it holds,
each piece from one source rank that holds it (where several replicas do, destination ranks take
turns among them): no destination byte is written twice and none is missed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from services.engine.config import stage_layers
from services.engine.kv_cache import KvLayout


@dataclass(frozen=True)
class Shard:
    """The layers and K/V heads one rank of an instance holds."""

    rank: int
    layers: range
    heads: range


@dataclass(frozen=True)
class Piece:
    """Layers x heads a pull copies from one source rank's pool into one destination rank's."""

    src_rank: int
    dst_rank: int
    layers: range
    heads: range


def rank_heads(num_kv_heads: int, tp: int, position: int) -> range:
    if tp <= num_kv_heads:
        if num_kv_heads % tp:
            raise ValueError(f"{num_kv_heads} K/V heads do not split over {tp} ranks")
        per_rank = num_kv_heads // tp
        return range(position * per_rank, (position + 1) * per_rank)
    if tp % num_kv_heads:
        raise ValueError(f"{tp} ranks are neither a divisor nor a multiple of the {num_kv_heads} K/V heads")
    head = position // (tp // num_kv_heads)
    return range(head, head + 1)


MAX_RANKS = 256  # of one instance: more is a malformed request, not a deployment


def shards(num_layers: int, num_kv_heads: int, tp: int, pp: int) -> list[Shard]:
    """Every rank's shard, in rank order."""
    if tp < 1 or pp < 1 or tp * pp > MAX_RANKS:
        raise ValueError(f"tp {tp} x pp {pp}: each must be at least 1, and at most {MAX_RANKS} ranks in all")
    if pp > num_layers:
        raise ValueError(f"{pp} pipeline stages for {num_layers} layers")
    return [
        Shard(rank, stage_layers(num_layers, pp, rank // tp), rank_heads(num_kv_heads, tp, rank % tp))
        for rank in range(tp * pp)
    ]


def instance_shards(layout: KvLayout, tp: int, pp: int) -> list[Shard]:
    """The shards of an instance whose KV geometry as a whole is `layout` (the model's layers and
    K/V heads)."""
    return shards(layout.num_layers, layout.num_kv_heads, tp, pp)


def rank_layout(layout: KvLayout, shard: Shard) -> KvLayout:
    """The layout of one rank's pool: the instance's, cut to the rank's layers and heads."""
    return replace(layout, num_layers=len(shard.layers), num_kv_heads=len(shard.heads))


def degrees(shards_: list[Shard]) -> tuple[int, int]:
    """(tp, pp) of the instance whose shards these are."""
    pp = len({s.layers for s in shards_})
    return len(shards_) // pp, pp


def _overlap(a: range, b: range) -> range:
    return range(max(a.start, b.start), min(a.stop, b.stop))


def resharding_plan(src: list[Shard], dst: list[Shard]) -> list[Piece]:
    """The pieces that fill every destination shard from the source shards (see the module doc)."""
    stages = sorted({s.layers for s in src}, key=lambda layers: layers.start)  # the source's stages
    pieces = []
    for want in dst:
        for stage in stages:
            layers = _overlap(want.layers, stage)
            if not layers:
                continue
            holders = [s for s in src if s.layers == stage]
            for head in want.heads:
                owners = [s for s in holders if head in s.heads]
                if not owners:
                    raise ValueError(f"no source rank holds K/V head {head} of layers {layers.start}-{layers.stop - 1}")
                source = owners[want.rank % len(owners)]  # replicas share the load
                pieces.append(Piece(source.rank, want.rank, layers, range(head, head + 1)))
    return _merged(pieces)


def _merged(pieces: list[Piece]) -> list[Piece]:
    """Adjacent heads from the same source into the same destination as one piece."""
    out: list[Piece] = []
    for piece in pieces:
        last = out[-1] if out else None
        if (
            last is not None
            and (last.src_rank, last.dst_rank, last.layers) == (piece.src_rank, piece.dst_rank, piece.layers)
            and last.heads.stop == piece.heads.start
        ):
            out[-1] = Piece(last.src_rank, last.dst_rank, last.layers, range(last.heads.start, piece.heads.stop))
        else:
            out.append(piece)
    return out
