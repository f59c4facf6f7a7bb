"""The latency profile of one instance (`pdserve.profile/v1`): how long its prefill batches and
decode steps take, its KV memory and batch limits, and the serving overheads and KV transfer
around it. DistServe's simulator form:

    prefill_time(batch) = a + b * sum(len_i) + c * sum(len_i^2)
        a: fixed cost of a forward pass (kernel launches, weight reads at small batches)
        b: per-token cost of the matmuls (linear in tokens)
        c: attention's quadratic cost (every token attends to every earlier one)
    decode_step_time(batch) = a' + b' * sum(context_i) + c' * batch_size
        a': weight reads (the same for any batch: decode is memory-bound)
        b': KV reads (every step reads each sequence's whole context)
        c': per-sequence compute and bookkeeping

`pdserve plan profile` writes one, measured (services/planner/profile.py, fitted by
services/planner/latency_model.py) or derived from a GPU's datasheet (analytic.py); the planner's
simulator reads it, and so does an emulated engine (services/engine/emulated.py), which takes the
time it says.
"""

from __future__ import annotations

import json
from dataclasses import asdict, astuple, dataclass, field, replace

PROFILE_SCHEMA = "pdserve.profile/v1"


@dataclass(frozen=True)
class PrefillLatency:
    a: float
    b: float
    c: float

    def batch_time(self, sum_len: float, sum_len_sq: float) -> float:
        return self.a + self.b * sum_len + self.c * sum_len_sq

    def time(self, lengths) -> float:
        return self.batch_time(sum(lengths), sum(n * n for n in lengths))


@dataclass(frozen=True)
class DecodeLatency:
    a: float
    b: float
    c: float

    def step_time(self, batch_size: int, sum_context: float) -> float:
        return self.a + self.b * sum_context + self.c * batch_size


@dataclass
class Overheads:
    """Time the serving system adds around the engine, all in seconds (0 = not modelled)."""

    dispatch_s: float = 0.0  # request reaches the router -> it is in a prefill worker's queue
    first_token_s: float = 0.0  # prefill batch done -> first token reaches the client
    handoff_s: float = 0.0  # prefill batch done -> request is in a decode worker's queue
    prefill_batch_s: float = 0.0  # added to every prefill batch (batcher, RPC, sampling)
    decode_step_s: float = 0.0  # added to every decode step (scheduler, token streaming)


@dataclass
class TransferSpec:
    """KV transfer time = fixed_s + bytes / bytes_per_s (None = instantaneous)."""

    fixed_s: float = 0.0
    bytes_per_s: float | None = None

    def seconds(self, num_bytes: float) -> float:
        return self.fixed_s + (num_bytes / self.bytes_per_s if self.bytes_per_s else 0.0)


@dataclass
class LatencyProfile:
    prefill: PrefillLatency
    decode: DecodeLatency
    kv_bytes_per_token: int  # all layers, whole model
    kv_capacity_tokens: int  # KV slots of one instance (all its GPUs)
    block_size: int = 16
    max_batched_tokens: int = 4096  # prefill token budget L_m
    max_num_seqs: int = 256  # decode batch limit
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    source: str = "measured"  # "measured" | "analytic"
    model: str = ""
    device: str = ""
    dtype: str = ""
    overheads: Overheads = field(default_factory=Overheads)
    transfer: TransferSpec = field(default_factory=TransferSpec)
    fit: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)
    notes: dict = field(default_factory=dict)

    @property
    def num_gpus(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def kv_capacity_blocks(self) -> int:
        return self.kv_capacity_tokens // self.block_size

    def slowed(self, factor: float) -> LatencyProfile:
        """The same hardware run `factor` times slower: every time it models (steps, transfers,
        overheads) multiplied by `factor`. An emulated cluster at such a profile, with SLOs and
        request rates scaled alike, queues and batches exactly as at the original timings, while
        the serving system's own CPU time per request and token shrinks by `factor` relative to
        them: how a cluster at GPU token rates is emulated on a few cores."""
        o, t = self.overheads, self.transfer
        return replace(
            self,
            prefill=PrefillLatency(*(factor * v for v in (self.prefill.a, self.prefill.b, self.prefill.c))),
            decode=DecodeLatency(*(factor * v for v in (self.decode.a, self.decode.b, self.decode.c))),
            overheads=Overheads(*(factor * v for v in astuple(o))),
            transfer=TransferSpec(factor * t.fixed_s, t.bytes_per_s / factor if t.bytes_per_s else None),
            notes={**self.notes, "slowed": factor * self.notes.get("slowed", 1.0)},
        )

    def mixed_step_time(self, chunks: list[tuple[int, int]], decode_contexts: list[int]) -> float:
        """A chunked-prefill step: prompt chunks, each (tokens cached before, tokens now), beside
        running sequences' next tokens (their context lengths), in one forward pass.

        A prefill pass over the chunks' tokens, each attending to every earlier token of its
        sequence (the prefill fit's quadratic term over the chunk's positions), that carries the
        next tokens too: each costs a prefill token's matmul work and its context's KV reads (the
        decode fit's per-context-token term). It never takes less than a decode step of those
        next tokens alone. Without next tokens, a first chunk of n tokens is prefill.time([n])."""
        return self.mixed_time(chunks, len(decode_contexts), sum(decode_contexts))

    def mixed_time(self, chunks: list[tuple[int, int]], num_decode: int, decode_context_sum: int) -> float:
        """mixed_step_time with the next tokens given by their number and context sum."""
        p, d = self.prefill, self.decode
        tokens = sum(n for _, n in chunks) + num_decode
        attention = p.c * sum((cached + n) ** 2 - cached**2 for cached, n in chunks)
        prefill_pass = p.a + p.b * tokens + attention + d.b * decode_context_sum
        if not num_decode:
            return prefill_pass
        return max(prefill_pass, d.step_time(num_decode, decode_context_sum))

    def to_json(self) -> dict:
        d = asdict(self)
        return {"schema": PROFILE_SCHEMA, **d}

    @classmethod
    def from_json(cls, d: dict) -> LatencyProfile:
        d = dict(d)
        schema = d.pop("schema", PROFILE_SCHEMA)
        if schema != PROFILE_SCHEMA:
            raise ValueError(f"profile schema {schema!r} is not {PROFILE_SCHEMA!r}")
        d["prefill"] = PrefillLatency(**d["prefill"])
        d["decode"] = DecodeLatency(**d["decode"])
        d["overheads"] = Overheads(**d.get("overheads", {}))
        d["transfer"] = TransferSpec(**d.get("transfer", {}))
        return cls(**d)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=2)
            f.write("\n")

    @classmethod
    def load(cls, path: str) -> LatencyProfile:
        with open(path) as f:
            try:
                return cls.from_json(json.load(f))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not JSON ({e})") from None
            except (KeyError, TypeError) as e:  # a missing or unexpected field
                raise ValueError(
                    f"{path}: not a latency profile ({type(e).__name__}: {e}); write one with `pdserve plan profile`"
                ) from None
