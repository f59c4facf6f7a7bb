"""An emulated device: an engine that runs no model, and whose every step takes the time a latency
profile (`pdserve.profile/v1`, services/common/latency_profile.py) says it takes on the profiled
hardware: a prefill batch `prefill.time(lengths)`, a decode step `decode.step_time(batch, context)`,
a chunked-prefill step `mixed_step_time(chunks, decode contexts)`.

Everything around the model is real: the worker, its scheduler and the block manager (at the
profile's KV capacity: an emulated H100 holds what the profile says), the gRPC calls, the kvstore
daemons and the bytes they move. The KV pool holds `kv_bytes_per_token / kv_scale` bytes per
token, so that dozens of emulated workers' pools fit in one machine's memory; a pull into an
emulated worker lasts at least what the profile's transfer model says for the unscaled bytes
(`min_transfer_seconds`). A step sleeps, so the GIL is free and many emulated workers share a few
cores; it sleeps the profile's time less what the step itself took. A step whose own work already
took longer than the profile's time, or whose sleep overslept, because the machine's cores are too
busy for the cluster emulated on them, runs late: `late_steps` and `late_seconds` count it, exported as
pdserve_emulated_late_steps_total and pdserve_emulated_late_seconds_total, so a run can show
that its timings were the profile's.

An instance with pp pipeline stages (one process, as every emulated instance is) keeps pp batches
in flight as the planner's simulator models it: a prefill worker's next batch enters once the first
stage is free, each batch's results come the whole prefill time after it entered
(`prefill_pipelined`); a decode step advances every running sequence in the time of one micro-batch
of 1/pp of them (pp micro-batches, each one token per pass through the pipeline).

Tokens are a deterministic function of the request (`emulated_token`: its prompt, the output index,
and the seed when it samples), never an EOS: repeats, failovers and exactness checks can compare
them, and every request runs to its max_tokens. The vocabulary, EOS ids and context limit are the
served checkpoint's (--model), so the router's tokenizer decodes them.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from array import array
from dataclasses import replace

from services.common.arith import ceil_div
from services.common.latency_profile import LatencyProfile

from .block_manager import BlockManager
from .config import EngineConfig, ModelConfig
from .engine import EngineBase, StepOutput
from .kv_cache import KvLayout, KvPool
from .sampler import SampleResult
from .sequence import Sequence

log = logging.getLogger(__name__)

DEFAULT_KV_SCALE = 4096  # an emulated pool holds the profile's KV bytes per token / this
_MASK = (1 << 64) - 1
LATE_TOLERANCE_SECONDS = 0.001  # a step ending later than this past the profile's time ran late


def _mix(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit hash of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def prompt_hash(prompt: list[int]) -> int:
    return _mix(zlib.crc32(array("I", prompt).tobytes()) ^ (len(prompt) << 32))


def emulated_token(prompt: int, index: int, seed: int, vocab_size: int, eos_token_ids: tuple[int, ...]) -> int:
    """The token an emulated engine makes at output `index` of a request with prompt hash `prompt`
    (`seed` is the request's when it samples, 0 when greedy), never one of the EOS ids."""
    token = _mix(prompt ^ _mix(index ^ _mix(seed))) % vocab_size
    while token in eos_token_ids:
        token = (token + 1) % vocab_size
    return token


class EmulatedEngine(EngineBase):
    def __init__(self, model_dir: str, config: EngineConfig, profile: LatencyProfile, kv_scale: int = DEFAULT_KV_SCALE):
        self.profile = profile
        self.model_config = ModelConfig.from_pretrained(model_dir)
        # the profile's instance: its block size and batch limits
        self.config = replace(
            config,
            block_size=profile.block_size,
            max_num_seqs=profile.max_num_seqs * profile.pipeline_parallel,  # per micro-batch, as vLLM
            max_num_batched_tokens=profile.max_batched_tokens,
        )
        mc = self.model_config
        self.max_model_len = min(config.max_model_len or mc.max_model_len, mc.max_model_len)
        self.kv_scale = kv_scale
        bytes_per_token = 4 * max(1, ceil_div(math.ceil(profile.kv_bytes_per_token / kv_scale), 4))  # float16 K and V
        layout = KvLayout(
            num_blocks=profile.kv_capacity_blocks,
            num_layers=1,
            block_size=profile.block_size,
            num_kv_heads=1,
            head_dim=bytes_per_token // 4,
            dtype="float16",
            # The model's KV whatever the instance's GPU or parallelism: an emulated instance holds
            # all of it in one pool, so a TP-1 pipeline's prefill hands off to a TP-2 decode.
            model_id=f"emulated-{profile.model}-scale{kv_scale}",
        )
        self.kv_pool = KvPool.allocate(layout, "cpu", name=config.kv_pool_name)
        self.block_manager = BlockManager(layout.num_blocks, profile.block_size, config.enable_prefix_caching)
        self._prompt_hashes: dict[str, int] = {}  # seq_id -> prompt_hash, dropped with its blocks
        self._stage_free = [0.0] * profile.pipeline_parallel  # when each pipeline stage is next free
        self._pipelined = False  # the prefill in progress is prefill_pipelined's
        self._leaves_at = 0.0  # when its batch leaves the last stage
        self.steps = 0
        self.late_steps = 0
        self.late_seconds = 0.0
        log.info(
            "emulated engine: %s on %s (tp %d, pp %d, %s profile), %d KV blocks of %d tokens, "
            "%d bytes per token in the pool (1/%d of %d)",
            profile.model,
            profile.device,
            profile.tensor_parallel,
            profile.pipeline_parallel,
            profile.source,
            layout.num_blocks,
            profile.block_size,
            bytes_per_token,
            kv_scale,
            profile.kv_bytes_per_token,
        )

    def min_transfer_seconds(self, num_tokens: int) -> float:
        return self.profile.transfer.seconds(num_tokens * self.profile.kv_bytes_per_token)

    def prefill_pipelined(self, seqs: list[Sequence]) -> tuple[list[StepOutput], float]:
        self._pipelined = True
        try:
            outputs = self.prefill(seqs)
        finally:
            self._pipelined = False
        return outputs, self._leaves_at

    def _prefill(self, seqs: list[Sequence]) -> SampleResult:
        started = time.monotonic()
        result = self._tokens(seqs)
        self._take_prefill_time(started, self.profile.prefill.time([len(s.token_ids) for s in seqs]))
        return result

    def _take_prefill_time(self, started: float, duration: float) -> None:
        """Sleeps as a prefill pass of `duration` begun at `started` holds up this worker."""
        if not self._pipelined:  # a decode or colocated worker's prefill: its results are needed now
            self._sleep_until(started + duration)
            return
        # The simulator's PrefillInstance: each stage takes 1/pp of the time, a batch waits for each
        # stage to be free, and the next batch may enter when this one has left the first.
        stage, leaves = duration / len(self._stage_free), started
        for k, free in enumerate(self._stage_free):
            leaves = self._stage_free[k] = max(leaves, free) + stage
        self._leaves_at = leaves
        self._sleep_until(self._stage_free[0])

    def _decode(self, seqs: list[Sequence]) -> SampleResult:
        started = time.monotonic()
        result = self._tokens(seqs)
        lanes = max(1, min(len(seqs), len(self._stage_free)))  # micro-batches in flight
        context = sum(len(s.token_ids) for s in seqs)
        self._sleep_until(started + self.profile.decode.step_time(ceil_div(len(seqs), lanes), context / lanes))
        return result

    def _mixed(self, seqs: list[Sequence], num_tokens: list[int], completing: list[int]) -> SampleResult:
        started = time.monotonic()
        result = self._tokens([seqs[i] for i in completing])
        decode = [(s.num_cached + 1) for s, n in zip(seqs, num_tokens) if n == 1 and s.num_cached > 0]
        chunks = [(s.num_cached, n) for s, n in zip(seqs, num_tokens) if not (n == 1 and s.num_cached > 0)]
        # a prefill worker's batch with cached prefixes comes here too (EngineBase.prefill)
        self._take_prefill_time(started, self.profile.mixed_step_time(chunks, decode))
        return result

    def _tokens(self, seqs: list[Sequence]) -> SampleResult:
        for seq_id in self.block_manager.take_discarded():
            self._prompt_hashes.pop(seq_id, None)
        mc = self.model_config
        tokens = []
        for seq in seqs:
            key = self._prompt_hashes.get(seq.seq_id)
            if key is None:
                key = self._prompt_hashes[seq.seq_id] = prompt_hash(seq.token_ids[: seq.num_prompt_tokens])
            seed = seq.sampling.seed if seq.sampling.temperature > 0 else 0
            tokens.append(emulated_token(key, seq.num_output_tokens, seed, mc.vocab_size, mc.eos_token_ids))
        logprobs = [0.0 if seq.sampling.logprobs else math.nan for seq in seqs]  # a certain token
        return SampleResult(tokens, logprobs)

    def _sleep_until(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining > 0:
            time.sleep(remaining)
        late = time.monotonic() - deadline
        self.steps += 1
        if late > LATE_TOLERANCE_SECONDS:
            self.late_steps += 1
            self.late_seconds += late
