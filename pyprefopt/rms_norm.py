"""RMSNorm as Llama, Qwen2 and Qwen3 compute it, keeping only its input and a per-row scalar for backward.

    rstd = 1 / sqrt(mean(x^2) + eps)        y = w * round_x(x * rstd)        (Zhang & Sennrich 2019, eq. 4)

The statistics are fp32; the normalised row is rounded to x's dtype before the weight multiplies, in the dtype w
and x promote to (transformers' order, so the forward is theirs bit for bit on the PyTorch path).

Autograd through transformers' module keeps the fp32 copy of x (twice x's size in 16-bit) for `pow` and the
product; `RMSNormFunction` keeps x itself and rstd, and forms x * rstd again in backward:

    n = x * rstd        dn = dy * w        dx = rstd * (dn - n * mean(dn * n))        dw = sum_rows(dy * round_x(n))

- CUDA: the Triton kernels of `pyprefopt.kernels.rms_norm` (a row per program forward; dw from per-program fp32
  partial sums, deterministic), for rows of up to `kernels.rms_norm.MAX_ROW` elements.
- CPU, and wider rows: the same formulas in PyTorch, in fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from pyprefopt.backend import use_triton as triton_for


def _check_inputs(x, weight, eps):
    for label, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{label} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{label} must be a floating-point tensor, got {t.dtype}")
    if x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [H] for x of [..., H], got weight {tuple(weight.shape)} and x "
                         f"{tuple(x.shape)}")
    if weight.device != x.device:
        raise ValueError(f"x and weight must be on one device, got {x.device} and {weight.device}")
    if not (isinstance(eps, float | int) and eps >= 0):
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")


class RMSNormFunction(torch.autograd.Function):
    """y = w * round_x(x * rstd) over x's last dimension; gradients for x and w."""

    @staticmethod
    def forward(ctx, x, weight, eps, use_triton):
        _check_inputs(x, weight, eps)
        out_dtype = torch.promote_types(weight.dtype, x.dtype)
        if use_triton and x.numel():
            from pyprefopt.kernels import rms_norm as kernels

            x = x.contiguous()
            y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
            rstd = kernels.forward(x.view(-1, x.shape[-1]), weight, float(eps), y.view(-1, x.shape[-1]))
        else:
            x32 = x.float()
            rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps).squeeze(-1)
            y = weight * (x32 * rstd.unsqueeze(-1)).to(x.dtype)
        ctx.use_triton = use_triton
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        need_x, need_weight = ctx.needs_input_grad[:2]
        width = x.shape[-1]
        if ctx.use_triton and x.numel():
            from pyprefopt.kernels import rms_norm as kernels

            grad_x, grad_weight = kernels.backward(grad_y.contiguous().view(-1, width), x.view(-1, width), weight,
                                                   rstd, need_weight)
            grad_x = grad_x.view(x.shape)
        else:
            normed = x.float() * rstd.unsqueeze(-1)
            grad_y32 = grad_y.float()
            grad_weight = None
            if need_weight:
                grad_weight = (grad_y32 * normed.to(x.dtype)).reshape(-1, width).sum(0)
            grad_normed = grad_y32 * weight.float()
            dot = (grad_normed * normed).mean(-1, keepdim=True)
            grad_x = grad_normed.sub_(normed.mul_(dot)).mul_(rstd.unsqueeze(-1)).to(x.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x if need_x else None, grad_weight, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    """RMSNorm of `x` [..., H] with `weight` [H], as transformers' Llama/Qwen2/Qwen3 RMSNorm computes it, keeping
    x and one fp32 scalar per row for backward. backend: "auto" (Triton on CUDA for rows the kernels hold,
    PyTorch elsewhere), "triton" or "torch"."""
    use_triton = triton_for(x.device, backend)
    if use_triton:
        from pyprefopt.kernels import rms_norm as kernels

        if x.shape[-1] > kernels.MAX_ROW:
            if backend == "triton":
                raise ValueError(f"rows of {x.shape[-1]} elements are wider than the {kernels.MAX_ROW} the RMSNorm "
                                 "kernels hold; backend='auto' takes the PyTorch path for them")
            use_triton = False
    return RMSNormFunction.apply(x, weight, eps, use_triton)


class RMSNorm(nn.Module):
    """A drop-in for transformers' Llama/Qwen2/Qwen3 RMSNorm over the same `weight` parameter (its state-dict key
    and `variance_epsilon` as theirs)."""

    def __init__(self, weight: nn.Parameter, eps: float = 1e-6, backend: str = "auto"):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon, self.backend)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"
