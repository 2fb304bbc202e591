"""Tiny random checkpoints of real architectures with the default tokenizer of the test data (tests/synthetic_data.py),
for the CLI tests that pass a local `--model`: tests/test_bad_inputs_train.py and tests/test_reference_recipes.py."""

from __future__ import annotations

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
