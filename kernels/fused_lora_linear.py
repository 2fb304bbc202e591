"""Triton kernels for `pyprefopt.lora` (GPU path): a LoRA linear layer whose big output is written once.

    Y  = X @ W.T (+ bias) + s * (X' @ A.T) @ B.T          X' = dropout(X), or X itself
    dX = dY @ W + s * (dY @ B) @ A                        (dX' separately when X' is not X)
    dA = s * (dY @ B).T @ X'          dB = s * dY.T @ (X' @ A.T)          no dW: the base is frozen

Kernels (all accumulate in fp32):
- `lora_down_kernel`: `S = X' @ A.T` ([tokens, r], fp32), split over the reduction with atomics so that a
  few token blocks still fill the GPU.
- `lora_main_kernel`: the big GEMM `X @ W.T` whose epilogue adds `s * S @ B.T` and the bias before the one
  store of Y (as LoRAFusion, Zhu et al. 2025). The backward reuses it for `dX = dY @ W + s * T @ A`: only
  the strides of W and of the low-rank factor change. The base tile is either loaded (16-bit/fp32 W) or
  decoded from bitsandbytes NF4 codes in the load path (W4A16): packed bytes (high nibble first), the
  16-entry NF4 table, per-block absmax, optionally itself uint8-quantised (double quantisation).
- `lora_dy_kernel`: one read of dY for both `T = dY @ B` and `dB.T = S.T @ dY`.
- `lora_grad_kernel`: `dA = s * T.T @ X'`, split over tokens with atomics.

Under `TRITON_INTERPRET=1` the kernels run on CPU tensors; the interpreter's `tl.dot` is wrong on bf16
operands (triton 3.9), so `DOT_FP32` upcasts the tiles there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyprefopt.kernels import triton_launch as launch
from pyprefopt.kernels import tuning
from pyprefopt.kernels.triton_launch import dot


@triton.jit
def _load_base_tile(
    w_ptr, codes_ptr, absmax_ptr, absmax_code_ptr, nested_code_ptr, nested_absmax_ptr, nf4_table_ptr,
    offs_k, offs_n, mask, stride_wk, stride_wn, blocksize, nested_blocksize, nested_offset,
    NF4: tl.constexpr, NESTED: tl.constexpr, OUT_DTYPE: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """The `[BLOCK_K, BLOCK_N]` tile `W[offs_k, offs_n]` of the logical base matrix, in `OUT_DTYPE`.

    The strides address the row-major W, so for NF4 `offs_k * stride_wk + offs_n * stride_wn` is the
    element's flat index in bitsandbytes' packing whichever way the GEMM walks W."""
    flat = offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
    if NF4:
        packed = tl.load(codes_ptr + flat // 2, mask=mask, other=0)
        nibble = tl.where(flat % 2 == 0, packed >> 4, packed & 15).to(tl.int32)
        value = tl.load(nf4_table_ptr + nibble)
        block = flat // blocksize
        if NESTED:
            absmax_code = tl.load(absmax_code_ptr + block, mask=mask, other=0).to(tl.int32)
            absmax = tl.load(nested_code_ptr + absmax_code) * tl.load(
                nested_absmax_ptr + block // nested_blocksize, mask=mask, other=0.0) + nested_offset
        else:
            absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
        # bitsandbytes decodes in fp32 and rounds once to the weight dtype: the same here.
        return launch.rounded(value * absmax, OUT_DTYPE, INTERPRETED)
    return tl.load(w_ptr + flat, mask=mask, other=0.0).to(OUT_DTYPE)


@triton.jit
def lora_main_kernel(
    x_ptr, w_ptr, codes_ptr, absmax_ptr, absmax_code_ptr, nested_code_ptr, nested_absmax_ptr, nf4_table_ptr,
    bias_ptr, s_ptr, l_ptr, y_ptr,
    M, N, K, R, stride_xm, stride_wk, stride_wn, stride_lr, stride_ln, stride_ym,
    blocksize, nested_blocksize, nested_offset, scale,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, NF4: tl.constexpr, NESTED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    """`Y[M, N] = X[M, K] @ Wt[K, N] + bias + scale * S[M, R] @ L[R, N]`, one store of Y."""
    # Grouped ordering: GROUP_M row blocks sweep the columns together and share W tiles in L2.
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * blocks_n)
    first_m = group * GROUP_M
    group_size = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * blocks_n)) % group_size
    pid_n = (pid % (GROUP_M * blocks_n)) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    compute_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        w = _load_base_tile(w_ptr, codes_ptr, absmax_ptr, absmax_code_ptr, nested_code_ptr, nested_absmax_ptr,
                            nf4_table_ptr, offs_k, offs_n, mask_k[:, None] & mask_n[None, :], stride_wk, stride_wn,
                            blocksize, nested_blocksize, nested_offset, NF4, NESTED, compute_dtype, DOT_FP32)
        if DOT_FP32:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = dot(x, w, acc, IEEE)
    if HAS_LORA:
        # The epilogue: the rank-r update joins the accumulator before Y is written.
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        s = tl.load(s_ptr + offs_m[:, None] * R + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        low = tl.load(l_ptr + offs_r[:, None] * stride_lr + offs_n[None, :] * stride_ln,
                      mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        s = s * scale
        if DOT_FP32:
            low = low.to(tl.float32)
        else:
            s = s.to(compute_dtype)
        acc = dot(s, low, acc, IEEE)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :],
             launch.rounded(acc, y_ptr.dtype.element_ty, DOT_FP32), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def lora_down_kernel(
    p_ptr, q_ptr, out_ptr, M, K, R, stride_pm, stride_qk, stride_qr, k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    """`out[M, R] += P[M, K] @ Q[K, R]` over one slice of K (fp32 `out`, zeroed by the caller)."""
    pid_m = tl.program_id(0)
    k_start = tl.program_id(1) * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_end
        p = tl.load(p_ptr + offs_m[:, None] * stride_pm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        q = tl.load(q_ptr + offs_k[:, None] * stride_qk + offs_r[None, :] * stride_qr,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if DOT_FP32:
            p = p.to(tl.float32)
            q = q.to(tl.float32)
        acc = dot(p, q, acc, IEEE)
    tl.atomic_add(out_ptr + offs_m[:, None] * R + offs_r[None, :], acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def lora_dy_kernel(
    dy_ptr, b_ptr, s_ptr, t_ptr, db_ptr, M, N, R, stride_dym, stride_bn, n_per_split, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    """One pass over dY: `T[M, R] += dY @ B` (this program's slice of N) and `dB[N, R] += scale * dY.T @ S`.

    T and dB are fp32 and zeroed by the caller; dB is written as dB (row n, column r)."""
    pid_m = tl.program_id(0)
    n_start = tl.program_id(1) * n_per_split
    n_end = tl.minimum(n_start + n_per_split, N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    compute_dtype = dy_ptr.dtype.element_ty
    s = tl.load(s_ptr + offs_m[:, None] * R + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
    s = s * scale
    if not DOT_FP32:
        s = s.to(compute_dtype)
    s_t = tl.trans(s)
    t_acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :], mask=mask_m[:, None] & mask_n[None, :],
                     other=0.0)
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :],
                    other=0.0)
        if DOT_FP32:
            dy = dy.to(tl.float32)
            b = b.to(tl.float32)
        t_acc = dot(dy, b, t_acc, IEEE)
        db_t = dot(s_t, dy, tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32), IEEE)
        tl.atomic_add(db_ptr + offs_n[None, :] * R + offs_r[:, None], db_t, mask=mask_r[:, None] & mask_n[None, :])
    tl.atomic_add(t_ptr + offs_m[:, None] * R + offs_r[None, :], t_acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def lora_grad_kernel(
    t_ptr, x_ptr, da_ptr, M, K, R, stride_xm, m_per_split, scale,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    """`dA[R, K] += scale * T[M, R].T @ X[M, K]` over this program's slice of tokens (fp32 dA, zeroed)."""
    pid_k = tl.program_id(0)
    m_start = tl.program_id(1) * m_per_split
    m_end = tl.minimum(m_start + m_per_split, M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    mask_r = offs_r < R
    compute_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_end
        t = tl.load(t_ptr + offs_m[None, :] * R + offs_r[:, None], mask=mask_r[:, None] & mask_m[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        if DOT_FP32:
            x = x.to(tl.float32)
        else:
            t = t.to(compute_dtype)
        acc = dot(t, x, acc, IEEE)
    tl.atomic_add(da_ptr + offs_r[:, None] * K + offs_k[None, :], acc * scale, mask=mask_r[:, None] & mask_k[None, :])


# Tile configs for the GPU autotuner, per device family. Every kept one is compiled ahead of time for its family's
# target in tests/test_triton_aot.py, which reports registers and asserts zero spills. 8 warps throughout: at 4
# warps 16-bit 64x64 tiles already sit at the register limit, and fp32 inputs (IEEE fp32 dots run on the FMA units
# and unroll into registers) spill. Every family runs the same tiles: registers, not shared memory, bind their
# resident programs, on the 100 KiB SMs of sm_86/89 and sm_120 too.
MAIN_TILES = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=8, num_stages=3)
    for bm, bn in ((128, 128), (128, 64), (64, 128), (64, 64), (64, 32))
]
# The skinny kernels stream one big operand: tiles along it, the whole rank block across.
DOWN_TILES = [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=8, num_stages=2)
              for bm, bk in ((128, 64), (64, 64), (32, 64))]
DY_TILES = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=8, num_stages=2)
            for bm, bn in ((128, 64), (64, 64), (32, 64))]
