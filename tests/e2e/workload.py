"""The shared e2e workload: 32 prompts of varied length and max_tokens with HF greedy references
(tokens and their logprobs), and the checks every cluster configuration must pass. Every other
request asks for logprobs."""

from __future__ import annotations

import asyncio
import random
import re

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.engine.config import ModelConfig
from services.tiny_models import CORPUS_WORDS, get_model

NUM_REQUESTS = 32
BLOCK_SIZE = 16


@pytest.fixture(scope="session")
def model_dir():
    return get_model("llama")


@pytest.fixture(scope="session")
def workload(model_dir):
    """32 prompts of varied length and max_tokens, with HF greedy references."""
    return build_workload(model_dir, NUM_REQUESTS)


def build_workload(model_dir: str, num_requests: int) -> list[dict]:
    rng = random.Random(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    items = []
    for i in range(num_requests):
        prompt = " ".join(rng.choice(CORPUS_WORDS) for _ in range(rng.randint(1, 60)))
        max_tokens = rng.choice([1, 2, 5, 17, 33, 48])
        ids = tokenizer.encode(prompt)
        out = hf.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=max_tokens,
            output_scores=True,
            return_dict_in_generate=True,
        )
        ref = out.sequences[0, len(ids) :].tolist()
        logprobs = [torch.log_softmax(score[0], -1)[t].item() for score, t in zip(out.scores, ref)]
        items.append(
            {
                "prompt": prompt,
                "ids": ids,
                "max_tokens": max_tokens,
                "expected": ref,
                "expected_logprobs": logprobs,
                "logprobs": i % 2 == 0,
            }
        )
    return items


def block_bytes(model_dir: str) -> int:
    mc = ModelConfig.from_pretrained(model_dir)
    return mc.kv_elements_per_token * BLOCK_SIZE * 4  # float32


async def _generate(router: str, item: dict, **sampling) -> tuple[list[int], str, router_pb2.GenerateResponse]:
    async with grpc.aio.insecure_channel(router) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        request = router_pb2.GenerateRequest(
            prompt=item["prompt"],
            request_id=f"req-{item['prompt'][:8]}",
            logprobs=item.get("logprobs", False),
            sampling=common_pb2.SamplingParams(max_tokens=item["max_tokens"], temperature=0, **sampling),
        )
        tokens, text, last, logprobs = [], "", None, []
        async for response in stub.Generate(request, timeout=120):
            tokens.extend(response.token_ids)
            text += response.text
            logprobs.extend(response.logprobs)
            last = response
        del last.logprobs[:]
        last.logprobs.extend(logprobs)  # the whole stream's, for the checks
        return tokens, text, last


def run_workload(router: str, workload: list[dict]) -> list[tuple]:
    async def all_at_once():
        return await asyncio.gather(*(_generate(router, item) for item in workload))

    return asyncio.run(all_at_once())


def check_outputs(workload, results, tokenizer) -> None:
    for item, (tokens, text, last) in zip(workload, results):
        assert tokens == item["expected"], f"prompt {item['prompt'][:30]!r}"
        if item["logprobs"]:
            assert list(last.logprobs) == pytest.approx(item["expected_logprobs"], abs=1e-4)
        else:
            assert not last.logprobs
        assert last.finish_reason in ("stop", "length")
        assert last.usage.prompt_tokens == len(item["ids"]) and last.usage.completion_tokens == len(tokens)
        assert text == tokenizer.decode(tokens, skip_special_tokens=True)
        assert last.timing.ttft_seconds > 0 and last.timing.e2e_seconds >= last.timing.ttft_seconds
        # where the first token's time went, reported by the worker that prefilled (either mode)
        timing = last.timing
        assert timing.prefill_seconds > 0 and timing.queue_seconds >= 0
        assert timing.queue_seconds + timing.prefill_seconds <= timing.ttft_seconds
        router = timing.ttft_seconds - timing.queue_seconds - timing.prefill_seconds
        assert timing.router_seconds == pytest.approx(router, abs=1e-6) and timing.router_seconds > 0


def expected_kv_bytes(workload, model_dir) -> int:
    """KV moved = the prompt's blocks, for every request that continued past its first token."""
    per_block = block_bytes(model_dir)
    total = 0
    for item in workload:
        if len(item["expected"]) > 1:
            total += -(-len(item["ids"]) // BLOCK_SIZE) * per_block
    return total


def largest_grpc_message(cluster) -> int:
    largest = 0
    for svc in cluster.info["services"]:
        for m in re.finditer(
            r"^pdserve_grpc_largest_message_bytes\{[^}]*\} ([0-9.e+]+)$", cluster.metrics_text(svc), re.M
        ):
            largest = max(largest, int(float(m.group(1))))
    return largest
