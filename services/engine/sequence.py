"""A request's state inside one worker's engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from services.common.enums import FinishReason

from .config import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"  # queued: for a prefill, or (decode worker) for blocks to pull its KV into
    PULLING = "pulling"  # decode worker: blocks allocated, its KV being pulled into them
    RUNNING = "running"  # in the batch (prefill worker: being prefilled)
    PUBLISHED = "published"  # prefill worker: its blocks back a published KV entry until released
    ABORTED = "aborted"  # decode worker: cancelled while its pull runs; the pull's end frees its blocks
    FINISHED = "finished"  # done, cancelled or failed; its blocks are freed


@dataclass(eq=False)
class Sequence:
    seq_id: str
    token_ids: list[int]  # prompt followed by the output so far
    num_prompt_tokens: int
    sampling: SamplingParams
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    # tokens whose K/V is in the pool; decode feeds token_ids[num_cached] next
    num_cached: int = 0
    output_logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    # prefix caching (block_manager.py): requests with different salts share no blocks
    cache_salt: str = ""
    block_hashes: list[bytes] = field(default_factory=list)  # of its first full blocks, as far as computed
    num_blocks_entered: int = 0  # its first blocks that are in the prefix cache
    prefix_hit_tokens: int = 0  # tokens found cached when it was last admitted
    fetched_blocks: tuple[int, int] = (0, 0)  # [first, end) of its blocks fetched from a prefix tier
    fetched_tier: str = "node"  # which: "node" (this node's), "remote" (another node's)

    @classmethod
    def from_prompt(cls, seq_id: str, prompt: list[int], sampling: SamplingParams) -> Sequence:
        return cls(seq_id, list(prompt), len(prompt), sampling)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
