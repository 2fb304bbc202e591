"""Triton kernels for `pyprefopt.fused_linear_logprobs` (GPU path).

The logits are `out_scale * z`, or with soft-capping (`SOFTCAP`, Gemma's final logit softcapping)
`out_scale * tanh(in_scale * z)`, of `z = h @ W.T + b`: the two constants of a
`pyprefopt.fused_linear_logprobs.LogitTransform`, which folds the logit scale, the cap and the temperature.

Forward: each program owns a block of tokens and a slice of the vocabulary; it computes logits tiles
`h @ W.T` in registers (fp32 accumulation), folds them into an online log-sum-exp and picks the label's
logit. No logits tile ever reaches global memory (Cut Cross-Entropy, Wijmans et al. 2024). The partial
(max-shifted sum, max) pairs of the vocabulary slices are combined by a log-sum-exp over slices.

Backward: each program recomputes one `[BLOCK_N, BLOCK_V]` logits tile, turns it into the gradient
`g * (onehot(y) - p) * d logits / d z` in registers (the constant `out_scale` uncapped,
`out_scale * in_scale * (1 - tanh^2)` capped) and accumulates `dH += dZ @ W_tile` and
`dW_tile += dZ.T @ H` into fp32 buffers with atomics; flags skip the weight/bias terms of a frozen head.

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
def _tanh(x):
    """fp32 tanh within about an ulp: Triton has no tanh, and `2 * sigmoid(2x) - 1` loses all relative accuracy
    as x -> 0. Both branches are `m - m * r` with one division:
    |x| < 1: m = x, r = 1 - tanh(x) / x = x^2 N(x^2) / D(x^2) from the [7/6] Pade approximant of tanh (Lambert's
      continued fraction), whose own relative error there is below 1e-11;
    |x| >= 1: m = sign(x), r = 2e / (1 + e) with e = exp(-2|x|) <= 0.14, which cannot overflow and leaves the
      result near 1 a single rounding from exact."""
    x2 = x * x
    e = tl.exp(-2.0 * tl.abs(x))
    pade = x2 < 1.0
    num = tl.where(pade, x2 * (45045.0 + x2 * (2772.0 + x2 * 27.0)), 2.0 * e)
    den = tl.where(pade, 135135.0 + x2 * (62370.0 + x2 * (3150.0 + x2 * 28.0)), 1.0 + e)
    m = tl.where(pade, x, tl.where(x < 0.0, -1.0, 1.0))
    return tl.fma(-m, num / den, m)


@triton.jit
def _capped_dlogp_dz(x, lse, g, is_label, out_scale):
    """d logp / d z of one capped logit, times the upstream gradient: with t = tanh(x), x = in_scale * z, the logit
    out_scale * t and `g` already `g_t * out_scale * in_scale`, it is g * (1[v == y] - p) * (1 - t^2).

    One function of one element, so that under `tl.map_elementwise` the tanh, p and the slope live in scalars
    rather than as tiles side by side (the slope and p each a tile's worth of registers would cost the frozen
    backward a resident program per SM). p = exp(out_scale * t - lse) takes the logit through an fma, rounded
    once with the subtraction of lse; 1 - t^2 is one rounding (t near 1 would cancel), and the clamp at 0 only
    turns t = -1 outside the vocabulary (x = -inf) into a slope of 0."""
    t = _tanh(x)
    p = tl.exp(tl.fma(t, out_scale, -lse))
    return g * tl.where(is_label, 1.0 - p, -p) * tl.maximum(tl.fma(-t, t, 1.0), 0.0)


@triton.jit
def _logits_tile(
    h_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, n_hidden, stride_h, stride_w, out_scale, in_scale,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, PER_ELEMENT_TANH: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    """fp32 logits `out_scale * z` (SOFTCAP: `out_scale * tanh(in_scale * z)`) of `z = h[offs_n] @ w[offs_v].T
    + b[offs_v]`, -inf outside the vocabulary.

    PER_ELEMENT_TANH evaluates the tanh element by element (`tl.map_elementwise`): taken over the whole tile, each of
    its temporaries is a tile's worth of registers (32 per thread at 64x128), and the capped kernels fit fewer
    programs per SM. The interpreter has no map_elementwise and runs the same function on the tile."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, n_hidden, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < n_hidden
        h = tl.load(h_ptr + offs_n[:, None] * stride_h + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_ptr + offs_v[:, None] * stride_w + offs_d[None, :],
                    mask=mask_v[:, None] & mask_d[None, :], other=0.0)
        if DOT_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = dot(h, tl.trans(w), acc, IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        if PER_ELEMENT_TANH:
            acc = tl.map_elementwise(_tanh, acc * in_scale)
        else:
            acc = _tanh(acc * in_scale)
    acc = acc * out_scale
    return tl.where(mask_v[None, :], acc, float("-inf"))


@triton.jit
def fused_linear_logprobs_fwd_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, part_max_ptr, part_sum_ptr, label_logit_ptr,
    n_tokens, n_vocab, n_hidden, stride_h, stride_w, vocab_per_split, out_scale, in_scale,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, PER_ELEMENT_TANH: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_tokens
    y = tl.load(y_ptr + offs_n, mask=mask_n, other=-1)
    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    label_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_start = split * vocab_per_split
    v_end = tl.minimum(v_start + vocab_per_split, n_vocab)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, n_hidden, stride_h, stride_w,
                         out_scale, in_scale, HAS_BIAS, SOFTCAP, PER_ELEMENT_TANH, BLOCK_N, BLOCK_V, BLOCK_D,
                         DOT_FP32, IEEE)
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
        label_logit += tl.sum(tl.where(offs_v[None, :] == y[:, None], z, 0.0), axis=1)
    out = split * n_tokens + offs_n
    tl.store(part_max_ptr + out, run_max, mask=mask_n)
    tl.store(part_sum_ptr + out, run_sum, mask=mask_n)
    tl.store(label_logit_ptr + out, label_logit, mask=mask_n)


