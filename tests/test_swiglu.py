"""pyprefopt.swiglu: the gating on both paths (Triton kernels under TRITON_INTERPRET=1 on CPU tensors, and the PyTorch
path) against the fp64 reference, fp32 tightly and 16-bit within 2x torch's same-dtype error, forward and both
gradients, at odd sizes and strided inputs; the recomputed down_proj input; clear errors for bad input."""

import pytest
import torch

from pyprefopt.reference import swiglu_reference
from pyprefopt.swiglu import SwiGLUMLP, swiglu
from tests.tensor_asserts import assert_close_verbose, assert_elementwise_op_matches_fp64

SHAPES = [(1, 1), (7, 33), (3, 5, 1031), (2, 2048 + 3)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_swiglu_matches_the_fp64_reference(shape, dtype, backend):
    gate, up = 3 * torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    assert_elementwise_op_matches_fp64(lambda g, u: swiglu(g, u, backend=backend), swiglu_reference, (gate, up),
                                       torch.randn(shape), ("h", "d gate", "d up"),
                                       {"h": 1e-6, "d gate": 1e-6, "d up": 1e-6})


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_swiglu_takes_strided_inputs(backend):
    """gate and up as the halves of one fused gate_up projection (Phi-3's layout): non-contiguous views."""
    fused = torch.randn(6, 2, 40, requires_grad=True)
    gate, up = fused[:, 0], fused[:, 1]
    h = swiglu(gate, up, backend=backend)
    h.backward(torch.ones_like(h))
    reference = fused.detach().clone().requires_grad_()
    swiglu_reference(reference[:, 0], reference[:, 1]).backward(torch.ones_like(h))
    assert_close_verbose(h, swiglu_reference(gate.detach(), up.detach()), name="h")
    assert_close_verbose(fused.grad, reference.grad, rtol=1e-5, atol=1e-6, name="d fused")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_the_mlp_rebuilds_down_projs_saved_input_exactly(backend):
    """down_proj's backward reads h = silu(gate) * up rebuilt from gate and up: its weight gradient is the one from
    the h the forward made, bit for bit."""
    linear = [torch.nn.Linear(24, 40), torch.nn.Linear(24, 40), torch.nn.Linear(40, 24)]
    mlp = SwiGLUMLP(*linear, backend=backend)
    x = torch.randn(5, 24)
    mlp(x).square().sum().backward()
    down_grad = linear[2].weight.grad.clone()
    with torch.no_grad():
        h = swiglu(linear[0](x), linear[1](x), backend=backend)
    grad_y = 2 * torch.nn.functional.linear(h, linear[2].weight, linear[2].bias)
    assert torch.equal(down_grad, grad_y.t() @ h)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="gate and up must have one shape, dtype and device"):
        swiglu(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="gate and up must have one shape, dtype and device"):
        swiglu(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="gate must be a floating-point tensor"):
        swiglu(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="backend must be"):
        swiglu(torch.randn(2, 3), torch.randn(2, 3), backend="cuda")
