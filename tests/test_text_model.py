"""`pyprefopt.text_model`: a multimodal checkpoint's language model loaded and trained alone, its adapter named as in
the whole model. The card's command end to end is tests/test_reference_recipes.py's."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pyprefopt.lora import inject_lora, load_lora_adapter, save_lora_adapter
from pyprefopt.peft_format import CHECKPOINT_PREFIX, PEFT_PREFIX
from pyprefopt.safetensors_io import checkpoint_tensor_names
from pyprefopt.text_model import causal_lm_class, checkpoint_prefix
from tests.tiny_models import gemma3n_config, save_as_multimodal_gemma3n


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(text checkpoint, the same laid out as the multimodal google/gemma-3n-E4B)."""
    from transformers import AutoModelForCausalLM

    from pyprefopt.default_model import build_tokenizer

    root = tmp_path_factory.mktemp("gemma3n")
    tokenizer = build_tokenizer(["a tiny corpus of words"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(gemma3n_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                                            eos_token_id=tokenizer.eos_token_id))
    model.save_pretrained(root / "text")
    tokenizer.save_pretrained(root / "text")
    return root / "text", save_as_multimodal_gemma3n(root / "text", root / "multimodal")


def load(directory):
    from transformers import AutoConfig

    model_class, config = causal_lm_class(AutoConfig.from_pretrained(directory))
    return model_class.from_pretrained(directory, config=config, dtype=torch.float32), model_class


def test_a_multimodal_checkpoint_loads_its_language_model_with_the_same_weights(checkpoints):
    text_dir, multimodal_dir = checkpoints
    text, text_class = load(text_dir)
    language_model, multimodal_class = load(multimodal_dir)
    assert text_class.__name__ == "AutoModelForCausalLM" and type(language_model).__name__ == "Gemma3nForCausalLM"
    for (name, a), (_, b) in zip(text.state_dict().items(), language_model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert checkpoint_prefix(text, checkpoint_tensor_names(text_dir)) == "model."
    assert checkpoint_prefix(language_model, checkpoint_tensor_names(multimodal_dir)) == "model.language_model."


def test_the_prefix_is_refused_where_the_checkpoint_lacks_weights_or_is_ambiguous(checkpoints):
    text_dir, multimodal_dir = checkpoints
    model, _ = load(multimodal_dir)
    names = checkpoint_tensor_names(multimodal_dir)
    dropped = "model.language_model.layers.1.mlp.down_proj.weight"
    with pytest.raises(ValueError, match=r"not these weights of the language model: \['model.layers.1.mlp.down_proj"):
        checkpoint_prefix(model, [n for n in names if n != dropped])
    with pytest.raises(ValueError, match="2 tensors named like the input embeddings"):
        checkpoint_prefix(model, names + ["model.other.embed_tokens.weight"])


def test_the_adapter_is_named_as_in_the_whole_model_and_loads_back(checkpoints, tmp_path):
    _, multimodal_dir = checkpoints
    model, _ = load(multimodal_dir)
    setattr(model, CHECKPOINT_PREFIX, checkpoint_prefix(model, checkpoint_tensor_names(multimodal_dir)))
    inject_lora(model, ["gate_proj", "up_proj", "down_proj"], r=4, lora_alpha=8)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_()
    save_lora_adapter(model, tmp_path / "adapter")
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    base = set(checkpoint_tensor_names(multimodal_dir))
    assert keys and all(k.startswith(f"{PEFT_PREFIX}model.language_model.layers.") for k in keys)
    assert all(f"{k.removeprefix(PEFT_PREFIX).rsplit('.lora_', 1)[0]}.weight" in base for k in keys)

    again, _ = load(multimodal_dir)
    setattr(again, CHECKPOINT_PREFIX, getattr(model, CHECKPOINT_PREFIX))
    load_lora_adapter(again, tmp_path / "adapter")
    input_ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=input_ids).logits, model(input_ids=input_ids).logits,
                                   rtol=0, atol=0)
    # A language model without the checkpoint's prefix finds none of those keys: a clear error, not a silent no-op.
    plain, _ = load(multimodal_dir)
    with pytest.raises(ValueError, match="keys that match no parameter"):
        load_lora_adapter(plain, tmp_path / "adapter")
