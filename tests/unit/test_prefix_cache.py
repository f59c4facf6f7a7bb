"""Prefix caching's accounting (engine/block_manager.py), the cache events a worker reports and the
router's index of them (router/prefix_index.py), and KV-aware dispatch (router/policies.py): pure
state, no model. The engine's outputs with cache hits are test_engine_exact.py's; the cluster's,
tests/e2e/test_prefix_caching.py's."""

from __future__ import annotations

from collections import deque

import pytest

from pdserve.v1 import common_pb2
from services.common.block_hashes import block_hashes
from services.common.enums import Role
from services.engine.block_manager import BlockManager
from services.engine.config import SamplingParams
from services.engine.scheduler import PrefillScheduler, take_prefill_batch
from services.engine.sequence import Sequence
from services.kvstore.prefix_store import PrefixStore
from services.prefill.server import FetchCost
from services.router.policies import pick_colocated, pick_prefill
from services.router.prefix_index import NodePrefixes, PrefixIndex, PrefixRoutingMetrics, PromptPrefix
from services.router.registry import Endpoint

BS = 4


def _seq(name: str, tokens: list[int], salt: str = "") -> Sequence:
    seq = Sequence.from_prompt(name, tokens, SamplingParams(max_tokens=4, temperature=0))
    seq.cache_salt = salt
    return seq


def _computed(blocks: BlockManager, seq: Sequence) -> None:
    """As the engine does after a prefill."""
    seq.num_cached = len(seq.token_ids)
    blocks.enter_computed_blocks(seq)


def test_hashes_chain_over_the_whole_prefix_and_the_salt():
    a = block_hashes(list(range(12)), BS)
    assert len(a) == 3 and len(set(a)) == 3
    assert block_hashes(list(range(12)) + [99], BS) == a  # a partial block has none
    b = block_hashes([0, 1, 2, 3, 9, 5, 6, 7, 8, 9, 10, 11], BS)  # a token of block 1 differs
    assert b[0] == a[0] and b[1] != a[1] and b[2] != a[2]  # so do the blocks after it
    assert block_hashes(list(range(12)), BS, "tenant")[0] != a[0]


def test_a_prefix_is_computed_once_shared_while_held_and_kept_after():
    blocks = BlockManager(16, BS, prefix_caching=True)
    first = _seq("a", list(range(10)))  # two full blocks, then 2 tokens
    blocks.admit(first, blocks.cached_prefix(first))
    assert first.num_cached == 0 and len(first.block_table) == 3
    _computed(blocks, first)
    assert blocks.num_cached == 2
    # a second prompt with the same 8 first tokens takes those two blocks (shared) and one new
    second = _seq("b", list(range(8)) + [50, 51, 52])
    cached = blocks.cached_prefix(second)
    assert cached == first.block_table[:2]
    assert blocks.blocks_to_admit(second, cached) == 1  # the shared ones are held already
    blocks.admit(second, cached)
    assert second.num_cached == second.prefix_hit_tokens == 8 and blocks.ref_count(cached[0]) == 2
    # both done: every block free, the cached ones still findable
    blocks.free_seq(first)
    blocks.free_seq(second)
    assert blocks.num_free == 16 and blocks.num_cached == 2
    third = _seq("c", list(range(9)))
    assert blocks.cached_prefix(third) == cached
    # a prompt entirely cached still computes its last token: 8 tokens cached of [0..8)
    again = _seq("d", list(range(8)))
    assert len(blocks.cached_prefix(again)) == 1
    assert (blocks.prefix_query_tokens["worker"], blocks.prefix_hit_tokens["worker"]) == (21, 8)


