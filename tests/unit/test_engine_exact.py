"""The engine against Hugging Face transformers, the correctness reference.

For every supported architecture (and on CPU, through both the CPU kernels and the torch backend):
8 prompts prefilled as one packed batch, decoded as one continuous batch whose members leave at
different steps while 2 more join mid-way, must give the same greedy tokens as
`generate(do_sample=False)` per prompt, with logits within 1e-4 at every step; and so must a
batch run with chunked prefill, and multi-turn conversations whose prompts are mostly found in the
prefix cache. All also with the model split over 2 and 4 tensor-parallel ranks,
over 2 pipeline stages (decode passes cut into 2 micro-batches), and over both (2 x 2 ranks).
"""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.engine.config import EngineConfig, SamplingParams
from services.engine.engine import Engine
from services.engine.kernels import cpu
from services.engine.scheduler import BatchScheduler, StepKind
from services.engine.sequence import Sequence
from services.tiny_models import ARCHITECTURE_SPECS, get_model

PROMPT_LENS = [3, 9, 17, 30, 1, 45, 64, 100]
MAX_TOKENS = [64, 10, 33, 64, 5, 48, 20, 64]
JOIN_LENS, JOIN_MAX_TOKENS, JOIN_AT_STEP = [12, 37], [30, 64], 7
LOGIT_TOL = 1e-4
# CPU here and in CI; on a GPU machine, PDSERVE_TEST_DEVICE=cuda runs the same checks through CUDA
# graphs and the Triton decode kernel.
DEVICE = os.environ.get("PDSERVE_TEST_DEVICE", "cpu")


def _prompts(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1024, (n,), generator=g).tolist() for n in lengths]


