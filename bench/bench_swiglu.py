"""SwiGLU MLP: `pyprefopt.swiglu.SwiGLUMLP` against transformers' Qwen3 MLP over the same layers (frozen bf16
projections with fp32 LoRA factors of rank 16 on gate/up/down, as the Qwen3-1.7B card trains them): forward + backward
time, side by side in one process, and KiB autograd saves per token. CPU, bf16 autocast as the train CLI runs.

    python -m bench.bench_swiglu [--tokens 1024 --hidden 2048 --intermediate 6144 --rounds 5 --threads 2]
    python -m pytest bench/bench_swiglu.py            # a quick shape, checked against the model's MLP first (CI)
"""

from __future__ import annotations

import argparse
import copy

import torch

from bench.side_by_side import print_comparison, saved_bytes
from pyprefopt import lora
from pyprefopt.swiglu import SwiGLUMLP


def mlps(hidden: int, intermediate: int, lora_targets=("gate_proj", "up_proj", "down_proj")):
    """(transformers' Qwen3MLP, SwiGLUMLP over a copy of its layers), bf16 weights and fp32 LoRA factors."""
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3MLP

    torch.manual_seed(0)
    theirs = Qwen3MLP(Qwen3Config(hidden_size=hidden, intermediate_size=intermediate)).bfloat16()
    if lora_targets:
        lora.inject_lora(theirs, list(lora_targets), r=16, lora_alpha=32)
        for layer in lora.lora_layers(theirs).values():
            layer.float()
            layer.base_layer.bfloat16()
            torch.nn.init.normal_(layer.lora_B, std=0.02)
    ours = copy.deepcopy(theirs)
    return theirs, SwiGLUMLP(ours.gate_proj, ours.up_proj, ours.down_proj)


def step(mlp, x, grad_y):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mlp(x)
    y.backward(grad_y)
    return y


def frozen_weights(mlp):
    return [p for p in mlp.parameters() if not p.requires_grad]


def test_swiglu_mlp_quick(benchmark):
    theirs, ours = mlps(64, 160)
    x = torch.randn(96, 64, dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn(96, 64, dtype=torch.bfloat16)
    expected = step(theirs, x, grad_y).detach()
    assert torch.equal(step(ours, x, grad_y).detach(), expected)
    assert saved_bytes(lambda: step(ours, x, grad_y), frozen_weights(ours)) < saved_bytes(
        lambda: step(theirs, x, grad_y), frozen_weights(theirs))
    benchmark(step, ours, x, grad_y)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=6144)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    theirs, ours = mlps(a.hidden, a.intermediate)
    x = torch.randn(a.tokens, a.hidden, dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn(a.tokens, a.hidden, dtype=torch.bfloat16)
    print_comparison(f"SwiGLU MLP, LoRA r16 on gate/up/down, tokens {a.tokens}, H {a.hidden}, I {a.intermediate}, "
                     f"bf16, {a.threads} threads, {a.rounds} rounds", "MLP",
                     {"transformers": theirs, "pyprefopt": ours}, step, x, grad_y, a.rounds, frozen_weights, 1)


if __name__ == "__main__":
    main()