GRAD_TILES = [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=8, num_stages=2)
              for bm, bk in ((64, 128), (64, 64), (64, 32))]
# sm_100: the main kernel without the 64x128 tile, whose NF4 decode spills there.
MAIN_CONFIGS = dict(dict.fromkeys(tuning.FAMILY_NAMES, MAIN_TILES),
                    sm_100=[c for c in MAIN_TILES if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) != (64, 128)])
DOWN_CONFIGS = dict.fromkeys(tuning.FAMILY_NAMES, DOWN_TILES)
# sm_86/89: the dY kernel without the 64x64 tile, which spills there at rank 64.
DY_CONFIGS = dict(dict.fromkeys(tuning.FAMILY_NAMES, DY_TILES),
                  sm_86=[c for c in DY_TILES if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) != (64, 64)])
GRAD_CONFIGS = dict.fromkeys(tuning.FAMILY_NAMES, GRAD_TILES)
# The largest tile (BLOCK_M x BLOCK_N or BLOCK_K) kept, by (fp32 inputs?, rank block above 16?), from
# the ptxas reports: wider rank blocks and fp32 tiles take more registers. Rank blocks of 32 get the
# rank-64 budget (compiled: 16 and 64).
TILE_BUDGETS = {
    "main": {(False, False): 128 * 128, (False, True): 128 * 64, (True, False): 64 * 64, (True, True): 64 * 32},
    "skinny": {(False, False): 128 * 64, (False, True): 64 * 64, (True, False): 128 * 64, (True, True): 32 * 64},
}
# The interpreter runs one config each (autotuning there only multiplies test time).
INTERPRETER_CONFIGS = {
    "main": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2},
    "down": {"BLOCK_M": 16, "BLOCK_K": 32},
    "dy": {"BLOCK_M": 16, "BLOCK_N": 32},
    "grad": {"BLOCK_M": 16, "BLOCK_K": 32},
}
MAX_BLOCK_R = 64


