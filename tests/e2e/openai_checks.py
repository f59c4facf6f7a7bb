"""Checks of the OpenAI-compatible HTTP API through the official `openai` client, shared by the
disaggregated (test_openai_api.py) and colocated (test_cluster.py) clusters: greedy outputs with
token-id prompts equal transformers' `generate`, token for token (the tokens named by id through
vLLM's `return_tokens_as_token_ids`), with their logprobs and usage; chat likewise, its messages
rendered with the checkpoint's chat template."""

from __future__ import annotations

import asyncio

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

CHATS = [
    [{"role": "user", "content": "Once upon a time there lived a little fox"}],
    [
        {"role": "system", "content": "You answer in numbers."},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "7 8 9"},
        {"role": "user", "content": [{"type": "text", "text": "and"}, {"type": "text", "text": "then?"}]},
    ],
]


def client(cluster) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://{cluster.info['http']}/v1", api_key="unused", max_retries=0)


async def served_model(api: openai.AsyncOpenAI) -> str:
    models = await api.models.list()
    assert len(models.data) == 1
    return models.data[0].id


def token_ids(logprobs_tokens: list[str]) -> list[int]:
    assert all(t.startswith("token_id:") for t in logprobs_tokens)
    return [int(t.removeprefix("token_id:")) for t in logprobs_tokens]


async def completion(api, model: str, prompt, stream: bool, **kwargs) -> dict:
    """One completion's text, token ids, logprobs, finish_reason and usage, streamed or not."""
    extra = {"return_tokens_as_token_ids": True, **kwargs.pop("extra_body", {})}
    if not stream:
        r = await api.completions.create(model=model, prompt=prompt, logprobs=0, extra_body=extra, **kwargs)
        choice = r.choices[0]
        return dict(
            text=choice.text,
            ids=token_ids(choice.logprobs.tokens),
            logprobs=choice.logprobs.token_logprobs,
            finish_reason=choice.finish_reason,
            usage=r.usage,
        )
    out: dict = dict(text="", ids=[], logprobs=[], finish_reason=None, usage=None)
    chunks = await api.completions.create(
        model=model,
        prompt=prompt,
        logprobs=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
        **kwargs,
    )
    async for chunk in chunks:
        if chunk.usage is not None:
            assert not chunk.choices  # the usage chunk comes last, on its own
            out["usage"] = chunk.usage
            continue
        (choice,) = chunk.choices
        assert out["finish_reason"] is None, "a chunk after the finish"
        out["text"] += choice.text
        out["ids"] += token_ids(choice.logprobs.tokens)
        out["logprobs"] += choice.logprobs.token_logprobs
        out["finish_reason"] = choice.finish_reason
    return out


def check_completions_exact(cluster, workload, tokenizer) -> None:
    """The workload through /v1/completions, token-id prompts, half of them streamed."""

    async def run():
        api = client(cluster)
        model = await served_model(api)
        return await asyncio.gather(
            *(
                completion(api, model, item["ids"], stream=i % 2 == 1, max_tokens=item["max_tokens"], temperature=0)
                for i, item in enumerate(workload)
            )
        )

    for item, out in zip(workload, asyncio.run(run())):
        assert out["ids"] == item["expected"], f"prompt {item['prompt'][:30]!r}"
        assert out["text"] == tokenizer.decode(item["expected"], skip_special_tokens=True)
        assert out["logprobs"] == pytest.approx(item["expected_logprobs"], abs=1e-4)
        assert out["finish_reason"] in ("stop", "length")
        assert out["usage"].prompt_tokens == len(item["ids"])
        assert out["usage"].completion_tokens == len(item["expected"])
        assert out["usage"].total_tokens == len(item["ids"]) + len(item["expected"])


def _text(content) -> str:
    """A message's content as the server renders it: text parts joined by newlines."""
    return content if isinstance(content, str) else "\n".join(part["text"] for part in content)


def chat_references(model_dir: str, max_tokens: int) -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    refs = []
    for messages in CHATS:
        flat = [{**m, "content": _text(m["content"])} for m in messages]
        ids = tokenizer.apply_chat_template(flat, add_generation_prompt=True, tokenize=True, return_dict=False)
        out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=max_tokens)
        refs.append(out[0, len(ids) :].tolist())
    return refs


def check_chat_exact(cluster, model_dir: str, max_tokens: int = 12) -> None:
    """Each chat through /v1/chat/completions, streamed and not, equals generate on its rendering."""
    refs = chat_references(model_dir, max_tokens)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    async def one(api, model, messages, stream):
        kwargs = dict(model=model, messages=messages, max_tokens=max_tokens, temperature=0, logprobs=True)
        extra = {"return_tokens_as_token_ids": True}
        if not stream:
            r = await api.chat.completions.create(**kwargs, extra_body=extra)
            (choice,) = r.choices
            assert choice.message.role == "assistant"
            ids = token_ids([t.token for t in choice.logprobs.content])
            return choice.message.content, ids, choice.finish_reason, r.usage
        text, ids, finish, usage, roles = "", [], None, None, []
        chunks = await api.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}, extra_body=extra
        )
        async for chunk in chunks:
            if chunk.usage is not None:
                usage = chunk.usage
                continue
            (choice,) = chunk.choices
            roles.append(choice.delta.role)
            text += choice.delta.content or ""
            ids += token_ids([t.token for t in choice.logprobs.content]) if choice.logprobs else []
            finish = choice.finish_reason
        assert roles[0] == "assistant" and not any(roles[1:])  # the role comes in the first delta only
        return text, ids, finish, usage

    async def run():
        api = client(cluster)
        model = await served_model(api)
        return await asyncio.gather(*(one(api, model, m, stream) for m in CHATS for stream in (False, True)))

    results = asyncio.run(run())
    for i, (text, ids, finish, usage) in enumerate(results):
        ref = refs[i // 2]
        assert ids == ref, f"chat {i // 2} (stream: {i % 2 == 1})"
        assert text == tokenizer.decode(ref, skip_special_tokens=True)
        assert finish in ("stop", "length") and usage.completion_tokens == len(ref)
