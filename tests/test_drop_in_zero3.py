"""The drop-in fused head under DeepSpeed ZeRO-3 (2 gloo CPU processes, each its own batch), where every parameter is
partitioned: an empty placeholder outside its module's forward (the config in tests/trl_parallel.py keeps none whole,
gathers none ahead and releases each after use).

Through the engine, the same loss and gradients as the unpartitioned model with the gradients averaged over the
processes, untied and tied heads, and the head's weight gathered only while the head computes. Through TRL's trainers
under accelerate's DeepSpeed plugin, the same logs and updated weights with and without `patch_trl`: DPO against a
reference model and SFT with the head trained, DPO with a LoRA adapter and the head frozen (CPO and ORPO:
tests/test_drop_in_wrapped.py)."""

from __future__ import annotations

import deepspeed
import pytest
import torch
import torch.distributed as dist
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
from deepspeed.utils import safe_get_full_grad
from peft import LoraConfig
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

from pyprefopt import drop_in
from tests.tiny_trl_setup import (  # noqa: F401 (all but CHECKED, model, random_state, rank_batch, tiny_config: fixtures)
    CHECKED,
    model,
    policy_state,
    preference_dataset,
    qwen3_config,
    random_state,
    rank_batch,
    ref_state,
    tiny_config,
    tokenizer,
)
from tests.trl_parallel import WORLD, ZERO3, assert_same_training, init_env, spawn, train_with_and_without_pyprefopt


def _engine_worker(rank, port, architecture):
    init_env(rank, port)
    deepspeed.init_distributed("gloo")
    config = tiny_config(architecture)
    state = random_state(config, 0)
    plain, partitioned = model(config, state), model(config, state)
    for m in (plain, partitioned):
        drop_in.add_fused_lm_head(m)
    # Taken before the engine: read inside the engine's forward, a partitioned weight is gathered by the read.
    head_weight = partitioned.lm_head.weight
    engine, *_ = deepspeed.initialize(
        model=partitioned, model_parameters=partitioned.parameters(),
        config={"train_micro_batch_size_per_gpu": 3, "zero_optimization": ZERO3, "zero_allow_untested_optimizer": True,
                "optimizer": {"type": "SGD", "params": {"lr": 0.0}}})
    assert head_weight.numel() == 0 and head_weight.ds_status == ZeroParamStatus.NOT_AVAILABLE
    # Whether the head is gathered while the first layer runs forward and backward: after the head's forward, and
    # (the head being last) after its backward.
    head_during_backbone = []
    first_layer = partitioned.model.layers[0]
    first_layer.register_forward_pre_hook(lambda *_: head_during_backbone.append(head_weight.ds_status))
    first_layer.register_full_backward_hook(lambda *_: head_during_backbone.append(head_weight.ds_status))
    input_ids, labels = rank_batch(rank)
    try:
        # Twice: DeepSpeed records the order modules run in on the first step and fetches by it after.
        for step in range(2):
            loss = engine(input_ids=input_ids, labels=labels, fused_lm_head=True).loss
            engine.backward(loss)
            got = {name: safe_get_full_grad(p) for name, p in partitioned.named_parameters() if name in CHECKED}
            engine.step()
            plain.zero_grad()
            want = plain(input_ids=input_ids, labels=labels, fused_lm_head=True).loss
            want.backward()
            torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)
            for name, p in plain.named_parameters():
                if name in got:
                    expected = p.grad.clone()
                    dist.all_reduce(expected)
                    expected /= WORLD  # ZeRO averages gradients over the data-parallel processes
                    torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-7,
                                               msg=lambda m, name=name: f"rank {rank} step {step} grad {name}: {m}")
            assert head_during_backbone == [ZeroParamStatus.NOT_AVAILABLE] * 2, (step, head_during_backbone)
            head_during_backbone.clear()
    finally:
        engine.destroy()
        dist.destroy_process_group()


@pytest.mark.parametrize("architecture", ["qwen3", "llama_tied"])
def test_fused_head_under_zero3_matches_the_unpartitioned_model(architecture):
    spawn(_engine_worker, architecture)


def _build(training_args, case, config, policy, reference, tokenizer, dataset):
    if case == "sft":
        return SFTTrainer(model=model(config, policy), args=training_args(SFTConfig), train_dataset=dataset,
                          processing_class=tokenizer)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return DPOTrainer(model=model(config, policy), ref_model=model(config, reference) if case == "dpo" else None,
                      args=training_args(DPOConfig, beta=0.1), train_dataset=dataset, processing_class=tokenizer,
                      peft_config=lora if case == "dpo-lora" else None)


def _trl_checked(case):
    """The head, and a parameter the steps train (under LoRA, where the head is frozen, an adapter's)."""
    if case == "dpo-lora":
        return tuple("base_model.model." + name
                     for name in ("lm_head.weight", "model.layers.1.self_attn.q_proj.lora_A.default.weight"))
    return CHECKED


@pytest.mark.parametrize("case", ["dpo", "sft", "dpo-lora"])
def test_trl_trainers_under_zero3_train_as_without_pyprefopt(tmp_path, case, qwen3_config, policy_state, ref_state,
                                                             tokenizer, preference_dataset):
    dataset = preference_dataset
    if case == "sft":
        dataset = dataset.rename_column("chosen", "completion").remove_columns("rejected")
    checked = _trl_checked(case)
    theirs, ours = train_with_and_without_pyprefopt(tmp_path, _build, "zero3", checked, case, qwen3_config,
                                                    policy_state, ref_state, tokenizer, dataset)
    assert_same_training(ours, theirs, checked)
    head_moved = (ours["weights"][checked[0]] - policy_state["lm_head.weight"]).abs().max()
    assert head_moved == 0 if case == "dpo-lora" else head_moved > 1e-3, head_moved
