"""pyprefopt.geglu against the fp64 reference (fp32 tightly, 16-bit within 2x torch's same-dtype error; forward and
both gradients), with and without Gemma-3n's Gaussian top-k activation sparsity, at odd widths; the forward bit for
bit transformers' own; GeGLUMLP against transformers' Gemma-3n MLP (a sparse layer, LoRA projections, bf16) for
output and every gradient; a row of equal gate entries; clear errors for bad input."""

import copy

import pytest
import torch
import transformers

from pyprefopt import lora
from pyprefopt.geglu import GeGLUMLP, geglu
from pyprefopt.reference import geglu_reference
from tests.tensor_asserts import assert_elementwise_op_matches_fp64, assert_within_torch_error

SHAPES = [(1, 1), (3, 7, 16), (5, 33), (2, 1031)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# (shape, activation sparsity): a one-entry row has std 0, its own test below.
CASES = [(shape, sparsity) for shape in SHAPES for sparsity in (0.0, 0.95) if not (sparsity and shape[-1] == 1)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, sparsity", CASES, ids=str)
def test_geglu_matches_the_fp64_reference(shape, sparsity, dtype):
    gate, up = (2 * torch.randn(shape)).to(dtype), torch.randn(shape).to(dtype)
    # The upstream gradient in the inputs' dtype: the fp64 truth then answers the very problem the 16-bit runs get.
    ours, same_dtype = assert_elementwise_op_matches_fp64(
        lambda g, u: geglu(g, u, sparsity), lambda g, u: geglu_reference(g, u, sparsity), (gate, up),
        torch.randn(shape).to(dtype), ("h", "grad gate", "grad up"), {"h": 1e-6, "grad gate": 1e-5, "grad up": 1e-6})
    assert torch.equal(ours[0], same_dtype[0])  # transformers' own ops, bit for bit
    if sparsity:
        assert (ours[1] != 0).any()


def test_a_row_of_equal_entries_has_a_finite_gradient():
    """std 0: the cutoff is the entries themselves, every shift 0; autograd's std backward divides 0 by 0."""
    gate = torch.full((2, 8), 0.5, requires_grad=True)
    up = torch.randn(2, 8, requires_grad=True)
    geglu(gate, up, 0.95).sum().backward()
    assert torch.isfinite(gate.grad).all() and torch.isfinite(up.grad).all()


def _gemma3n_mlp(sparsity):
    config = transformers.Gemma3nTextConfig(hidden_size=48, intermediate_size=[160], num_hidden_layers=1,
                                            activation_sparsity_pattern=[sparsity])
    torch.manual_seed(0)
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextMLP

    return Gemma3nTextMLP(config, layer_idx=0)


@pytest.mark.parametrize("sparsity", [0.0, 0.95])
def test_the_module_is_transformers_gemma3n_mlp(sparsity):
    """A bf16 Gemma-3n MLP with LoRA on its three projections, under bf16 autocast as the train CLI runs it: the
    output bit for bit, the input's and every LoRA factor's gradient within 2x the module's own bf16 error."""
    theirs = _gemma3n_mlp(sparsity)
    lora.inject_lora(theirs, "all-linear", r=4, lora_alpha=8)
    for layer in lora.lora_layers(theirs).values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    theirs_bf16 = copy.deepcopy(theirs).to(torch.bfloat16)
    for name, param in theirs_bf16.named_parameters():
        param.requires_grad_("lora_" in name)
    ours = GeGLUMLP(theirs_bf16.gate_proj, theirs_bf16.up_proj, theirs_bf16.down_proj, sparsity)
    x, upstream = torch.randn(3, 5, 48), torch.randn(3, 5, 48)

    def results(module, dtype):
        leaf = x.to(dtype).requires_grad_()
        module.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = module(leaf)
        y.backward(upstream.to(y.dtype))
        return [y, leaf.grad] + [p.grad.clone() for p in module.parameters() if p.requires_grad]

    truth = results(copy.deepcopy(theirs).double(), torch.float64)
    theirs_results = results(theirs_bf16, torch.bfloat16)
    ours_results = results(ours, torch.bfloat16)
    assert torch.equal(ours_results[0], theirs_results[0])
    assert len(ours_results) == len(theirs_results) == len(truth) == 2 + 6
    for i, (mine, want, same_dtype) in enumerate(zip(ours_results, truth, theirs_results)):
        assert_within_torch_error(mine, want, same_dtype, name=f"result {i}")


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="gate and up must have one shape, dtype and device"):
        geglu(torch.randn(2, 8), torch.randn(2, 7))
    with pytest.raises(TypeError, match="gate must be a floating-point tensor"):
        geglu(torch.ones(2, 8, dtype=torch.long), torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"activation_sparsity must be a number in \[0, 1\)"):
        geglu(torch.randn(2, 8), torch.randn(2, 8), 1.0)
    with pytest.raises(ValueError, match=r"activation_sparsity must be a number in \[0, 1\)"):
        GeGLUMLP(torch.nn.Identity(), torch.nn.Identity(), torch.nn.Identity(), -0.1)
