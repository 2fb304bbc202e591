"""Triton kernels for `pyprefopt.swiglu` (GPU path): SwiGLU's gating, elementwise over contiguous tensors,

    h = silu(g) * u = g * sigmoid(g) * u                    (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6)
    du = dh * silu(g)        dg = dh * u * sigmoid(g) * (1 + g * (1 - sigmoid(g)))

in fp32, one rounding per output. The backward reads g and u (all the forward keeps) and recomputes sigmoid(g).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyprefopt.kernels import triton_launch as launch

# Elements per program: 8 per thread at 4 warps, one 16-byte access per thread and operand in 16-bit.
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, n_elements, BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + offsets, launch.rounded(h, h_ptr.dtype.element_ty, INTERPRETED), mask=mask)


@triton.jit
def swiglu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n_elements,
                      BLOCK: tl.constexpr, INTERPRETED: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n_elements
    dh = tl.load(dh_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    du = dh * g * sig
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(du_ptr + offsets, launch.rounded(du, du_ptr.dtype.element_ty, INTERPRETED), mask=mask)
    tl.store(dg_ptr + offsets, launch.rounded(dg, dg_ptr.dtype.element_ty, INTERPRETED), mask=mask)


def _grid(n_elements):
    return (triton.cdiv(n_elements, BLOCK),)


def forward(gate, up):
    """h for contiguous `gate` and `up` of one shape and dtype."""
    h = torch.empty_like(gate)
    swiglu_fwd_kernel[_grid(gate.numel())](gate, up, h, gate.numel(), BLOCK=BLOCK,
                                            INTERPRETED=launch.interpreting(), num_warps=NUM_WARPS)
    return h


def backward(grad_h, gate, up):
    """(d gate, d up) for contiguous `grad_h`, `gate` and `up`."""
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    swiglu_bwd_kernel[_grid(gate.numel())](grad_h, gate, up, grad_gate, grad_up, gate.numel(), BLOCK=BLOCK,
                                           INTERPRETED=launch.interpreting(), num_warps=NUM_WARPS)
    return grad_gate, grad_up
