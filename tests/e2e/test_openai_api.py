"""The OpenAI-compatible HTTP API (issue 20), through the official `openai` client and raw HTTP, on a
real disaggregated cluster (the colocated one is checked in test_cluster.py), and on a router with
no worker for the statuses that need one missing (503, 429)."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import openai
import pytest
import torch
from openai_checks import check_chat_exact, check_completions_exact, client, completion, served_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.launcher import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def cluster(two_node):
    return two_node  # (conftest.py's, shared with test_cluster.py)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(model_dir)


def _router_metric(cluster, name: str, **labels) -> float:
    (router,) = cluster.services("router")
    text = cluster.metrics_text(router)
    total = 0.0
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} ([0-9.e+]+)$", text, re.M):
        found = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def test_completions_and_chat_equal_transformers_generate(cluster, workload, model_dir, tokenizer):
    names = ("pdserve_requests_total", "pdserve_time_to_first_token_seconds_count")
    before = {(name, api): _router_metric(cluster, name, api=api) for name in names for api in ("grpc", "http")}
    check_completions_exact(cluster, workload, tokenizer)
    check_chat_exact(cluster, model_dir)
    cluster.wait_idle()
    # the same request metrics as gRPC's, under api="http"
    for name in names:
        assert _router_metric(cluster, name, api="http") - before[name, "http"] == len(workload) + 4
        assert _router_metric(cluster, name, api="grpc") == before[name, "grpc"]
    assert _router_metric(cluster, "pdserve_http_responses_total", status="200") >= len(workload) + 4


def _stop_spanning_tokens(tokenizer, ids: list[int]) -> str:
    """A stop string made of the end of one output token and the start of the next."""
    pieces = [tokenizer.decode([t]) for t in ids]
    for k in range(2, len(pieces) - 1):
        a, b = pieces[k], pieces[k + 1]
        if len(a) >= 2 and len(b) >= 2 and (a + b).isascii() and (a + b).isprintable():
            return a[-2:] + b[:2]
    raise AssertionError("no two neighbouring tokens of two characters or more")


def test_stop_strings_across_token_boundaries_on_both_apis(cluster, workload, tokenizer):
    item = next(i for i in workload if len(i["expected"]) >= 17)
    whole = tokenizer.decode(item["expected"], skip_special_tokens=True)
    stop = _stop_spanning_tokens(tokenizer, item["expected"])
    want = whole[: whole.index(stop)]

    async def run():
        api = client(cluster)
        model = await served_model(api)
        http = [
            await completion(api, model, item["ids"], stream, max_tokens=item["max_tokens"], temperature=0, stop=stop)
            for stream in (False, True)
        ]
        async with grpc.aio.insecure_channel(cluster.router) as channel:
            request = router_pb2.GenerateRequest(
                token_ids=item["ids"],
                sampling=common_pb2.SamplingParams(max_tokens=item["max_tokens"], temperature=0, stop=["zzzz", stop]),
            )
            responses = [r async for r in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=60)]
        return http, responses

    http, responses = asyncio.run(run())
    for out in http:
        assert out["text"] == want and stop not in out["text"]
        assert out["finish_reason"] == "stop"
        # generation ended at the token that completed the stop string
        assert out["ids"] == item["expected"][: len(out["ids"])] and len(out["ids"]) < len(item["expected"])
        assert out["usage"].completion_tokens == len(out["ids"])
    tokens = [t for r in responses for t in r.token_ids]
    assert "".join(r.text for r in responses) == want
    assert responses[-1].finish_reason == "stop" and tokens == http[0]["ids"]
    assert responses[-1].usage.completion_tokens == len(tokens)
    cluster.wait_idle()  # the rest of each generation was cancelled, its blocks freed


def test_min_tokens_defers_the_end_as_transformers_min_new_tokens(cluster, workload, model_dir):
    item = next(i for i in workload if len(i["expected"]) >= 17)
    stop_id = item["expected"][2]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = (
        [stop_id, *hf.generation_config.eos_token_id]
        if isinstance(hf.generation_config.eos_token_id, list)
        else [
            stop_id,
            hf.generation_config.eos_token_id,
        ]
    )
    ref = hf.generate(
        torch.tensor([item["ids"]]), do_sample=False, max_new_tokens=8, min_new_tokens=6, eos_token_id=eos
    )[0, len(item["ids"]) :].tolist()

    async def run():
        api = client(cluster)
        model = await served_model(api)
        kwargs = dict(max_tokens=8, temperature=0)
        early = await completion(api, model, item["ids"], False, extra_body={"stop_token_ids": [stop_id]}, **kwargs)
        late = await completion(
            api, model, item["ids"], True, extra_body={"stop_token_ids": [stop_id], "min_tokens": 6}, **kwargs
        )
        return early, late

    early, late = asyncio.run(run())
    assert early["ids"] == item["expected"][: item["expected"].index(stop_id) + 1]
    assert early["finish_reason"] == "stop"
    assert late["ids"] == ref
    assert len(late["ids"]) >= 6 and stop_id not in late["ids"][:6]


def test_n_choices_prompt_lists_and_usage(cluster, workload):
    a, b = workload[0], workload[1]

    async def run():
        api = client(cluster)
        model = await served_model(api)
        greedy = await api.completions.create(
            model=model, prompt=[a["ids"], b["ids"]], n=2, max_tokens=5, temperature=0
        )
        sampled = [
            await api.completions.create(model=model, prompt=a["ids"], n=3, max_tokens=8, temperature=1.0, seed=7)
            for _ in range(2)
        ]
        single = await api.completions.create(model=model, prompt=a["ids"], max_tokens=8, temperature=1.0, seed=7)
        chunks = await api.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=4, temperature=0.5, stream=True
        )
        finishes = {}
        async for chunk in chunks:
            for choice in chunk.choices:
                if choice.finish_reason:
                    assert choice.index not in finishes
                    finishes[choice.index] = choice.finish_reason
        return greedy, sampled, single, finishes

    greedy, sampled, single, finishes = asyncio.run(run())
    assert [c.index for c in greedy.choices] == [0, 1, 2, 3]
    texts = [c.text for c in greedy.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3]  # greedy: each prompt's n choices agree
    want_a, want_b = (min(len(x["expected"]), 5) for x in (a, b))
    assert greedy.usage.prompt_tokens == len(a["ids"]) + len(b["ids"])  # each prompt once, not per choice
    assert greedy.usage.completion_tokens <= 2 * 5 + 2 * 5
    assert greedy.usage.completion_tokens >= 2 * want_a + 2 * want_b - 4  # (an EOS may end one early)
    # sampled choices: reproducible with a seed, each its own draws, the first as n=1 draws it
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]
    assert len({c.text for c in sampled[0].choices}) > 1
    assert sampled[0].choices[0].text == single.choices[0].text
    assert set(finishes) == {0, 1}
    cluster.wait_idle()


def test_logprobs_equal_the_grpc_paths(cluster, workload):
    item = workload[3]

    async def run():
        api = client(cluster)
        model = await served_model(api)
        http = await completion(api, model, item["ids"], False, max_tokens=10, temperature=0.8, seed=11)
        async with grpc.aio.insecure_channel(cluster.router) as channel:
            request = router_pb2.GenerateRequest(
                token_ids=item["ids"],
                logprobs=True,
                sampling=common_pb2.SamplingParams(max_tokens=10, temperature=0.8, seed=11),
            )
            responses = [r async for r in router_pb2_grpc.RouterStub(channel).Generate(request, timeout=60)]
        return http, responses

    http, responses = asyncio.run(run())
    assert http["ids"] == [t for r in responses for t in r.token_ids]
    assert http["logprobs"] == pytest.approx([lp for r in responses for lp in r.logprobs], abs=1e-6)


def _http(address: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """One request on a fresh connection: (status, JSON body or None, headers)."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        data = r.read()
        return r.status, json.loads(data) if data else None, r.headers
    finally:
        conn.close()


