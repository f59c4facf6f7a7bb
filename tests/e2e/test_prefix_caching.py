"""Prefix caching through the whole system (issue 19): real clusters started with `pdserve up`.

Disaggregated (2 prefill workers, a decode worker, small pools): multi-turn conversations over a
shared system prompt, one turn at a time, go to the prefill worker that holds their prefix
(KV-aware dispatch: the router's index of the workers' caches), which finds their earlier prompt in
its own cache (tier "worker") and the earlier answer, which the decode worker offered to the
node's prefix tier when it finished, in the kvstore daemon (tier "node"), and computes only the
new message: exactly as many tokens hit in each tier as the blocks allow (metric deltas). Then a
concurrent flood of long prompts, half of them cancelled, evicts cached blocks while conversations
go on; a salted request finds nothing in either tier. Every output equals transformers' greedy
`generate` (logprobs within 1e-4), and afterwards every pool and the kvstore are idle (no
prefix-tier row held).

Colocated: test_cluster.py's colocated clusters run conversations.check_next_turns_find_the_answer_cached.
"""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest
from conversations import BLOCK, generate, random_tokens, summed

from pdserve.v1 import router_pb2_grpc
from services.engine.config import ModelConfig

pytestmark = pytest.mark.slow

POOL_BLOCKS = 96  # every worker's: the flood below needs several times that, so cached blocks are evicted


def _pool_gb(model_dir: str) -> str:
    mc = ModelConfig.from_pretrained(model_dir)
    return f"{POOL_BLOCKS * mc.kv_elements_per_token * BLOCK * 4 / 2**30:.9f}"


def _wait_decode_idle(cluster) -> None:
    """The decode worker holds a finished request's blocks until the node's prefix tier has them."""
    deadline = time.monotonic() + 10
    while not all(s.kv_blocks_free == s.kv_blocks_total for s in cluster.worker_stats("decode")):
        assert time.monotonic() < deadline, "the decode worker kept blocks"
        time.sleep(0.02)


HITS = "pdserve_prefix_cache_hit_tokens_total"
TIERS = ("worker", "node", "remote")


def _prefill_hits(cluster) -> list[float]:
    """The prefill workers' hit tokens in each of TIERS."""
    return [summed(cluster, "prefill", HITS, tier=tier) for tier in TIERS]


async def _turn(stub, cluster, reference, prompt: list[int], what: str) -> tuple[list[int], list[float]]:
    """One request, checked against transformers; the hit tokens it added in each tier, once the
    decode worker has offered its blocks to its node's prefix tier."""
    before = _prefill_hits(cluster)
    answer = await generate(stub, prompt)
    reference.check(prompt, answer, what)
    _wait_decode_idle(cluster)
    return answer, [after - b for after, b in zip(_prefill_hits(cluster), before)]


