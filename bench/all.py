"""`make bench`: a short run of every benchmark on this machine (CPU, tiny models), < 10 minutes.

1. bench.engine: engine decode/prefill throughput against Hugging Face generate (~50M Llama).
2. bench.mixed_batch: CPU decode of mixed-context batches: the CPU kernels, and the torch path grouped and padded.
3. bench.serving: SLO attainment against rate and goodput, colocated against disaggregated on the
   same cores, chat-like workload (a shortened sweep; docs/benchmarks.md has the longer runs).
4. bench.overhead: the serving path's CPU per streamed token, router and decode worker (this
   checkout alone; `--base` compares two checkouts side by side).
5. bench.serving_tpot: TPOT through the router against the engine alone at batch 64, engines
   emulated at H100 timings, then the llama-serve test model running on the CPU.
6. bench.soak: 90 s of load with a random service SIGKILLed every 20 s: requests lost, exact,
   memory slopes.
7. bench.pipeline: decode on 2 pipeline stages, the batch whole against cut into micro-batches.
8. bench.prefix_cache: multi-turn chat without prefix caching and with all of it (engines emulated
   at H100 timings): prefill tokens computed and TTFT (docs/benchmarks.md has both workloads and
   every configuration).
9. bench.kv_throughput: KV through the kvstore (same node, UCX between two daemons) against a raw
   copy and a raw ucxx transfer of the same bytes (last: it starts UCX in this process).

Results (JSON + PNG) go to results/. Longer or GPU runs: call the modules directly (see --help).
"""

from __future__ import annotations

import sys
import time

from . import engine, kv_throughput, mixed_batch, overhead, pipeline, prefix_cache, serving, serving_tpot, soak
from .emulated_fidelity import DEFAULT_PROFILE


def main(argv=None) -> int:
    started = time.monotonic()
    print("== engine: pdserve against HF generate ==", flush=True)
    engine.main(["--batch-sizes", "1,4,16", "--repeats", "3", "--out", "results/engine"])
    print("\n== CPU decode of mixed contexts: grouped attention against padded ==", flush=True)
    mixed_batch.main(["--batch-sizes", "16,38", "--trials", "3", "--out", "results/mixed-batch"])
    print("\n== serving: colocated against disaggregated, chat workload ==", flush=True)
    serving.main(
        [
            "--workload",
            "chat",
            "--scale",
            "1.0",
            "--n",
            "30",
            "--rates",
            "1,2,4",
            "--rel-tol",
            "0.2",
            "--out",
            "results/serving-chat",
        ]
    )
    print("\n== serving path: CPU per streamed token (engines emulated at H100 timings) ==", flush=True)
    overhead.main(["--rounds", "1", "--out", "results/overhead"])
    print("\n== serving path: TPOT through the router against the engine alone, batch 64 ==", flush=True)
    serving_tpot.main(["--emulate", DEFAULT_PROFILE, "--model", "llama", "--out", "results/serving-tpot-emulated"])
    serving_tpot.main(["--rounds", "2", "--out", "results/serving-tpot-cpu"])
    print("\n== soak: services SIGKILLed at random under load (docs/reliability.md has 30 minutes) ==", flush=True)
    soak.main(["--minutes", "1.5", "--kill-every", "20", "--probe-seconds", "10", "--out", "results/soak"])
    print("\n== pipeline parallelism: decode micro-batches on 2 stages ==", flush=True)
    pipeline.main(["--rounds", "3", "--out", "results/pipeline-cpu.json"])
    print("\n== prefix caching: multi-turn chat, none against all (engines emulated at H100 timings) ==", flush=True)
    prefix_cache.main(
        ["--mode", "emulated", "--workloads", "multi-turn", "--conversations", "12", "--configs", "none,all"]
    )
    print("\n== KV through the kvstore against raw copies (CPU pools) ==", flush=True)
    kv_throughput.main(["--rounds", "5", "--out", "results/kv-throughput"])
    print(f"\nmake bench finished in {time.monotonic() - started:.0f} s; results in results/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
