"""PEFT's adapter format, read in one place (pyprefopt.peft_format) by LoRA save/load, the merge and the CLI: its
target-name rule is PEFT's own, its key names round-trip, and a config of the wrong types is refused by name."""

from __future__ import annotations

import pytest

from pyprefopt import peft_format


@pytest.mark.parametrize("targets", [["q_proj"], ["mlp.up_proj", "v_proj"], ["layers.0.self_attn.q_proj"]])
def test_names_module_is_pefts_rule(targets):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(target_modules=targets)
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.up_proj", "xq_proj",
                   "q_proj", "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.q_proj_norm"):
        assert peft_format.names_module(module, targets) == bool(check_target_module_exists(config, module)), module


def test_lora_keys_split_back_into_module_and_part():
    key_a, key_b = peft_format.lora_keys("model.layers.3.mlp.down_proj")
    assert key_a == "base_model.model.model.layers.3.mlp.down_proj.lora_A.weight"
    for key, part in ((key_a, "lora_A.weight"), (key_b, "lora_B.weight")):
        assert peft_format.split_lora_key(key.removeprefix(peft_format.PEFT_PREFIX)) == (
            "model.layers.3.mlp.down_proj", part)
    assert peft_format.split_lora_key("model.layers.3.mlp.down_proj.base_layer.bias") is None


@pytest.mark.parametrize("config, expected", [
    ([], "holds a JSON list, not an object"),
    ({"peft_type": "IA3", "r": 8, "lora_alpha": 16}, "peft_type is 'IA3', not a LoRA adapter"),
    ({"lora_alpha": 16}, "required field 'r' is missing"),
    ({"r": 0, "lora_alpha": 16}, "r must be a positive number, got 0"),
    ({"r": 8, "lora_alpha": True}, "lora_alpha must be a positive number, got True"),
    ({"r": 8, "lora_alpha": 16, "target_modules": 5}, "target_modules must be a list of module names or one regular"),
    ({"r": 8, "lora_alpha": 16, "rank_pattern": {"q": -1}}, "rank_pattern must be an object mapping"),
    ({"r": 8, "lora_alpha": 16, "use_rslora": "yes"}, "use_rslora must be true or false"),
])
def test_a_config_of_the_wrong_types_is_refused_by_name(config, expected):
    with pytest.raises(ValueError, match="adapter_config.json") as error:
        peft_format.check_config(config, "adapter_config.json")
    assert expected in str(error.value)
    peft_format.check_config({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]}, "adapter_config.json")
