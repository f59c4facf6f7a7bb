"""The torch backend's dense K/V mirror for CPU decode (services/engine/backends/kv_mirror.py)
against its plain gather path, on batches whose contexts differ widely and change as sequences
join and leave."""

import random

import torch

from services.engine.backends.kv_mirror import GROUP_SPLIT_ROWS, attention_groups
from services.engine.config import EngineConfig, SamplingParams
from services.engine.engine import Engine
from services.engine.sequence import Sequence
from services.tiny_models import get_model


def _engine(mirror_bytes: int) -> Engine:
    # the mirror serves the torch backend (the CPU kernels read the pool in place)
    return Engine(
        get_model("llama"),
        EngineConfig(
            dtype="float32",
            device="cpu",
            block_size=16,
            kv_cache_bytes=64 << 20,
            cpu_decode_kv_mirror_bytes=mirror_bytes,
            backend="torch",
        ),
    )


def test_mirror_matches_gather_path_with_joins_leaves_and_mixed_lengths():
    """Sequences of 2 to 700 tokens join at random steps and leave at random steps; every step's
    logits through the mirror (sorted slots, grouped attention) equal the gather path's."""
    rng = random.Random(0)
    with_mirror, without = _engine(256 << 20), _engine(0)
    assert with_mirror.backend.mirror is not None and without.backend.mirror is None
    lengths = [700, 3, 40, 520, 9, 260, 130, 2, 600, 75, 310, 18]
    prompts = [[rng.randrange(3, 1000) for _ in range(n)] for n in lengths]
    free_at_start = with_mirror.block_manager.num_free
    pairs = {}  # seq id -> (sequence on the mirror engine, on the gather engine)
    pending = list(enumerate(prompts))
    split_steps = 0
    for step in range(40):
        if pending and (step % 3 == 0 or not pairs):
            for _ in range(rng.randint(1, 3)):
                if not pending:
                    break
                i, prompt = pending.pop(0)
                a, b = (
                    Sequence.from_prompt(f"s{i}", list(prompt), SamplingParams(max_tokens=1000, temperature=0))
                    for _ in range(2)
                )
                ta, tb = with_mirror.prefill([a])[0].token_id, without.prefill([b])[0].token_id
                assert ta == tb
                pairs[a.seq_id] = (a, b)
        batch = list(pairs.values())
        rng.shuffle(batch)  # the caller's order is arbitrary; the mirror runs its own slot order
        out_a = with_mirror.decode_step([a for a, _ in batch])
        logits_a = with_mirror.last_logits.clone()
        out_b = without.decode_step([b for _, b in batch])
        torch.testing.assert_close(logits_a, without.last_logits, atol=1e-4, rtol=0)
        assert [o.token_id for o in out_a] == [o.token_id for o in out_b]
        mirror = with_mirror.backend.mirror
        mirrored = [len(pairs[sid][0].token_ids) for sid in mirror.seq_ids]
        assert mirrored == sorted(mirrored, reverse=True), "slots are kept longest first"
        split_steps += len(mirror.groups) > 1
        if step % 4 == 3 and len(pairs) > 1:  # one leaves: its blocks freed, the mirror told at the next step
            sid = rng.choice(sorted(pairs))
            a, b = pairs.pop(sid)
            with_mirror.free(a)
            without.free(b)
    assert split_steps > 10, "mixed lengths should have split attention into groups"
    for a, b in pairs.values():
        with_mirror.free(a)
        without.free(b)
    assert with_mirror.block_manager.num_free == free_at_start
    # idle: the mirror, sized for the largest batch it held, is freed, and made again when needed
    assert with_mirror.backend.mirror.caches
    with_mirror.release_idle_memory()
    assert with_mirror.backend.mirror.caches == []
    sampling = SamplingParams(max_tokens=4, temperature=0)
    a, b = (Sequence.from_prompt("after", prompts[0][:50], sampling) for _ in range(2))
    with_mirror.prefill([a])
    without.prefill([b])
    for _ in range(3):
        assert [o.token_id for o in with_mirror.decode_step([a])] == [o.token_id for o in without.decode_step([b])]
        torch.testing.assert_close(with_mirror.last_logits, without.last_logits, atol=1e-4, rtol=0)


def test_attention_groups_bound_padding_and_cover_every_slot():
    assert attention_groups([100] * 16) == [(0, 16, 100)]  # uniform: one call
    assert attention_groups([2000, 1900, 60, 50, 40, 30]) == [(0, 2, 2000), (2, 6, 60)]
    assert len(attention_groups([200, 100])) == 1  # saving 100 rows of one slot is not worth a call
    rng = random.Random(1)
    for _ in range(200):
        lens = sorted((rng.randint(1, 2048) for _ in range(rng.randint(1, 64))), reverse=True)
        groups = attention_groups(lens)
        assert groups[0][0] == 0 and groups[-1][1] == len(lens)
        assert all(g[1] == h[0] for g, h in zip(groups, groups[1:]))
        assert all(span == max(lens[s:e]) for s, e, span in groups)
        padded = sum((e - s) * span for s, e, span in groups)
        assert padded <= len(lens) * lens[0]
        # every cut saves more than a call costs
        assert all(lens[s] - lens[e] > 0 for s, e, _ in groups[:-1])
    assert GROUP_SPLIT_ROWS > 0
    # an unsorted batch is still attended over each group's true maximum
    assert attention_groups([10, 500, 5]) == [(0, 3, 500)]
