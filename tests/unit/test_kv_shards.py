"""The KV shard layout of an instance and the resharding pull's plan (services/kvstore/shards.py):
for every pair of layouts the planner may choose, each destination rank gets exactly its layers
and heads, once, from a source rank that holds them; and the bytes moved are the destination's
share. The tensor-parallel engine keeps K/V heads as `rank_heads` says (checked against
QKVParallelLinear)."""

from __future__ import annotations

import itertools

import pytest

from services.engine.layers.linear import QKVParallelLinear, TensorParallel
from services.kvstore.shards import Piece, rank_heads, resharding_plan, shards, stage_layers

LAYOUTS = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 2), (8, 1)]  # (tp, pp)


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4, 8])
@pytest.mark.parametrize(("src_layout", "dst_layout"), list(itertools.product(LAYOUTS, LAYOUTS)))
def test_every_destination_byte_comes_from_a_holder_exactly_once(num_kv_heads, src_layout, dst_layout):
    num_layers = 6
    src = shards(num_layers, num_kv_heads, *src_layout)
    dst = shards(num_layers, num_kv_heads, *dst_layout)
    plan = resharding_plan(src, dst)
    for want in dst:
        written = [
            (layer, head)
            for piece in plan
            if piece.dst_rank == want.rank
            for layer in piece.layers
            for head in piece.heads
        ]
        assert sorted(written) == sorted(itertools.product(want.layers, want.heads))  # all of it, once
    for piece in plan:
        source = src[piece.src_rank]
        assert set(piece.layers) <= set(source.layers) and set(piece.heads) <= set(source.heads)
    # bytes moved = the destination's share: its layers x heads summed over its ranks
    moved = sum(len(p.layers) * len(p.heads) for p in plan)
    assert moved == sum(len(s.layers) * len(s.heads) for s in dst)


def test_the_cases_the_issue_names():
    def plan(src, dst, heads=2, layers=4):
        return resharding_plan(shards(layers, heads, *src), shards(layers, heads, *dst))

    # TP 2 -> TP 1: the one destination rank takes head 0 from rank 0 and head 1 from rank 1
    assert plan((2, 1), (1, 1)) == [Piece(0, 0, range(4), range(1)), Piece(1, 0, range(4), range(1, 2))]
    # TP 1 -> TP 2: each destination rank its head from the one source
    assert plan((1, 1), (2, 1)) == [Piece(0, 0, range(4), range(1)), Piece(0, 1, range(4), range(1, 2))]
    # PP 2 -> TP 2: each destination rank its head, layers 0-1 from stage 0 and 2-3 from stage 1
    assert plan((1, 2), (2, 1)) == [
        Piece(0, 0, range(2), range(1)),
        Piece(1, 0, range(2, 4), range(1)),
        Piece(0, 1, range(2), range(1, 2)),
        Piece(1, 1, range(2, 4), range(1, 2)),
    ]
    # TP 4 (2 heads: each replicated twice) -> TP 2: destination ranks take turns among the replicas
    assert {p.src_rank for p in plan((4, 1), (2, 1))} == {0, 3}


def test_stages_and_heads():
    assert [stage_layers(10, 4, s) for s in range(4)] == [range(3), range(3, 6), range(6, 8), range(8, 10)]
    assert [rank_heads(2, 4, t) for t in range(4)] == [range(1), range(1), range(1, 2), range(1, 2)]
    with pytest.raises(ValueError, match="neither a divisor nor a multiple"):
        rank_heads(2, 3, 0)
    with pytest.raises(ValueError, match="3 pipeline stages for 2 layers"):
        shards(2, 2, 1, 3)


@pytest.mark.parametrize(("heads", "kv_heads", "tp"), [(8, 8, 2), (8, 2, 4), (8, 1, 8), (8, 4, 8)])
def test_rank_heads_is_what_the_engine_keeps(heads, kv_heads, tp):
    for rank in range(tp):
        layer = QKVParallelLinear(64, 8, heads, kv_heads, bias=False, tp=TensorParallel(rank=rank, size=tp))
        kept = range(layer.kv_rank * layer.num_kv_heads, (layer.kv_rank + 1) * layer.num_kv_heads)
        assert kept == rank_heads(kv_heads, tp, rank)