@triton.jit
def fused_linear_logprobs_bwd_kernel(
    h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, dh_ptr, dw_ptr, db_ptr,
    n_tokens, n_vocab, n_hidden, stride_h, stride_w, out_scale, in_scale,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, PER_ELEMENT_TANH: tl.constexpr, HIDDEN_GRAD: tl.constexpr,
    WEIGHT_GRAD: tl.constexpr, BIAS_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < n_tokens
    mask_v = offs_v < n_vocab
    # Capped, the tile is the tanh's argument x = in_scale * z and the whole gradient is formed from it element by
    # element (_capped_dlogp_dz); uncapped, the logits out_scale * z.
    z = _logits_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, mask_n, mask_v, n_hidden, stride_h, stride_w,
                     in_scale if SOFTCAP else out_scale, in_scale, HAS_BIAS, False, False, BLOCK_N, BLOCK_V,
                     BLOCK_D, DOT_FP32, IEEE)
    lse = tl.load(lse_ptr + offs_n, mask=mask_n, other=0.0)
    y = tl.load(y_ptr + offs_n, mask=mask_n, other=-1)
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0) * out_scale
    is_label = offs_v[None, :] == y[:, None]
    if SOFTCAP:
        g = g * in_scale
        if PER_ELEMENT_TANH:
            dz = tl.map_elementwise(_capped_dlogp_dz, z, lse[:, None], g[:, None], is_label, out_scale)
        else:
            dz = _capped_dlogp_dz(z, lse[:, None], g[:, None], is_label, out_scale)
    else:
        # d logp_t / d z_tv = (1[v == y_t] - p_tv) * out_scale, scaled by the upstream gradient g_t.
        dz = g[:, None] * (tl.where(is_label, 1.0, 0.0) - tl.exp(z - lse[:, None]))
    dz = tl.where(mask_n[:, None] & mask_v[None, :], dz, 0.0)
    if BIAS_GRAD:
        tl.atomic_add(db_ptr + offs_v, tl.sum(dz, axis=0), mask=mask_v)
    if DOT_FP32:
        dz_op = dz
    else:
        dz_op = dz.to(h_ptr.dtype.element_ty)
    for d0 in range(0, n_hidden, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < n_hidden
        if HIDDEN_GRAD:
            w = tl.load(w_ptr + offs_v[:, None] * stride_w + offs_d[None, :],
                        mask=mask_v[:, None] & mask_d[None, :], other=0.0)
            if DOT_FP32:
                w = w.to(tl.float32)
            dh = dot(dz_op, w, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32), IEEE)
            tl.atomic_add(dh_ptr + offs_n[:, None] * n_hidden + offs_d[None, :], dh,
                          mask=mask_n[:, None] & mask_d[None, :])
        if WEIGHT_GRAD:
            h = tl.load(h_ptr + offs_n[:, None] * stride_h + offs_d[None, :],
                        mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            if DOT_FP32:
                h = h.to(tl.float32)
            dw = dot(tl.trans(dz_op), h, tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32), IEEE)
            tl.atomic_add(dw_ptr + offs_v[:, None] * n_hidden + offs_d[None, :], dw,
                          mask=mask_v[:, None] & mask_d[None, :])


def _config(block_n: int, block_v: int, block_d: int = 32, programs_per_sm: int | None = None) -> triton.Config:
    """A tile at 8 warps (64-wide reduction steps at 4 warps spill); `programs_per_sm`: the resident programs its
    registers are budgeted for (`maxnreg`, where `budgeted`), None to leave the count to ptxas."""
    maxnreg = tuning.register_budget(programs_per_sm, 8) if programs_per_sm else None
    return triton.Config({"BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_D": block_d}, num_warps=8, maxnreg=maxnreg)


