"""The CPU engine of two checkouts of pdserve, side by side in one run, alternating.

    git worktree add /tmp/pdserve-main origin/main        # the checkout to compare against
    python -m bench.checkouts --base /tmp/pdserve-main    # this checkout is the head

Each checkout runs in its own process, started once, with its own code (its CPU kernels too: they
are built per source). The processes take turns, one trial each (base, head, head, base, ...),
so both see the same machine conditions; the other waits idle on its input. A trial prefills
`--batch` prompts of `--prompt-len` tokens and times `--decode-steps` decode steps. The ratio
reported is the median over rounds of head/base step time (above 1: head is slower), with the
medians of each side. Writes JSON and a PNG of every trial to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap

from tqdm import tqdm

# Runs inside each checkout. The engine's API (Engine, EngineConfig, Sequence, prefill, decode_step,
# free) is the same on both sides; only the modules holding it moved in issue 14.
TRIAL_PROCESS = textwrap.dedent("""
    import json, sys, time, torch
    try:
        from services.engine.config import EngineConfig, SamplingParams
        from services.engine.engine import Engine
        from services.engine.sequence import Sequence
        from services.tiny_models import get_model
    except ImportError:  # a checkout from before the engine's modules were split
        from services.engine import Engine, EngineConfig, SamplingParams, Sequence
        from services.engine.testmodels import get_model
    model, batch, prompt_len, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    engine = Engine(get_model(model), EngineConfig(kv_cache_bytes=512 << 20))
    vocab = engine.model_config.vocab_size

    def trial(seed):
        g = torch.Generator().manual_seed(seed)
        sampling = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
        seqs = [Sequence.from_prompt(str(i), torch.randint(10, vocab, (prompt_len,), generator=g).tolist(), sampling)
                for i in range(batch)]
        engine.prefill(seqs)
        engine.decode_step(seqs)  # outside the timing
        started = time.perf_counter()
        for _ in range(steps):
            engine.decode_step(seqs)
        seconds = (time.perf_counter() - started) / steps
        for seq in seqs:
            engine.free(seq)
        return seconds

    trial(10_000)  # warm-up
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        print(json.dumps({"step_seconds": trial(int(line))}), flush=True)
""")


class Checkout:
    def __init__(self, name: str, path: str, args):
        self.name, self.path = name, os.path.abspath(path)
        env = dict(os.environ, PYTHONPATH=self.path)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                TRIAL_PROCESS,
                args.model,
                str(args.batch),
                str(args.prompt_len),
                str(args.decode_steps),
            ],
            cwd=self.path,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._read()  # ready
        self.step_seconds: list[float] = []

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} ({self.path}) exited with code {self.proc.wait()}")
        return json.loads(line)

    def trial(self, seed: int) -> float:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{seed}\n")
        self.proc.stdin.flush()
        seconds = self._read()["step_seconds"]
        self.step_seconds.append(seconds)
        return seconds

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for side in ("base", "head"):
        ax.plot([s * 1e3 for s in result[side]["step_seconds"]], "o-", label=f"{side}: {result[side]['path']}")
    ax.set(
        xlabel="round",
        ylabel="decode step (ms)",
        title=(
            f"{result['model']} batch {result['batch']}: head/base {result['head_over_base']:.3f} (median of rounds)"
        ),
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the checkout to compare against (a folder)")
    ap.add_argument("--head", default=".", help="the checkout under test (default: this one)")
    ap.add_argument("--model", default="llama-50m", help="a tiny-model spec name (services/tiny_models.py)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--out", default="results/checkouts")
    args = ap.parse_args(argv)

    base, head = Checkout("base", args.base, args), Checkout("head", args.head, args)
    ratios = []
    try:
        for r in tqdm(range(args.rounds), desc="rounds (a trial of each)"):
            order = (base, head) if r % 2 == 0 else (head, base)
            times = {c.name: c.trial(seed=r) for c in order}
            ratios.append(times["head"] / times["base"])
    finally:
        base.close()
        head.close()
    result = {
        "model": args.model,
        "batch": args.batch,
        "prompt_len": args.prompt_len,
        "decode_steps": args.decode_steps,
        "device": f"cpu, {os.cpu_count()} cores",
        "rounds": args.rounds,
        "head_over_base": statistics.median(ratios),
        "ratios": ratios,
        **{
            c.name: {
                "path": c.path,
                "step_seconds": c.step_seconds,
                "median_step_seconds": statistics.median(c.step_seconds),
            }
            for c in (base, head)
        },
    }
    print(
        f"\n{args.model}, batch {args.batch}, prompt {args.prompt_len}, {args.decode_steps} decode steps per trial, "
        f"{args.rounds} rounds alternating (measured on this machine's CPU)"
    )
    for c in (base, head):
        print(f"  {c.name}: median step {result[c.name]['median_step_seconds'] * 1e3:.2f} ms  ({c.path})")
    print(
        f"  head/base step time: {result['head_over_base']:.3f} (median of per-round ratios; "
        f"range {min(ratios):.3f}-{max(ratios):.3f})"
    )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=2)
    plot(result, args.out + ".png")
    print(f"wrote {args.out}.json and {args.out}.png")
    return result


if __name__ == "__main__":
    main()
