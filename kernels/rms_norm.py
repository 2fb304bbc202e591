"""Triton kernels for `pyprefopt.rms_norm` (GPU path): RMSNorm as Llama, Qwen2 and Qwen3 compute it,

    rstd = 1 / sqrt(mean(x^2) + eps)        y = w * round_x(x * rstd)        (Zhang & Sennrich 2019, eq. 4)

with the statistics in fp32, the normalised row rounded to x's dtype before the weight multiplies (transformers'
order), or as the Gemma families do (SCALE_IN_FP32: y = round_x(x * rstd * (offset + w)), or round_x(x * rstd) with
no weight), and only x and the per-row rstd kept for backward. With s the scale (w, or offset + w, or 1):

    n = x * rstd        dn = dy * s        dx = rstd * (dn - n * mean(dn * n))
    dw = sum_rows(dy * round_x(n))  (Llama order),  sum_rows(dy * n)  (Gemma order)

- `rms_norm_fwd_kernel`: one program per row.
- `rms_norm_bwd_kernel`: a fixed number of programs, each over a contiguous range of rows, accumulating its share
  of dw in fp32 registers and writing it to its own row of a [programs, H] buffer that the caller sums (no
  atomics, so dw is deterministic).

A row is one block: `row_config` picks the block and warps from the row's width.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyprefopt.kernels import triton_launch as launch

# The widest row one program holds in registers (the backward keeps several fp32 rows of it live); wider rows
# spill on some families, and `pyprefopt.rms_norm` takes its PyTorch path for them.
MAX_ROW = 4096


def row_config(n_cols: int) -> triton.Config:
    """The block (the row's width rounded up to a power of two) and warps for rows of `n_cols` elements: a warp per
    256 elements (8 a thread), at least 4."""
    block = triton.next_power_of_2(n_cols)
    return triton.Config({"BLOCK_H": block}, num_warps=max(block // 256, 4))


@triton.jit
def rms_norm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, stride_x, stride_y, eps, weight_offset,
                        BLOCK_H: tl.constexpr, SCALE_IN_FP32: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                        INTERPRETED: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    if SCALE_IN_FP32:
        y = x * rstd
        if HAS_WEIGHT:
            y = y * (tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + weight_offset)
    else:
        normed = launch.rounded(x * rstd, x_ptr.dtype.element_ty, INTERPRETED).to(tl.float32)
        y = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) * normed
    tl.store(y_ptr + row * stride_y + cols, launch.rounded(y, y_ptr.dtype.element_ty, INTERPRETED), mask=mask)


@triton.jit
def rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, n_cols, rows_per_program,
                        stride_dy, stride_x, stride_dx, weight_offset,
                        BLOCK_H: tl.constexpr, WEIGHT_GRAD: tl.constexpr, SCALE_IN_FP32: tl.constexpr,
                        HAS_WEIGHT: tl.constexpr, INTERPRETED: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < n_cols
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    dy_ptr += first.to(tl.int64) * stride_dy
    x_ptr += first.to(tl.int64) * stride_x
    dx_ptr += first.to(tl.int64) * stride_dx
    rstd_ptr += first
    for _ in range(first, last):
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr)
        normed = x * rstd
        if WEIGHT_GRAD:
            if SCALE_IN_FP32:
                dw += dy * normed
            else:
                dw += dy * launch.rounded(normed, x_ptr.dtype.element_ty, INTERPRETED).to(tl.float32)
        # w read per row (from cache) rather than held across the loop: wide rows leave no registers for it.
        if HAS_WEIGHT:
            dn = dy * (tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32) + weight_offset)
        else:
            dn = dy
        dx = rstd * (dn - normed * (tl.sum(dn * normed, axis=0) / n_cols))
        tl.store(dx_ptr + cols, launch.rounded(dx, dx_ptr.dtype.element_ty, INTERPRETED), mask=mask)
        dy_ptr += stride_dy
        x_ptr += stride_x
        dx_ptr += stride_dx
        rstd_ptr += 1
    if WEIGHT_GRAD:
        tl.store(dw_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


def forward(x2, weight, eps, y2, scale_in_fp32=False, weight_offset=0.0):
    """Writes y into `y2` for the rows of the 2-D `x2` (unit stride along a row) and returns their fp32 rstd.
    `weight` None (no scale) only with `scale_in_fp32`; the Llama order ignores `weight_offset`."""
    rows, cols = x2.shape
    rstd = torch.empty(rows, dtype=torch.float32, device=x2.device)
    config = row_config(cols)
    rms_norm_fwd_kernel[(rows,)](x2, x2 if weight is None else weight, y2, rstd, cols, x2.stride(0), y2.stride(0),
                                 eps, weight_offset, SCALE_IN_FP32=scale_in_fp32, HAS_WEIGHT=weight is not None,
                                 INTERPRETED=launch.interpreting(), num_warps=config.num_warps, **config.kwargs)
    return rstd


def backward(grad_y2, x2, weight, rstd, weight_grad: bool, scale_in_fp32=False, weight_offset=0.0):
    """(dx, dw or None) for the rows of `x2`; dw in fp32."""
    rows, cols = x2.shape
    grad_x = torch.empty((rows, cols), dtype=x2.dtype, device=x2.device)
    programs = max(1, min(rows, launch.target_programs(x2.device)))
    rows_per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, rows_per_program) if rows else 1
    partial = torch.empty((programs, cols), dtype=torch.float32, device=x2.device) if weight_grad else grad_x
    config = row_config(cols)
    rms_norm_bwd_kernel[(programs,)](grad_y2, x2, x2 if weight is None else weight, rstd, grad_x, partial, rows, cols,
                                     rows_per_program, grad_y2.stride(0), x2.stride(0), grad_x.stride(0),
                                     weight_offset, WEIGHT_GRAD=weight_grad, SCALE_IN_FP32=scale_in_fp32,
                                     HAS_WEIGHT=weight is not None, INTERPRETED=launch.interpreting(),
                                     num_warps=config.num_warps, **config.kwargs)
    return grad_x, partial.sum(0) if weight_grad else None