# ---- bad requests -------------------------------------------------------------------------------------------
MSG = [{"role": "user", "content": "hi"}]
# (path, body: a dict sent as JSON, or bytes as they are; the status; the parameter named)
BAD_REQUESTS = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"\xff\xfe", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", 5]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, -2]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [[3]]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", b'{"prompt": "a\\ud800b"}', 400, "prompt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, "messages"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1.5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_k": -5}, 400, "top_k"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "n": True}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "seed": "x"}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": 3}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 3}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "hi", "suffix": "end"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "hi", "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "colour": "blue"}, 400, "colour"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [10**9]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [10**30]}, 400, "stop_token_ids"),
    ("/v1/completions", b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, None),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "min_tokens": 9}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "cache_salt": "s" * 300}, 400, "cache_salt"),
    ("/v1/completions", {"prompt": "hi", "request_id": "a\tb"}, 400, "request_id"),
    ("/v1/completions", {"prompt": "hi", "n": 2, "request_id": "r" * 127}, 400, "request_id"),
    ("/v1/completions", {"prompt": "hi", "slo_ttft_seconds": 0}, 400, "slo_ttft_seconds"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"prompt": "word " * 3000}, 413, "prompt"),
    ("/v1/completions", {"prompt": [5 + i % 900 for i in range(1100)]}, 413, "prompt"),
    ("/v1/completions", b'{"prompt": "' + b"x" * (4 << 20) + b'"}', 413, None),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]}, 400, "messages[0].content"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        400,
        "messages[0].content[0]",
    ),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "mood": "x"}]}, 400, "messages[0].mood"),
    ("/v1/chat/completions", {"messages": MSG, "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": MSG, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MSG, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MSG, "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": MSG, "prompt": "hi"}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": MSG, "presence_penalty": 1}, 400, "presence_penalty"),
    ("/v1/no/such/path", {}, 404, None),
]


