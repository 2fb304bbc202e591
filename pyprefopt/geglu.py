"""GeGLU's gating h = gelu_tanh(gate) * up (Shazeer 2020, "GLU Variants Improve Transformer", eq. 5, with the tanh
approximation of GELU), optionally after Gemma-3n's Gaussian top-k activation sparsity, keeping only its two inputs
for backward; and the Gemma 2, 3 and 3n MLP built on it: `down_proj(gelu_tanh(sparse(gate_proj(x))) * up_proj(x))`.

Gemma-3n's sparsity (its first layers' `activation_sparsity_pattern`) keeps the entries of each gate row above
a cutoff at the row's `sparsity` quantile under a normal fit, shifted down by it:

    c = mean(g) + k * std(g)      (k = Phi^-1(sparsity), std over the row, uncorrected)       s = relu(g - c)

computed in the gate's dtype with transformers' own ops. Its backward, with dz = ds * [s > 0] over the row of N:

    dg_i = dz_i - sum(dz) * (1 / N + k * (g_i - mean(g)) / (N * std(g)))

(the std term taken as 0 for a row of equal entries, where autograd's 0/0 gives NaN).

Autograd through transformers' MLP keeps, per layer, the gate, its sparse shift s (sparse layers), GELU's output,
up and, when down_proj has a LoRA branch, h: up to five intermediate-wide tensors. `GeGLUFunction` keeps gate and up
(and two scalars a row) and recomputes s and gelu(s) in backward; `GeGLUMLP` has down_proj's saved h rebuilt from
gate and up when its backward asks for it (`pyprefopt.swiglu.saves_of_gating_recomputed`).

The forward is transformers' ops in transformers' order (bit for bit theirs on every device); so are GELU's and
relu's gradients in backward, the sparsity's row terms fp32.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from pyprefopt.swiglu import GatedMLP, check_gating_inputs

GELU_APPROXIMATION = "tanh"


def _check_inputs(gate, up, sparsity):
    check_gating_inputs(gate, up)
    if gate.dim() < 1:
        raise ValueError("gate and up must be [..., intermediate], got 0-d tensors")
    _check_sparsity(sparsity)


def _check_sparsity(sparsity):
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0 <= sparsity < 1:
        raise ValueError(f"activation_sparsity must be a number in [0, 1), got {sparsity!r}")


def std_multiplier(sparsity: float, dtype: torch.dtype, device) -> torch.Tensor:
    """k = Phi^-1(sparsity) in `dtype`, as Gemma-3n's MLP forms it (an fp32 normal quantile, then cast)."""
    target = torch.tensor(sparsity, dtype=torch.float32, device=device)
    return torch.distributions.normal.Normal(0, 1).icdf(target).type(dtype)


def _cutoff(gate, multiplier):
    """(c, std) of each row: Gemma-3n's `_gaussian_topk` ops, in the gate's dtype."""
    std = torch.std(gate, dim=-1, keepdim=True, unbiased=False)
    return torch.mean(gate, dim=-1, keepdim=True) + std * multiplier, std


def _shifted(gate, cutoff):
    return gate if cutoff is None else nn.functional.relu(gate - cutoff)


def _gated(gate, up, cutoff):
    """h = gelu_tanh(s) * up, s the sparse shift of gate by each row's `cutoff` (gate itself for None)."""
    return nn.functional.gelu(_shifted(gate, cutoff), approximate=GELU_APPROXIMATION) * up


class GeGLUFunction(torch.autograd.Function):
    """gelu_tanh(sparse(gate)) * up, elementwise but for the sparsity's row statistics; gradients for gate and up.
    Returns (h, each row's cutoff, or None without sparsity): the cutoff, a constant to autograd (the backward takes
    its dependence on gate in), lets down_proj's saved h be rebuilt without the row statistics again."""

    @staticmethod
    def forward(ctx, gate, up, multiplier):
        cutoff, std = (None, None) if multiplier is None else _cutoff(gate, multiplier)
        h = _gated(gate, up, cutoff)
        ctx.sparse = multiplier is not None
        ctx.save_for_backward(gate, up, *((cutoff, std, multiplier) if ctx.sparse else ()))
        if ctx.sparse:
            ctx.mark_non_differentiable(cutoff)
        return h, cutoff

    @staticmethod
    def backward(ctx, grad_h, _grad_cutoff):
        gate, up, *statistics = ctx.saved_tensors
        cutoff, std, multiplier = statistics if ctx.sparse else (None, None, None)
        shifted = _shifted(gate, cutoff)
        grad_up = grad_h * nn.functional.gelu(shifted, approximate=GELU_APPROXIMATION) \
            if ctx.needs_input_grad[1] else None
        grad_gate = None
        if ctx.needs_input_grad[0]:
            # GELU's and relu's gradients as autograd takes them through transformers' module, in the gate's dtype.
            grad_gate = torch.ops.aten.gelu_backward(grad_h * up, shifted, approximate=GELU_APPROXIMATION)
            if ctx.sparse:
                grad_shifted = torch.ops.aten.threshold_backward(grad_gate, shifted, 0)
                # The cutoff's gradient reaches each entry through the row's mean and (where std > 0) its std, in
                # fp32: dg = ds - (total / N + through_std * (g - mean)) = ds - (g * through_std + offset).
                total = grad_shifted.sum(-1, keepdim=True, dtype=torch.float32)
                std32 = std.float()
                width = gate.shape[-1]
                through_std = torch.where(std32 > 0, multiplier.float() * total / (width * std32), 0.0)
                mean = gate.mean(-1, keepdim=True, dtype=torch.float32)
                shift = gate.to(torch.float32, copy=True).mul_(through_std).add_(total / width - through_std * mean)
                grad_gate = torch.sub(grad_shifted, shift, out=shift).to(gate.dtype)
        return grad_gate, grad_up, None


def geglu(gate: torch.Tensor, up: torch.Tensor, activation_sparsity: float = 0.0) -> torch.Tensor:
    """gelu_tanh(gate) * up, with Gemma-3n's Gaussian top-k on gate first when `activation_sparsity` > 0, keeping
    gate and up (and two scalars a row) for backward."""
    _check_inputs(gate, up, activation_sparsity)
    multiplier = std_multiplier(activation_sparsity, gate.dtype, gate.device) if activation_sparsity > 0 else None
    return GeGLUFunction.apply(gate, up, multiplier)[0]


class GeGLUMLP(GatedMLP):
    """A drop-in for transformers' Gemma 2, 3 and 3n MLPs (GELU-tanh; Gemma-3n's with its layer's activation
    sparsity)."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module,
                 activation_sparsity: float = 0.0):
        super().__init__(gate_proj, up_proj, down_proj)
        _check_sparsity(activation_sparsity)
        self.activation_sparsity = float(activation_sparsity)

    def activation(self, gate, up):
        multiplier = None
        if self.activation_sparsity > 0:
            multiplier = std_multiplier(self.activation_sparsity, gate.dtype, gate.device)
        h, cutoff = GeGLUFunction.apply(gate, up, multiplier)

        def rebuild(gate, up):
            with torch.no_grad():
                return _gated(gate, up, cutoff)

        return h, rebuild

    def extra_repr(self) -> str:
        return f"activation_sparsity={self.activation_sparsity}" if self.activation_sparsity else ""
