"""TRL's CPO and ORPO trainers with `patch_trl` in 2 gloo CPU processes, the model wrapped by accelerate in DDP, FSDP2
or a DeepSpeed ZeRO-3 engine: the same logs and trained weights as without the patch. pyprefopt's forwards run the
model through the wrapper's forward, as TRL's do; calling the backbone and the head on their own would skip DDP's
gradient reduction, FSDP2's unshard and DeepSpeed's parameter gathering (SGD with a large learning rate: a gradient not
averaged over the processes shows in the weights)."""

from __future__ import annotations

import pytest
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from tests.tiny_trl_setup import (  # noqa: F401 (all but model: pytest fixtures)
    model,
    policy_state,
    preference_dataset,
    qwen3_config,
    tokenizer,
)
from tests.trl_parallel import PARALLELISMS, assert_same_training, train_with_and_without_pyprefopt

TRAINERS = {"cpo": (CPOTrainer, CPOConfig, {}), "orpo": (ORPOTrainer, ORPOConfig, {"beta": 0.2})}
CHECKED = ("lm_head.weight", "model.layers.1.mlp.down_proj.weight")


def _build(training_args, trainer, config, state, tokenizer, dataset):
    trainer_class, config_class, kwargs = TRAINERS[trainer]
    return trainer_class(model=model(config, state), args=training_args(config_class, max_length=64, **kwargs),
                         train_dataset=dataset, processing_class=tokenizer)


@pytest.mark.parametrize("parallelism", PARALLELISMS)
@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_cpo_and_orpo_through_the_wrapper_train_as_without_pyprefopt(tmp_path, trainer, parallelism, qwen3_config,
                                                                     policy_state, tokenizer, preference_dataset):
    theirs, ours = train_with_and_without_pyprefopt(tmp_path, _build, parallelism, CHECKED, trainer, qwen3_config,
                                                    policy_state, tokenizer, preference_dataset)
    assert_same_training(ours, theirs, CHECKED)
    assert {"nll_loss", "logits/chosen", "logits/rejected"} <= ours["logs"][0].keys()
    head_moved = (ours["weights"]["lm_head.weight"] - policy_state["lm_head.weight"]).abs().max()
    assert head_moved > 1e-3, head_moved
