"""Engine throughput against Hugging Face `generate`, side by side in one run.

    python -m bench.engine                                   # CPU, ~50M Llama, batch 1..32
    python -m bench.engine --model llama-3-8b --device cuda --dtype bfloat16 --batch-sizes 1,16,64

For each batch size: prefill tokens/s (B prompts packed), decode tokens/s and TPOT (B sequences
stepping together), and HF generate's decode tokens/s on the same weights, prompts and lengths;
the ratio is printed. On CUDA it also measures device copy bandwidth in the same run and reports
TPOT at batch 1 against the HBM roofline (weight bytes / bandwidth). Writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
from tqdm import tqdm

from services.engine.config import BACKENDS, EngineConfig, ModelConfig, SamplingParams
from services.engine.engine import Engine, EngineBase
from services.engine.sequence import Sequence
from services.tiny_models import IN_MEMORY_ONLY, get_model, hf_config


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _prompts(batch, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(10, vocab, (length,), generator=g).tolist() for _ in range(batch)]


def measure_copy_bandwidth(device: str, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (the HBM roofline's bandwidth)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    times = []
    for _ in range(10):
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t)
    del src, dst
    return 2 * nbytes / statistics.median(times)


def engine_trial(engine: EngineBase, batch: int, prompt_len: int, decode_steps: int, seed: int) -> tuple[float, float]:
    """One prefill of `batch` prompts and `decode_steps` decode steps: (prefill s, seconds per step)."""
    device = engine.config.device
    prompts = _prompts(batch, prompt_len, engine.model_config.vocab_size, seed)
    params = SamplingParams(max_tokens=decode_steps + 1, temperature=0, ignore_eos=True)
    seqs = [Sequence.from_prompt(str(i), p, params) for i, p in enumerate(prompts)]
    _sync(device)
    t = time.perf_counter()
    engine.prefill(seqs)
    _sync(device)
    prefill_s = time.perf_counter() - t
    engine.decode_step(seqs)  # first step outside the timing (graph replay warm-up)
    _sync(device)
    t = time.perf_counter()
    for _ in range(decode_steps - 1):
        engine.decode_step(seqs)
    _sync(device)
    step_s = (time.perf_counter() - t) / (decode_steps - 1)
    for s in seqs:
        engine.free(s)
    return prefill_s, step_s


class HfTrial:
    """HF generate, greedy, fixed length; its decode step time is (generate(n+1) - generate(1)) / n."""

    def __init__(self, hf_model, batch: int, prompt_len: int, decode_steps: int, vocab: int, device: str):
        self.model, self.steps, self.device = hf_model, decode_steps, device
        self.prompts = torch.tensor(_prompts(batch, prompt_len, vocab, seed=0), device=device)
        self._timed(2)  # warm-up

    def _timed(self, n: int) -> float:
        _sync(self.device)
        t = time.perf_counter()
        self.model.generate(
            self.prompts, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None
        )
        _sync(self.device)
        return time.perf_counter() - t

    def __call__(self) -> float:
        return max(self._timed(self.steps + 1) - self._timed(1), 1e-9) / self.steps


def bench_batch(engine: Engine, hf_model, batch: int, prompt_len: int, decode_steps: int, repeats: int) -> dict:
    """Alternates engine and HF trials, so that both see the same machine conditions (this kind of
    machine drifts by tens of percent over a minute); reports medians and the median of the
    per-pair ratios."""
    hf = (
        HfTrial(hf_model, batch, prompt_len, decode_steps, engine.model_config.vocab_size, engine.config.device)
        if hf_model is not None
        else None
    )
    engine_trial(engine, batch, prompt_len, decode_steps, seed=100)  # warm-up
    prefill, steps, hf_steps = [], [], []
    for r in range(repeats):
        p, s = engine_trial(engine, batch, prompt_len, decode_steps, seed=r)
        prefill.append(p)
        steps.append(s)
        if hf is not None:
            hf_steps.append(hf())
    step_s = statistics.median(steps)
    row = {
        "batch_size": batch,
        "pdserve": {
            "prefill_tokens_per_s": batch * prompt_len / statistics.median(prefill),
            "prefill_seconds": statistics.median(prefill),
            "tpot_seconds": step_s,
            "decode_tokens_per_s": batch / step_s,
            "trial_step_seconds": steps,
        },
    }
    if hf is not None:
        hf_s = statistics.median(hf_steps)
        row["hf"] = {"decode_tokens_per_s": batch / hf_s, "tpot_seconds": hf_s, "trial_step_seconds": hf_steps}
        row["decode_speedup_vs_hf"] = statistics.median(h / o for h, o in zip(hf_steps, steps))
    return row


def load(
    model: str,
    device: str,
    dtype: str,
    kv_cache_bytes: int | None,
    with_hf: bool,
    threads: int | None,
    backend: str = "auto",
):
    """Returns (engine, hf_model or None). In-memory specs get random weights shared by both."""
    import transformers

    if threads:
        torch.set_num_threads(threads)
    torch_dtype = getattr(torch, dtype)
    cfg = EngineConfig(
        dtype=dtype,
        device=device,
        kv_cache_bytes=kv_cache_bytes,
        max_num_seqs=256,
        max_model_len=4096 if model in IN_MEMORY_ONLY else None,
        backend=backend,
    )
    if model in IN_MEMORY_ONLY:
        config = hf_config(model)
        hf = None
        if with_hf:
            torch.manual_seed(0)
            with torch.device(device):
                hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch_dtype).eval()
        engine = Engine(
            None,
            cfg,
            model_config=ModelConfig.from_hf_config(config),
            weights=hf.state_dict().items() if hf is not None else None,
        )
        return engine, hf
    folder = model if os.path.isdir(model) else get_model(model)
    engine = Engine(folder, cfg)
    hf = None
    if with_hf:
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
        hf = hf.to(device).eval()  # type: ignore[arg-type]  # transformers' @wraps(Module.to) hides the bound self
    return engine, hf


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    bs = [r["batch_size"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    ax[0].plot(bs, [r["pdserve"]["decode_tokens_per_s"] for r in rows], "o-", label="pdserve engine")
    if all("hf" in r for r in rows):
        ax[0].plot(bs, [r["hf"]["decode_tokens_per_s"] for r in rows], "s--", label="HF generate")
    ax[0].set(xlabel="batch size", ylabel="decode tokens/s", title="Decode throughput", xscale="log", yscale="log")
    ax[0].legend()
    ax[1].plot(bs, [r["pdserve"]["prefill_tokens_per_s"] for r in rows], "o-")
    ax[1].set(xlabel="batch size (prompts)", ylabel="prefill tokens/s", title="Prefill throughput", xscale="log")
    fig.suptitle(f"{result['model']} {result['dtype']} on {result['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-50m", help="test-model spec name or checkpoint folder")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-sizes", default="1,4,16,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kv-cache-gb", type=float, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    ap.add_argument(
        "--backend",
        choices=list(BACKENDS),
        default="auto",
        help="the engine's backend (services/engine/backends): auto, the torch reference, "
        "pdserve's CPU kernels or triton",
    )
    ap.add_argument("--out", default="results/engine")
    args = ap.parse_args(argv)

    kv = int(args.kv_cache_gb * 2**30) if args.kv_cache_gb else (None if args.device.startswith("cuda") else 512 << 20)
    engine, hf = load(args.model, args.device, args.dtype, kv, not args.no_hf, args.threads, args.backend)
    mc = engine.model_config
    decode_path = f"{engine.backend.name} backend"
    weight_bytes = mc.num_params() * torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    result = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "device_name": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else f"cpu x{torch.get_num_threads()} threads",
        "params": mc.num_params(),
        "weight_bytes": weight_bytes,
        "decode_path": decode_path,
        "prompt_len": args.prompt_len,
        "decode_steps": args.decode_steps,
        "rows": [],
    }
    if args.device.startswith("cuda"):
        bw = measure_copy_bandwidth(args.device)
        result["copy_bandwidth_bytes_per_s"] = bw
        result["tpot_roofline_seconds"] = weight_bytes / bw
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    for bs in tqdm(batch_sizes, desc="batch sizes"):
        result["rows"].append(bench_batch(engine, hf, bs, args.prompt_len, args.decode_steps, args.repeats))

    print(
        f"\n{args.model} ({mc.num_params() / 1e6:.0f}M params, {args.dtype}) on {result['device_name']} "
        f"({decode_path}), "
        f"prompt {args.prompt_len}, {args.decode_steps} decode steps, medians of {args.repeats} "
        f"(engine and HF trials alternate; 'vs HF' is the median of the per-trial ratios)"
    )
    print(
        f"{'batch':>5} {'prefill tok/s':>14} {'decode tok/s':>13} {'TPOT ms':>8} {'HF decode tok/s':>16} {'vs HF':>6}"
    )
    for r in result["rows"]:
        p, h = r["pdserve"], r.get("hf")
        print(
            f"{r['batch_size']:>5} {p['prefill_tokens_per_s']:>14.0f} {p['decode_tokens_per_s']:>13.0f} "
            f"{p['tpot_seconds'] * 1e3:>8.2f} {h['decode_tokens_per_s'] if h else float('nan'):>16.0f} "
            f"{r.get('decode_speedup_vs_hf', float('nan')):>5.2f}x"
        )
    if "tpot_roofline_seconds" in result:
        b1 = next((r for r in result["rows"] if r["batch_size"] == 1), None)
        roof = result["tpot_roofline_seconds"]
        print(
            f"copy bandwidth {result['copy_bandwidth_bytes_per_s'] / 1e12:.2f} TB/s; "
            f"weights {weight_bytes / 1e9:.2f} GB; "
            f"TPOT roofline {roof * 1e3:.2f} ms"
        )
        if b1:
            result["tpot_batch1_over_roofline"] = b1["pdserve"]["tpot_seconds"] / roof
            print(
                f"TPOT at batch 1: {b1['pdserve']['tpot_seconds'] * 1e3:.2f} ms = "
                f"{result['tpot_batch1_over_roofline']:.2f}x roofline"
            )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    plot(result, args.out + ".png")
    print(f"wrote {args.out}.json and {args.out}.png")
    return result


if __name__ == "__main__":
    main()
