"""The embedded default model: a tiny Qwen3 (random init, ~5M parameters) and a byte-level BPE tokenizer
trained on the run's own training text, both built offline at first use and cached.

The pair is saved once as an ordinary transformers checkpoint under
`$PYPREFOPT_CACHE/default-model/<key>/` (default `~/.cache/pyprefopt/`), where `<key>` hashes the training
text and the recipe below, so an adapter's `base_model_name_or_path` names a directory that
`AutoModelForCausalLM.from_pretrained` and `peft.PeftModel.from_pretrained` load, and a second run on the
same data reuses it.

The tokenizer is byte-level (GPT-2's byte-to-unicode alphabet as its initial alphabet), so every string,
Arabic, Persian or otherwise, encodes without an unknown token; BPE merges learned from the training text
keep Arabic sequences short. The chat template is Qwen's ChatML (`<|im_start|>role\\ncontent<|im_end|>\\n`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from pyprefopt.files import publishable, staging_dir

# Bump when the recipe below changes: the cache key includes it, so an old cached model is never reused.
RECIPE_VERSION = 1
VOCAB_SIZE = 4096
IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
# Qwen's ChatML, without Qwen3's thinking blocks (the embedded model has no reasoning traces to learn).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen3's architecture at a size that trains in seconds on a laptop CPU.
MODEL_CONFIG = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=2048,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    initializer_range=0.02,
)
# The base weights do not depend on the run's --seed: one cached base serves every run on the same data.
INIT_SEED = 0


def cache_root() -> Path:
    """`$PYPREFOPT_CACHE`, else `~/.cache/pyprefopt`."""
    return Path(os.environ.get("PYPREFOPT_CACHE") or Path.home() / ".cache" / "pyprefopt")


def _cache_key(texts: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"recipe": RECIPE_VERSION, "vocab": VOCAB_SIZE, "model": MODEL_CONFIG,
                              "template": CHAT_TEMPLATE, "seed": INIT_SEED}, sort_keys=True).encode())
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def build_tokenizer(texts: list[str]):
    """A byte-level BPE `PreTrainedTokenizerFast` with VOCAB_SIZE entries learned from `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not texts:
        raise ValueError("the default tokenizer needs training text, and none was given")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=IM_END,
                                        additional_special_tokens=[IM_START])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(vocab_size: int, pad_token_id: int, eos_token_id: int):
    """The tiny Qwen3ForCausalLM, randomly initialised from INIT_SEED (the global RNG is left untouched)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab_size, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                         bos_token_id=None, **MODEL_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        return Qwen3ForCausalLM(config)


def default_model_path(texts: list[str]) -> Path:
    """The cached default base (model + tokenizer) for this training text, built and saved on first use.

    The directory is written under a temporary name and renamed into place, so a crash never leaves a
    half-written base, and two processes building it at once both end with a complete one."""
    path = cache_root() / "default-model" / _cache_key(texts)
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = staging_dir(path.parent, path.name)
    try:
        tokenizer = build_tokenizer(texts)
        model = build_model(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if not (staging / "config.json").exists():
            raise RuntimeError("transformers saved no model from this process: in a distributed run the first "
                               "process must build the default model (pyprefopt.train does)")
        try:
            os.rename(publishable(staging), path)
        except OSError:
            # Another process renamed its complete copy into place first; keep that one.
            if not (path / "config.json").exists():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return path
