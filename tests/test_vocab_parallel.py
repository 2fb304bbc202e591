"""A head sharded along the vocabulary across processes (gloo, 2 CPU processes): `fused_linear_logprobs` and
`FusedLinearPreferenceLoss` give the unsharded op's log-probs, losses and gradients, each process holding and
differentiating only its own rows of the head; on the blocked CPU path and the Triton kernels (interpreted)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist

from pyprefopt import FusedLinearPreferenceLoss, fused_linear_logprobs
from pyprefopt.reference import reference_logprobs, reference_preference_loss
from tests.gloo_processes import WORLD, report_every_check_passed, run_in_processes
from tests.tensor_asserts import assert_within_torch_error

# Odd, so the shards differ in size (DTensor's Shard(0) gives 151 + 150 rows).
VOCAB, WIDTH = 301, 24
CASES = {
    "frozen": dict(grads=("hidden",), transform={}),
    "trained": dict(grads=("hidden", "weight", "bias"), transform={"temperature": 0.8}),
    "capped": dict(grads=("hidden", "weight"), transform={"softcap": 5.0, "logit_scale": 2.0}),
}


def _inputs(grads):
    """The same batch on every process: hidden [3, 7, H], the full head [V, H] and bias [V], labels with ignored
    positions."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, WIDTH, generator=g)
    weight = torch.randn(VOCAB, WIDTH, generator=g) / WIDTH**0.5 * 3
    bias = torch.randn(VOCAB, generator=g)
    labels = torch.randint(0, VOCAB, (3, 7), generator=g)
    labels[0, :3] = -100
    return hidden.requires_grad_("hidden" in grads), weight, bias, labels


def _shard_rows(rank):
    """This process's rows of the vocabulary as DTensor's Shard(0) places them (torch.chunk's split)."""
    sizes = [len(c) for c in torch.arange(VOCAB).chunk(WORLD)]
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _check_logprobs(rank, mesh, case, backend, form):
    from torch.distributed.tensor import Shard, distribute_tensor

    grads, transform = CASES[case]["grads"], CASES[case]["transform"]
    hidden, weight, bias, labels = _inputs(grads)
    rows = _shard_rows(rank)
    if form == "dtensor":
        head = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_("weight" in grads)
        head_bias = None
        kwargs = {}
    else:
        head = weight[rows].clone().requires_grad_("weight" in grads)
        head_bias = bias[rows].clone().requires_grad_("bias" in grads)
        kwargs = {"process_group": dist.group.WORLD}
    logp = fused_linear_logprobs(hidden, head, labels, head_bias, backend=backend, **transform, **kwargs)
    upstream = torch.randn(logp.shape, generator=torch.Generator().manual_seed(1))
    leaves = {"hidden": hidden, "weight": head, "bias": head_bias}
    wanted = [name for name in grads if leaves[name] is not None]
    got = dict(zip(wanted, torch.autograd.grad(logp, [leaves[n] for n in wanted], upstream)))

    full_bias = None if head_bias is None else bias

    def reference(dtype):
        leaves64 = {"hidden": hidden.detach().to(dtype).requires_grad_(),
                    "weight": weight.to(dtype).requires_grad_(), "bias": bias.to(dtype).requires_grad_()}
        out = reference_logprobs(leaves64["hidden"], leaves64["weight"], labels,
                                 None if full_bias is None else leaves64["bias"], dtype=dtype, **transform)
        return out, dict(zip(wanted, torch.autograd.grad(out, [leaves64[n] for n in wanted], upstream.to(dtype))))

    (truth, true_grads), (same, same_grads) = reference(torch.float64), reference(torch.float32)
    assert_within_torch_error(logp, truth, same, name=f"rank {rank} {case} {form} logp")
    for name, grad in got.items():
        # This process's rows of the head's gradients; the hidden gradient whole, summed over processes.
        grad = grad.to_local() if hasattr(grad, "to_local") else grad
        part = slice(None) if name == "hidden" else rows
        assert_within_torch_error(grad, true_grads[name][part], same_grads[name][part],
                                  name=f"rank {rank} {case} {form} grad {name}")


def _check_loss(rank, mesh):
    """DPO with a sharded (DTensor) trained head against the unsharded reference loss and gradients."""
    from torch.distributed.tensor import Shard, distribute_tensor

    hidden, weight, _, labels = _inputs(("hidden",))
    labels = labels[:2]
    hidden = hidden[:2].detach().requires_grad_()
    ref_logps = torch.tensor([-40.0, -45.0])
    head = distribute_tensor(weight, mesh, [Shard(0)]).requires_grad_()
    loss, metrics = FusedLinearPreferenceLoss("dpo", beta=0.2)(hidden, head, labels, ref_logps=ref_logps)
    got_hidden, got_weight = torch.autograd.grad(loss, [hidden, head])
    full = weight.clone().requires_grad_()
    want, want_metrics = reference_preference_loss("dpo", hidden, full, labels, ref_logps=ref_logps, beta=0.2)
    want_hidden, want_weight = torch.autograd.grad(want, [hidden, full])
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    for key in want_metrics:
        torch.testing.assert_close(metrics[key], want_metrics[key], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_hidden, want_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_weight.to_local(), want_weight[_shard_rows(rank)], rtol=1e-5, atol=1e-6)


def _check_errors(rank, mesh):
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    hidden, weight, _, labels = _inputs(())
    sharded = distribute_tensor(weight, mesh, [Shard(0)])
    with pytest.raises(ValueError, match="not both"):
        fused_linear_logprobs(hidden, sharded, labels, process_group=dist.group.WORLD)
    with pytest.raises(ValueError, match="sharded along the vocabulary"):
        fused_linear_logprobs(hidden, distribute_tensor(weight, mesh, [Replicate()]), labels)
    with pytest.raises(NotImplementedError, match="statistics"):
        fused_linear_logprobs(hidden, sharded, labels, statistics=("entropy",))
    with pytest.raises(ValueError, match=f"out of range for a vocabulary of {VOCAB}"):
        fused_linear_logprobs(hidden, sharded, labels.clamp(max=0) + VOCAB)
    # Data parallelism's batches (each process its own) with an FSDP2-like dim-0 shard of the head.
    with pytest.raises(ValueError, match="same hidden states and labels on every process"):
        fused_linear_logprobs(hidden + rank, sharded, labels)


def _worker(backend):
    """One of the WORLD processes torchrun starts (its rank and rendezvous in the environment)."""
    from torch.distributed.device_mesh import DeviceMesh

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        # A mesh over the default group itself: init_device_mesh would make a group of its own, and making one
        # on gloo/CPU aborts a process now and then (torch 2.13), where this test is about the head.
        mesh = DeviceMesh.from_group(dist.group.WORLD, "cpu")
        for case in CASES:
            for form in ("process_group", "dtensor"):
                _check_logprobs(rank, mesh, case, backend, form)
        _check_loss(rank, mesh)
        # Nothing to score: still differentiable, zero gradients, no rank left waiting.
        hidden, weight, bias, labels = _inputs(("hidden",))
        logp = fused_linear_logprobs(hidden, weight[_shard_rows(rank)], torch.full_like(labels, -100),
                                     process_group=dist.group.WORLD, backend=backend)
        logp.sum().backward()
        assert not logp.any() and not hidden.grad.any()
        _check_errors(rank, mesh)
        report_every_check_passed(rank)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_vocabulary_sharded_head_matches_the_whole_head(backend):
    run_in_processes("tests.test_vocab_parallel", backend, env={"TRITON_INTERPRET": "1"})


if __name__ == "__main__":
    _worker(sys.argv[1])
