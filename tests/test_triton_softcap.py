"""The Triton log-prob kernels with and without logit soft-capping, called directly (interpreted on CPU tensors)
with a `LogitTransform`, against the materialised logits of `pyprefopt.reference` in float64: each result within
2x the error of PyTorch's own computation in the input dtype (tests/tensor_asserts.py)."""

import math

import pytest
import torch
import triton
import triton.language as tl

from pyprefopt.fused_linear_logprobs import LogitTransform
from pyprefopt.kernels import fused_linear_logprobs as kernels
from pyprefopt.reference import reference_logprobs
from tests.tensor_asserts import assert_within_torch_error

# (tokens, hidden, vocab): vocabularies that are no multiple of the tiles, one of them split over two programs.
SHAPES = [(7, 24, 300), (37, 32, 1000)]
# Gemma 2's cap of 30 with weights scaled so that |z| reaches ~100: most logits sit deep in the tanh's flat part.
CAPPED = {"temperature": 0.9, "softcap": 30.0, "logit_scale": 1.0}
WEIGHT_SCALE = 40.0


def make_inputs(tokens, width, vocab, dtype, with_bias, weight_scale):
    hidden = torch.randn(tokens, width).to(dtype)
    weight = (torch.randn(vocab, width) / width**0.5 * weight_scale).to(dtype)
    bias = torch.randn(vocab).to(dtype) if with_bias else None
    return hidden, weight, bias, torch.randint(0, vocab, (tokens,))


def check(shape, dtype, with_bias, trained, weight_scale, **transform):
    hidden, weight, bias, labels = make_inputs(*shape, dtype, with_bias, weight_scale)
    logit_transform = LogitTransform(**transform)
    upstream = torch.randn(shape[0])
    logp, lse = kernels.forward(hidden, weight, bias, labels, logit_transform)
    need = {"hidden": True, "weight": trained, "bias": trained and with_bias}
    grads = kernels.backward(upstream, hidden, weight, bias, labels, lse, logit_transform, *need.values())
    assert logp.dtype == torch.float32 and logp.shape == labels.shape
    assert [g is not None for g in grads] == list(need.values())

    def torch_run(run_dtype):
        leaves = {name: None if t is None else t.detach().to(run_dtype).requires_grad_(need[name])
                  for name, t in (("hidden", hidden), ("weight", weight), ("bias", bias))}
        out = reference_logprobs(leaves["hidden"], leaves["weight"], labels, leaves["bias"], dtype=run_dtype,
                                 **transform)
        wanted = [t for t in leaves.values() if t is not None and t.requires_grad]
        return out, torch.autograd.grad(out, wanted, upstream.to(out.dtype))

    same_dtype, torch_grads = torch_run(dtype)
    truth, true_grads = torch_run(torch.float64)
    assert_within_torch_error(logp, truth, same_dtype, name="logp")
    names = [name for name, wanted in need.items() if wanted]
    # The kernels' fp32 gradients are handed out in the input dtype, as PyTorch's are.
    for name, g, t, tg in zip(names, [g for g in grads if g is not None], torch_grads, true_grads, strict=True):
        assert_within_torch_error(g.to(dtype), tg, t, name=f"grad {name}")


@pytest.mark.parametrize("trained", [False, True], ids=["frozen", "trained"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_capped_matches_float64(shape, dtype, with_bias, trained):
    check(shape, dtype, with_bias, trained, WEIGHT_SCALE, **CAPPED)


@pytest.mark.parametrize("trained", [False, True], ids=["frozen", "trained"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_uncapped_matches_float64(dtype, trained):
    check(SHAPES[1], dtype, True, trained, 3.0, temperature=0.7, logit_scale=0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_capped_with_logit_scale(dtype):
    """A logit scale before the cap (in_scale = logit_scale / softcap, slope = logit_scale / T)."""
    check(SHAPES[0], dtype, True, True, WEIGHT_SCALE / 4, temperature=1.3, softcap=20.0, logit_scale=4.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_capped_flat_softmax(dtype):
    """Small logits under the cap (|in_scale * z| ~ 0.03): there the tanh must be accurate relative to its value,
    which `2 * sigmoid(2x) - 1` is not (its log-probs come out 3-10x PyTorch's fp32 error)."""
    check(SHAPES[1], dtype, True, True, 1.0, **CAPPED)


def test_the_cap_matters():
    """At these inputs capped and uncapped log-probs differ far beyond any rounding: the tests above would catch a
    kernel that ignored the cap."""
    hidden, weight, bias, labels = make_inputs(*SHAPES[0], torch.float32, True, WEIGHT_SCALE)
    capped = kernels.forward(hidden, weight, bias, labels, LogitTransform(**CAPPED))[0]
    uncapped = kernels.forward(hidden, weight, bias, labels, LogitTransform(temperature=CAPPED["temperature"]))[0]
    assert (capped - uncapped).abs().max() > 10.0


@triton.jit
def _tanh_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(out_ptr + offs, kernels._tanh(tl.load(x_ptr + offs, mask=mask, other=0.0)), mask=mask)


# x^2 overflows for the huge inputs, in the Pade branch that the select then discards.
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
def test_tanh_within_about_an_ulp():
    """The kernels' fp32 tanh against float64 over 1e-30 < |x| < 60, around the branch point |x| = 1 and at the
    special values: at most 1.5 ulps off (`2 * sigmoid(2x) - 1` is off by millions near 0), and no more than
    1.5x PyTorch's own fp32 tanh anywhere."""
    g = torch.Generator().manual_seed(0)
    magnitude = torch.cat([torch.exp(torch.empty(20000).uniform_(math.log(1e-30), math.log(60.0), generator=g)),
                           torch.linspace(0.99, 1.01, 2001), torch.tensor([0.0, 1.0, 0.5, 2.0, 9.0, 10.0, 1e30])])
    x = (magnitude * torch.where(torch.rand(magnitude.shape, generator=g) < 0.5, -1.0, 1.0)).float()
    ours = torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, ours, x.numel(), BLOCK=1024)
    truth = torch.tanh(x.double())
    ulp = (truth.float().abs().nextafter(torch.tensor(math.inf)) - truth.float().abs()).double()
    ours_ulps = ((ours.double() - truth).abs() / ulp).max().item()
    torch_ulps = ((torch.tanh(x).double() - truth).abs() / ulp).max().item()
    assert ours_ulps <= 1.5 and ours_ulps <= 1.5 * max(torch_ulps, 1.0), (ours_ulps, torch_ulps)
    special = torch.tensor([math.inf, -math.inf, math.nan, 0.0])
    out = torch.empty_like(special)
    _tanh_kernel[(1,)](special, out, 4, BLOCK=4)
    assert out[:2].tolist() == [1.0, -1.0] and out[2].isnan() and out[3] == 0.0