def _reference(hf, prompt, max_tokens):
    out = hf.generate(
        torch.tensor([prompt], device=DEVICE),
        do_sample=False,
        max_new_tokens=max_tokens,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return out.sequences[0, len(prompt) :].tolist(), [lg[0].cpu() for lg in out.logits]


# On CPU both backends: pdserve's AVX-512 kernels (the default where they build) and the torch
# reference; on CUDA, Triton with CUDA graphs.
BACKENDS = ["cpu-kernels", "torch"] if DEVICE == "cpu" else ["triton"]
# (backend, tensor-parallel ranks, pipeline stages): each backend alone, and the default one split
# over 2 ranks (one K/V head each, or Mistral's one head replicated), 4 (K/V heads replicated on 2
# ranks each: Llama), 2 stages of one layer each (Llama; Mistral: multi-query, untied) and 2 x 2
# (Qwen2: its LM head tied to the embeddings, so they are on both stages); every rank a process, as
# in a worker (engine/parallel.py). (The e2e tests add Qwen3 on 2 stages.)
WHICH_ARCHS = {(4, 1): ("llama",), (1, 2): ("llama", "mistral"), (2, 2): ("qwen2",)}
CASES = [
    (arch, backend, tp, pp)
    for arch in ARCHITECTURE_SPECS
    for backend, tp, pp in [(backend, 1, 1) for backend in BACKENDS]
    + [(BACKENDS[0], 2, 1), (BACKENDS[0], 4, 1), (BACKENDS[0], 1, 2), (BACKENDS[0], 2, 2)]
    if arch in WHICH_ARCHS.get((tp, pp), ARCHITECTURE_SPECS)
]


def _skip_unless_runnable(backend: str, tp: int, pp: int) -> None:
    if backend == "cpu-kernels" and cpu.load() is None:
        pytest.skip("the CPU kernels cannot be built here (test_cpu_kernels.py says why)")
    if DEVICE != "cpu" and tp * pp > max(1, torch.cuda.device_count()):
        pytest.skip(f"{tp * pp} ranks need {tp * pp} GPUs")


@pytest.fixture
def make_engine():
    """Engines closed after the test, passed or not (a tensor-parallel one stops its ranks)."""
    made: list[Engine] = []
    threads = torch.get_num_threads()

    def make(model_dir: str, backend: str, tp: int, pp: int, **overrides) -> Engine:
        config = EngineConfig(
            dtype="float32",
            device=DEVICE,
            block_size=16,
            kv_cache_bytes=16 << 20,
            backend=backend,
            tensor_parallel=tp,
            pipeline_parallel=pp,
            pipeline_micro_batches=0,  # on a pipeline, decode as one micro-batch per stage (not the default)
            **overrides,
        )
        made.append(Engine(model_dir, config))
        assert made[-1].backend.name == backend and made[-1].tp.size == tp and made[-1].pipeline.stages == pp
        return made[-1]

    yield make
    for engine in made:
        engine.close()
    assert torch.get_num_threads() == threads  # the ranks' share given back


@pytest.mark.parametrize(("arch", "backend", "tp", "pp"), CASES)
def test_continuous_batch_matches_transformers(arch, backend, tp, pp, make_engine):
    _skip_unless_runnable(backend, tp, pp)
    model_dir = get_model(arch)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE).eval()
    engine = make_engine(model_dir, backend, tp, pp)

    first = _prompts(PROMPT_LENS, seed=1)
    joiners = _prompts(JOIN_LENS, seed=2)
    seqs = [
        Sequence.from_prompt(f"a{i}", p, SamplingParams(max_tokens=m, temperature=0))
        for i, (p, m) in enumerate(zip(first, MAX_TOKENS))
    ]
    late = [
        Sequence.from_prompt(f"b{i}", p, SamplingParams(max_tokens=m, temperature=0))
        for i, (p, m) in enumerate(zip(joiners, JOIN_MAX_TOKENS))
    ]
    expected = {s.seq_id: _reference(hf, s.token_ids, s.sampling.max_tokens) for s in seqs + late}

    step_logits: dict[str, list[torch.Tensor]] = {s.seq_id: [] for s in seqs + late}

    def record(batch):
        for seq, row in zip(batch, engine.last_logits):
            step_logits[seq.seq_id].append(row.float().cpu())
            if seq.finished:
                engine.free(seq)

    engine.prefill(seqs)
    record(seqs)
    running = [s for s in seqs if not s.finished]
    step = 0
    batch_sizes = []
    while running:
        if step == JOIN_AT_STEP:
            engine.prefill(late)
            record(late)
            running += [s for s in late if not s.finished]
        batch_sizes.append(len(running))
        engine.decode_step(running)
        record(running)
        running = [s for s in running if not s.finished]
        step += 1

    # the batch really was continuous: it grew when the two joined and shrank as sequences left
    assert max(batch_sizes) > len(PROMPT_LENS) - 1 and batch_sizes[-1] < max(batch_sizes)
    for seq in seqs + late:
        ref_tokens, ref_logits = expected[seq.seq_id]
        assert seq.output_token_ids == ref_tokens, f"{arch} {seq.seq_id}: tokens differ"
        assert len(step_logits[seq.seq_id]) == len(ref_logits)
        worst = max((a - b).abs().max().item() for a, b in zip(step_logits[seq.seq_id], ref_logits))
        assert worst <= LOGIT_TOL, f"{arch} {seq.seq_id}: logits differ by {worst:.2e}"
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


@pytest.mark.parametrize("arch", ARCHITECTURE_SPECS)
def test_prefill_kv_equals_reference_past_key_values(arch):
    model_dir = get_model(arch)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE).eval()
    engine = Engine(model_dir, EngineConfig(dtype="float32", device=DEVICE, block_size=8, kv_cache_bytes=4 << 20))
    prompts = _prompts([21, 5, 40], seed=3)
    seqs = [Sequence.from_prompt(str(i), p, SamplingParams(max_tokens=4, temperature=0)) for i, p in enumerate(prompts)]
    engine.prefill(seqs)
    pool = engine.kv_pool
    for seq, prompt in zip(seqs, prompts):
        with torch.no_grad():
            past = hf(torch.tensor([prompt], device=DEVICE), use_cache=True).past_key_values
        n = len(prompt)
        for layer in range(engine.model_config.num_layers):
            for kind, cache in ((0, past.layers[layer].keys), (1, past.layers[layer].values)):
                ref = cache[0].transpose(0, 1)  # [T, KVH, D]
                blocks = pool.tensor[seq.block_table, layer, kind]  # [nb, bs, KVH, D]
                ours = blocks.reshape(-1, *blocks.shape[2:])[:n]
                assert torch.allclose(ours.cpu(), ref.cpu(), atol=1e-5, rtol=1e-5), f"{arch} layer {layer} kind {kind}"
    engine.close()


