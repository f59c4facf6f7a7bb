"""Instances split over tensor-parallel ranks (engine/parallel.py), through the real cluster (gloo
on this CPU).

Colocated: `pdserve up --mode colocated --colocated 2 --tp 2` runs 4 rank processes. It serves the
shared workload exactly as transformers generates it, and SIGKILL of an instance's second rank
takes the whole instance down (rank 0 exits, the launcher restarts it) while the stream it served
finishes on the other instance, token for token as expected; SIGKILL of rank 0 takes its other rank
with it; no /dev/shm pool of a killed instance is left.

Disaggregated, prefill and decode of different tensor and pipeline parallelism: the kvstore daemon
moves each decode rank exactly the layers and K/V heads it holds from the prefill ranks that hold
them (kvstore/shards.py), and the outputs are transformers' token for token; the bytes the daemons
moved are the destination's share."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import grpc
import pytest
import torch
from processes import children, wait_gone
from transformers import AutoModelForCausalLM, AutoTokenizer
from workload import BLOCK_SIZE, build_workload, check_outputs, run_workload

from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.engine.config import ModelConfig
from services.engine.kv_cache import POOL_FILE_PREFIX, SHM_DIR
from services.tiny_models import get_model


@pytest.fixture(scope="module")
def tp_cluster(cluster_factory, model_dir):
    return cluster_factory("--model", model_dir, "--mode", "colocated", "--colocated", "2", "--tp", "2")


def _pools_of(pids: list[int]) -> list[str]:
    """The /dev/shm KV pools these processes created (kv_cache.py names them by pid)."""
    return sorted(name for name in os.listdir(SHM_DIR) for pid in pids if name.startswith(f"{POOL_FILE_PREFIX}{pid}-"))


def test_tensor_parallel_instances_give_the_reference_outputs(tp_cluster, workload, model_dir):
    for svc in tp_cluster.services("colocated"):
        ranks = children(svc["pid"])
        assert len(ranks) == 1, ranks  # rank 1: a process of its own
        assert len(_pools_of([svc["pid"], *ranks])) == 2  # with a KV pool of its own
    results = run_workload(tp_cluster.router, workload)
    check_outputs(workload, results, AutoTokenizer.from_pretrained(model_dir))
    tp_cluster.wait_idle()


def test_a_killed_rank_takes_its_instance_down_and_the_stream_fails_over(tp_cluster, model_dir):
    prompt = [3 + (7 * i) % 997 for i in range(40)]
    max_tokens = 120
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_tokens)[0, len(prompt) :]

    async def run():
        async with grpc.aio.insecure_channel(tp_cluster.router) as channel:
            call = router_pb2_grpc.RouterStub(channel).Generate(
                router_pb2.GenerateRequest(
                    token_ids=prompt, sampling=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0)
                ),
                timeout=120,
            )
            tokens: list[int] = []
            killed, killed_rank, last = None, 0, None
            async for response in call:
                tokens.extend(response.token_ids)
                last = response
                if killed is None and len(tokens) >= 10:
                    busy = [
                        svc
                        for svc, stats in zip(tp_cluster.services("colocated"), tp_cluster.worker_stats("colocated"))
                        if stats.running > 0
                    ]
                    assert len(busy) == 1
                    killed = busy[0]
                    (killed_rank,) = children(killed["pid"])
                    os.kill(killed_rank, signal.SIGKILL)
            return tokens, last, killed, killed_rank

    tokens, last, killed, killed_rank = asyncio.run(run())
    assert tokens == expected.tolist() and last.timing.retries == 1
    # the instance went down whole: rank 0 exited, and the launcher started a new one, with its ranks
    wait_gone({killed["pid"]}, timeout=10)
    tp_cluster.wait_recovered()
    with open(tp_cluster.ready_path) as f:
        restarted = next(svc for svc in json.load(f)["services"] if svc["name"] == killed["name"])
    assert restarted["pid"] != killed["pid"] and len(children(restarted["pid"])) == 1
    assert _pools_of([killed["pid"], killed_rank]) == []  # the new instance's ranks swept them

    # and the other way round: rank 0 SIGKILLed, its rank 1 exits too (the parent-death signal)
    other = next(svc for svc in tp_cluster.services("colocated") if svc["name"] != killed["name"])
    (rank1,) = children(other["pid"])
    os.kill(other["pid"], signal.SIGKILL)
    wait_gone({rank1}, timeout=10)
    tp_cluster.wait_recovered()  # restarted before the cluster stops
    assert _pools_of([other["pid"], rank1]) == []


def destination_share(model_dir: str, tp: int, num_tokens: int) -> int:
    """KV bytes an instance of `tp` ranks holds for `num_tokens` tokens (whole blocks, float32):
    every rank its K/V heads, a head on several ranks when there are more ranks than heads."""
    mc = ModelConfig.from_pretrained(model_dir)
    heads_per_rank = max(1, mc.num_kv_heads // tp)
    blocks = -(-num_tokens // BLOCK_SIZE)
    return blocks * tp * mc.num_layers * 2 * BLOCK_SIZE * heads_per_rank * mc.head_dim * 4


@pytest.mark.parametrize(
    "model, prefill, decode",
    [
        ("qwen2", (2, 2), (1, 1)),  # (and Qwen3 pp 2 -> tp 2 below, over 2 pods)
        # (Llama tp 2 -> tp 1 alone: tests/integration/test_kvstore.py's shard pulls; left out here
        # for make test's time, the case above reshards tensor and pipeline parallelism at once)
        # (K/V heads replicated on decode ranks: tests/integration/test_kvstore.py's tp1 -> tp8 pull,
        # byte for byte, and test_engine_exact.py's Mistral on 2 ranks)
    ],
    ids=lambda p: f"tp{p[0]}pp{p[1]}" if isinstance(p, tuple) else p,
)
def test_kv_moves_between_prefill_and_decode_of_different_parallelism(cluster_factory, model, prefill, decode):
    model_dir = get_model(model)
    items = build_workload(model_dir, 6)
    cluster = cluster_factory(
        "--model",
        model_dir,
        *("--prefill-tp", str(prefill[0]), "--prefill-pp", str(prefill[1])),
        *("--decode-tp", str(decode[0]), "--decode-pp", str(decode[1])),
    )
    decode_tp = decode[0]
    try:
        for role, (tp, pp) in (("prefill", prefill), ("decode", decode)):
            (svc,) = cluster.services(role)
            assert len(children(svc["pid"])) == tp * pp - 1
        before = sum(s.bytes_local for s in cluster.kvstore_stats())
        results = run_workload(cluster.router, items)
        check_outputs(items, results, AutoTokenizer.from_pretrained(model_dir))
        cluster.wait_idle()
        moved = sum(s.bytes_local for s in cluster.kvstore_stats()) - before
        # every request that continued past its first token had its prompt's KV pulled, once
        want = sum(destination_share(model_dir, decode_tp, len(i["ids"])) for i in items if len(i["expected"]) > 1)
        assert moved == want > 0
    finally:
        assert cluster.stop() == 0, open(cluster.log_path).read()[-3000:]


def test_an_instance_over_two_pods_serves_exactly_and_goes_down_whole(cluster_factory):
    """A prefill instance of 2 pipeline stages over 2 pods (here: the worker and a follower process,
    engine/follower.py, as a second host would run it), pulling into a decode instance of 2
    tensor-parallel ranks: exact, and the KV moved is the destination's share. SIGKILL of the
    follower takes the worker down with it; both restart, the follower joins the new worker, and the
    instance serves exactly again."""
    model_dir = get_model("qwen3")
    items = build_workload(model_dir, 6)
    cluster = cluster_factory("--model", model_dir, "--prefill-pp", "2", "--prefill-pods", "2", "--decode-tp", "2")
    try:
        (prefill,) = cluster.services("prefill")
        (follower,) = cluster.services("follower")
        assert not children(prefill["pid"])  # its pod's one rank is itself
        assert len(children(follower["pid"])) == 1  # the second stage's rank, on the other pod
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        check_outputs(items, run_workload(cluster.router, items), tokenizer)
        cluster.wait_idle()
        moved = sum(s.bytes_local for s in cluster.kvstore_stats())
        assert moved == sum(destination_share(model_dir, 2, len(i["ids"])) for i in items if len(i["expected"]) > 1)

        os.kill(follower["pid"], signal.SIGKILL)
        wait_gone({prefill["pid"]}, timeout=10)  # the instance cannot compute without its second stage
        cluster.wait_recovered()
        with open(cluster.ready_path) as f:
            services = {svc["name"]: svc for svc in json.load(f)["services"]}
        assert services[prefill["name"]]["pid"] != prefill["pid"]
        assert services[follower["name"]]["pid"] != follower["pid"]
        check_outputs(items, run_workload(cluster.router, items), tokenizer)
    finally:
        assert cluster.stop() == 0, open(cluster.log_path).read()[-3000:]
