"""The drop-in fused head under DeepSpeed ZeRO-3 (2 gloo CPU processes, each its own batch), where every parameter is
partitioned: an empty placeholder outside its module's forward (the config below keeps none whole, gathers none
ahead and releases each after use).

Through the engine and with the backbone and head called on their own (as the CPO and ORPO forwards call them, outside
the model's forward), the same loss and gradients as the unpartitioned model with the gradients averaged over the
processes, untied and tied heads, and the head's weight gathered only while the head computes. Through TRL's trainers
under accelerate's DeepSpeed plugin, the same logs and updated weights with and without `patch_trl` (SGD, so a wrong
gradient shows in the weights, where Adam's normalisation would hide a scale): DPO against a reference model and SFT
with the head trained, DPO with a LoRA adapter and the head frozen."""

from __future__ import annotations

import math
import os
import socket

import pytest

pytest.importorskip("trl")
pytest.importorskip("deepspeed")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from pyprefopt import drop_in  # noqa: E402

from tiny_trl_setup import (  # noqa: E402,F401 (all but model, random_state, tiny_config: pytest fixtures)
    model,
    policy_state,
    preference_dataset,
    qwen3_config,
    random_state,
    ref_state,
    tiny_config,
    tokenizer,
)

WORLD = 2
BATCH = 2
STEPS = 3
CHECKED = ("lm_head.weight", "model.layers.1.mlp.down_proj.weight")
# Every parameter partitioned and released after each use: DeepSpeed's defaults keep parameters this small whole
# (persistence threshold) and leave gathered ones in place for reuse, where the head would never be empty.
ZERO3 = {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 0,
         "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}
# Logged per step; timing entries differ from run to run by nature.
TIMING = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos")
# fp32 on both sides, the same batches and seeds; TRL's head and ours sum in different orders.
RTOL, ATOL = 1e-5, 1e-6


def _init_env(rank, port):
    # DeepSpeed reads its accelerator when first imported: CPU here whatever the machine has.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, *args):
    mp.start_processes(worker, args=(_free_port(), *args), nprocs=WORLD, start_method="spawn")


def _batch(rank):
    g = torch.Generator().manual_seed(rank)
    input_ids = torch.randint(2, 300, (3, 10), generator=g)
    return input_ids, input_ids.masked_fill(torch.arange(10) < 3, -100)


def _engine_worker(rank, port, architecture, call):
    _init_env(rank, port)
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.utils import safe_get_full_grad

    from pyprefopt.head_config import head_logit_transform

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
    input_ids, labels = _batch(rank)
    try:
        # Twice: DeepSpeed records the order modules run in on the first step and fetches by it after.
        for step in range(2):
            if call == "engine":
                loss = engine(input_ids=input_ids, labels=labels, fused_lm_head=True).loss
            else:
                hidden = partitioned.model(input_ids=input_ids, use_cache=False).last_hidden_state[:, :-1]
                log_probs = drop_in._token_logps(partitioned.lm_head, hidden, labels[:, 1:],
                                                 head_logit_transform(config))
                loss = -log_probs.sum() / (labels[:, 1:] != -100).sum()
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
@pytest.mark.parametrize("call", ["engine", "backbone-and-head"])
def test_fused_head_under_zero3_matches_the_unpartitioned_model(architecture, call):
    _spawn(_engine_worker, architecture, call)


def _trl_worker(rank, port, case, patched, config, policy, reference, tokenizer, dataset, out):
    """One training run (a process holds one DeepSpeed accelerator); process 0 saves its logs and the checked
    parameters, gathered whole, to `out`."""
    _init_env(rank, port)
    import deepspeed
    from accelerate import PartialState
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    # Built before the TrainingArguments: while a ZeRO-3 config is active transformers builds models partitioned,
    # and the state dicts do not load into those.
    policy_model = model(config, policy)
    ref_model = model(config, reference) if case == "dpo" else None
    # TrainingArguments builds its distributed state with no backend for DeepSpeed, which on a machine without an
    # accelerator leaves accelerate with one process (DeepSpeed still partitions over two); a state configured with
    # gloo before them is the one they use.
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    common = dict(output_dir=os.path.dirname(out), report_to="none", per_device_train_batch_size=BATCH, bf16=False,
                  disable_tqdm=True, seed=0, max_steps=STEPS, logging_steps=1, save_strategy="no", optim="sgd",
                  learning_rate=0.5, accelerator_config={"use_configured_state": True},
                  deepspeed={"zero_optimization": ZERO3, "train_micro_batch_size_per_gpu": BATCH,
                             "gradient_accumulation_steps": 1, "gradient_clipping": 1.0})
    calls = []
    if patched:
        real = drop_in.fused_linear_logprobs
        drop_in.fused_linear_logprobs = lambda *a, **k: calls.append(1) or real(*a, **k)
        drop_in.patch_trl()
    try:
        if case == "sft":
            trainer = SFTTrainer(model=policy_model, args=SFTConfig(**common), train_dataset=dataset,
                                 processing_class=tokenizer)
        else:
            lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            trainer = DPOTrainer(model=policy_model, ref_model=ref_model, args=DPOConfig(**common, beta=0.1),
                                 train_dataset=dataset, processing_class=tokenizer,
                                 peft_config=lora if case == "dpo-lora" else None)
        trainer.train()
        assert not patched or len(calls) >= STEPS
        params = dict(trainer.model_wrapped.module.named_parameters())
        checked = _trl_checked(case)
        with deepspeed.zero.GatheredParameters([params[name] for name in checked]):
            weights = {name: params[name].detach().clone() for name in checked}
        if rank == 0:
            logs = [{k: v for k, v in entry.items() if k not in TIMING} for entry in trainer.state.log_history]
            torch.save({"logs": logs, "weights": weights}, out)
    finally:
        dist.destroy_process_group()


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

    def train(patched):
        out = tmp_path / f"patched{int(patched)}.pt"
        _spawn(_trl_worker, case, patched, qwen3_config, policy_state, ref_state, tokenizer, dataset, str(out))
        return torch.load(out)

    theirs, ours = train(False), train(True)
    assert len(ours["logs"]) == len(theirs["logs"]) == STEPS + 1
    for step, (a, b) in enumerate(zip(ours["logs"], theirs["logs"])):
        assert a.keys() == b.keys(), (step, sorted(a.keys() ^ b.keys()))
        for key, value in b.items():
            assert math.isclose(a[key], value, rel_tol=RTOL, abs_tol=ATOL), (step, key, a[key], value)
    head, trained = _trl_checked(case)
    for name in (head, trained):
        torch.testing.assert_close(ours["weights"][name], theirs["weights"][name], rtol=RTOL, atol=ATOL,
                                   msg=lambda m, name=name: f"{name} after training: {m}")
    head_moved = (ours["weights"][head] - policy_state["lm_head.weight"]).abs().max()
    assert head_moved == 0 if case == "dpo-lora" else head_moved > 1e-3, head_moved