def kept_configs(family: str, configs, element_size: int, block_r: int):
    """The configs of a kernel `family` ("main" or "skinny") worth timing for `element_size`-byte inputs
    and rank block `block_r`: those whose tile fits the family's register budget."""
    budget = TILE_BUDGETS[family][(element_size > 2, block_r > 16)]
    return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs.get("BLOCK_N", c.kwargs.get("BLOCK_K")) <= budget]


# The streamed big operand of each kernel, whose element size sets the register budget.
_STREAMED = ("x_ptr", "p_ptr", "dy_ptr")


def _prune(family):
    def prune(configs, named_args, **kwargs):
        # Triton hands the launch's positional arguments in `named_args` and its keyword ones in `kwargs`.
        launch_args = {**named_args, **kwargs}
        streamed = next(launch_args[name] for name in _STREAMED if name in launch_args)
        return kept_configs(family, configs, streamed.element_size(), launch_args["BLOCK_R"])

    return prune


_KERNELS = {
    "main": launch.TunedKernel(lora_main_kernel, MAIN_CONFIGS, INTERPRETER_CONFIGS["main"], ["N", "K", "R"],
                               _prune("main")),
    # Atomic accumulators: every autotuning trial must start from zeroed buffers.
    "down": launch.TunedKernel(lora_down_kernel, DOWN_CONFIGS, INTERPRETER_CONFIGS["down"], ["K", "R"],
                               _prune("skinny"), reset_to_zero=["out_ptr"]),
    "dy": launch.TunedKernel(lora_dy_kernel, DY_CONFIGS, INTERPRETER_CONFIGS["dy"], ["N", "R"], _prune("skinny"),
                             reset_to_zero=["t_ptr", "db_ptr"]),
    "grad": launch.TunedKernel(lora_grad_kernel, GRAD_CONFIGS, INTERPRETER_CONFIGS["grad"], ["K", "R"],
                               _prune("skinny"), reset_to_zero=["da_ptr"]),
}


