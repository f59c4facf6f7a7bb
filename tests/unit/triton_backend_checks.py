"""The Triton backend (services/engine/backends/triton.py) through a whole engine, on CPU tensors
under Triton's interpreter (TRITON_INTERPRET=1), against transformers, also with chunked
prefill: run by test_engine_parts.py in a subprocess. No GPU here, so the one thing faked is the
device check (choose_backend would refuse triton without CUDA); CUDA graphs, which need a GPU, are
off. Prints a JSON summary."""

import json
import sys

import torch
from transformers import AutoModelForCausalLM

import services.engine.backends as backends
from services.engine.config import EngineConfig, SamplingParams
from services.engine.engine import Engine
from services.engine.scheduler import BatchScheduler, StepKind
from services.engine.sequence import Sequence
from services.tiny_models import get_model

backends.choose_backend = lambda config, head_dim: "triton"  # the device check (a GPU)


def run(arch: str) -> dict:
    model_dir = get_model(arch)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    engine = Engine(model_dir, EngineConfig(dtype="float32", kv_cache_bytes=4 << 20, enable_cuda_graphs=False))
    assert engine.backend.name == "triton"
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 1000, (n,), generator=g).tolist() for n in (5, 19, 33)]
    seqs = [
        Sequence.from_prompt(str(i), p, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        for i, p in enumerate(prompts)
    ]
    engine.prefill(seqs)
    while not all(s.finished for s in seqs):
        engine.decode_step([s for s in seqs if not s.finished])
    expected = [
        hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=4, min_new_tokens=4)[0, len(p) :].tolist()
        for p in prompts
    ]
    # chunked prefill: 8 tokens a step, the prompts' chunks beside the others' next tokens
    chunked = [
        Sequence.from_prompt(f"c{i}", p, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        for i, p in enumerate(prompts)
    ]
    scheduler = BatchScheduler(engine.block_manager, max_num_seqs=4, max_num_batched_tokens=8, chunked_prefill=True)
    for seq in chunked:
        scheduler.add_prompt(seq)
    mixed_steps = 0
    while scheduler.has_work():
        plan = scheduler.schedule()
        assert plan is not None
        mixed_steps += plan.kind is StepKind.MIXED
        engine.run(plan)
        scheduler.finish_step(plan)
    return {
        "same_tokens": [s.output_token_ids for s in seqs] == expected,
        "chunked_same_tokens": mixed_steps > 5 and [s.output_token_ids for s in chunked] == expected,
    }


if __name__ == "__main__":
    print(json.dumps({arch: run(arch) for arch in sys.argv[1:]}))
