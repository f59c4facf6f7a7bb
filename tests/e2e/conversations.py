"""Conversations through a live cluster (prefix caching, issue 19): transformers' reference answers
with their logprobs, a request helper, metric sums, and the colocated multi-turn check that
test_cluster.py's colocated clusters run."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc

BLOCK = 16
MAX_TOKENS = 12
LOGPROB_TOL = 1e-4


def random_tokens(rng: random.Random, n: int) -> list[int]:
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


async def generate(stub, prompt: list[int], salt: str = "", cancel_after: int = 0) -> Answer:
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


def metric(cluster, service: dict, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(cluster.metrics_text(service)):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def summed(cluster, role: str, name: str, **labels: str) -> float:
    return sum(metric(cluster, s, name, **labels) for s in cluster.services(role))


@pytest.fixture(scope="module")
def reference(model_dir):
    return Reference(model_dir)


def check_next_turns_find_the_answer_cached(cluster, reference: Reference, seed: int = 20) -> None:
    """Colocated: a conversation's next turn finds the blocks of its last turn's prompt and answer
    (but the answer's last token, never fed) in its worker's cache, and computes only the rest."""
    rng = random.Random(seed)
    name = "pdserve_prefix_cache_hit_tokens_total"

    async def run():
        async with grpc.aio.insecure_channel(cluster.router) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            prompt = random_tokens(rng, 37)
            computed = 0  # tokens of the last turn whose K/V was computed
            for turn in range(3):
                before = summed(cluster, "colocated", name, tier="worker")
                answer = await generate(stub, prompt)
                reference.check(prompt, answer, f"turn {turn}")
                got = summed(cluster, "colocated", name, tier="worker") - before
                assert got == computed // BLOCK * BLOCK, f"turn {turn}: the last turn's full blocks were cached"
                computed = len(prompt) + len(answer) - 1
                prompt = prompt + answer + random_tokens(rng, 9)

    asyncio.run(run())
