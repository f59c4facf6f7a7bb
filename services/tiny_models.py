"""Tiny random-weight checkpoints of each supported architecture, and a small BPE tokenizer: the
embedded model that `pdserve up` and `make demo` serve when given no --model, and what tests and
benchmarks load.

Built with transformers' own config and model classes and `save_pretrained` (fixed seed), so the
folders are ordinary Hugging Face checkpoints; cached under $PDSERVE_CACHE/models (paths.py),
keyed by the spec's content. Building one needs torch; finding a built one does not.

    python -m services.tiny_models llama   # prints the folder
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable

from services.common.paths import cache_dir

TOKENIZER_VOCAB = 1024
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
# ChatML, as Qwen's checkpoints write it: what the HTTP API's /v1/chat/completions renders messages with
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=1024,
    initializer_range=0.2,
    rms_norm_eps=1e-6,
    bos_token_id=BOS_ID,
    eos_token_id=EOS_ID,
    pad_token_id=PAD_ID,
)

# name -> (config class name, config overrides). Each exercises a different part of the family.
SPECS: dict[str, tuple[str, dict]] = {
    # GQA, llama3-style rope scaling, tied embeddings
    "llama": (
        "LlamaConfig",
        dict(
            _TINY,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        ),
    ),
    # multi-query (1 KV head), explicit head_dim different from hidden/heads, untied
    "mistral": (
        "MistralConfig",
        dict(_TINY, num_key_value_heads=1, head_dim=32, tie_word_embeddings=False, sliding_window=None),
    ),
    # q/k/v bias, tied
    "qwen2": ("Qwen2Config", dict(_TINY, num_key_value_heads=2, tie_word_embeddings=True)),
    # q/k RMSNorm, explicit head_dim, untied
    "qwen3": ("Qwen3Config", dict(_TINY, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)),
    # ~50M parameters (hidden 512, 8 layers): the CPU engine benchmark
    "llama-50m": (
        "LlamaConfig",
        dict(
            _TINY,
            hidden_size=512,
            intermediate_size=1024,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=32000,
            max_position_embeddings=2048,
            initializer_range=0.02,
            tie_word_embeddings=False,
        ),
    ),
    # the serving demo/benchmark model: small enough to be quick on 2 cores, big enough that a
    # prefill costs noticeably more than a decode step
    "llama-serve": (
        "LlamaConfig",
        dict(
            _TINY,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
        ),
    ),
    # Shape of Meta-Llama-3-8B. Too big to save: benchmarks build it in memory with random weights.
    "llama-3-8b": (
        "LlamaConfig",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
            bos_token_id=128000,
            eos_token_id=128001,
            tie_word_embeddings=False,
        ),
    ),
}
ARCHITECTURE_SPECS = ("llama", "mistral", "qwen2", "qwen3")
IN_MEMORY_ONLY = ("llama-3-8b",)
DEFAULT_MODEL = "llama"  # what the services serve without --model


def hf_config(name: str):
    """The transformers config object of spec `name` (no weights, nothing written)."""
    import transformers

    cls_name, overrides = SPECS[name]
    return getattr(transformers, cls_name)(**dict({"vocab_size": TOKENIZER_VOCAB}, **overrides))


CORPUS_WORDS = (
    "the a an prefill decode token cache block transfer worker router request latency throughput "
    "serving model layer attention key value query batch queue memory node network stream first "
    "time output per second goodput rate service daemon pool copy pull push publish release health "
    "metric histogram counter gauge schedule admit preempt stop length sample greedy temperature "
    "is are was were be been has have had do does did will would can could should may might must "
    "of in on at by for with from to into over under about after before between through during "
    "and or but if then else when while because so than as like not no yes all any each every some "
    "one two three four five six seven eight nine ten hundred thousand million fast slow big small "
    "GPU CPU disk link bandwidth compute bound step loop run start end open close read write send "
    "receive hello world story once upon there lived little fox who loved numbers and letters"
).split()


def _corpus(seed: int = 0, lines: int = 3000) -> list[str]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(CORPUS_WORDS) for _ in range(rng.randint(4, 16))]
        line = " ".join(words)
        out.append(line.capitalize() + rng.choice([".", "?", "!", ",", ":"]) + f" {rng.randint(0, 999)}")
    return out


def build_tokenizer(folder: str, vocab_size: int = TOKENIZER_VOCAB) -> None:
    """A byte-level BPE tokenizer (any UTF-8 text encodes, nothing is unknown)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)


def spec_key(name: str) -> str:
    cls, overrides = SPECS[name]
    blob = json.dumps([cls, overrides, TOKENIZER_VOCAB, SPECIAL_TOKENS, CHAT_TEMPLATE, 2], sort_keys=True)
    return f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def build_model(
    name: str,
    folder: str,
    seed: int = 0,
    max_shard_size: str | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> None:
    """Spec `name` with random weights (initialised on `device`: a full-size one is minutes faster
    on a GPU) and the tokenizer, saved to `folder`."""
    import torch
    import transformers

    build_tokenizer(folder)
    config = hf_config(name)
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    model.generation_config.save_pretrained(folder)


def built_once(folder: str, build: Callable[[str], None]) -> str:
    """`folder`, built by `build` (given a fresh folder) unless it is there: safe across processes,
    which see a whole checkpoint or none."""
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    root = os.path.dirname(folder)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}-", dir=root)
    try:
        build(tmp)
        try:
            os.rename(tmp, folder)
        except OSError:  # another process finished first
            if not os.path.exists(os.path.join(folder, "config.json")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def get_model(name: str = "llama", root: str | None = None, max_shard_size: str | None = None) -> str:
    """Returns the folder of test model `name`, building it once (safe across processes)."""
    if name not in SPECS or name in IN_MEMORY_ONLY:
        known = [n for n in SPECS if n not in IN_MEMORY_ONLY]
        raise ValueError(f"unknown test model {name!r}; known: {', '.join(known)}")
    root = root or os.path.join(cache_dir(), "models")
    key = spec_key(name) + (f"-sharded{max_shard_size}" if max_shard_size else "")
    return built_once(os.path.join(root, key), lambda tmp: build_model(name, tmp, max_shard_size=max_shard_size))


DEFAULT_SERVED_NAME = "pdserve-tiny-llama"  # the embedded model's name in the APIs


def model_dir_or_default(model: str) -> str:
    """`model` (a checkpoint folder), or the embedded tiny model's folder when it is empty."""
    return model or get_model(DEFAULT_MODEL)


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["llama"]:
        print(get_model(arg))