# the parallel layouts' mixed passes: one case each is enough (their split is the decode test's)
CHUNKED_CASES = [c for c in CASES if c[2:] == (1, 1) or c[0] in WHICH_ARCHS.get(c[2:], ("qwen3",))[:1]]


@pytest.mark.parametrize(("arch", "backend", "tp", "pp"), CHUNKED_CASES)
def test_chunked_prefill_matches_transformers(arch, backend, tp, pp, make_engine):
    """A colocated batch with chunked prefill: a 24-token budget per step, so the longer prompts
    are computed over several steps beside the running sequences' next tokens, and two prompts
    arrive mid-way. Tokens and logits as transformers gives them."""
    _skip_unless_runnable(backend, tp, pp)
    model_dir = get_model(arch)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE).eval()
    engine = make_engine(model_dir, backend, tp, pp)
    scheduler = BatchScheduler(engine.block_manager, max_num_seqs=16, max_num_batched_tokens=24, chunked_prefill=True)
    seqs = [
        Sequence.from_prompt(f"a{i}", p, SamplingParams(max_tokens=m, temperature=0))
        for i, (p, m) in enumerate(zip(_prompts(PROMPT_LENS, seed=1), MAX_TOKENS))
    ]
    late = [
        Sequence.from_prompt(f"b{i}", p, SamplingParams(max_tokens=m, temperature=0))
        for i, (p, m) in enumerate(zip(_prompts(JOIN_LENS, seed=2), JOIN_MAX_TOKENS))
    ]
    expected = {s.seq_id: _reference(hf, s.token_ids, s.sampling.max_tokens) for s in seqs + late}
    step_logits: dict[str, list[torch.Tensor]] = {s.seq_id: [] for s in seqs + late}
    kinds, chunk_counts = [], dict.fromkeys(expected, 0)
    for seq in seqs:
        scheduler.add_prompt(seq)
    step = 0
    while scheduler.has_work():
        if step == JOIN_AT_STEP:
            for seq in late:
                scheduler.add_prompt(seq)
        plan = scheduler.schedule()
        assert plan is not None
        kinds.append((plan.kind, len(plan.seqs)))
        for seq, n in zip(plan.seqs, plan.num_tokens or [1] * len(plan.seqs)):
            chunk_counts[seq.seq_id] += n > 1 or seq.num_cached == 0
        outputs = engine.run(plan)
        for out, row in zip(outputs, engine.last_logits):
            step_logits[out.seq.seq_id].append(row.float().cpu())
        scheduler.finish_step(plan)
        step += 1

    # it really was chunked: steps mixed chunks with other sequences' tokens, and the 100-token
    # prompt took at least ceil(100 / 24) steps
    assert any(kind is StepKind.MIXED and n > 1 for kind, n in kinds) and chunk_counts["a7"] >= 5
    for seq in seqs + late:
        ref_tokens, ref_logits = expected[seq.seq_id]
        assert seq.output_token_ids == ref_tokens, f"{arch} {seq.seq_id}: tokens differ"
        assert len(step_logits[seq.seq_id]) == len(ref_logits)
        worst = max((a - b).abs().max().item() for a, b in zip(step_logits[seq.seq_id], ref_logits))
        assert worst <= LOGIT_TOL, f"{arch} {seq.seq_id}: logits differ by {worst:.2e}"
    assert engine.block_manager.num_free == engine.block_manager.num_blocks