def test_cached_blocks_are_evicted_last_and_least_recently_used_first():
    blocks = BlockManager(6, BS, prefix_caching=True)
    old, new = _seq("old", list(range(8)) + [1]), _seq("new", list(range(100, 108)) + [1])
    for seq in (old, new):
        blocks.admit(seq, [])
        _computed(blocks, seq)
        blocks.free_seq(seq)
    assert blocks.num_cached == 4 and blocks.num_free == 6
    # two uncached blocks are free: they go first, and nothing is evicted
    assert blocks.allocate(2) and blocks.num_cached == 4 and blocks.prefix_evicted_blocks == 0
    # then the least recently freed cached blocks: old's
    blocks.allocate(2)
    assert blocks.prefix_evicted_blocks == 2
    assert blocks.cached_prefix(_seq("x", list(range(9)))) == []
    assert len(blocks.cached_prefix(_seq("y", list(range(100, 109))))) == 2


def test_different_salts_never_share_blocks():
    blocks = BlockManager(16, BS, prefix_caching=True)
    a = _seq("a", list(range(9)), salt="tenant-a")
    blocks.admit(a, blocks.cached_prefix(a))
    _computed(blocks, a)
    assert blocks.cached_prefix(_seq("b", list(range(9)), salt="tenant-b")) == []
    assert blocks.cached_prefix(_seq("c", list(range(9)))) == []
    assert len(blocks.cached_prefix(_seq("d", list(range(9)), salt="tenant-a"))) == 2


def test_a_prefill_batch_takes_cached_blocks_and_counts_only_computed_tokens_in_its_budget():
    blocks = BlockManager(8, BS, prefix_caching=True)
    seed = _seq("seed", list(range(16)) + [7])
    blocks.admit(seed, [])
    _computed(blocks, seed)
    blocks.free_seq(seed)
    waiting = deque([_seq("a", list(range(16)) + [1, 2]), _seq("b", list(range(16)) + [3, 4])])
    # each computes 2 tokens (16 cached), so both fit a 4-token budget; both share the 4 cached blocks
    batch = take_prefill_batch(waiting, blocks, max_tokens=4, max_seqs=8)
    assert [s.seq_id for s in batch] == ["a", "b"] and [s.num_cached for s in batch] == [16, 16]
    assert blocks.num_free == 8 - 4 - 2


def test_prefill_scheduler_sees_room_that_cached_blocks_make():
    """The head fits once its cached prefix is counted (else the queue would wait for releases
    that may never come)."""
    blocks = BlockManager(5, BS, prefix_caching=True)
    scheduler = PrefillScheduler(blocks, max_num_batched_tokens=64, max_num_seqs=8)
    holder = _seq("holder", list(range(16)) + [1])
    scheduler.add(holder)
    assert scheduler.schedule() == [holder]
    _computed(blocks, holder)
    scheduler.publish("kv-holder", holder)  # its 5 blocks held by a published entry
    follower = _seq("follower", list(range(16)) + [2])
    scheduler.add(follower)
    assert not scheduler.has_work()  # needs 1 new block; none free
    scheduler.release("kv-holder")
    assert scheduler.has_work() and scheduler.schedule() == [follower] and follower.num_cached == 16


def test_cache_events_give_each_reader_what_changed_or_a_snapshot():
    blocks = BlockManager(4, BS, prefix_caching=True)
    events = blocks.cache_events
    a = _seq("a", list(range(8)) + [1])
    blocks.admit(a, [])
    _computed(blocks, a)
    stored, removed = events.since(events.log_id, 0)
    assert stored == a.block_hashes and removed == []
    cursor = events.cursor
    blocks.free_seq(a)
    blocks.allocate(4)  # evicts both
    stored, removed = events.since(events.log_id, cursor)
    assert stored == [] and sorted(removed) == sorted(a.block_hashes)
    assert events.since("another-log", cursor) is None  # a restarted worker: start from a snapshot
    assert events.since(events.log_id, events.cursor + 1) is None

    # the router's index follows the same log
    index = PrefixIndex()
    index.apply(common_pb2.PrefixCacheUpdate(log_id=events.log_id, cursor=cursor, snapshot=True, stored=a.block_hashes))
    assert index.cached_blocks(a.block_hashes) == 2
    index.apply(common_pb2.PrefixCacheUpdate(log_id=events.log_id, cursor=events.cursor, removed=a.block_hashes[1:]))
    assert index.cached_blocks(a.block_hashes) == 1
    assert index.stats_request().prefix_cursor == events.cursor


