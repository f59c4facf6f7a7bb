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

Colocated: a conversation's next turn finds the previous answer's blocks cached too (they were
computed on the same worker), and computes only the new message.
"""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.engine.config import ModelConfig

pytestmark = pytest.mark.slow

BLOCK = 16
MAX_TOKENS = 12
LOGPROB_TOL = 1e-4
POOL_BLOCKS = 96  # every worker's: the flood below needs several times that, so cached blocks are evicted


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 1000) for _ in range(n)]


class Answer(list):
    """A request's tokens, with their logprobs."""

    logprobs: list[float]


class Reference:
    """transformers' greedy tokens for a prompt, and their logprobs (each computed once)."""

    def __init__(self, model_dir: str):
        self.hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.done: dict[tuple[int, ...], Answer] = {}

    def __call__(self, prompt: list[int]) -> Answer:
        key = tuple(prompt)
        if key not in self.done:
            out = self.hf.generate(
                torch.tensor([prompt]),
                do_sample=False,
                max_new_tokens=MAX_TOKENS,
                output_logits=True,
                return_dict_in_generate=True,
            )
            answer = Answer(out.sequences[0, len(prompt) :].tolist())
            answer.logprobs = [torch.log_softmax(lg[0], -1)[t].item() for lg, t in zip(out.logits, answer)]
            self.done[key] = answer
        return self.done[key]

    def check(self, prompt: list[int], answer: Answer, what: str) -> None:
        """Tokens equal, logprobs within LOGPROB_TOL."""
        expected = self(prompt)
        assert answer == expected, f"{what}: tokens differ"
        worst = max(abs(a - b) for a, b in zip(answer.logprobs, expected.logprobs))
        assert worst <= LOGPROB_TOL, f"{what}: logprobs differ by {worst:.2e}"


async def _generate(stub, prompt: list[int], salt: str = "", cancel_after: int = 0) -> Answer:
    call = stub.Generate(
        router_pb2.GenerateRequest(
            token_ids=prompt,
            cache_salt=salt,
            logprobs=True,
            sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
        ),
        timeout=120,
    )
    answer = Answer()
    answer.logprobs = []
    async for response in call:
        answer.extend(response.token_ids)
        answer.logprobs.extend(response.logprobs)
        if cancel_after and len(answer) >= cancel_after:
            call.cancel()
            break
    return answer


