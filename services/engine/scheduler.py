"""Continuous batching over one Engine: which sequences run in the next step.

Used by the decode worker (sequences arrive with their KV already pulled into blocks) and by the
colocated worker (sequences arrive as prompts). The policy is vLLM's default: a step prefills
waiting prompts when any fit (prefill first, FCFS, up to a token budget), otherwise it advances
every running sequence by one token. When a step needs a block and none is free, the most
recently admitted sequence is preempted: its blocks are freed and it goes back to the front of
the queue to be recomputed (prompt + tokens so far) by a later prefill.

Single-threaded by design: the worker's engine thread is the only caller.
"""

from __future__ import annotations

from collections import deque

from .engine import Engine, StepOutput
from .sequence import Sequence


def take_prefill_batch(waiting: deque[Sequence], engine: Engine, max_tokens: int, max_seqs: int,
                       reserve_blocks: int = 0) -> list[Sequence]:
    """Pops the longest FCFS prefix of `waiting` that fits the token budget and the free blocks.

    A prompt longer than the budget still runs, alone: the budget bounds batching, not prompts."""
    batch: list[Sequence] = []
    tokens = blocks = 0
    free = engine.block_manager.num_free - reserve_blocks
    while waiting and len(batch) < max_seqs:
        seq = waiting[0]
        n = len(seq.token_ids)
        need = engine.blocks_for_tokens(n) - len(seq.block_table)
        if batch and tokens + n > max_tokens:
            break
        if blocks + need > free:
            break
        batch.append(waiting.popleft())
        tokens += n
        blocks += need
    return batch


class BatchScheduler:
    def __init__(self, engine: Engine, max_num_seqs: int, max_num_batched_tokens: int):
        self.engine = engine
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()  # need a prefill: new prompts and preempted ones
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.last_step_kind = ""  # "prefill" | "decode": what the last step() ran
        # Keep a few blocks spare so that admitting a prompt does not force a preemption at once.
        self.watermark_blocks = max(1, engine.block_manager.num_blocks // 100)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add_prompt(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose KV for all but its last token is already in its blocks."""
        self.running.append(seq)

    def abort(self, seq_id: str) -> Sequence | None:
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.seq_id == seq_id:
                    queue.remove(seq)
                    self.engine.free(seq)
                    return seq
        return None

    def step(self) -> list[StepOutput]:
        room = self.max_num_seqs - len(self.running)
        batch = take_prefill_batch(self.waiting, self.engine, self.max_num_batched_tokens, room,
                                   reserve_blocks=self.watermark_blocks if self.running else 0)
        if batch:
            outputs = self.engine.prefill(batch)
            self.last_step_kind = "prefill"
        elif self.running:
            self.last_step_kind = "decode"
            self._reserve_decode_blocks()
            outputs = self.engine.decode_step(self.running) if self.running else []
        else:
            return []
        finished = {id(o.seq) for o in outputs if o.finish_reason}
        for out in outputs:
            if out.finish_reason:
                self.engine.free(out.seq)
        if batch:
            self.running.extend(s for s in batch if id(s) not in finished)
        else:
            self.running = [s for s in self.running if id(s) not in finished]
        return outputs

    def _reserve_decode_blocks(self) -> None:
        """Preempts from the back until every running sequence can grow by one token."""
        while self.running:
            need = sum(self.engine.blocks_needed_for_step(s) for s in self.running)
            if need <= self.engine.block_manager.num_free:
                return
            victim = self.running.pop()
            self.engine.free(victim)
            self.waiting.appendleft(victim)
            self.num_preemptions += 1