def _worker(address: str, role: Role, queued_tokens: int = 0, cached: list[bytes] = ()) -> Endpoint:
    ep = Endpoint(address, role, "static", peer=None, stub=None, stats_stub=None)
    ep.stats = common_pb2.WorkerStats(
        block_size=BS, queued_prompt_tokens=queued_tokens, prefill_seconds_per_token=1e-3, prefix_cache={}
    )
    ep.inflight_prompt_tokens = queued_tokens
    ep.prefix.add(cached)
    return ep


def test_kv_aware_dispatch_weighs_the_cached_prefix_against_the_queue():
    prompt = PromptPrefix(list(range(401)), salt="")
    hashes = prompt.hashes(BS)
    assert len(hashes) == 100
    holder = _worker("a:1", Role.PREFILL, queued_tokens=100, cached=hashes)
    idle = _worker("b:1", Role.PREFILL)
    # 100 queued + 1 to compute at holder, 401 at idle: KV-aware picks holder, least-loaded idle
    assert pick_prefill([holder, idle], prompt_tokens=401, cached_tokens=prompt.cached_tokens) is holder
    assert pick_prefill([holder, idle], prompt_tokens=401) is idle
    # a queue longer than the prompt outweighs the cache
    busy_holder = _worker("a:1", Role.PREFILL, queued_tokens=1000, cached=hashes)
    assert pick_prefill([busy_holder, idle], prompt_tokens=401, cached_tokens=prompt.cached_tokens) is idle
    # the same for colocated workers
    c_holder, c_idle = _worker("a:1", Role.COLOCATED, 100, hashes), _worker("b:1", Role.COLOCATED)
    assert pick_colocated([c_holder, c_idle], prompt_tokens=401, cached_tokens=prompt.cached_tokens) is c_holder
    assert pick_colocated([c_holder, c_idle], prompt_tokens=401) is c_idle
    # a salted prompt's hashes are not the unsalted ones
    assert PromptPrefix(list(range(401)), salt="t").cached_tokens(holder) == 0


def test_the_router_points_a_prefill_worker_at_the_node_whose_tier_holds_more_of_the_prompt():
    nodes = NodePrefixes()
    decode = _worker("d:1", Role.DECODE)
    decode.stats.node_id, decode.stats.kvstore_transfer_address = "node-b", "10.0.0.2:9999"
    conversation = list(range(50))
    nodes.offered(decode, conversation, salt="")  # 49 tokens computed: 12 full blocks
    prefill = _worker("p:1", Role.PREFILL, cached=block_hashes(conversation[:20], BS))
    prefill.stats.node_id = "node-a"
    next_turn = PromptPrefix(conversation + [7, 8, 9], salt="")
    source = nodes.source_for(next_turn, prefill)
    assert (source.node_id, source.transfer_address, source.num_blocks) == ("node-b", "10.0.0.2:9999", 12)
    # nothing when the worker holds as much, or when the salt differs
    assert nodes.source_for(PromptPrefix(conversation[:21], salt=""), prefill) is None
    assert nodes.source_for(PromptPrefix(conversation + [7], salt="t"), prefill) is None
    # the worker's own node first, on a tie
    nodes.offered(_worker("d:2", Role.DECODE), conversation, salt="")  # (no transfer address: not indexed)
    other = _worker("d:3", Role.DECODE)
    other.stats.node_id, other.stats.kvstore_transfer_address = "node-a", "10.0.0.1:9999"
    nodes.offered(other, conversation, salt="")
    assert nodes.source_for(next_turn, prefill).node_id == "node-a"


