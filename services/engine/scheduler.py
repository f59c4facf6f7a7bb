"""Every scheduling decision of the workers, as plain state with no I/O and no model: which
sequences run in the next step, which blocks they hold, and when a request may take blocks. The
worker's engine thread asks a scheduler for a step, runs the engine on it, and reports back.

- `PrefillScheduler` (prefill worker): one FCFS queue, batched up to a token budget and the free
  blocks; after the step a sequence's blocks stay held while its KV is published, until released.
- `BatchScheduler` (colocated worker): continuous batching. By default prefill first (vLLM's
  policy before chunked prefill): a step prefills waiting prompts when any fit (FCFS, up to a
  token budget), otherwise it advances every running sequence by one token. With chunked prefill,
  each step carries every running sequence's next token and fills the rest of the token budget
  with prompt chunks. When a step needs a block and none is free, the most recently admitted
  sequence is preempted: its blocks are freed and it goes back to the front of the queue to be
  recomputed (prompt + tokens so far) by a later prefill.
- `DecodeScheduler` (decode worker): the same continuous batch, entered through pull-based
  admission (DistServe 4.4): a request waits holding nothing until blocks for its KV are free, is
  given them and pulls its KV into them, then runs; a failed pull is recomputed here instead.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


class StepKind(Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    MIXED = "mixed"  # chunked prefill: prompt chunks and running sequences' next tokens in one pass


@dataclass
class StepPlan:
    kind: StepKind
    seqs: list[Sequence]
    num_tokens: list[int] | None = None  # MIXED: tokens each sequence computes, from its num_cached on


class AbortOutcome(Enum):
    """Where an aborted sequence was, which says what else its worker must do."""

    NOT_ADMITTED = "not_admitted"  # decode: it held nothing; its KV entry will never be pulled (release it)
    PULLING = "pulling"  # decode: its pull is in flight; its blocks are dealt with when the pull ends
    FREED = "freed"  # it was queued or running; its blocks (if any) are free
    NOT_QUEUED = "not_queued"  # in no queue: finished already, or taken by the step under way


def take_prefill_batch(
    waiting: deque[Sequence], blocks: BlockManager, max_tokens: int, max_seqs: int, reserve_blocks: int = 0
) -> list[Sequence]:
    """Pops the longest FCFS prefix of `waiting` that fits the token budget and the free blocks, and
    gives each its blocks: those of its cached prefix (prefix caching), new ones for the rest. The
    budget counts the tokens to compute.

    A prompt longer than the budget still runs, alone: the budget bounds batching, not prompts."""
    batch: list[Sequence] = []
    tokens = 0
    while waiting and len(batch) < max_seqs:
        seq = waiting[0]
        cached = blocks.cached_prefix(seq)
        n = len(seq.token_ids) - len(cached) * blocks.block_size
        if batch and tokens + n > max_tokens:
            break
        if blocks.blocks_to_admit(seq, cached) + reserve_blocks > blocks.num_free:
            break
        blocks.admit(waiting.popleft(), cached)
        batch.append(seq)
        tokens += n
    return batch


class PrefillScheduler:
    def __init__(self, blocks: BlockManager, max_num_batched_tokens: int, max_num_seqs: int):
        self.blocks = blocks
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.queued_tokens = 0
        self.published: dict[str, Sequence] = {}  # kv_id -> the sequence whose blocks back the entry

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self.queued_tokens += len(seq.token_ids)

    def has_work(self) -> bool:
        """The head of the queue fits the free blocks (it may need to wait for releases)."""
        if not self.waiting:
            return False
        head = self.waiting[0]
        return self.blocks.blocks_to_admit(head, self.blocks.cached_prefix(head)) <= self.blocks.num_free

    def schedule(self) -> list[Sequence]:
        """The next batch, its blocks allocated (empty when the head does not fit yet)."""
        batch = take_prefill_batch(self.waiting, self.blocks, self.max_num_batched_tokens, self.max_num_seqs)
        for seq in batch:
            self.queued_tokens -= len(seq.token_ids)
            seq.status = SequenceStatus.RUNNING
        return batch

    def finish(self, seq: Sequence) -> None:
        """The sequence ended at its first token, or its step failed: nothing to publish."""
        seq.status = SequenceStatus.FINISHED
        self.blocks.free_seq(seq)

    def publish(self, kv_id: str, seq: Sequence) -> None:
        """Its blocks back published entry `kv_id` until `release(kv_id)`."""
        seq.status = SequenceStatus.PUBLISHED
        self.published[kv_id] = seq

    def release(self, kv_id: str) -> bool:
        """The entry was pulled, dropped or never recorded: its blocks are free again."""
        seq = self.published.pop(kv_id, None)
        if seq is None:
            return False
        self.finish(seq)
        return True

    def abort(self, seq: Sequence) -> None:
        """Its request went away: out of the queue, or its blocks freed if computed and not published
        (a published entry is released through the kvstore instead)."""
        if seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
            self.queued_tokens -= len(seq.token_ids)
            seq.status = SequenceStatus.FINISHED
        elif seq.status is SequenceStatus.RUNNING:
            self.finish(seq)


class BatchScheduler:
    def __init__(
        self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int, chunked_prefill: bool = False
    ):
        if chunked_prefill and max_num_batched_tokens < max_num_seqs:
            raise ValueError(
                f"chunked prefill needs a token budget (max_num_batched_tokens, {max_num_batched_tokens}) of "
                f"at least the batch limit (max_num_seqs, {max_num_seqs}): every running sequence's next "
                "token is in each step"
            )
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Sequence] = deque()  # need a prefill: new prompts and preempted ones
        self.running: list[Sequence] = []  # hold blocks (chunked prefill: some part-way through their prompt)
        self.num_preemptions = 0
        # Keep a few blocks spare so that admitting a prompt does not force a preemption at once.
        self.watermark_blocks = max(1, blocks.num_blocks // 100)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add_prompt(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """A sequence whose KV for all but its last token is already in its blocks."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def abort(self, seq: Sequence) -> AbortOutcome:
        """Takes the sequence out wherever it is and frees its blocks."""
        for queue in (self.waiting, self.running):
            if seq in queue:
                queue.remove(seq)
                self._finish(seq)
                return AbortOutcome.FREED
        return AbortOutcome.NOT_QUEUED

    def schedule(self) -> StepPlan | None:
        """The next step, its blocks allocated; None when nothing can run now."""
        if self.chunked_prefill:
            return self._schedule_chunked()
        room = self.max_num_seqs - len(self.running)
        batch = take_prefill_batch(
            self.waiting,
            self.blocks,
            self.max_num_batched_tokens,
            room,
            reserve_blocks=self.watermark_blocks if self.running else 0,
        )
        if batch:
            for seq in batch:
                seq.status = SequenceStatus.RUNNING
            return StepPlan(StepKind.PREFILL, batch)
        self._reserve_decode_blocks()
        if not self.running:
            return None
        self.blocks.allocate_for_step(self.running)
        return StepPlan(StepKind.DECODE, list(self.running))

    def _schedule_chunked(self) -> StepPlan | None:
        """Chunked prefill (Sarathi-Serve; vLLM's and SGLang's default): every running sequence's
        next token first, then prompts, FCFS, as far as the step's token budget goes, the last one
        cut to what is left (and continued in the next steps). A step never waits for a whole long
        prompt, so running sequences keep their pace while prompts arrive. A prompt takes blocks
        for all its tokens (its cached prefix's first) when its first chunk is scheduled."""
        self._reserve_decode_blocks()
        budget = self.max_num_batched_tokens
        seqs: list[Sequence] = []
        num_tokens: list[int] = []

        def take(seq: Sequence) -> None:
            nonlocal budget
            n = min(len(seq) - seq.num_cached, budget)
            seqs.append(seq)
            num_tokens.append(n)
            budget -= n

        next_tokens = [seq for seq in self.running if len(seq) - seq.num_cached == 1]
        for seq in next_tokens:  # the budget covers them all (it is at least max_num_seqs)
            self.blocks.allocate_seq(seq)
            take(seq)
        for seq in self.running:
            if budget and len(seq) - seq.num_cached > 1:
                take(seq)
        while budget and self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            spare = self.watermark_blocks if self.running else 0
            cached = self.blocks.cached_prefix(seq)
            if self.blocks.blocks_to_admit(seq, cached) + spare > self.blocks.num_free:
                break
            self.waiting.popleft()
            self.blocks.admit(seq, cached)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            take(seq)
        if not seqs:
            return None
        if len(next_tokens) == len(seqs):
            return StepPlan(StepKind.DECODE, seqs)
        return StepPlan(StepKind.MIXED, seqs, num_tokens)

    def _reserve_decode_blocks(self) -> None:
        """Preempts from the back until every running sequence can grow by one token."""
        while self.running:
            need = self.blocks.blocks_needed_for_step(self.running)
            if need <= self.blocks.num_free:
                return
            victim = self.running.pop()
            self.blocks.free_seq(victim)
            victim.status = SequenceStatus.WAITING
            self.waiting.appendleft(victim)
            self.num_preemptions += 1

    def finish_step(self, plan: StepPlan) -> list[Sequence]:
        """After the engine ran `plan`: finished sequences leave (blocks freed), prefilled ones join
        the running batch. Returns the finished ones."""
        finished = [seq for seq in plan.seqs if seq.finished]
        for seq in finished:
            self._finish(seq)
        if plan.kind is StepKind.PREFILL:
            self.running.extend(seq for seq in plan.seqs if not seq.finished)
        elif finished:
            self.running = [seq for seq in self.running if not seq.finished]
        return finished

    def fail_step(self, plan: StepPlan) -> None:
        """The engine raised on `plan`: its sequences leave, their blocks freed."""
        for seq in plan.seqs:
            if self.abort(seq) is AbortOutcome.NOT_QUEUED:  # a prefill batch has left the queue already
                self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.FINISHED
        self.blocks.free_seq(seq)


