"""The router's view of one worker's prefix cache, for KV-aware dispatch (policies.py): the block
hashes it holds (common/block_hashes.py), from the cache events in its Stats answers
(engine/block_manager.py CacheEvents), plus what this router has just sent it (entered at once,
so that a conversation's next turn finds the worker of the last one before the worker's next
Stats answer says so). A stale hash only misjudges a score: the worker looks up its own cache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter

from pdserve.v1 import common_pb2, worker_pb2
from services.common.block_hashes import block_hashes, leading_held

if TYPE_CHECKING:
    from .registry import Endpoint


class PrefixIndex:
    GUESS_POLLS = 4  # a block this router sent is taken as cached for this many Stats answers

    def __init__(self) -> None:
        self.hashes: set[bytes] = set()  # as the worker reported them
        self.guessed: dict[bytes, int] = {}  # sent there, not reported yet: hash -> the poll it expires at
        self.polls = 0
        self.log_id = ""  # the worker's event log and our place in it (none: ask for a snapshot)
        self.cursor = 0

    def stats_request(self) -> common_pb2.StatsRequest:
        return common_pb2.StatsRequest(prefix_log_id=self.log_id, prefix_cursor=self.cursor)

    def apply(self, update: common_pb2.PrefixCacheUpdate) -> None:
        if update.snapshot:
            self.hashes = set(update.stored)
        else:
            self.hashes.update(update.stored)
            self.hashes.difference_update(update.removed)
        self.log_id, self.cursor = update.log_id, update.cursor
        self._expire_guesses()

    def _expire_guesses(self) -> None:
        """A block the worker did not report within GUESS_POLLS answers was not cached (its request
        was cancelled before its prefill, or the block was evicted and reported already)."""
        self.polls += 1
        self.guessed = {h: until for h, until in self.guessed.items() if until > self.polls}

    def clear(self) -> None:
        """The worker has no prefix cache (or it went away)."""
        self.hashes.clear()
        self.guessed.clear()
        self.log_id, self.cursor = "", 0

    def add(self, hashes: Iterable[bytes]) -> None:
        """Blocks this router just sent the worker: taken as cached until its answers say otherwise."""
        until = self.polls + self.GUESS_POLLS
        for block_hash in hashes:
            if block_hash not in self.hashes:
                self.guessed[block_hash] = until

    def __contains__(self, block_hash: object) -> bool:
        return block_hash in self.hashes or block_hash in self.guessed

    def cached_blocks(self, hashes: list[bytes]) -> int:
        """How many of the first blocks (`hashes`, in order) the worker holds."""
        return leading_held(hashes, self)


class PromptPrefix:
    """A prompt's full-block hashes for KV-aware dispatch, computed once per block size (short of
    its last token, which a worker always computes)."""

    def __init__(self, token_ids: list[int], salt: str):
        self.token_ids = token_ids
        self.salt = salt
        self._hashes: dict[int, list[bytes]] = {}

    def hashes(self, block_size: int) -> list[bytes]:
        found = self._hashes.get(block_size)
        if found is None:
            found = self._hashes[block_size] = block_hashes(self.token_ids[:-1], block_size, self.salt)
        return found

    def cached_tokens(self, ep: Endpoint) -> int:
        """The prompt's tokens whose K/V worker `ep` holds, as far as this router knows."""
        if not (ep.prefix.hashes or ep.prefix.guessed) or ep.stats is None or not ep.stats.block_size:
            return 0
        block_size = ep.stats.block_size
        return ep.prefix.cached_blocks(self.hashes(block_size)) * block_size


class PrefixRoutingMetrics:
    def __init__(self, registry: CollectorRegistry | None):
        self.dispatched = Counter(
            "pdserve_router_prefix_dispatch",
            "Prompts sent to a prefill or colocated worker, by policy and by whether that worker held a "
            "cached prefix of the prompt (as the router knew it).",
            ["role", "policy", "outcome"],
            registry=registry,
        )
        self.cached_tokens = Counter(
            "pdserve_router_prefix_cached_tokens",
            "Prompt tokens the router expected the chosen worker to find cached.",
            ["role"],
            registry=registry,
        )

    def record(self, role: str, policy: str, prompt: PromptPrefix, ep: Endpoint) -> None:
        """Counts the decision, and enters the prompt's blocks as the worker will hold them."""
        cached = prompt.cached_tokens(ep)
        self.dispatched.labels(role, policy, "hit" if cached else "miss").inc()
        self.cached_tokens.labels(role).inc(cached)
        if ep.stats is not None and ep.stats.HasField("prefix_cache") and ep.stats.block_size:
            ep.prefix.add(prompt.hashes(ep.stats.block_size))


class NodePrefixes:
    """What each node's prefix tier (kvstore/prefix_store.py) should hold, as this router saw it: the
    blocks of every request a decode worker there finished (it offers them when it finishes), the
    most recent NODE_INDEX_BLOCKS per node. A prefill worker asks a tier only when the router says
    it holds more of the prompt than the worker (no round trip for the rest). The daemon evicts
    without telling: a stale entry only makes a prefill worker fetch less than it was told it might;
    another router's requests are not seen: a tier may hold more than a router knows."""

    NODE_INDEX_BLOCKS = 1 << 16

    def __init__(self) -> None:
        self._nodes: dict[str, tuple[str, OrderedDict[bytes, None]]] = {}  # node -> (transfer address, hashes)

    def offered(self, ep: Endpoint, token_ids: list[int], salt: str) -> None:
        """A decode worker finished a request: it offers its computed full blocks (all its tokens
        but the last, never fed)."""
        stats = ep.stats
        if stats is None or not stats.kvstore_transfer_address or not stats.block_size:
            return
        hashes = self._nodes[stats.node_id][1] if stats.node_id in self._nodes else OrderedDict()
        self._nodes[stats.node_id] = (stats.kvstore_transfer_address, hashes)  # (a restarted daemon's new address)
        computed = (len(token_ids) - 1) // stats.block_size * stats.block_size
        for block_hash in block_hashes(token_ids[:computed], stats.block_size, salt):
            hashes[block_hash] = None
            hashes.move_to_end(block_hash)
        while len(hashes) > self.NODE_INDEX_BLOCKS:
            hashes.popitem(last=False)

    def _held(self, node: str, prompt: PromptPrefix, block_size: int) -> int:
        entry = self._nodes.get(node)
        return 0 if entry is None else leading_held(prompt.hashes(block_size), entry[1])

    def source_for(self, prompt: PromptPrefix, ep: Endpoint) -> worker_pb2.PrefixSource | None:
        """The node whose prefix tier holds the most of the prompt, if more than prefill worker
        `ep`'s own cache: the worker's node first (a local copy), else the best other one (UCX)."""
        stats = ep.stats
        if stats is None or not stats.block_size or not self._nodes:
            return None
        block_size = stats.block_size
        best, best_node = ep.prefix.cached_blocks(prompt.hashes(block_size)), ""
        for node in sorted(self._nodes, key=lambda n: n != stats.node_id):
            if (held := self._held(node, prompt, block_size)) > best:
                best, best_node = held, node
        if not best_node:
            return None
        return worker_pb2.PrefixSource(node_id=best_node, transfer_address=self._nodes[best_node][0], num_blocks=best)