# Tile configs for the GPU autotuner, per device family and input element size. Every one is compiled ahead of
# time for its family's target in tests/test_triton_aot.py, which reports registers, shared memory and resident
# programs per SM, asserts zero spills and that the soft-capped frozen backward keeps the plain one's resident
# programs. fp32 tiles take twice the registers of 16-bit ones: above 64x64 they spill. Outside Hopper the
# backward steps their reduction 16 wide, where 32-wide steps spill in the frozen head's; on Hopper 16-wide steps
# spill in the trained head's.
TILES = {2: [_config(64, 64), _config(128, 64), _config(64, 128)], 4: [_config(64, 64)]}
FORWARD_CONFIGS = {
    # Every family the same tiles, unbudgeted: a register budget that holds the soft-capped forward to the plain
    # one's resident programs spills its epilogue. sm_120 (Ampere's mma, Ada's 100 KiB): the 64x128 tile only, the
    # capped forward spills at 128x64, and at 64x64 on unaligned operands.
    **dict.fromkeys(("sm_80", "sm_86", "sm_90", "sm_100"), TILES),
    "sm_120": {2: [_config(64, 128)], 4: TILES[4]},
}
FP32_BACKWARD = [_config(64, 64, block_d=16)]
# Register budgets hold the soft-capped frozen head's backward to the resident programs the plain one reaches on its
# own: left to ptxas, the capped tile epilogue takes registers past them and loses a resident program, which that
# kernel (bound by its atomics) pays for in full. Plain and trained launches run unbudgeted (the trained backward
# spills under the 64x64 budget), and so do unaligned ones (see `budgeted`).
BACKWARD_CONFIGS = {
    # sm_86/89: the sm_80 tiles; registers bind each tile's resident programs before their 100 KiB of shared
    # memory does. Capped and plain reach the same resident programs there unbudgeted.
    **dict.fromkeys(("sm_80", "sm_86"), {2: TILES[2], 4: FP32_BACKWARD}),
    "sm_90": {2: [_config(64, 64, programs_per_sm=4), _config(128, 64, programs_per_sm=2),
                  _config(64, 128, programs_per_sm=2)], 4: TILES[4]},
    # sm_100 (accumulators in tensor memory): the 64x128 tile only; 128x64 spills there, and at 64x64 the capped
    # backward cannot hold the plain one's resident programs without spilling.
    "sm_100": {2: [_config(64, 128)], 4: FP32_BACKWARD},
    "sm_120": {2: [_config(64, 64), _config(128, 64, programs_per_sm=2), _config(64, 128, programs_per_sm=2)],
               4: FP32_BACKWARD},
}
# The interpreter runs one config (autotuning there only multiplies test time).
INTERPRETER_CONFIG = {"BLOCK_N": 32, "BLOCK_V": 32, "BLOCK_D": 16}
# Register budgets are set for the code Triton specialises for 16-byte aligned operands and hidden sizes that
# are multiples of 16 (vectorised loads); anything else loads element by element, needs more registers and runs
# without a budget.
ALIGNMENT = 16


