"""A multimodal checkpoint's language model, trained on its own.

A checkpoint such as google/gemma-3n-E4B holds vision and audio towers beside its language model, and
`AutoModelForCausalLM` builds all of them (Gemma-3n's vision tower needs timm). Training on text needs the language
model alone: `causal_lm_class` picks its own causal-LM class, which transformers loads out of the multimodal
checkpoint, and `checkpoint_prefix` finds where that checkpoint keeps its weights. The prefix goes on the model
(`peft_format.CHECKPOINT_PREFIX`), so that an adapter is saved under the names PEFT gives its tensors in the whole
multimodal model and merges into the whole checkpoint, towers included.
"""

from __future__ import annotations

from collections.abc import Iterable


def causal_lm_class(config):
    """(the class whose `from_pretrained` loads the model to train, the config to give it): the language model's
    own causal-LM class and config for a multimodal config that has one, else `AutoModelForCausalLM` and `config`."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    text_config = config.get_text_config()
    if text_config is config or type(text_config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        return AutoModelForCausalLM, config
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(text_config)], text_config


def checkpoint_prefix(model, checkpoint_names: Iterable[str]) -> str:
    """The prefix under which a checkpoint holds the weights `model` names `<base_model_prefix>.` (its decoder):
    where the checkpoint keeps the input embeddings, provided every decoder parameter is found there too.
    ValueError naming what is missing otherwise."""
    names = set(checkpoint_names)
    own = f"{model.base_model_prefix}."
    embeddings = next(name for name, module in model.named_modules() if module is model.get_input_embeddings())
    suffix = f"{embeddings.removeprefix(own)}.weight"
    found = sorted(name.removesuffix(suffix) for name in names if name == suffix or name.endswith(f".{suffix}"))
    if len(found) != 1:
        raise ValueError(f"the checkpoint holds {len(found)} tensors named like the input embeddings "
                         f"(...{suffix}): {found[:4]}; cannot tell where its language model is")
    prefix = found[0]
    missing = [name for name, _ in model.named_parameters()
               if name.startswith(own) and prefix + name.removeprefix(own) not in names]
    if missing:
        raise ValueError(f"the checkpoint keeps the input embeddings under {prefix!r} but not these weights of the "
                         f"language model: {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    return prefix
