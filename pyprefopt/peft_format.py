"""PEFT's on-disk LoRA adapter format in one place: the file names, the saved tensors' key names, the types of the
`adapter_config.json` fields, and PEFT's rule for which modules a list of `target_modules` names.

`pyprefopt.lora` saves and loads adapters, `pyprefopt.merge` merges a saved one into its base checkpoint, and the
train CLI reads an `--adapter`: all three read the format here, so an adapter one of them writes is what the others
(and `peft.PeftModel.from_pretrained`) read.
"""

from __future__ import annotations

import math
import re

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's prefix of every saved key: `PeftModel.base_model` (LoraModel) `.model` (the wrapped model).
PEFT_PREFIX = "base_model.model."
# A LoRA linear layer's saved tensors after its module name: A [r, in], B [out, r], and PEFT's lora_bias=True bias.
_LORA_KEY = re.compile(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias)$")


# Set on a language model loaded out of a multimodal checkpoint (`pyprefopt.text_model`): the prefix under which that
# checkpoint, and PEFT in the whole multimodal model, name what the model names `<base_model_prefix>.`.
CHECKPOINT_PREFIX = "pyprefopt_checkpoint_prefix"


def saved_key(name: str) -> str:
    """The key under which PEFT saves the tensor named `name` in the wrapped model."""
    return PEFT_PREFIX + name


def checkpoint_name(model, name: str) -> str:
    """`name`, of a module or tensor of `model`, as the model's checkpoint names it (see `CHECKPOINT_PREFIX`)."""
    prefix = getattr(model, CHECKPOINT_PREFIX, None)
    own = f"{getattr(model, 'base_model_prefix', '')}."
    if prefix is None or not name.startswith(own):
        return name
    return prefix + name.removeprefix(own)


def lora_keys(module: str) -> tuple[str, str]:
    """The saved keys of `module`'s LoRA factors A and B."""
    return saved_key(f"{module}.lora_A.weight"), saved_key(f"{module}.lora_B.weight")


def split_lora_key(name: str) -> tuple[str, str] | None:
    """(module, part) of an unprefixed key of a LoRA linear layer's tensor, part one of "lora_A.weight",
    "lora_B.weight", "lora_B.bias"; None for any other key."""
    match = _LORA_KEY.fullmatch(name)
    return None if match is None else (match.group(1), match.group(2))


def names_module(module: str, target_names) -> bool:
    """PEFT's rule for a list of `target_modules`: an entry names a module by its full name or a dotted suffix."""
    return any(module == t or module.endswith(f".{t}") for t in target_names)


def _is_positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_config(config, path, error=ValueError):
    """Raise `error` naming `path` unless `config` is a LoRA adapter config whose fields have PEFT's types: r and
    lora_alpha positive numbers, target_modules a list of names or one regular expression, rank_pattern and
    alpha_pattern mappings to positive numbers, the flags booleans."""
    if not isinstance(config, dict):
        raise error(f"{path} holds a JSON {type(config).__name__}, not an object: it is not the file this "
                    "expects, re-save it with transformers/PEFT")
    if config.get("peft_type", "LORA") != "LORA":
        raise error(f"{path}: peft_type is {config.get('peft_type')!r}, not a LoRA adapter")

    def bad(field, wanted):
        return error(f"{path}: {field} must be {wanted}, got {config[field]!r}; fix the field or re-save the "
                     "adapter with PEFT")

    for name in ("r", "lora_alpha"):
        if name not in config:
            raise error(f"{path}: required field {name!r} is missing; re-save the adapter with PEFT")
        if not _is_positive_number(config[name]):
            raise bad(name, "a positive number")
    target_modules = config.get("target_modules")
    if not (target_modules is None or isinstance(target_modules, str)
            or (isinstance(target_modules, list) and all(isinstance(t, str) for t in target_modules))):
        raise bad("target_modules", "a list of module names or one regular expression")
    for name in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(name)
        if patterns is not None and not (
            isinstance(patterns, dict) and all(map(_is_positive_number, patterns.values()))
        ):
            raise bad(name, "an object mapping module-name patterns to positive numbers")
    for name in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if config.get(name) is not None and not isinstance(config[name], bool):
            raise bad(name, "true or false")