def test_disaggregated_turns_hit_the_worker_and_node_tiers_exactly(cluster_factory, model_dir, reference):
    cluster = cluster_factory(
        "--model",
        model_dir,
        "--prefill",
        "2",
        "--decode",
        "1",
        "--kv-cache-gb",
        _pool_gb(model_dir),
        "--worker-arg=--node-prefix-fetch always",  # (measured: whether a fetch pays depends on timing)
    )
    rng = random.Random(19)
    system = random_tokens(rng, 4 * BLOCK)
    queries = "pdserve_prefix_cache_queries_tokens_total"

    async def run():
        async with grpc.aio.insecure_channel(cluster.router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            # 1. four conversations of three turns, one request at a time
            prompts: list[list[int]] = []
            expected = [0, 0, 0]
            conversations = []
            for c in range(4):
                prompt = system + random_tokens(rng, rng.randint(5, 30))
                turns: list[list[int]] = []
                answers: list[list[int]] = []
                for turn in range(3):
                    tokens, got = await _turn(stub, cluster, reference, prompt, f"conversation {c} turn {turn}")
                    # The system prompt was cached by the first conversation. A later turn finds its
                    # last prompt's full blocks at its prefill worker, and the blocks of the answer
                    # that the decode worker computed, offered to the node's prefix tier, there.
                    if turn == 0:
                        want = [0 if c == 0 else 4 * BLOCK, 0, 0]
                    else:
                        last, answer = turns[-1], answers[-1]
                        in_worker = len(last) // BLOCK * BLOCK
                        want = [in_worker, (len(last) + len(answer) - 1) // BLOCK * BLOCK - in_worker, 0]
                    assert got == want, f"conversation {c} turn {turn}: {TIERS} hits {got}, expected {want}"
                    expected = [e + w for e, w in zip(expected, want)]
                    prompts.append(prompt)
                    turns.append(prompt)
                    answers.append(tokens)
                    prompt = prompt + tokens + random_tokens(rng, rng.randint(3, 20))
                conversations.append(turns)
            assert summed(cluster, "prefill", queries, tier="worker") == sum(len(p) for p in prompts)
            assert _prefill_hits(cluster) == expected and expected[1] > 0
            assert summed(cluster, "router", "pdserve_router_prefix_dispatch_total", outcome="hit") >= 11

            # 2. a flood of long prompts, half cancelled at their first token, evicts cached
            # blocks while the conversations' last turns are asked again, concurrently
            flood = [random_tokens(rng, rng.randint(300, 500)) for _ in range(10)]
            jobs = [generate(stub, p, cancel_after=1 if i % 2 else 0) for i, p in enumerate(flood)]
            jobs += [generate(stub, turns[-1]) for turns in conversations]
            results = await asyncio.gather(*jobs)
            for i, (p, tokens) in enumerate(zip(flood + [t[-1] for t in conversations], results)):
                if i < len(flood) and i % 2:
                    assert tokens[:1] == reference(p)[:1]
                else:
                    reference.check(p, tokens, f"request {i} after the flood")
            assert summed(cluster, "prefill", "pdserve_prefix_cache_evicted_blocks_total") > 0

            # 3. another tenant's salt finds nothing of the first conversation, in either tier
            before = _prefill_hits(cluster)
            salted = conversations[0][1]
            reference.check(salted, await generate(stub, salted, salt="tenant-b"), "salted")
            assert _prefill_hits(cluster) == before

    asyncio.run(run())
    cluster.wait_idle(timeout=20)
    assert all(s.prefix_pinned_rows == 0 and s.prefix_blocks > 0 for s in cluster.kvstore_stats())


def test_two_nodes_next_turn_fetches_the_answer_from_the_decode_nodes_tier_over_ucx(
    cluster_factory, model_dir, reference
):
    """Prefill on node A, decode on node B (the default split): a finished turn's blocks go to node
    B's prefix tier; the router tells the prefill worker that node B holds the conversation, and
    its daemon fetches the answer's blocks from node B's over UCX (tier "remote")."""
    cluster = cluster_factory(
        "--model",
        model_dir,
        "--nodes",
        "2",
        "--kv-cache-gb",
        _pool_gb(model_dir),
        "--worker-arg=--node-prefix-fetch always",
    )
    rng = random.Random(21)

    async def run():
        async with grpc.aio.insecure_channel(cluster.router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            for c in range(2):
                prompt = random_tokens(rng, rng.randint(20, 60))
                last: list[int] = []
                answer: list[int] = []
                for turn in range(3):
                    tokens, got = await _turn(stub, cluster, reference, prompt, f"conversation {c} turn {turn}")
                    in_worker = len(last) // BLOCK * BLOCK
                    remote = (len(last) + len(answer) - 1) // BLOCK * BLOCK - in_worker if turn else 0
                    assert got == [in_worker, 0, remote], f"conversation {c} turn {turn}: {TIERS} hits {got}"
                    last, answer = prompt, tokens
                    prompt = prompt + tokens + random_tokens(rng, rng.randint(3, 20))

    asyncio.run(run())
    cluster.wait_idle(timeout=20)
    stats = {s.node_id: s for s in cluster.kvstore_stats()}
    decode_node = cluster.services("decode")[0]["node"]
    assert stats[decode_node].prefix_blocks > 0 and stats[decode_node].bytes_ucx_sent > 0
    assert all(s.prefix_pinned_rows == 0 for s in stats.values())
