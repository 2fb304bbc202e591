"""RMSNorm as Llama, Qwen2, Qwen3 and the Gemma families compute it, keeping only its input and a per-row scalar for
backward.

    rstd = 1 / sqrt(mean(x^2) + eps)        n = x * rstd        (Zhang & Sennrich 2019, eq. 4)
    Llama, Qwen2, Qwen3:                y = w * round_x(n)      in the dtype w and x promote to
    Gemma 2, 3 (offset 1), 3n (0):      y = round_x(n * (offset + w))     (`scale_in_fp32`; Gemma-3n's
                                        `with_scale=False` norms have no w: y = round_x(n))

The statistics are fp32; the Llama order rounds the normalised row to x's dtype before the weight multiplies, the
Gemma order multiplies in fp32 and rounds once (transformers' orders, so the forward is theirs bit for bit on the
PyTorch path).

Autograd through transformers' modules keeps the fp32 copy of x (twice x's size in 16-bit) for `pow` and the
product; `RMSNormFunction` keeps x itself and rstd, and forms x * rstd again in backward. With s the scale (w, or
offset + w):

    dn = dy * s        dx = rstd * (dn - n * mean(dn * n))        dw = sum_rows(dy * round_x(n))  (Llama order)
                                                                  dw = sum_rows(dy * n)           (Gemma order)

- CUDA: the Triton kernels of `pyprefopt.kernels.rms_norm` (a row per program forward; dw from per-program fp32
  partial sums, deterministic), for rows of up to `kernels.rms_norm.MAX_ROW` elements.
- CPU, and wider rows: the same formulas in PyTorch, in fp32.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pyprefopt.backend import use_triton as triton_for


def _check_inputs(x, weight, eps, scale_in_fp32, weight_offset):
    if weight is None and not scale_in_fp32:
        raise ValueError("weight=None (no scale, Gemma-3n's with_scale=False) needs scale_in_fp32=True")
    if not isinstance(weight_offset, float | int) or not math.isfinite(weight_offset):
        raise ValueError(f"weight_offset must be a finite number, got {weight_offset!r}")
    if weight_offset and not scale_in_fp32:
        raise ValueError("weight_offset (Gemma 2 and 3's 1 + w) needs scale_in_fp32=True: the Llama order has none")
    for label, t in (("x", x), ("weight", weight)):
        if label == "weight" and t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{label} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{label} must be a floating-point tensor, got {t.dtype}")
    if weight is None:
        if x.dim() < 1:
            raise ValueError(f"x must be [..., H], got a {x.dim()}-d tensor")
    elif x.dim() < 1 or weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [H] for x of [..., H], got weight {tuple(weight.shape)} and x "
                         f"{tuple(x.shape)}")
    elif weight.device != x.device:
        raise ValueError(f"x and weight must be on one device, got {x.device} and {weight.device}")
    if not (isinstance(eps, float | int) and eps >= 0):
        raise ValueError(f"eps must be a non-negative number, got {eps!r}")


class RMSNormFunction(torch.autograd.Function):
    """y = w * round_x(x * rstd), or round_x(x * rstd * (offset + w)) (`scale_in_fp32`), over x's last dimension;
    gradients for x and w."""

    @staticmethod
    def forward(ctx, x, weight, eps, use_triton, scale_in_fp32=False, weight_offset=0.0):
        _check_inputs(x, weight, eps, scale_in_fp32, weight_offset)
        out_dtype = x.dtype if scale_in_fp32 else torch.promote_types(weight.dtype, x.dtype)
        if use_triton and x.numel():
            from pyprefopt.kernels import rms_norm as kernels

            x = x.contiguous()
            y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
            rstd = kernels.forward(x.view(-1, x.shape[-1]), weight, float(eps), y.view(-1, x.shape[-1]),
                                   scale_in_fp32, float(weight_offset))
        else:
            x32 = x.float()
            rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps).squeeze(-1)
            normed = x32 * rstd.unsqueeze(-1)
            if not scale_in_fp32:
                y = weight * normed.to(x.dtype)
            elif weight is None:
                y = normed.to(x.dtype)
            else:
                y = (normed * _fp32_scale(weight, weight_offset)).to(x.dtype)
        ctx.use_triton, ctx.scale_in_fp32, ctx.weight_offset = use_triton, scale_in_fp32, weight_offset
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
                                                   rstd, need_weight, ctx.scale_in_fp32, float(ctx.weight_offset))
            grad_x = grad_x.view(x.shape)
        else:
            normed = x.float() * rstd.unsqueeze(-1)
            grad_y32 = grad_y.float()
            grad_weight = None
            if need_weight:
                weight_input = normed if ctx.scale_in_fp32 else normed.to(x.dtype)
                grad_weight = (grad_y32 * weight_input).reshape(-1, width).sum(0)
            if weight is None:
                grad_normed = grad_y.to(torch.float32, copy=True)
            elif ctx.scale_in_fp32:
                grad_normed = grad_y32 * _fp32_scale(weight, ctx.weight_offset)
            else:
                grad_normed = grad_y32 * weight.float()
            dot = (grad_normed * normed).mean(-1, keepdim=True)
            grad_x = grad_normed.sub_(normed.mul_(dot)).mul_(rstd.unsqueeze(-1)).to(x.dtype)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x if need_x else None, grad_weight, None, None, None, None


def _fp32_scale(weight, offset):
    """offset + w in fp32, as Gemma's norms form it (`1.0 + weight.float()`, or `weight.float()`)."""
    return weight.float() + offset if offset else weight.float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, backend: str = "auto", *,
             scale_in_fp32: bool = False, weight_offset: float = 0.0) -> torch.Tensor:
    """RMSNorm of `x` [..., H] with `weight` [H], keeping x and one fp32 scalar per row for backward: as
    transformers' Llama/Qwen2/Qwen3 RMSNorm computes it (`w * round_x(n)`, in the dtype w and x promote to), or
    with `scale_in_fp32` as Gemma's (`round_x(n * (weight_offset + w))`, in x's dtype: Gemma 2 and 3 have
    weight_offset 1, Gemma-3n 0, and Gemma-3n's unscaled norms weight None). backend: "auto" (Triton on CUDA
    for rows the kernels hold, PyTorch elsewhere), "triton" or "torch"."""
    use_triton = triton_for(x.device, backend)
    if use_triton:
        from pyprefopt.kernels import rms_norm as kernels

        if x.shape[-1] > kernels.MAX_ROW:
            if backend == "triton":
                raise ValueError(f"rows of {x.shape[-1]} elements are wider than the {kernels.MAX_ROW} the RMSNorm "
                                 "kernels hold; backend='auto' takes the PyTorch path for them")
            use_triton = False
    return RMSNormFunction.apply(x, weight, eps, use_triton, scale_in_fp32, weight_offset)


class RMSNorm(nn.Module):
    """A drop-in for transformers' Llama/Qwen2/Qwen3 RMSNorm (or, `scale_in_fp32`, Gemma's) over the same `weight`
    parameter (its state-dict key as theirs; a Gemma-3n norm without scale has none)."""

    def __init__(self, weight: nn.Parameter | None, eps: float = 1e-6, backend: str = "auto", *,
                 scale_in_fp32: bool = False, weight_offset: float = 0.0):
        super().__init__()
        if weight is not None:
            self.weight = weight
        self.variance_epsilon = eps
        self.backend = backend
        self.scale_in_fp32, self.weight_offset = scale_in_fp32, weight_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, getattr(self, "weight", None), self.variance_epsilon, self.backend,
                        scale_in_fp32=self.scale_in_fp32, weight_offset=self.weight_offset)

    def extra_repr(self) -> str:
        weight = getattr(self, "weight", None)
        shape = "no weight" if weight is None else str(tuple(weight.shape))
        order = f", scale_in_fp32, weight_offset={self.weight_offset}" if self.scale_in_fp32 else ""
        return f"{shape}, eps={self.variance_epsilon}{order}"
