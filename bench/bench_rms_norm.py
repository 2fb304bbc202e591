"""RMSNorm: `pyprefopt.rms_norm.RMSNorm` against transformers' Qwen3 RMSNorm over the same frozen bf16 weight, on bf16
hidden states that need a gradient (as a LoRA run's decoder has them): forward + backward time, side by side in one
process, and KiB autograd saves per token. CPU.

    python -m bench.bench_rms_norm [--tokens 1024 --hidden 2048 --rounds 5 --threads 2]
    python -m pytest bench/bench_rms_norm.py          # a quick shape, checked against the model's norm first (CI)
"""

from __future__ import annotations

import argparse

import torch

from bench.side_by_side import print_comparison, saved_bytes
from pyprefopt.rms_norm import RMSNorm


def norms(hidden: int):
    """(transformers' Qwen3RMSNorm, RMSNorm over its weight), the weight bf16 and frozen."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    torch.manual_seed(0)
    theirs = Qwen3RMSNorm(hidden, eps=1e-6).bfloat16().requires_grad_(False)
    torch.nn.init.normal_(theirs.weight, 1.0, 0.1)
    return theirs, RMSNorm(theirs.weight, theirs.variance_epsilon)


def step(norm, x, grad_y):
    y = norm(x)
    y.backward(grad_y)
    return y


def test_rms_norm_quick(benchmark):
    theirs, ours = norms(64)
    x = torch.randn(96, 64, dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn(96, 64, dtype=torch.bfloat16)
    assert torch.equal(step(ours, x, grad_y).detach(), step(theirs, x, grad_y).detach())
    assert saved_bytes(lambda: step(ours, x, grad_y), [ours.weight]) < saved_bytes(
        lambda: step(theirs, x, grad_y), [theirs.weight])
    benchmark(step, ours, x, grad_y)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    theirs, ours = norms(a.hidden)
    x = torch.randn(a.tokens, a.hidden, dtype=torch.bfloat16, requires_grad=True)
    grad_y = torch.randn(a.tokens, a.hidden, dtype=torch.bfloat16)
    print_comparison(f"RMSNorm, frozen weight, tokens {a.tokens}, H {a.hidden}, bf16, {a.threads} threads, "
                     f"{a.rounds} rounds", "RMSNorm", {"transformers": theirs, "pyprefopt": ours}, step, x, grad_y,
                     a.rounds, lambda m: [m.weight], 2)


if __name__ == "__main__":
    main()