def test_the_router_enters_what_it_sent_and_counts_its_decisions():
    metrics = PrefixRoutingMetrics(None)
    prompt = PromptPrefix(list(range(41)), salt="")
    ep = _worker("a:1", Role.PREFILL)
    metrics.record(Role.PREFILL, "kv-aware", prompt, ep)
    assert prompt.cached_tokens(ep) == 40  # the next turn finds it there before the worker says so
    metrics.record(Role.PREFILL, "kv-aware", prompt, ep)
    assert metrics.dispatched.labels(Role.PREFILL, "kv-aware", "miss")._value.get() == 1
    assert metrics.dispatched.labels(Role.PREFILL, "kv-aware", "hit")._value.get() == 1
    assert metrics.cached_tokens.labels(Role.PREFILL)._value.get() == 40
    # the worker never reports them (the request was cancelled before its prefill): forgotten
    for _ in range(PrefixIndex.GUESS_POLLS):
        ep.prefix.apply(common_pb2.PrefixCacheUpdate(log_id="w", cursor=0))
    assert prompt.cached_tokens(ep) == 0


def test_fetched_blocks_join_the_cache_after_the_held_prefix_and_count_as_node_hits():
    blocks = BlockManager(8, BS, prefix_caching=True)
    seq = _seq("a", list(range(17)))  # 4 full blocks, the first cached here
    seed = _seq("seed", list(range(4)) + [99])
    blocks.admit(seed, [])
    _computed(blocks, seed)
    blocks.free_seq(seed)
    hashes = block_hashes(seq.token_ids[:16], BS)
    assert blocks.cached_blocks(hashes) == 1
    # room for the 3 blocks the node tier holds beyond it: the cached one is held meanwhile
    prefix, fresh = blocks.hold_for_fetch(hashes, 3)
    assert len(prefix) == 1 and len(fresh) == 3 and blocks.ref_count(prefix[0]) == 1
    assert blocks.hold_for_fetch(hashes, 8) is None  # no room: nothing taken
    blocks.enter_fetched(fresh, hashes[1:4])
    blocks.free(prefix)
    assert blocks.num_free == 8 and blocks.cached_blocks(hashes) == 4
    seq.fetched_blocks = (1, 4)
    blocks.admit(seq, blocks.cached_prefix(seq))
    assert seq.prefix_hit_tokens == 16
    assert blocks.prefix_hit_tokens == {"worker": 4, "node": 12, "remote": 0}


def test_the_node_tiers_store_keeps_blocks_by_hash_evicts_the_least_recent_and_never_a_pinned_one():
    store = PrefixStore(capacity_bytes=4 * 8)  # 4 rows of 8 bytes
    h = [bytes([i]) * 16 for i in range(6)]
    rows, reserved = store.reserve("fp", 8, h[:3] + h[:1])  # a hash twice: stored once
    assert [i for i, _ in reserved] == [0, 1, 2]
    for i, row in reserved:
        rows[row] = i
    store.commit("fp", h[:3] + h[:1], reserved)
    assert store.lookup("fp", h) == 3 and store.lookup("other", h) == 0
    tensor, taken = store.take("fp", h[:2])  # pinned, and now the most recently used
    assert [int(tensor[r][0]) for r in taken] == [0, 1]
    _, more = store.reserve("fp", 8, h[3:6])  # 1 free row, then h[2] (unpinned, least recent)
    assert [i for i, _ in more] == [0, 1] and store.evictions == 1
    store.cancel("fp", more)  # a failed copy: nothing stored, rows free again
    assert store.lookup("fp", h[3:]) == 0 and store.num_pinned == 2
    store.unpin("fp", taken)
    assert store.num_pinned == 0 and store.lookup("fp", h) == 2


def test_a_fetch_pays_only_when_cheaper_than_computing():
    cost = FetchCost()
    assert cost.pays(4, 0.001)  # nothing measured yet: try
    cost.observe(0.002, 4)
    assert cost.seconds_per_block == pytest.approx(0.0005)
    cost.observe(0.01, 10)  # a recent average
    assert cost.seconds_per_block == pytest.approx(0.2 * 0.001 + 0.8 * 0.0005)
    assert cost.pays(10, 0.01) and not cost.pays(10, 0.005)
    assert FetchCost(always=True).pays(10, 0.0)