def _metric(cluster, service: dict, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(cluster.metrics_text(service)):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def _summed(cluster, role: str, name: str, **labels: str) -> float:
    return sum(_metric(cluster, s, name, **labels) for s in cluster.services(role))


def _pool_gb(model_dir: str) -> str:
    mc = ModelConfig.from_pretrained(model_dir)
    return f"{POOL_BLOCKS * mc.kv_elements_per_token * BLOCK * 4 / 2**30:.9f}"


@pytest.fixture(scope="module")
def reference(model_dir):
    return Reference(model_dir)


def _wait_decode_idle(cluster) -> None:
    """The decode worker holds a finished request's blocks until the node's prefix tier has them."""
    deadline = time.monotonic() + 10
    while not all(s.kv_blocks_free == s.kv_blocks_total for s in cluster.worker_stats("decode")):
        assert time.monotonic() < deadline, "the decode worker kept blocks"
        time.sleep(0.02)


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
    system = _tokens(rng, 4 * BLOCK)
    hits = ("pdserve_prefix_cache_hit_tokens_total",)
    queries = "pdserve_prefix_cache_queries_tokens_total"

    def tier_hits() -> tuple[float, float]:
        return tuple(_summed(cluster, "prefill", *hits, tier=tier) for tier in ("worker", "node"))  # type: ignore[return-value]

    async def run():
        async with grpc.aio.insecure_channel(cluster.router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            # 1. four conversations of three turns, one request at a time
            prompts: list[list[int]] = []
            expected = [0, 0]
            conversations = []
            for c in range(4):
                prompt = system + _tokens(rng, rng.randint(5, 30))
                turns: list[list[int]] = []
                answers: list[list[int]] = []
                for turn in range(3):
                    before = tier_hits()
                    tokens = await _generate(stub, prompt)
                    reference.check(prompt, tokens, f"conversation {c} turn {turn}")
                    _wait_decode_idle(cluster)
                    got = [after - b for after, b in zip(tier_hits(), before)]
                    # The system prompt was cached by the first conversation. A later turn finds its
                    # last prompt's full blocks at its prefill worker, and the blocks of the answer
                    # that the decode worker computed, offered to the node's prefix tier, there.
                    if turn == 0:
                        want = [0 if c == 0 else 4 * BLOCK, 0]
                    else:
                        last, answer = turns[-1], answers[-1]
                        in_worker = len(last) // BLOCK * BLOCK
                        want = [in_worker, (len(last) + len(answer) - 1) // BLOCK * BLOCK - in_worker]
                    assert got == want, f"conversation {c} turn {turn}: (worker, node) hits {got}, expected {want}"
                    expected = [e + w for e, w in zip(expected, want)]
                    prompts.append(prompt)
                    turns.append(prompt)
                    answers.append(tokens)
                    prompt = prompt + tokens + _tokens(rng, rng.randint(3, 20))
                conversations.append(turns)
            assert _summed(cluster, "prefill", queries, tier="worker") == sum(len(p) for p in prompts)
            assert list(tier_hits()) == expected and expected[1] > 0
            assert _summed(cluster, "router", "pdserve_router_prefix_dispatch_total", outcome="hit") >= 11

            # 2. a flood of long prompts, half cancelled at their first token, evicts cached
            # blocks while the conversations' last turns are asked again, concurrently
            flood = [_tokens(rng, rng.randint(300, 500)) for _ in range(10)]
            jobs = [_generate(stub, p, cancel_after=1 if i % 2 else 0) for i, p in enumerate(flood)]
            jobs += [_generate(stub, turns[-1]) for turns in conversations]
            results = await asyncio.gather(*jobs)
            for i, (p, tokens) in enumerate(zip(flood + [t[-1] for t in conversations], results)):
                if i < len(flood) and i % 2:
                    assert tokens[:1] == reference(p)[:1]
                else:
                    reference.check(p, tokens, f"request {i} after the flood")
            assert _summed(cluster, "prefill", "pdserve_prefix_cache_evicted_blocks_total") > 0

            # 3. another tenant's salt finds nothing of the first conversation, in either tier
            before = tier_hits()
            salted = conversations[0][1]
            reference.check(salted, await _generate(stub, salted, salt="tenant-b"), "salted")
            assert tier_hits() == before

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
    name = "pdserve_prefix_cache_hit_tokens_total"

    def tier_hits() -> list[float]:
        return [_summed(cluster, "prefill", name, tier=tier) for tier in ("worker", "node", "remote")]

    async def run():
        async with grpc.aio.insecure_channel(cluster.router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            for c in range(2):
                prompt = _tokens(rng, rng.randint(20, 60))
                last: list[int] = []
                answer: list[int] = []
                for turn in range(3):
                    before = tier_hits()
                    tokens = await _generate(stub, prompt)
                    reference.check(prompt, tokens, f"conversation {c} turn {turn}")
                    _wait_decode_idle(cluster)
                    got = [after - b for after, b in zip(tier_hits(), before)]
                    in_worker = len(last) // BLOCK * BLOCK
                    remote = (len(last) + len(answer) - 1) // BLOCK * BLOCK - in_worker if turn else 0
                    assert got == [in_worker, 0, remote], f"conversation {c} turn {turn}: (worker, node, remote) {got}"
                    last, answer = prompt, tokens
                    prompt = prompt + tokens + _tokens(rng, rng.randint(3, 20))

    asyncio.run(run())
    cluster.wait_idle(timeout=20)
    stats = {s.node_id: s for s in cluster.kvstore_stats()}
    decode_node = cluster.services("decode")[0]["node"]
    assert stats[decode_node].prefix_blocks > 0 and stats[decode_node].bytes_ucx_sent > 0
    assert all(s.prefix_pinned_rows == 0 for s in stats.values())


def test_colocated_next_turn_finds_the_answer_cached(cluster_factory, model_dir, reference):
    cluster = cluster_factory("--model", model_dir, "--mode", "colocated")
    rng = random.Random(20)
    name = "pdserve_prefix_cache_hit_tokens_total"

    async def run():
        async with grpc.aio.insecure_channel(cluster.router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            prompt = _tokens(rng, 37)
            computed = 0  # tokens of the last turn whose K/V was computed: its prompt and its answer but the last
            for turn in range(3):
                before = _summed(cluster, "colocated", name, tier="worker")
                tokens = await _generate(stub, prompt)
                reference.check(prompt, tokens, f"turn {turn}")
                got = _summed(cluster, "colocated", name, tier="worker") - before
                assert got == computed // BLOCK * BLOCK, f"turn {turn}: the last turn's full blocks were cached"
                computed = len(prompt) + len(tokens) - 1
                prompt = prompt + tokens + _tokens(rng, 9)

    asyncio.run(run())
    cluster.wait_idle(timeout=20)