def test_bad_requests_get_openai_errors_naming_the_parameter(cluster):
    assert len(BAD_REQUESTS) >= 30
    address = cluster.info["http"]
    for path, body, status, param in BAD_REQUESTS:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        got, answer, _ = _http(address, "POST", path, content)
        case = f"{path} {content[:80]!r}"
        assert got == status, f"{case}: {got} {answer}"
        error = answer["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], case
        assert error["param"] == param, f"{case}: {error}"
    gzip = {"Content-Encoding": "gzip"}  # a body that says it is compressed and is not
    assert _http(address, "POST", "/v1/completions", b"not gzip at all", gzip)[0] == 400
    assert _http(address, "GET", "/v1/completions")[0] == 405
    assert _http(address, "GET", "/v1/models/gpt-4")[0] == 404
    assert _http(address, "GET", "/health")[0] == 200
    cluster.wait_idle()  # nothing held by any of them
    # and the router serves on
    out = asyncio.run(_one_completion(cluster, [5, 6, 7], max_tokens=3))
    assert len(out["ids"]) == 3
    assert _router_metric(cluster, "pdserve_http_responses_total", status="400") >= 40


async def _one_completion(cluster, prompt, **kwargs) -> dict:
    api = client(cluster)
    return await completion(api, await served_model(api), prompt, False, temperature=0, **kwargs)


# ---- disconnects --------------------------------------------------------------------------------------------
def _post_then_hang_up(address: str, body: dict, read_first_event: bool) -> None:
    """POSTs a request on a raw connection and closes it mid-request: after the first event of a
    stream, or a moment after sending a request that is not streamed."""
    host, port = address.rsplit(":", 1)
    data = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n"
        sock.sendall(head.encode() + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        if read_first_event:
            received = b""
            while b"data: " not in received:
                chunk = sock.recv(4096)
                assert chunk, "the stream ended before its first event"
                received += chunk
            assert b" 200 " in received.split(b"\r\n", 1)[0]
        else:
            time.sleep(0.3)


def test_a_client_that_disconnects_cancels_its_request_and_frees_its_kv(cluster):
    cancelled = _router_metric(cluster, "pdserve_requests_total", api="http", finish_reason="cancelled")
    long = {"prompt": [5, 6, 7], "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    # someone else's request, running all along: it must finish whole
    other: dict = {}
    thread = threading.Thread(
        target=lambda: other.update(asyncio.run(_one_completion(cluster, [9, 10, 11], max_tokens=600))),
    )
    thread.start()
    _post_then_hang_up(cluster.info["http"], {**long, "stream": True}, read_first_event=True)
    _post_then_hang_up(cluster.info["http"], long, read_first_event=False)
    deadline = time.monotonic() + 10
    while _router_metric(cluster, "pdserve_requests_total", api="http", finish_reason="cancelled") < cancelled + 2:
        assert time.monotonic() < deadline, "the router did not cancel the requests whose clients left"
        time.sleep(0.05)
    thread.join(timeout=120)
    assert len(other["ids"]) == 600 or other["finish_reason"] == "stop"
    cluster.wait_idle()


# ---- a router with no worker: 503, 429, 401, and a checkpoint without a chat template ------------------------
def test_a_router_without_workers_answers_503_429_401_and_no_chat_template(tmp_path, model_dir):
    folder = tmp_path / "no-template"
    shutil.copytree(model_dir, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for name in os.listdir(folder):
        if name.startswith("chat_template"):
            os.remove(folder / name)
    key = "k" * 24
    http_port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.router", "--host", "127.0.0.1", "--port", str(free_port())]
        + ["--http-port", str(http_port), "--metrics-port", "-1", "--model", str(folder), "--api-key", key]
        + ["--prefill", f"127.0.0.1:{free_port()}", "--decode", f"127.0.0.1:{free_port()}"]
        + ["--worker-wait-seconds", "3", "--max-inflight-requests", "1"],
        cwd=ROOT,
        stdout=open(tmp_path / "router.log", "w"),
        stderr=subprocess.STDOUT,
    )
    address = f"127.0.0.1:{http_port}"
    base = f"http://{address}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                status, health, _ = _http(address, "GET", "/health")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "router.log").read_text()
                time.sleep(0.2)
        assert status == 503 and "no healthy" in health["error"]["message"]

        api = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
        model = api.models.list().data[0].id
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong" * 5, max_retries=0).models.list()
        assert _http(address, "GET", "/v1/models")[0] == 401
        conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)  # a key that is not UTF-8
        conn.putrequest("GET", "/v1/models")
        conn.putheader("Authorization", b"Bearer \xff\xfe")
        conn.endheaders()
        assert conn.getresponse().status == 401
        conn.close()
        with pytest.raises(openai.BadRequestError, match="chat template") as err:
            api.chat.completions.create(model=model, messages=MSG)
        assert err.value.body["param"] == "messages"

        # the first request waits for a worker (holding the one slot), the second is shed
        waiting: dict = {}

        def first():
            try:
                api.completions.create(model=model, prompt="hello", max_tokens=2)
            except openai.APIStatusError as exc:
                waiting["error"] = exc

        thread = threading.Thread(target=first)
        thread.start()
        time.sleep(1.0)
        with pytest.raises(openai.RateLimitError) as shed:
            api.completions.create(model=model, prompt="hello", max_tokens=2)
        assert int(shed.value.response.headers["retry-after"]) >= 1
        thread.join(timeout=30)
        assert waiting["error"].status_code == 503 and "no " in waiting["error"].message
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, (tmp_path / "router.log").read_text()[-3000:]