# prefix caching: every architecture alone (Llama also chunked), and a pipeline's and
# tensor-parallel ranks' (the cached blocks are rank 0's decision; every rank reads its own share)
PREFIX_CASES = [
    (*c, chunked)
    for c in CASES
    if c[1:] == (BACKENDS[0], 1, 1)
    for chunked in ((False, True) if c[0] == "llama" else (False,))
] + [("llama", BACKENDS[0], 2, 1, False), ("mistral", BACKENDS[0], 1, 2, False)]


@pytest.mark.parametrize(("arch", "backend", "tp", "pp", "chunked"), PREFIX_CASES)
def test_prefix_cache_hits_match_transformers(arch, backend, tp, pp, chunked, make_engine):
    """Conversations over a shared 40-token system prompt, two turns each: the first turns hit only
    the system prompt (once one of them has computed it), the second turns (first turn, its answer,
    a new message) hit all of the first turn's full blocks, answer included; one conversation asks
    the same twice (all but its last block). The tokens computed are only the rest, and tokens and
    logits are transformers' all the same. A salted request hits nothing."""
    _skip_unless_runnable(backend, tp, pp)
    model_dir = get_model(arch)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(DEVICE).eval()
    engine = make_engine(model_dir, backend, tp, pp, enable_prefix_caching=True)
    blocks = engine.block_manager
    scheduler = BatchScheduler(blocks, max_num_seqs=16, max_num_batched_tokens=64, chunked_prefill=chunked)
    system = _prompts([40], seed=5)[0]
    turns = _prompts([7, 20, 3, 11], seed=6)
    step_logits: dict[str, list[torch.Tensor]] = {}

    def run(seqs: list[Sequence]) -> None:
        for seq in seqs:
            step_logits[seq.seq_id] = []
            scheduler.add_prompt(seq)
        while scheduler.has_work():
            plan = scheduler.schedule()
            assert plan is not None
            outputs = engine.run(plan)
            for out, row in zip(outputs, engine.last_logits):
                step_logits[out.seq.seq_id].append(row.float().cpu())
            scheduler.finish_step(plan)

    def check(seqs: list[Sequence]) -> None:
        for seq in seqs:
            ref_tokens, ref_logits = _reference(hf, seq.token_ids[: seq.num_prompt_tokens], seq.sampling.max_tokens)
            assert seq.output_token_ids == ref_tokens, f"{arch} {seq.seq_id}: tokens differ"
            worst = max((a - b).abs().max().item() for a, b in zip(step_logits[seq.seq_id], ref_logits))
            assert worst <= LOGIT_TOL, f"{arch} {seq.seq_id}: logits differ by {worst:.2e}"

    greedy = SamplingParams(max_tokens=12, temperature=0)
    first = [Sequence.from_prompt(f"t1-{i}", system + turn, greedy) for i, turn in enumerate(turns)]
    run(first[:1])
    run(first[1:])
    # the system prompt's two full blocks computed once; the others found them cached
    assert [s.prefix_hit_tokens for s in first] == [0, 32, 32, 32]
    second = [
        Sequence.from_prompt(f"t2-{i}", s.token_ids + reply, greedy)
        for i, (s, reply) in enumerate(zip(first, _prompts([5, 9, 16, 2], seed=7)))
    ]
    second.append(Sequence.from_prompt("again", list(first[3].token_ids[: first[3].num_prompt_tokens]), greedy))
    salted = Sequence.from_prompt("salted", system + turns[0], greedy)
    salted.cache_salt = "tenant-b"
    run(second + [salted])
    # a first turn's blocks were computed up to its last token (not fed back): its answer's full
    # blocks but the one holding that token are cached
    assert [s.prefix_hit_tokens for s in second[:4]] == [(len(f) - 1) // 16 * 16 for f in first], (
        "the second turns hit every full block of the first"
    )
    assert second[4].prefix_hit_tokens == 48 and salted.prefix_hit_tokens == 0
    check(first + second + [salted])
    computed = blocks.prefix_query_tokens["worker"] - blocks.prefix_hit_tokens["worker"]
    assert computed == sum(
        len(s.token_ids) - s.num_output_tokens - s.prefix_hit_tokens for s in first + second + [salted]
    )
    assert blocks.num_free == blocks.num_blocks and blocks.num_cached > 0
