"""The router's dispatch policies are pure functions of its endpoints' bookkeeping."""

from __future__ import annotations

from pdserve.v1 import common_pb2
from services.common.enums import Role
from services.router.policies import pick_colocated, pick_decode
from services.router.registry import Endpoint


def _colocated(address: str, requests: int, queued_prompt_tokens: int) -> Endpoint:
    ep = Endpoint(address, Role.COLOCATED, "static", peer=None, stub=None, stats_stub=None)
    ep.inflight_requests, ep.inflight_prompt_tokens = requests, queued_prompt_tokens
    return ep


def test_a_colocated_request_goes_where_the_least_work_is_outstanding():
    # Prefill first: a prompt waits behind every queued prompt, so one long queued prompt outweighs
    # a few requests already decoding (fewest requests alone would pick the first).
    long_queue = _colocated("a:1", requests=1, queued_prompt_tokens=2000)
    decoding = _colocated("b:1", requests=3, queued_prompt_tokens=0)
    assert pick_colocated([long_queue, decoding]) is decoding
    # With nothing queued, the smaller batch; ties by address
    assert pick_colocated([_colocated("b:1", 2, 0), _colocated("a:1", 3, 0)]).address == "b:1"
    assert pick_colocated([_colocated("b:1", 2, 0), _colocated("a:1", 2, 0)]).address == "a:1"
    # a failed worker is skipped while another is left
    assert pick_colocated([long_queue, decoding], exclude={"b:1"}) is long_queue


def _decode(address: str, free: int, promised: int, reserved: int) -> Endpoint:
    ep = Endpoint(address, Role.DECODE, "static", peer=None, stub=None, stats_stub=None)
    ep.stats = common_pb2.WorkerStats(kv_blocks_total=1000, kv_blocks_free=free, kv_blocks_promised=promised)
    ep.reserved_blocks = reserved
    return ep


def test_a_decode_request_goes_where_most_blocks_are_free_counting_every_routers_requests():
    # b has more free blocks, but requests from another router wait there for 300 of them
    a, b = _decode("a:1", free=500, promised=0, reserved=0), _decode("b:1", free=700, promised=300, reserved=0)
    assert pick_decode([a, b]) is a
    # and what this router sent since its last poll counts too
    a.reserved_blocks = 150
    assert pick_decode([a, b]) is b
