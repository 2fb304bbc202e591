"""Tiny random checkpoints of real architectures with the default tokenizer of the test data (tests/synthetic_data.py),
for the CLI tests that pass a local `--model`: tests/test_bad_inputs_train.py and tests/test_reference_recipes.py."""

from __future__ import annotations

from pathlib import Path

import torch


def gemma3n_config(vocab_size, softcap=30.0, **overrides):
    """A tiny Gemma-3n text config: AltUp (its modality router is Linear(hidden, 4)), LAuReL, per-layer inputs.
    `overrides` replace any field (sizes, token ids)."""
    from transformers import Gemma3nTextConfig

    fields = dict(
        vocab_size=vocab_size, vocab_size_per_layer_input=vocab_size, hidden_size=64, hidden_size_per_layer_input=16,
        intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
        laurel_rank=8, altup_num_inputs=4, num_kv_shared_layers=0, layer_types=["sliding_attention", "full_attention"],
        sliding_window=32, activation_sparsity_pattern=[0.0, 0.0], max_position_embeddings=256,
        final_logit_softcapping=softcap, bos_token_id=None)
    fields.update(overrides)
    return Gemma3nTextConfig(**fields)


def qwen_config(config_class):
    """A maker of tiny configs of `config_class` (Qwen2Config, Qwen3Config, ...), for save_tiny_model; the head tied
    to the embeddings, as in the small Qwen2.5 and Qwen3 checkpoints."""
    def make(vocab_size, **ids):
        return config_class(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                            bos_token_id=None, **ids)

    return make


def save_tiny_model(directory, data_dir, make_config):
    """A tiny random model of `make_config(vocab_size, pad_token_id=..., eos_token_id=...)` with the default
    tokenizer of the test data, saved to `directory`."""
    from transformers import AutoModelForCausalLM

    from pyprefopt import data as D
    from pyprefopt.default_model import build_tokenizer

    rows = D.normalise_rows(D.read_rows(data_dir / "sft" / "train.jsonl"), "sft", "train")
    tokenizer = build_tokenizer(D.corpus(rows))
    config = make_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_as_multimodal_gemma3n(text_dir, directory):
    """The tiny Gemma-3n text checkpoint `text_dir` laid out as google/gemma-3n-E4B is: a `gemma3n` config around its
    text config, its weights under `model.language_model.` (the head tied, so not stored), and small vision and audio
    tower tensors beside them (their modules are never built: the vision tower needs timm)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoTokenizer, Gemma3nConfig

    text_dir, directory = Path(text_dir), Path(directory)
    tensors = load_file(text_dir / "model.safetensors")
    assert all(name.startswith("model.") for name in tensors), sorted(tensors)[:4]
    layout = {f"model.language_model.{name.removeprefix('model.')}": t for name, t in tensors.items()}
    generator = torch.Generator().manual_seed(0)
    layout["model.vision_tower.timm_model.conv_stem.conv.weight"] = torch.randn(8, 3, 3, 3, generator=generator)
    layout["model.audio_tower.subsample_conv_projection.conv_0.conv.weight"] = torch.randn(8, 1, 3, 3,
                                                                                            generator=generator)
    directory.mkdir(parents=True)
    save_file(layout, directory / "model.safetensors", metadata={"format": "pt"})
    Gemma3nConfig(text_config=AutoConfig.from_pretrained(text_dir).to_dict()).save_pretrained(directory)
    AutoTokenizer.from_pretrained(text_dir).save_pretrained(directory)
    return directory
