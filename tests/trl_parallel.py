"""TRL trainers trained in 2 gloo CPU processes (each its own batches) under DDP, FSDP2 or DeepSpeed ZeRO-3, with and
without `patch_trl`, for tests/test_drop_in_zero3.py and tests/test_drop_in_wrapped.py: the logs and the trained
weights of both runs, and the check that they agree. SGD with a large learning rate, so that a gradient that is wrong
(not averaged over the processes, or scaled) shows in the weights, where Adam's normalisation would hide a scale."""

from __future__ import annotations

import gc
import math
import os
import socket

import deepspeed
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from accelerate import PartialState
from accelerate.utils import DistributedType

from pyprefopt import drop_in

WORLD = 2
BATCH = 2
STEPS = 3
PARALLELISMS = ("ddp", "fsdp2", "zero3")
# Every parameter partitioned and released after each use: DeepSpeed's defaults keep parameters this small whole
# (persistence threshold) and leave gathered ones in place for reuse, where the head would never be empty.
ZERO3 = {"stage": 3, "stage3_param_persistence_threshold": 0, "stage3_max_live_parameters": 0,
         "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}
# Logged per step; timing entries differ from run to run by nature.
TIMING = ("step_time", "train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos")
# fp32 on both sides, the same batches and seeds; TRL's head and ours sum in different orders.
RTOL, ATOL = 1e-5, 1e-6


def init_env(rank, port):
    """What torch.distributed, accelerate and DeepSpeed read to join process `rank` to the others."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, *args):
    """`worker(rank, port, *args)` in WORLD fresh processes."""
    mp.start_processes(worker, args=(_free_port(), *args), nprocs=WORLD, start_method="spawn")


def _training_args(parallelism, output_dir, config_class, **kwargs):
    """`config_class` (a TRL config) for `parallelism`, with the accelerate state it needs set up first."""
    common = dict(output_dir=output_dir, report_to="none", per_device_train_batch_size=BATCH, bf16=False,
                  disable_tqdm=True, seed=0, max_steps=STEPS, logging_steps=1, save_strategy="no", optim="sgd",
                  learning_rate=0.5, accelerator_config={"use_configured_state": True})
    if parallelism == "zero3":
        # TrainingArguments builds its distributed state with no backend for DeepSpeed, which on a machine without
        # an accelerator leaves accelerate with one process (DeepSpeed still partitions over two); a state configured
        # with gloo before them is the one they use.
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
        common["deepspeed"] = {"zero_optimization": ZERO3, "train_micro_batch_size_per_gpu": BATCH,
                               "gradient_accumulation_steps": 1, "gradient_clipping": 1.0}
    else:
        state = PartialState(backend="gloo", cpu=True)
        common["use_cpu"] = True
        if parallelism == "fsdp2":
            # accelerate takes FSDP only for accelerator processes; on CPU (gloo) it would wrap the model in DDP.
            # Its FSDP2 preparation itself runs on CPU as it is.
            os.environ["ACCELERATE_USE_FSDP"] = "true"
            state.distributed_type = DistributedType.MULTI_GPU
            common.update(fsdp="full_shard", fsdp_config={"version": 2})
    return config_class(**common, **kwargs)


def _full_weights(trainer, parallelism, names):
    """The parameters `names` of the trained model, whole (gathered from their shards or partitions)."""
    params = dict(trainer.accelerator.unwrap_model(trainer.model_wrapped).named_parameters())
    if parallelism == "zero3":
        with deepspeed.zero.GatheredParameters([params[name] for name in names]):
            return {name: params[name].detach().clone() for name in names}
    if parallelism == "fsdp2":
        return {name: params[name].detach().full_tensor() for name in names}
    return {name: params[name].detach().clone() for name in names}


def _train_worker(rank, port, build, parallelism, patched, checked, args, out):
    """One training run: `build(training_args, *args)` makes the trainer, where `training_args(config_class,
    **kwargs)` makes its TRL config for `parallelism` (called after the models are built: while a ZeRO-3 config is
    active transformers builds models partitioned, and the state dicts do not load into those). Process 0 saves the
    logs and the parameters `checked` to `out`."""
    init_env(rank, port)
    calls = []
    if patched:
        real = drop_in.fused_linear_logprobs
        drop_in.fused_linear_logprobs = lambda *a, **k: calls.append(1) or real(*a, **k)
        drop_in.patch_trl()
    try:
        trainer = build(lambda config_class, **kwargs: _training_args(parallelism, os.path.dirname(out), config_class,
                                                                      **kwargs), *args)
        trainer.train()
        assert not patched or len(calls) >= STEPS
        weights = _full_weights(trainer, parallelism, checked)
        if rank == 0:
            logs = [{k: v for k, v in entry.items() if k not in TIMING} for entry in trainer.state.log_history]
            torch.save({"logs": logs, "weights": weights}, out)
        # The trainer's DDP reducer holds the process group: destroyed after the group, it hangs in gloo's teardown.
        del trainer
        gc.collect()
    finally:
        dist.destroy_process_group()


def train_with_and_without_pyprefopt(tmp_path, build, parallelism, checked, *args):
    """The logs and the parameters `checked` of a run of `build` (see `_train_worker`) without and with `patch_trl`;
    `build` and `args` go to the processes by pickling."""
    def train(patched):
        out = tmp_path / f"{parallelism}-patched{int(patched)}.pt"
        spawn(_train_worker, build, parallelism, patched, checked, args, str(out))
        return torch.load(out)

    return train(False), train(True)


def assert_same_training(ours, theirs, checked):
    """Every logged value and every parameter `checked` of the two runs agree."""
    assert len(ours["logs"]) == len(theirs["logs"]) == STEPS + 1
    for step, (a, b) in enumerate(zip(ours["logs"], theirs["logs"])):
        assert a.keys() == b.keys(), (step, sorted(a.keys() ^ b.keys()))
        for key, value in b.items():
            assert math.isclose(a[key], value, rel_tol=RTOL, abs_tol=ATOL), (step, key, a[key], value)
    for name in checked:
        torch.testing.assert_close(ours["weights"][name], theirs["weights"][name], rtol=RTOL, atol=ATOL,
                                   msg=lambda m, name=name: f"{name} after training: {m}")