def _launch(name, grid, device, **kwargs):
    _KERNELS[name].launch(grid, device, **kwargs)


def block_r(rank: int) -> int:
    """The rank padded to a power of two of at least 16 (`tl.dot`'s smallest operand side)."""
    if not 1 <= rank <= MAX_BLOCK_R:
        raise ValueError(f"the Triton LoRA kernels support ranks 1..{MAX_BLOCK_R}, got r={rank}")
    return max(16, triton.next_power_of_2(rank))


def _splits(length: int, other_blocks: int, align: int, device: torch.device) -> tuple[int, int]:
    """(splits, per_split) cutting `length` into `align`-multiple slices so that `other_blocks * splits`
    programs fill `device`; every config's block divides `align`."""
    splits = max(1, min(triton.cdiv(length, align), triton.cdiv(launch.target_programs(device), other_blocks)))
    per_split = triton.cdiv(triton.cdiv(length, splits), align) * align
    return triton.cdiv(length, per_split), per_split


# The largest BLOCK_K/N/M of the skinny kernels' configs: their split slices are multiples of it.
SPLIT_ALIGN = 128


class DenseBase:
    """A 16-bit or fp32 base weight W [out, in] as the main kernel reads it."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight.contiguous()
        self.shape = tuple(weight.shape)

    def args(self, input_grad: bool, dummy: torch.Tensor) -> dict:
        out_features, in_features = self.shape
        # The forward GEMM walks W.T [K=in, N=out]; the input-gradient GEMM walks W [K=out, N=in].
        strides = (in_features, 1) if input_grad else (1, in_features)
        return dict(w_ptr=self.weight, codes_ptr=dummy, absmax_ptr=dummy, absmax_code_ptr=dummy,
                    nested_code_ptr=dummy, nested_absmax_ptr=dummy, nf4_table_ptr=dummy,
                    stride_wk=strides[0], stride_wn=strides[1], blocksize=1, nested_blocksize=1,
                    nested_offset=0.0, NF4=False, NESTED=False)


class NF4Base:
    """A bitsandbytes NF4 base weight (`pyprefopt.nf4.NF4Weight`), decoded tile by tile by the main kernel."""

    def __init__(self, weight):
        from pyprefopt import nf4

        if len(weight.shape) != 2:
            raise ValueError(f"the NF4 base must be a 2-D weight, got shape {weight.shape}")
        self.nf4 = weight
        self.shape = tuple(weight.shape)
        self.table = nf4.NF4_CODE.to(weight.device)

    def args(self, input_grad: bool, dummy: torch.Tensor) -> dict:
        out_features, in_features = self.shape
        w = self.nf4
        strides = (in_features, 1) if input_grad else (1, in_features)
        nested = w.nested
        return dict(w_ptr=dummy, codes_ptr=w.codes, nf4_table_ptr=self.table,
                    absmax_ptr=dummy if nested else w.absmax, absmax_code_ptr=w.absmax if nested else dummy,
                    nested_code_ptr=w.nested_code if nested else dummy,
                    nested_absmax_ptr=w.nested_absmax if nested else dummy,
                    stride_wk=strides[0], stride_wn=strides[1], blocksize=w.blocksize,
                    nested_blocksize=w.nested_blocksize if nested else 1,
                    nested_offset=float(w.nested_offset) if nested else 0.0, NF4=True, NESTED=nested)


def _main(x, base, input_grad, bias, s, low, low_strides, scale, out):
    """`out = x @ (W if input_grad else W.T) + bias + scale * s @ low`; `s=None` skips the LoRA epilogue."""
    m, k = x.shape
    n = out.shape[1]
    rank = s.shape[1] if s is not None else 1
    dummy = out
    _launch(
        "main", lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),), x.device,
        x_ptr=x, **base.args(input_grad, dummy), bias_ptr=bias if bias is not None else dummy,
        s_ptr=s if s is not None else dummy, l_ptr=low if low is not None else dummy, y_ptr=out,
        M=m, N=n, K=k, R=rank, stride_xm=x.stride(0), stride_lr=low_strides[0], stride_ln=low_strides[1],
        stride_ym=out.stride(0), scale=scale, HAS_BIAS=bias is not None, HAS_LORA=s is not None,
        BLOCK_R=block_r(rank), **launch.dot_flags(x.dtype),
    )
    return out


def forward(x, base, bias, lora_x, lora_a, lora_b, scale):
    """`(Y, S)`: Y [tokens, out] in x's dtype, S = lora_x @ A.T [tokens, r] in fp32 for the backward.

    x, lora_x: [tokens, in] (lora_x may be x); base: DenseBase or NF4Base; A [r, in], B [out, r]."""
    merged = lora_x is x
    x = x.contiguous()
    lora_x = x if merged else lora_x.contiguous()
    lora_a = lora_a.contiguous()
    lora_b = lora_b.contiguous()
    tokens, in_features = x.shape
    rank = lora_a.shape[0]
    s = torch.zeros(tokens, rank, dtype=torch.float32, device=x.device)
    # Splits sized for 64-token blocks (the configs' middle); any config tiles them.
    m_blocks = triton.cdiv(tokens, 64)
    splits, per_split = _splits(in_features, m_blocks, SPLIT_ALIGN, x.device)
    _launch("down", lambda meta: (triton.cdiv(tokens, meta["BLOCK_M"]), splits), x.device,
            p_ptr=lora_x, q_ptr=lora_a, out_ptr=s, M=tokens, K=in_features, R=rank, stride_pm=lora_x.stride(0),
            stride_qk=1, stride_qr=lora_a.stride(0), k_per_split=per_split, BLOCK_R=block_r(rank),
            **launch.dot_flags(x.dtype))
    y = torch.empty(tokens, base.shape[0], dtype=x.dtype, device=x.device)
    # Y's epilogue factor is B.T: element (r, n) = B[n, r].
    _main(x, base, False, bias, s, lora_b, (1, lora_b.stride(0)), scale, y)
    return y, s


def backward(grad_y, lora_x, base, lora_a, lora_b, s, scale, merge_lora_x_grad, need_x_grad, need_lora_grads):
    """`(dX, dX', dA, dB)` (fp32 dA, dB; dX, dX' in grad_y's dtype); None where not needed.

    merge_lora_x_grad: X' is X, so dX carries both terms from one kernel and dX' is None."""
    grad_y = grad_y.contiguous()
    lora_a = lora_a.contiguous()
    lora_b = lora_b.contiguous()
    tokens, out_features = grad_y.shape
    rank, in_features = lora_a.shape
    dev = grad_y.device
    flags = launch.dot_flags(grad_y.dtype)
    t = torch.zeros(tokens, rank, dtype=torch.float32, device=dev)
    grad_b = torch.zeros(out_features, rank, dtype=torch.float32, device=dev)
    m_blocks = triton.cdiv(tokens, 64)
    splits, per_split = _splits(out_features, m_blocks, SPLIT_ALIGN, grad_y.device)
    _launch("dy", lambda meta: (triton.cdiv(tokens, meta["BLOCK_M"]), splits), dev,
            dy_ptr=grad_y, b_ptr=lora_b, s_ptr=s, t_ptr=t, db_ptr=grad_b, M=tokens, N=out_features, R=rank,
            stride_dym=grad_y.stride(0), stride_bn=lora_b.stride(0), n_per_split=per_split, scale=scale,
            BLOCK_R=block_r(rank), **flags)
    grad_x = grad_lora_x = grad_a = None
    if need_x_grad:
        grad_x = torch.empty(tokens, in_features, dtype=grad_y.dtype, device=dev)
        # dX = dY @ W (+ s * T @ A in the epilogue when X' is X); A's element (r, n) = A[r, n].
        if merge_lora_x_grad:
            _main(grad_y, base, True, None, t, lora_a, (lora_a.stride(0), 1), scale, grad_x)
        else:
            _main(grad_y, base, True, None, None, None, (0, 0), scale, grad_x)
    if not merge_lora_x_grad:
        grad_lora_x = ((t * scale).to(grad_y.dtype) @ lora_a)
    if need_lora_grads:
        lora_x = lora_x.contiguous()
        grad_a = torch.zeros(rank, in_features, dtype=torch.float32, device=dev)
        k_blocks = triton.cdiv(in_features, 64)
        splits, per_split = _splits(tokens, k_blocks, SPLIT_ALIGN, grad_y.device)
        _launch("grad", lambda meta: (triton.cdiv(in_features, meta["BLOCK_K"]), splits), dev,
                t_ptr=t, x_ptr=lora_x, da_ptr=grad_a, M=tokens, K=in_features, R=rank, stride_xm=lora_x.stride(0),
                m_per_split=per_split, scale=scale, BLOCK_R=block_r(rank), **flags)
    return grad_x, grad_lora_x, grad_a, grad_b if need_lora_grads else None