def aligned(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a launch on these (contiguous) operands gets Triton's 16-byte aligned specialisation."""
    return (hidden.shape[1] * hidden.element_size()) % ALIGNMENT == 0 and all(
        t.data_ptr() % ALIGNMENT == 0 for t in (hidden, weight))


def budgeted(args: dict) -> bool:
    """Whether a launch with these kernel arguments runs its configs' register budgets: the soft-capped frozen
    head's backward on aligned operands."""
    return (args["SOFTCAP"] and not args.get("WEIGHT_GRAD", True) and aligned(args["h_ptr"], args["w_ptr"]))


def config_variant(hidden: torch.Tensor) -> int:
    """The key of a launch's configs in a family's table: 2 for 16-bit inputs, 4 for fp32 (and wider) ones."""
    return min(hidden.element_size(), 4)


def without_register_budget(config: triton.Config) -> triton.Config:
    return triton.Config(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def _prune(configs, named_args, **kwargs):
    # Triton hands the launch's positional arguments in `named_args` and its keyword ones in `kwargs`.
    if budgeted({**named_args, **kwargs}):
        return configs
    return [without_register_budget(c) for c in configs]


# A capped head is tuned apart (SOFTCAP in the key): its tile epilogue (the tanh) changes the best config.
_forward_kernel = launch.TunedKernel(fused_linear_logprobs_fwd_kernel, FORWARD_CONFIGS, INTERPRETER_CONFIG,
                                     key=["n_vocab", "n_hidden", "SOFTCAP"], prune=_prune)
# The backward accumulates with atomics: every autotuning trial must start from zeroed buffers. A frozen and a
# trained head are tuned apart too: different kernels, and only the frozen one's configs keep their budgets.
_backward_kernel = launch.TunedKernel(fused_linear_logprobs_bwd_kernel, BACKWARD_CONFIGS, INTERPRETER_CONFIG,
                                      key=["n_vocab", "n_hidden", "SOFTCAP", "WEIGHT_GRAD"], prune=_prune,
                                      reset_to_zero=["dh_ptr", "dw_ptr", "db_ptr"])


# Vocabulary slices are whole multiples of the largest BLOCK_V, so every config tiles them exactly.
VOCAB_SLICE_ALIGN = 128


def _transform_args(transform) -> dict:
    """The kernels' arguments for a `LogitTransform` (its attributes only: this module never imports it).
    `in_scale` is unused uncapped, where the transform has none. A Triton without map_elementwise (older releases)
    takes the tanh over the tile."""
    return {"out_scale": transform.out_scale, "in_scale": transform.in_scale if transform.capped else 1.0,
            "SOFTCAP": transform.capped,
            "PER_ELEMENT_TANH": transform.capped and hasattr(tl, "map_elementwise") and not launch.interpreting()}


def forward(hidden, weight, bias, labels, transform):
    """`(logp [N], lse [N])` fp32 for rows whose labels are all valid; `transform` a `LogitTransform`."""
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    n_tokens, n_hidden = hidden.shape
    n_vocab = weight.shape[0]
    # Split the vocabulary so that few tokens still fill the GPU.
    splits = max(1, min(triton.cdiv(n_vocab, 4 * VOCAB_SLICE_ALIGN),
                        triton.cdiv(launch.target_programs(hidden.device), triton.cdiv(n_tokens, 64))))
    vocab_per_split = triton.cdiv(triton.cdiv(n_vocab, splits), VOCAB_SLICE_ALIGN) * VOCAB_SLICE_ALIGN
    splits = triton.cdiv(n_vocab, vocab_per_split)
    part = torch.empty(3, splits, n_tokens, dtype=torch.float32, device=hidden.device)
    _forward_kernel.launch(
        lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_N"]), splits), hidden.device, config_variant(hidden),
        h_ptr=hidden, w_ptr=weight, b_ptr=bias if bias is not None else hidden, y_ptr=labels,
        part_max_ptr=part[0], part_sum_ptr=part[1], label_logit_ptr=part[2],
        n_tokens=n_tokens, n_vocab=n_vocab, n_hidden=n_hidden, stride_h=hidden.stride(0),
        stride_w=weight.stride(0), vocab_per_split=vocab_per_split,
        HAS_BIAS=bias is not None, **_transform_args(transform), **launch.dot_flags(hidden.dtype),
    )
    part_max, part_sum, label_logit = part
    lse = torch.logsumexp(part_max + part_sum.log(), dim=0)
    return label_logit.sum(0) - lse, lse


def backward(grad_logp, hidden, weight, bias, labels, lse, transform, need_hidden, need_weight, need_bias):
    """fp32 `(grad_hidden, grad_weight, grad_bias)`, None where not needed."""
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    n_tokens, n_hidden = hidden.shape
    n_vocab = weight.shape[0]
    dev = hidden.device
    grad_hidden = torch.zeros(n_tokens, n_hidden, dtype=torch.float32, device=dev) if need_hidden else None
    grad_weight = torch.zeros(n_vocab, n_hidden, dtype=torch.float32, device=dev) if need_weight else None
    grad_bias = torch.zeros(n_vocab, dtype=torch.float32, device=dev) if need_bias else None
    # A pointer for the outputs a frozen head does not write. Its own buffer, never `lse`: the autotuner
    # zeroes every output pointer (reset_to_zero) before each trial.
    unused = torch.empty(1, dtype=torch.float32, device=dev)
    _backward_kernel.launch(
        lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_N"]), triton.cdiv(n_vocab, meta["BLOCK_V"])), dev,
        config_variant(hidden),
        h_ptr=hidden, w_ptr=weight, b_ptr=bias if bias is not None else hidden, y_ptr=labels, lse_ptr=lse,
        g_ptr=grad_logp.float().contiguous(),
        dh_ptr=grad_hidden if need_hidden else unused, dw_ptr=grad_weight if need_weight else unused,
        db_ptr=grad_bias if need_bias else unused,
        n_tokens=n_tokens, n_vocab=n_vocab, n_hidden=n_hidden, stride_h=hidden.stride(0),
        stride_w=weight.stride(0), **_transform_args(transform),
        HAS_BIAS=bias is not None, HIDDEN_GRAD=need_hidden, WEIGHT_GRAD=need_weight, BIAS_GRAD=need_bias,
        **launch.dot_flags(hidden.dtype),
    )
    return grad_hidden, grad_weight, grad_bias
