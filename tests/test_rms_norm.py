"""pyprefopt.rms_norm on both paths (Triton kernels under TRITON_INTERPRET=1 on CPU tensors, and the PyTorch path)
against the fp64 reference, fp32 tightly and 16-bit within 2x torch's same-dtype error, forward and the gradients of
the input and the weight, at odd widths, head-sized rows and many rows per backward program, in the Llama order and
the Gemma ones (the weight, 1 + the weight, or none, in fp32 before one rounding); the PyTorch path's forward bit for
bit transformers' own (Llama, Qwen2, Qwen3, Gemma 2, Gemma 3, Gemma-3n); clear errors for bad input."""

import copy
import importlib

import pytest
import torch

from pyprefopt.kernels import rms_norm as kernels
from pyprefopt.reference import rms_norm_reference
from pyprefopt.rms_norm import RMSNorm, rms_norm
from tests.tensor_asserts import assert_elementwise_op_matches_fp64, assert_within_torch_error

# (shape): a head-sized row under q_norm's [batch, tokens, heads, head_dim], odd widths, more rows than the
# backward's programs (each then walks several rows and sums its share of dw).
SHAPES = [(1, 1), (3, 7, 4, 16), (5, 33), (2, 3, 1031), (1200, 24)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# (scale_in_fp32, weight_offset, has weight): Llama/Qwen; Gemma-3n; Gemma 2 and 3; Gemma-3n's unscaled norms.
ORDERS = {"llama": (False, 0.0, True), "gemma3n": (True, 0.0, True), "gemma3": (True, 1.0, True),
          "gemma3n-no-scale": (True, 0.0, False)}


@pytest.mark.parametrize("order", sorted(ORDERS))
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_matches_the_fp64_reference(shape, dtype, backend, order):
    scale_in_fp32, offset, has_weight = ORDERS[order]
    options = dict(scale_in_fp32=scale_in_fp32, weight_offset=offset)
    x = (4 * torch.randn(shape)).to(dtype)
    # Gemma 2 and 3 initialise the weight at 0 and scale by 1 + w.
    weight = (1 - offset + 0.3 * torch.randn(shape[-1])).to(dtype)
    inputs, names = ((x, weight), ("y", "dx", "dw")) if has_weight else ((x,), ("y", "dx"))

    def ours_op(a, w=None):
        return rms_norm(a, w, 1e-6, backend=backend, **options)

    def reference(a, w=None):
        return rms_norm_reference(a, w, 1e-6, **options)

    ours, same_dtype = assert_elementwise_op_matches_fp64(ours_op, reference, inputs, torch.randn(shape), names,
                                                          {"y": 1e-5, "dx": 1e-5, "dw": 2e-5})
    if backend == "torch":
        assert torch.equal(ours[0], same_dtype[0])  # transformers' own ops, bit for bit


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_frozen_weight_gets_no_gradient_and_an_fp32_weight_promotes(backend):
    x = torch.randn(4, 9, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(9)
    y = rms_norm(x, weight, backend=backend)
    assert y.dtype == torch.float32  # transformers: an fp32 weight times the bf16 row promotes
    assert torch.equal(y, rms_norm_reference(x.detach(), weight))
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and weight.grad is None


@pytest.mark.parametrize("family", ["Llama", "Qwen2", "Qwen3"])
def test_the_module_is_transformers_rms_norm(family):
    modeling = importlib.import_module(f"transformers.models.{family.lower()}.modeling_{family.lower()}")
    theirs = getattr(modeling, f"{family}RMSNorm")(24, eps=1e-5)
    torch.nn.init.normal_(theirs.weight, 1.0, 0.2)
    ours = RMSNorm(theirs.weight, theirs.variance_epsilon, backend="torch")
    x = torch.randn(3, 5, 24, dtype=torch.bfloat16)
    assert torch.equal(ours(x), theirs(x))
    assert ours.state_dict().keys() == theirs.state_dict().keys()


@pytest.mark.parametrize("family, with_scale", [("Gemma2", True), ("Gemma3", True), ("Gemma3n", True),
                                               ("Gemma3n", False)])
def test_the_module_is_transformers_gemma_rms_norm(family, with_scale):
    from pyprefopt.lean_activations import lean_rms_norm

    modeling = importlib.import_module(f"transformers.models.{family.lower()}.modeling_{family.lower()}")
    cls = getattr(modeling, f"{family}RMSNorm")
    theirs = cls(24, eps=1e-5, with_scale=with_scale) if family == "Gemma3n" else cls(24, eps=1e-5)
    if with_scale:
        torch.nn.init.normal_(theirs.weight, 0.1, 0.3)
    ours = lean_rms_norm(theirs, backend="torch")
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    if with_scale:
        assert ours.weight is theirs.weight
    x = 4 * torch.randn(3, 5, 24)
    upstream = torch.randn(x.shape)

    def results(module, dtype):
        leaf = x.to(dtype).requires_grad_()
        y = module(leaf)
        y.backward(upstream.to(y.dtype))
        return [y, leaf.grad] + [p.grad for p in module.parameters()]

    truth = results(copy.deepcopy(theirs).double(), torch.float64)
    # The weights' gradients accumulate on the one parameter both modules share: theirs first, read, then cleared.
    theirs_bf16 = [t.clone() for t in results(theirs, torch.bfloat16)]
    theirs.zero_grad(set_to_none=True)
    ours_bf16 = results(ours, torch.bfloat16)
    assert torch.equal(ours_bf16[0], theirs_bf16[0])
    for name, mine, want, same_dtype in zip(("y", "dx", "dw"), ours_bf16, truth, theirs_bf16):
        assert_within_torch_error(mine, want, same_dtype, name=name)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match=r"weight must be \[H\] for x of \[..., H\]"):
        rms_norm(torch.randn(2, 8), torch.randn(7))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        rms_norm(torch.ones(2, 8, dtype=torch.long), torch.randn(8))
    with pytest.raises(ValueError, match="weight=None .* needs scale_in_fp32=True"):
        rms_norm(torch.randn(2, 8), None)
    with pytest.raises(ValueError, match="weight_offset .* needs scale_in_fp32=True"):
        rms_norm(torch.randn(2, 8), torch.randn(8), weight_offset=1.0)
    with pytest.raises(ValueError, match="weight_offset must be a finite number"):
        rms_norm(torch.randn(2, 8), torch.randn(8), scale_in_fp32=True, weight_offset=float("nan"))
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        rms_norm(torch.randn(2, 8), torch.randn(8), eps=-1.0)
    with pytest.raises(ValueError, match=f"wider than the {kernels.MAX_ROW} the RMSNorm kernels hold"):
        rms_norm(torch.randn(1, kernels.MAX_ROW + 1), torch.randn(kernels.MAX_ROW + 1), backend="triton")


def test_rows_wider_than_the_kernels_hold_take_the_pytorch_path(monkeypatch):
    """backend "auto" on a device that would run the kernels: a row wider than MAX_ROW goes to the PyTorch path."""
    import pyprefopt.rms_norm as module

    monkeypatch.setattr(module, "triton_for", lambda device, backend: True)
    monkeypatch.setattr(kernels, "forward", lambda *args: pytest.fail("the kernel ran on a row wider than MAX_ROW"))
    width = kernels.MAX_ROW + 1
    x, weight = torch.randn(2, width), torch.randn(width)
    assert torch.equal(rms_norm(x, weight), rms_norm_reference(x, weight))
