"""Content hashes of full KV blocks, chained over every token before them (vLLM's automatic prefix
caching): block i's hash names the first (i + 1) * block_size tokens, so two sequences with equal
hashes have equal K/V in that block. A per-request salt (`cache_salt`) enters the first block's
hash, so requests with different salts never share a block.

The engine's prefix cache (engine/block_manager.py) and the router's index of what each worker
holds (router/prefix_index.py) compute the same hashes.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Container, Sequence

HASH_BYTES = 16
_ROOT = b"pdserve.prefix/v1\0"


def extend_block_hashes(
    hashes: list[bytes], token_ids: Sequence[int], block_size: int, num_blocks: int, salt: str = ""
) -> list[bytes]:
    """Appends to `hashes` (those of the first len(hashes) blocks) the hashes of the blocks up to
    `num_blocks` (at most the full blocks of `token_ids`); returns `hashes`."""
    num_blocks = min(num_blocks, len(token_ids) // block_size)
    # the root is a hash too, so that every hashed message is (16 bytes, tokens): unambiguous
    parent = hashes[-1] if hashes else hashlib.blake2b(_ROOT + salt.encode(), digest_size=HASH_BYTES).digest()
    first = len(hashes)
    data = array("I", token_ids[first * block_size : num_blocks * block_size]).tobytes()
    step = 4 * block_size
    for k in range(num_blocks - first):
        parent = hashlib.blake2b(parent + data[k * step : (k + 1) * step], digest_size=HASH_BYTES).digest()
        hashes.append(parent)
    return hashes


def leading_held(hashes: Sequence[bytes], held: Container[bytes]) -> int:
    """How many of the first blocks (`hashes`, in order) `held` has: a prefix is usable up to its
    first missing block."""
    for i, block_hash in enumerate(hashes):
        if block_hash not in held:
            return i
    return len(hashes)


def block_hashes(token_ids: Sequence[int], block_size: int, salt: str = "") -> list[bytes]:
    """The hashes of every full block of `token_ids`."""
    return extend_block_hashes([], token_ids, block_size, len(token_ids) // block_size, salt)