class DecodeScheduler(BatchScheduler):
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        super().__init__(blocks, max_num_seqs, max_num_batched_tokens)
        self.admission: deque[Sequence] = deque()  # waiting for blocks, holding nothing
        # The blocks those will take when admitted: a worker's load as every router sees it (the
        # free blocks less these), whichever router sent them.
        self.admission_blocks = 0
        self.num_pulling = 0
        self.quarantined_blocks = 0  # of pulls that failed mid-transfer, not reusable yet

    def add_request(self, seq: Sequence) -> None:
        """A request whose KV (all tokens but the last) is to be pulled from a kvstore."""
        seq.status = SequenceStatus.WAITING
        self.admission.append(seq)
        self.admission_blocks += self.blocks.blocks_for_tokens(len(seq.token_ids))

    def fits(self, seq: Sequence) -> bool:
        """Room for the sequence's KV now. Sequences preempted back to the waiting queue come
        first (as in vLLM): while any waits, nothing new is admitted, or a steady stream of
        arrivals would take every block they free and starve them. The watermark (blocks kept
        spare so that running sequences can grow) applies only while something else holds
        blocks: an idle worker admits any request its pool can hold."""
        if self.waiting:
            return False
        in_flight = len(self.running) + self.num_pulling
        need = self.blocks.blocks_for_tokens(len(seq.token_ids))  # cached tokens + the next one
        spare = self.watermark_blocks if in_flight else 0
        return in_flight < self.max_num_seqs and need + spare <= self.blocks.num_free

    def admit(self) -> list[Sequence]:
        """Gives the requests at the head of the queue that fit their blocks (FCFS); the caller
        pulls their KV into `seq.block_table` and reports with pull_succeeded / pull_failed."""
        admitted = []
        while self.admission and self.fits(self.admission[0]):
            seq = self.admission.popleft()
            self.admission_blocks -= self.blocks.blocks_for_tokens(len(seq.token_ids))
            self.blocks.allocate_seq(seq, len(seq.token_ids) - 1)
            seq.status = SequenceStatus.PULLING
            self.num_pulling += 1
            admitted.append(seq)
        return admitted

    def pull_succeeded(self, seq: Sequence) -> None:
        self.num_pulling -= 1
        if seq.status is SequenceStatus.ABORTED:
            self._finish(seq)
            return
        seq.num_cached = len(seq.token_ids) - 1
        self.add_running(seq)

    def pull_failed(self, seq: Sequence, blocks_may_be_written: bool) -> list[int]:
        """The sequence is recomputed here (unless it was aborted meanwhile). Returns the blocks
        to keep out of use for a while, when the transfer may still be writing into them (a pull
        that broke off mid-copy); give them back with release_quarantined."""
        self.num_pulling -= 1
        quarantined: list[int] = []
        if blocks_may_be_written:
            quarantined = self.blocks.detach(seq)
            self.quarantined_blocks += len(quarantined)
        else:
            self.blocks.free_seq(seq)
        if seq.status is SequenceStatus.ABORTED:
            seq.status = SequenceStatus.FINISHED
        else:
            self.add_prompt(seq)
        return quarantined

    def release_quarantined(self, blocks: list[int]) -> None:
        self.blocks.free(blocks)
        self.quarantined_blocks -= len(blocks)

    def abort(self, seq: Sequence) -> AbortOutcome:
        if seq.status is SequenceStatus.PULLING:
            seq.status = SequenceStatus.ABORTED  # pull_succeeded/failed frees its blocks
            return AbortOutcome.PULLING
        if seq in self.admission:
            self.admission.remove(seq)
            self.admission_blocks -= self.blocks.blocks_for_tokens(len(seq.token_ids))
            seq.status = SequenceStatus.FINISHED
            return AbortOutcome.NOT_ADMITTED
        return super().abort(seq)

    def has_work(self) -> bool:
        # With blocks in quarantine and nothing running, a recompute that does not fit cannot be
        # stepped until they come back (the worker is woken when they do): reporting work then
        # would spin the engine thread for the whole quarantine.
        if (
            self.quarantined_blocks
            and self.waiting
            and not self.running
            and not self.blocks.can_allocate(self.blocks.blocks_for_tokens(len(self.waiting[0])))
        ):
            return False
        return super().has_work() or (bool(self.admission) and self.fits(self.admission[0]))
