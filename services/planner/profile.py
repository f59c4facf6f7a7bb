"""`plan profile`: measure the engine on the local device and fit the latency model.

Prefill is timed on batches of chosen compositions (equal and mixed prompt lengths); decode is
timed at chosen (batch size, context length) points by prefilling sequences of that context first
(untimed) and then timing a few decode steps. Both fits go into a LatencyProfile (latency_model.py)
together with the KV capacity the engine had and a measured local copy bandwidth for the KV
transfer. The serving overheads (router, gRPC, streaming) are not visible from the engine: they
stay 0 here and are set with flags or calibrated against the running cluster (docs/planner.md).
"""

from __future__ import annotations

import random
import statistics
import time
from dataclasses import dataclass, replace

import torch
from tqdm import tqdm

from services.common.latency_profile import LatencyProfile, Overheads, TransferSpec

from .latency_model import critical_batch_tokens, fit_decode, fit_prefill


@dataclass(frozen=True)
class ProfileGrid:
    prefill_lengths: tuple[int, ...] = (16, 64, 128, 256, 512, 1024)
    prefill_batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    prefill_max_batch_tokens: int = 4096  # skip equal-length batches larger than this
    decode_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    decode_contexts: tuple[int, ...] = (32, 128, 512, 1024)
    decode_max_batch_tokens: int = 32768  # skip (batch, context) points holding more KV than this
    # Each point keeps its fastest run: other load on the machine only ever adds time, and one
    # slow outlier would pull a least-squares fit far more than it deserves.
    decode_steps: int = 4  # timed steps per decode point
    repeats: int = 2  # timed runs per prefill point
    typical_prompt_len: int = 256  # for choosing L_m

    @classmethod
    def quick(cls) -> ProfileGrid:
        """A few seconds on a tiny model on CPU: for tests and smoke runs."""
        return cls(
            prefill_lengths=(8, 32, 96),
            prefill_batch_sizes=(1, 3),
            prefill_max_batch_tokens=512,
            decode_batch_sizes=(1, 4, 8),
            decode_contexts=(16, 96),
            decode_steps=3,
            repeats=2,
            typical_prompt_len=64,
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class EngineProfiler:
    def __init__(self, engine, grid: ProfileGrid, seed: int = 0):
        from services.engine.config import SamplingParams

        self.engine = engine
        self.grid = grid
        self.rng = random.Random(seed)
        self.max_len = engine.max_model_len - 1
        self._ids = 0
        self._sampling = lambda n: SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)

    def _seqs(self, lengths: list[int], max_tokens: int):
        from services.engine.sequence import Sequence

        vocab = self.engine.model_config.vocab_size
        seqs = []
        for n in lengths:
            self._ids += 1
            prompt = [self.rng.randrange(3, vocab) for _ in range(n)]
            seqs.append(Sequence.from_prompt(f"profile-{self._ids}", prompt, self._sampling(max_tokens)))
        return seqs

    def time_prefill(self, lengths: list[int]) -> float | None:
        engine = self.engine
        needed = sum(engine.block_manager.blocks_for_tokens(n + 1) for n in lengths)
        if needed > engine.block_manager.num_free:
            return None
        times = []
        for _ in range(self.grid.repeats):
            seqs = self._seqs(lengths, 4)
            _sync(engine.device)
            start = time.perf_counter()
            engine.prefill(seqs)
            _sync(engine.device)
            times.append(time.perf_counter() - start)
            for s in seqs:
                engine.free(s)
        return min(times)

    def time_decode(self, batch_size: int, context: int) -> list[tuple[int, int, float]]:
        """One sample (batch, total context, seconds): the fastest of a few consecutive steps."""
        engine = self.engine
        steps = self.grid.decode_steps
        prompt_len = max(1, context - 1)
        needed = batch_size * engine.block_manager.blocks_for_tokens(prompt_len + steps + 2)
        if needed > engine.block_manager.num_free or prompt_len + steps + 1 > self.max_len:
            return []
        seqs = self._seqs([prompt_len] * batch_size, steps + 2)
        chunk = max(1, 4096 // prompt_len)  # untimed setup, in bounded batches
        for i in range(0, len(seqs), chunk):
            engine.prefill(seqs[i : i + chunk])
        samples = []
        for _ in range(steps):
            total = sum(len(s.token_ids) for s in seqs)
            _sync(engine.device)
            start = time.perf_counter()
            engine.decode_step(seqs)
            _sync(engine.device)
            samples.append((batch_size, total, time.perf_counter() - start))
        for s in seqs:
            engine.free(s)
        return [min(samples, key=lambda x: x[2])]

    def prefill_points(self) -> list[list[int]]:
        g = self.grid
        lengths = [n for n in g.prefill_lengths if n <= self.max_len]
        points = [
            [n] * bs for n in lengths for bs in g.prefill_batch_sizes if n * bs <= max(g.prefill_max_batch_tokens, n)
        ]
        # Mixed batches: the c * sum(len^2) term is only identifiable if sum(len^2) != sum(len)^2 / bs.
        for i in range(len(lengths) - 1):
            points.append([lengths[0]] * 2 + [lengths[i + 1]])
        return points

    def decode_points(self) -> list[tuple[int, int]]:
        g = self.grid
        return [
            (bs, ctx)
            for bs in g.decode_batch_sizes
            for ctx in g.decode_contexts
            if bs * ctx <= g.decode_max_batch_tokens and ctx < self.max_len
        ]

    @torch.inference_mode()  # no autograd anywhere: the serving loops run the engine the same way
    def run(self, progress: bool = True) -> tuple[list, list]:
        prefill_points, decode_points = self.prefill_points(), self.decode_points()
        # Warm-up: first calls pay for allocator growth, lazy init and kernel selection.
        self.time_prefill([min(32, self.max_len)] * 2)
        self.time_decode(2, min(32, self.max_len - 4))
        prefill_samples, decode_samples = [], []
        with tqdm(
            total=len(prefill_points) + len(decode_points), desc="profiling", unit="point", disable=not progress
        ) as bar:
            for lengths in prefill_points:
                seconds = self.time_prefill(lengths)
                if seconds is not None:
                    prefill_samples.append((lengths, seconds))
                bar.update()
            for bs, ctx in decode_points:
                decode_samples.extend(self.time_decode(bs, ctx))
                bar.update()
        if len(prefill_samples) < 3 or len(decode_samples) < 3:
            raise RuntimeError("too few profile points fit in the KV pool; raise --kv-cache-mib or shrink the grid")
        return prefill_samples, decode_samples


def measure_copy_bandwidth(device: torch.device, num_bytes: int = 32 << 20) -> TransferSpec:
    """A device-local copy, as the kvstore does between two pools on one node: an estimate of
    the transfer cost for co-located workers, to be replaced by the measured one if known."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    small_src, small_dst = src[:4096], dst[:4096]
    for _ in range(2):
        dst.copy_(src)
        small_dst.copy_(small_src)
    _sync(device)
    times, small = [], []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
        small_dst.copy_(small_src)
        _sync(device)
        small.append(time.perf_counter() - start)
    return TransferSpec(fixed_s=statistics.median(small), bytes_per_s=num_bytes / statistics.median(times))


def profile_engine(
    engine,
    grid: ProfileGrid = ProfileGrid(),
    *,
    model_name: str = "",
    progress: bool = True,
    overheads: Overheads | None = None,
    seed: int = 0,
) -> LatencyProfile:
    profiler = EngineProfiler(engine, grid, seed)
    start = time.perf_counter()
    prefill_samples, decode_samples = profiler.run(progress)
    prefill, prefill_fit = fit_prefill(prefill_samples)
    decode, decode_fit = fit_decode(decode_samples)
    mc, cfg = engine.model_config, engine.config
    element = cfg.dtype_bytes
    device = engine.device
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    )
    return LatencyProfile(
        prefill=prefill,
        decode=decode,
        kv_bytes_per_token=mc.kv_elements_per_token * element,
        kv_capacity_tokens=engine.block_manager.num_blocks * engine.block_size,
        block_size=engine.block_size,
        max_batched_tokens=min(critical_batch_tokens(prefill, grid.typical_prompt_len), cfg.max_num_batched_tokens),
        max_num_seqs=cfg.max_num_seqs,
        source="measured",
        model=model_name,
        device=device_name,
        dtype=cfg.dtype,
        overheads=overheads or Overheads(),
        transfer=measure_copy_bandwidth(device),
        fit={"prefill": prefill_fit, "decode": decode_fit},
        samples={
            "prefill": [{"lengths": ls, "seconds": t} for ls, t in prefill_samples],
            "decode": [{"batch_size": bs, "sum_context": ctx, "seconds": t} for bs, ctx, t in decode_samples],
        },
        notes={
            "profile_seconds": time.perf_counter() - start,
            "params": mc.num_params(),
            "engine_max_num_batched_tokens": cfg.max_num_batched_tokens,
        },
    )


def step_log_samples(
    records: list[dict], since: float = float("-inf"), until: float = float("inf"), context_bin: int = 32
) -> tuple[list, list]:
    """(prefill samples, decode samples) for fit_prefill / fit_decode from one worker's step log
    (services/runtime/step_log.py), keeping the steps that started in [since, until).

    A decode step's cost is the time to the next step while the batch keeps running (the engine
    call plus the worker's own streaming and admissions between steps: what a client's TPOT is
    made of). Steps are binned by (batch size, context per sequence to `context_bin` tokens) and
    each bin gives its mean: a TPOT is a mean of step times, slow steps (GC pauses, page faults)
    included, and the cycle time is skewed, so a median would understate it (by 5-10% here)."""
    prefill = [
        (rec["lengths"], rec["seconds"])
        for rec in records
        if rec["kind"] == "prefill" and not any(rec.get("cached", ())) and since <= rec["t"] < until
    ]
    bins: dict[tuple[int, int], list[tuple[int, float]]] = {}
    for rec, cycle in decode_cycles(records, since, until):
        batch, context = rec["batch"], rec["context_tokens"]
        bins.setdefault((batch, round(context / batch / context_bin)), []).append((context, cycle))
    decode = [
        (batch, statistics.fmean(c for c, _ in steps), statistics.fmean(s for _, s in steps))
        for (batch, _), steps in sorted(bins.items())
        if len(steps) >= 3
    ]
    return prefill, decode


def decode_cycles(records: list[dict], since: float = float("-inf"), until: float = float("inf")):
    """(decode step record, seconds to the next step) for the decode steps in [since, until) after
    which the batch kept running: a step's cost as a client's TPOT sees it. A step that emptied
    the batch is left out, since the gap after it is idle time."""
    records = sorted(records, key=lambda r: r["t"])
    for rec, nxt in zip(records, records[1:]):
        if rec["kind"] == "decode" and rec["running_after"] > 0 and since <= rec["t"] < until:
            yield rec, nxt["t"] - rec["t"]


def refit_from_step_logs(
    profile: LatencyProfile, paths: list[str], since: float = float("-inf"), until: float = float("inf")
) -> LatencyProfile:
    """The profile with each phase the logs hold refitted on the serving instance's own steps."""
    from services.runtime.step_log import read_step_log

    prefill_samples, decode_samples = [], []
    for path in paths:
        p, d = step_log_samples(read_step_log(path), since, until)
        prefill_samples += p
        decode_samples += d
    fit = dict(profile.fit)
    samples = dict(profile.samples)
    prefill, decode = profile.prefill, profile.decode
    if len(prefill_samples) >= 3:
        prefill, fit["prefill"] = fit_prefill(prefill_samples)
        samples["prefill"] = [{"lengths": ls, "seconds": t} for ls, t in prefill_samples]
    if len(decode_samples) >= 3:
        decode, fit["decode"] = fit_decode(decode_samples)
        samples["decode"] = [{"batch_size": bs, "sum_context": ctx, "seconds": t} for bs, ctx, t in decode_samples]
    if prefill is profile.prefill and decode is profile.decode:
        raise ValueError(f"no usable steps in {', '.join(paths)} (need 3 prefill batches or 3 decode bins)")
    notes = dict(
        profile.notes,
        step_logs=list(paths),
        step_log_samples={"prefill": len(prefill_samples), "decode": len(decode_samples)},
    )
    return replace(profile, prefill=prefill, decode=decode, fit=fit, samples=samples, notes=notes)
