"""KV block accounting, kept apart from the tensors (as vLLM's block pool is).

Blocks are integers indexing the pool (see kv_cache.py). A block is free when its reference count
is zero. Reference counts let a block be held by more than one owner: a sequence and a published
KV entry awaiting transfer, or sequences sharing a cached prefix.

Token t of a sequence lives in block `seq.block_table[t // block_size]`. Every sequence whose
blocks are given back is logged (`take_discarded`): the model runner drops what it cached about
them (the torch backend's K/V mirror) before its next step, so a cache can never outlive the KV
it copies, whoever freed the blocks.

Prefix caching (vLLM's automatic prefix caching): a full block whose K/V is computed is entered
under its content hash (common/block_hashes.py), and stays there when freed. A new sequence takes
the cached blocks of its longest cached prefix (`cached_prefix`, `admit`) and computes only the
rest. Free blocks are handed out in LRU order, uncached ones first: a cached block is evicted (its
hash forgotten) only when it is allocated for something else. Cached free blocks count as free.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict, deque

from services.common.arith import ceil_div
from services.common.block_hashes import extend_block_hashes, leading_held

from .sequence import Sequence

PREFIX_TIERS = ("worker", "node", "remote")  # this pool; the node's prefix tier; another node's


class OutOfBlocksError(RuntimeError):
    pass


class CacheEvents:
    """What entered and left a prefix cache, for the routers' indexes of it (router/prefix_index.py).

    A bounded log, read by each router from its own cursor; a reader whose cursor is not in the
    log (it fell behind, or this is a new log: `log_id`) gets every cached hash instead. The engine
    thread writes and the gRPC thread reads: the reads copy deques and dicts whole (`list(...)`),
    which CPython does without letting another thread run."""

    def __init__(self, capacity: int = 1 << 16):
        self.log_id = uuid.uuid4().hex[:12]
        self._log: deque[tuple[bool, bytes]] = deque(maxlen=capacity)  # (stored, hash)
        self.cursor = 0  # events ever logged

    def add(self, stored: bool, block_hash: bytes) -> None:
        self._log.append((stored, block_hash))
        self.cursor += 1

    def since(self, log_id: str, cursor: int) -> tuple[list[bytes], list[bytes]] | None:
        """(stored, removed) since `cursor` of log `log_id`, each hash in the list of its last event;
        None when the caller must start from a snapshot."""
        events, end = list(self._log), self.cursor
        first = end - len(events)
        if log_id != self.log_id or not first <= cursor <= end:
            return None
        last: dict[bytes, bool] = {}
        for stored, block_hash in events[cursor - first :]:
            last[block_hash] = stored
        return [h for h, s in last.items() if s], [h for h, s in last.items() if not s]


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # taken from the front
        self._discarded: list[str] = []  # ids of sequences whose blocks were taken from them
        self._cached: dict[bytes, int] = {}  # block hash -> the block holding that K/V
        self._hash_of: dict[int, bytes] = {}  # the reverse, for cached blocks
        self.cache_events = CacheEvents()
        # by tier: "worker", tokens of sequences admitted (with prefix caching on) and those found
        # in this pool; "node" ("remote"), tokens looked up in the node's (another node's) prefix
        # tier and those fetched from it
        self.prefix_query_tokens = dict.fromkeys(PREFIX_TIERS, 0)
        self.prefix_hit_tokens = dict.fromkeys(PREFIX_TIERS, 0)
        self.prefix_evicted_blocks = 0

    # ---- blocks -----------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks holding a cached prefix (in use or free)."""
        return len(self._hash_of)

    def cached_hashes(self) -> list[bytes]:
        return list(self._cached)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return ceil_div(num_tokens, self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks > len(self._free):
            raise OutOfBlocksError(f"need {num_blocks} KV blocks, {len(self._free)} free")
        blocks = []
        for _ in range(num_blocks):
            b, _ = self._free.popitem(last=False)
            block_hash = self._hash_of.pop(b, None)
            if block_hash is not None:  # evicted: its K/V is about to be overwritten
                del self._cached[block_hash]
                self.cache_events.add(False, block_hash)
                self.prefix_evicted_blocks += 1
            self._ref_counts[b] = 1
            blocks.append(b)
        return blocks

    def share(self, blocks: list[int]) -> None:
        """Adds one owner to blocks that are already allocated."""
        for b in blocks:
            if self._ref_counts[b] <= 0:
                raise ValueError(f"block {b} is free and cannot be shared")
            self._ref_counts[b] += 1

    def free(self, blocks: list[int]) -> None:
        """Drops one owner from each block; a block returns to the free list with its last owner:
        at the back if cached (evicted last), else at the front (reused first). A sequence's blocks
        go back last first, so that its prefix's tail is evicted before its head (a lookup stops at
        the first missing block)."""
        for b in reversed(blocks):
            if self._ref_counts[b] <= 0:
                raise ValueError(f"block {b} freed twice")
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free[b] = None
                if b not in self._hash_of:
                    self._free.move_to_end(b, last=False)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    # ---- sequences --------------------------------------------------------------------------------
    def allocate_seq(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Gives `seq` blocks for its first `num_tokens` tokens (default: all); allocates only what
        it lacks."""
        need = self.blocks_for_tokens(len(seq.token_ids) if num_tokens is None else num_tokens)
        if need > len(seq.block_table):
            seq.block_table.extend(self.allocate(need - len(seq.block_table)))

    def blocks_needed_for_step(self, seqs: list[Sequence]) -> int:
        """Blocks a decode step of `seqs` would allocate (0 or 1 each)."""
        size = self.block_size  # (a loop of its own: every sequence, every step)
        return sum(len(seq.token_ids) > len(seq.block_table) * size for seq in seqs)

    def allocate_for_step(self, seqs: list[Sequence]) -> None:
        """Gives each sequence the block its next token needs, if it needs one (a decode step):
        allocate_seq for each, without the call for those that need none."""
        size = self.block_size
        for seq in seqs:
            if len(seq.token_ids) > len(seq.block_table) * size:
                self.allocate_seq(seq)

    def free_seq(self, seq: Sequence) -> None:
        self.free(self.detach(seq))

    def detach(self, seq: Sequence) -> list[int]:
        """Takes the sequence's blocks from it without freeing them (give them back with `free`):
        for blocks that something outside the engine may still be writing."""
        if seq.block_table:
            self._discarded.append(seq.seq_id)
        blocks, seq.block_table, seq.num_cached, seq.num_blocks_entered = seq.block_table, [], 0, 0
        return blocks

    def take_discarded(self) -> list[str]:
        """The sequences whose KV was given up since the last call (for caches of it)."""
        ids, self._discarded = self._discarded, []
        return ids

    # ---- prefix caching ---------------------------------------------------------------------------
    def cached_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks holding the longest prefix of a sequence that holds no blocks yet, short
        of its last token (whose logits must be computed)."""
        if not self.prefix_caching or seq.block_table:
            return []
        wanted = (len(seq.token_ids) - 1) // self.block_size
        hashes = extend_block_hashes(seq.block_hashes, seq.token_ids, self.block_size, wanted, seq.cache_salt)
        return [self._cached[h] for h in hashes[: self.cached_blocks(hashes[:wanted])]]

    def blocks_to_admit(self, seq: Sequence, cached: list[int]) -> int:
        """Free blocks that `admit(seq, cached)` takes: new ones for what is not cached, and the
        cached ones no other sequence holds."""
        new = self.blocks_for_tokens(len(seq.token_ids)) - len(seq.block_table) - len(cached)
        return new + sum(1 for b in cached if self._ref_counts[b] == 0)

    def admit(self, seq: Sequence, cached: list[int]) -> None:
        """Gives a sequence about to be prefilled the `cached` blocks of its prefix (from
        `cached_prefix`) and new blocks for the rest of its tokens."""
        self._hold(cached)
        if cached:
            seq.block_table = list(cached)
            seq.num_cached = len(cached) * self.block_size
            seq.num_blocks_entered = len(cached)
        if self.prefix_caching:
            first, end = seq.fetched_blocks
            fetched = max(0, min(end, len(cached)) - first) * self.block_size
            self.prefix_query_tokens["worker"] += len(seq.token_ids)
            self.prefix_hit_tokens["worker"] += seq.num_cached - fetched
            self.prefix_hit_tokens[seq.fetched_tier] += fetched
        seq.prefix_hit_tokens = seq.num_cached
        self.allocate_seq(seq)

    def cached_blocks(self, hashes: list[bytes]) -> int:
        """How many of the first blocks (`hashes`, in order) are cached here."""
        return leading_held(hashes, self._cached)

    def hold_for_fetch(self, hashes: list[bytes], count: int) -> tuple[list[int], list[int]] | None:
        """For a fetch of `count` blocks that continue the cached prefix of `hashes`: holds that
        prefix's blocks (so that making room does not evict them) and allocates `count` blocks to
        copy into; None when the pool has no room. Give them back with `enter_fetched` and `free`."""
        held = [self._cached[h] for h in hashes[: self.cached_blocks(hashes)]]
        if count + sum(1 for b in held if self._ref_counts[b] == 0) > len(self._free):
            return None
        self._hold(held)
        return held, self.allocate(count)

    def count_lookup(self, tier: str, num_tokens: int) -> None:
        self.prefix_query_tokens[tier] += num_tokens

    def enter_fetched(self, blocks: list[int], hashes: list[bytes]) -> None:
        """Blocks allocated for K/V copied in from elsewhere (the node's prefix tier) enter the cache
        under `hashes`, and are freed: a sequence admitted next finds them as if computed here."""
        for b, block_hash in zip(blocks, hashes, strict=True):
            self._enter(b, block_hash)
        self.free(blocks)

    def enter_computed_blocks(self, seq: Sequence) -> None:
        """Enters the sequence's full blocks whose K/V is now computed in the prefix cache. A block
        whose content another block holds already is left out (it is freed as usual)."""
        if not self.prefix_caching:
            return
        full = seq.num_cached // self.block_size
        if full <= seq.num_blocks_entered:
            return
        hashes = extend_block_hashes(seq.block_hashes, seq.token_ids, self.block_size, full, seq.cache_salt)
        for i in range(seq.num_blocks_entered, full):
            self._enter(seq.block_table[i], hashes[i])
        seq.num_blocks_entered = full

    def _enter(self, block: int, block_hash: bytes) -> None:
        """Caches `block` under `block_hash`, unless another block holds that content already."""
        if block_hash not in self._cached and block not in self._hash_of:
            self._cached[block_hash] = block
            self._hash_of[block] = block_hash
            self.cache_events.add(True, block_hash)

    def _hold(self, cached: list[int]) -> None:
        """One more owner for each cached block, taking those that were free off the free list."""
        for b in cached:
            if self._ref_counts[b] == 0:
                del self._free[b]
            self._ref_counts[b] += 1
