"""Per-token log-probs of labels straight from hidden states and the LM-head weight.

`fused_linear_logprobs(hidden, weight, labels)` equals
`log_softmax((hidden @ weight.T + bias) / temperature).gather(-1, labels)` but never holds the
`[tokens, vocab]` logits: tokens are cut into blocks, the vocabulary into tiles, and each tile is folded
into an online log-sum-exp (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax").
The logits may first be scaled and soft-capped as the model's own head does (`LogitTransform`).

Two kernels per device:
- CUDA: Triton kernels in `pyprefopt.kernels.fused_linear_logprobs` (matmul and reduction fused in
  registers, as in Cut Cross-Entropy, Wijmans et al. 2024); backward recomputes the tiles.
- CPU: the blocked PyTorch code below. For a frozen head (the LoRA case) the gradient w.r.t. the hidden
  state factorises,

      d logp_t / d h_t = s_ty W[y_t] - sum_v p_tv s_tv W_v    (s = d logits / d z: 1 / T for a plain head),

  and the second factor needs no upstream gradient, so the forward pass forms it while each tile's
  probabilities are at hand (one more GEMM, rescaled online like the normaliser) and the backward pass
  only scales it: two GEMMs in all, no recompute. A trained head needs the weight gradient, which the
  forward cannot form without the upstream gradient. Its forward keeps the first H tokens' logits in the
  buffer the weight gradient will be written to (weight-sized, and counted in the step's memory anyway):
  up to H tokens cost three GEMMs; tokens beyond them are recomputed in backward (four). The GEMMs go
  through `pyprefopt.cpu_linear` (oneDNN for large fp32 products, where torch's MKL path runs at half speed
  on AMD CPUs).

The per-token entropy H = -sum_v p_v log p_v (`statistics=("entropy",)`) is differentiable, for RL losses
with an entropy bonus: dH / dlogits_v = -p_v (log p_v + H), taken through the same tiles as the log-probs'
gradient by the blocked backward (on any device; the Triton kernels differentiate the log-probs only), and only
when the loss uses it: a frozen head's factorised backward stays as it is for an entropy logged as a metric.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.utils.weak import WeakIdKeyDictionary

from pyprefopt import backend as backend_choice
from pyprefopt import cpu_linear

# Bytes of fp32 logits one CPU tile may hold. oneDNN (pyprefopt.cpu_linear) writes each tile's GEMM to a fresh
# tensor and reorders the weight tile internally, so its transient memory grows with the tile while its speed
# stops growing well before: a few MiB is the knee.
CPU_TILE_BYTES = 4 * 2**20
CPU_TOKEN_BLOCK = 1024
# Per-token statistics `fused_linear_logprobs(..., statistics=...)` computes beside the log-probs.
STATISTICS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


class LogitTransform:
    """What a model does to its head's output `z = hidden @ W.T + b` before the softmax, in transformers' order:
    multiply by `logit_scale` (Cohere's `logit_scale`, Granite's 1 / `logits_scaling`, ...), soft-cap to
    `softcap * tanh(. / softcap)` (Gemma 2, 3 and 3n's `final_logit_softcapping`), then divide by the sampling
    `temperature` (TRL's, applied to the model's logits). In two constants:

        logits = out_scale * tanh(in_scale * z)   with in_scale = logit_scale / softcap, out_scale = softcap / T
        logits = out_scale * z                    uncapped, out_scale = logit_scale / T

    so an uncapped head is the plain head with a rescaled temperature, and a capped one has the derivative
    d logits / d z = slope * (1 - tanh(in_scale * z)^2) with slope = out_scale * in_scale = logit_scale / T.
    """

    def __init__(self, temperature: float = 1.0, softcap: float | None = None, logit_scale: float = 1.0):
        for name, value in (("temperature", temperature), ("softcap", softcap), ("logit_scale", logit_scale)):
            if value is None and name == "softcap":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite real number, got {value!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if softcap is not None and not softcap > 0:
            raise ValueError(f"softcap must be > 0 (or None for no soft-capping), got {softcap}")
        if logit_scale == 0:
            raise ValueError("logit_scale must not be 0: every logit would be 0 and the softmax uniform")
        self.capped = softcap is not None
        self.out_scale = float(softcap / temperature if self.capped else logit_scale / temperature)
        self.in_scale = float(logit_scale / softcap) if self.capped else None
        self.slope = float(logit_scale / temperature)

    def __repr__(self):
        return f"LogitTransform(out_scale={self.out_scale}, in_scale={self.in_scale})"

    @property
    def grad_factor(self) -> float:
        """The constant part of d logits / d z, folded into the upstream gradient: out_scale for an uncapped head;
        1 for a capped one, whose per-logit slope multiplies each tile's gradient instead."""
        return 1.0 if self.capped else self.out_scale

    def apply_(self, z: torch.Tensor, slope_out: torch.Tensor | None = None) -> torch.Tensor:
        """z <- logits(z) in place; with `slope_out` (capped only), d logits / d z is written there too."""
        if not self.capped:
            return z if self.out_scale == 1.0 else z.mul_(self.out_scale)
        z.mul_(self.in_scale).tanh_()
        if slope_out is not None:
            torch.mul(z, z, out=slope_out).sub_(1.0).mul_(-self.slope)
        return z.mul_(self.out_scale)

    def slope_from_logits_(self, logits: torch.Tensor) -> torch.Tensor:
        """d logits / d z from the transformed logits themselves, in place (capped only): tanh = logits /
        out_scale, so the backward pass of a kept tile needs no raw logits."""
        return logits.div_(self.out_scale).square_().sub_(1.0).mul_(-self.slope)


# Per trained fp32 CPU weight, the storage of the last weight gradient handed out for it (`weight_grad_buffer`).
_WEIGHT_GRAD_STORAGE = WeakIdKeyDictionary()


def weight_grad_buffer(weight: torch.Tensor, only_if_free: bool = False) -> torch.Tensor | None:
    """An fp32 tensor of `weight`'s shape and undefined contents, which the caller writes in full as the weight's
    gradient.

    A fresh [V, H] fp32 tensor costs a page fault per 4 KiB page on its first write (glibc maps large
    allocations anew each time), a sizeable share of a step at a real vocabulary. So for an fp32 CPU weight,
    whose gradient is this very tensor, the storage handed out last time for the same weight is reused once
    nobody else holds it (the usual case once the optimizer has stepped and `zero_grad()` set the gradient to
    None): a reference-count check, as PyTorch's CUDA-graph trees make for their output buffers. A gradient
    still held (accumulation, a caller's reference) gets a fresh tensor. The storage lives as long as the weight:
    one weight-sized buffer stays allocated between steps.
    Other dtypes (their fp32 gradient is converted, then dropped) and devices get a fresh tensor each time.

    `only_if_free`: the storage handed out last time if it is free, else None (never a fresh tensor): none yet
    (before the first backward), still held (by a pending forward, or as a gradient being accumulated), or not an
    fp32 CPU weight. A forward pass takes the buffer this way to keep logits in it until its backward, so it
    never allocates a weight-sized buffer itself, and a forward that is never differentiated keeps nothing alive.
    """
    if weight.dtype != torch.float32 or weight.device.type != "cpu":
        return None if only_if_free else torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    held = _WEIGHT_GRAD_STORAGE.get(weight)
    if held is not None and held.nbytes() == 4 * weight.numel() and torch._C._storage_Use_Count(held._cdata) == 1:
        return torch.empty(0, dtype=torch.float32).set_(held, 0, weight.shape)
    if only_if_free:
        return None
    fresh = torch.empty(weight.shape, dtype=torch.float32)
    _WEIGHT_GRAD_STORAGE[weight] = fresh.untyped_storage()
    return fresh


def kept_logits_tile(store: torch.Tensor, v0: int, width: int, t0: int, rows: int) -> torch.Tensor:
    """Where tokens [t0, t0 + rows) keep their logits of vocabulary tile [v0, v0 + width) in an unwritten [V, H]
    weight gradient `store`: in the rows that tile's own gradient goes to, token after token, so that the tile of
    tokens [0, n) is one [n, width] matrix (n <= H: it fits in those rows' width * H values). Each tile's logits
    must be read (or copied out) before its gradient rows are written."""
    return store[v0 : v0 + width].view(-1)[t0 * width : (t0 + rows) * width].view(rows, width)


def check_inputs(hidden, weight, labels, bias):
    if not isinstance(hidden, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("hidden and weight must be tensors")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got {hidden.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be [vocab, hidden], got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension ({hidden.shape[-1] if hidden.dim() else None}) must equal the weight's "
            f"hidden size ({weight.shape[1]}): hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype; cast one of them"
        )
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(hidden.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"labels {tuple(labels.shape)} must have hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    if labels.numel() == 0:
        raise ValueError("empty batch: labels has no elements")
    devices = {hidden.device, weight.device, labels.device}
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [vocab]={weight.shape[0]}, got shape {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias ({bias.dtype}) must have hidden's dtype ({hidden.dtype})")
        devices.add(bias.device)
    if len(devices) > 1:
        raise ValueError(f"hidden, weight, labels and bias must be on one device, got {sorted(map(str, devices))}")


def check_label_range(valid_labels: torch.Tensor, vocab: int):
    if valid_labels.numel() == 0:
        return
    # One host sync for both bounds: an out-of-range label would otherwise read another row of the
    # weight (CPU: IndexError deep inside; GPU: silent garbage).
    lo, hi = torch.aminmax(valid_labels)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"label {bad} is out of range for a vocabulary of {vocab} (and is not ignore_index)")


def tile_sizes(n_tokens: int, vocab: int) -> tuple[int, int]:
    # Equal token blocks of at most CPU_TOKEN_BLOCK: 1536 tokens run as 2 x 768, not 1024 + a 512 tail
    # whose narrower GEMMs are slower per FLOP.
    n_blocks = max(1, -(-n_tokens // CPU_TOKEN_BLOCK))
    block = max(1, -(-n_tokens // n_blocks))
    tile = max(256, (CPU_TILE_BYTES // (4 * block)) // 256 * 256)
    return block, min(vocab, tile)


def as_fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def weight_tile_scratch(weight: torch.Tensor, tile: int) -> torch.Tensor | None:
    """The fp32 buffer `fp32_weight_tile` upcasts a 16-bit head's tiles into (None for an fp32 head): one for the
    whole pass, as a fresh [tile, H] tensor per tile pays a page fault per 4 KiB, several times the upcast itself."""
    if weight.dtype == torch.float32:
        return None
    return torch.empty(min(tile, weight.shape[0]), weight.shape[1], dtype=torch.float32, device=weight.device)


def fp32_weight_tile(weight, v0, tile, scratch):
    """Rows [v0, v0 + tile) of the head in fp32: a view of an fp32 head, else upcast into `scratch`
    (`weight_tile_scratch`), which the next tile overwrites."""
    rows = weight[v0 : v0 + tile]
    return rows if scratch is None else scratch[: rows.shape[0]].copy_(rows)


def logits_tile(h, weight, bias, v0, tile, buffer, weight_scratch=None):
    """fp32 `h @ W[v0:v0+tile].T (+ b)` written into `buffer`; returns (the logits, the fp32 weight tile, in
    `weight_scratch` for a 16-bit head: see `fp32_weight_tile`)."""
    w = fp32_weight_tile(weight, v0, tile, weight_scratch)
    z = buffer[: h.shape[0], : w.shape[0]]
    cpu_linear.linear(h, w, out=z)
    if bias is not None:
        z.add_(as_fp32(bias[v0 : v0 + tile]))
    return z, w


def labels_in_tile(y, v0, width):
    """Rows whose label falls in the vocabulary tile [v0, v0 + width)."""
    return ((y >= v0) & (y < v0 + width)).nonzero().squeeze(1)


def fold_tile(z, running_max, running_sum):
    """Fold a tile of logits into running per-row log-sum-exp statistics (online softmax): z becomes
    exp(z - new max) in place and running_sum is rescaled and added to in place. Returns (new max, rescale)."""
    new_max = torch.maximum(running_max, z.amax(dim=1))
    rescale = torch.exp(running_max - new_max)
    z.sub_(new_max[:, None]).exp_()
    running_sum.mul_(rescale).add_(z.sum(dim=1))
    return new_max, rescale


def fold_tile_with_spread(z, running_max, running_sum, spread, out):
    """`fold_tile` that also folds the entropy's spread D = sum_v exp(z_v - max) (z_v - max) into `spread`, so
    that H = log S - D / S with S the running sum: two terms of the entropy's own size, where lse - E[z] through
    h . sum_v p_v W_v cancels digits away over a large vocabulary. z is used as scratch; the tile's
    exp(z - new max) goes to `out` (a buffer at least z's size). Returns (that tile, new max, rescale)."""
    new_max = torch.maximum(running_max, z.amax(dim=1))
    rescale = torch.exp(running_max - new_max)
    # Moving the max from m to m' turns D into rescale * (D + (m - m') S); before the first tile S = 0.
    moved = torch.where(running_sum > 0, (running_max - new_max) * running_sum, 0.0)
    spread.add_(moved).mul_(rescale)
    z.sub_(new_max[:, None])
    e = torch.exp(z, out=out[: z.shape[0], : z.shape[1]])
    # torch's own sum (cascaded): a BLAS dot over the vocabulary sums serially in some libraries, losing digits.
    spread.add_(z.mul_(e).sum(dim=1))
    running_sum.mul_(rescale).add_(e.sum(dim=1))
    return e, new_max, rescale


def tile_backward(z, scale, g, y, v0, h, w, grad_hidden, grad_weight, grad_bias, write_weight_grad=False,
                   scratch=None, slope=None, label_slope=None, entropy_term=None):
    """Gradients of one tile for rows whose upstream gradient times `LogitTransform.grad_factor` is `g`, where z
    holds the tile's softmax up to a per-row factor, `scale * z = g * softmax`: z becomes d / dz = g * (onehot(y) -
    softmax) in place (times the capped transform's per-logit `slope`, and `label_slope` [rows] at the labels),
    then the GEMMs add into grad_hidden (these rows' slice), grad_weight and grad_bias (full; None: not wanted).
    `entropy_term`: the entropy's upstream gradient's share, `g_H * p * (log p + H)` (`entropy_tile_term`), which
    is subtracted before the slope (dH / dlogits_v = -p_v (log p_v + H)).
    `write_weight_grad`: the tile's weight-gradient rows are written, not added to (the first token block to reach
    them: the buffer needs no zero-fill pass). `scratch`: z lives in those very rows (`FusedLinearPreferenceLoss`
    keeps a first chunk's logits in the unwritten weight gradient), so z.T is copied to this flat fp32 buffer
    before the rows are written."""
    z.mul_(scale.neg()[:, None])
    if entropy_term is not None:
        z.sub_(entropy_term)
    r = labels_in_tile(y, v0, w.shape[0])
    if slope is None:
        z[r, y[r] - v0] += g[r]
    else:
        # The label's slope comes from its own logit, not from the tile: a kept tile recovers its slopes from
        # exp(logits - max), which underflows where the softmax does, and the label term must not vanish with it.
        z.mul_(slope)
        z[r, y[r] - v0] += g[r] * label_slope[r]
    if grad_hidden is not None:
        cpu_linear.addmm_(grad_hidden, z, w.T)
    if grad_bias is not None:
        grad_bias[v0 : v0 + w.shape[0]] += z.sum(dim=0)
    if grad_weight is not None:
        rows = grad_weight[v0 : v0 + w.shape[0]]
        z_t = z.T if scratch is None else scratch[: z.numel()].view(z.shape[1], z.shape[0]).copy_(z.T)
        if write_weight_grad:
            cpu_linear.linear(z_t, h.T, out=rows)
        else:
            cpu_linear.addmm_(rows, z_t, h.T)


@cpu_linear.in_operand_precision_of("hidden")
def cpu_forward(hidden, weight, bias, labels, transform, with_hidden_grad_factor: bool, statistics=(),
                logits_store=None, lse_dtype=torch.float32):
    """Blocked forward on [N, H] rows whose labels are all valid, logits `transform`ed (a `LogitTransform`).

    Returns `(logp [N] fp32, lse [N] fp32, grad_factor [N, H] fp32 or None, statistics, kept_max, label_slope)`,
    where `grad_factor[t] = d logp_t / d h_t = s_ty W[y_t] - sum_v p_tv s_tv W_v` (s the transform's
    d logits / d z: the constant out_scale uncapped), `statistics` maps each requested name of STATISTICS to its
    [N] tensor (see `fused_linear_logprobs`) and `label_slope` is s at each label (None uncapped). Plain PyTorch,
    so it also serves CUDA tensors when statistics are asked of the Triton path.

    `lse_dtype`: float64 keeps the log-sum-exp of a vocabulary shard from rounding before it is combined with the
    other shards' (`VocabParallelLogprobsFunction`).

    `logits_store`: an unwritten fp32 [V, H] weight gradient. The token blocks among the first H tokens keep
    each tile's exp(logits - m) there (`kept_logits_tile`), m the running max after the tile, given back as
    `kept_max [tiles, kept tokens]` (None: nothing kept), so that `cpu_backward` need not recompute them.
    """
    n, width = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    capped = transform.capped
    block, tile = tile_sizes(n, vocab)
    n_kept = 0 if logits_store is None else (n if n <= width else width // block * block)
    kept_max = torch.empty(-(-vocab // tile), n_kept, dtype=torch.float32, device=dev) if n_kept else None
    logits = torch.empty(block, tile, dtype=torch.float32, device=dev)
    logp = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=lse_dtype, device=dev)
    label_slope = torch.empty(n, dtype=torch.float32, device=dev) if capped else None
    factor = torch.empty(n, width, dtype=torch.float32, device=dev) if with_hidden_grad_factor else None
    # A capped head's gradient factor weighs each W_v by p_v times its own slope: one more tile buffer.
    slopes = torch.empty(block, tile, dtype=torch.float32, device=dev) if capped and factor is not None else None
    stats = {name: torch.empty(n, dtype=torch.bool if name == "is_top1" else torch.float32, device=dev)
             for name in statistics}
    exp_buffer = torch.empty(block, tile, dtype=torch.float32, device=dev) if "entropy" in stats else None
    weight_scratch = weight_tile_scratch(weight, tile)
    for t0 in range(0, n, block):
        h = as_fp32(hidden[t0 : t0 + block])
        rows = h.shape[0]
        y = labels[t0 : t0 + rows]
        running_max = torch.full((rows,), float("-inf"), dtype=torch.float32, device=dev)
        running_sum = torch.zeros(rows, dtype=torch.float32, device=dev)
        acc = factor[t0 : t0 + rows].zero_() if factor is not None else None
        spread = torch.zeros(rows, dtype=torch.float32, device=dev) if exp_buffer is not None else None
        square_sum = torch.zeros(rows, dtype=torch.float32, device=dev) if "log_sum_sq_probs" in stats else None
        tile_label_logit = torch.empty(rows, dtype=torch.float32, device=dev) if "is_top1" in stats else None
        # The mean logit of a capped head is not linear in h: it is summed tile by tile.
        logit_sum = torch.zeros(rows, dtype=torch.float32, device=dev) if capped and "mean_logits" in stats else None
        for v0 in range(0, vocab, tile):
            kept = kept_logits_tile(logits_store, v0, min(tile, vocab - v0), t0, rows) if t0 < n_kept else None
            # A kept tile's logits go straight to the store, or with the entropy, its exp(z - max) does.
            z, w = logits_tile(h, weight, bias, v0, tile, logits if kept is None or exp_buffer is not None else kept,
                               weight_scratch)
            slope = None if slopes is None else slopes[:rows, : w.shape[0]]
            transform.apply_(z, slope)
            if logit_sum is not None:
                logit_sum.add_(z.sum(dim=1))
            if tile_label_logit is not None:
                # Read from the tile itself, so the comparison with the max is exact.
                r = labels_in_tile(y, v0, w.shape[0])
                tile_label_logit[r] = z[r, y[r] - v0]
            if spread is None:
                new_max, rescale = fold_tile(z, running_max, running_sum)
            else:
                z, new_max, rescale = fold_tile_with_spread(
                    z, running_max, running_sum, spread, exp_buffer if kept is None else kept
                )
            if kept is not None:
                kept_max[v0 // tile, t0 : t0 + rows] = new_max
            if acc is not None:
                # acc = sum_v exp(z_v - max) s_v W_v, rescaled whenever the max moves (flash-attention style).
                cpu_linear.addmm_(acc.mul_(rescale[:, None]), z if slope is None else slope.mul_(z), w.T)
            if square_sum is not None:
                square_sum.mul_(rescale.square()).add_(torch.linalg.vector_norm(z, dim=1).square_())
            running_max = new_max
        block_lse = lse[t0 : t0 + rows]
        torch.add(running_max.to(lse_dtype), running_sum.to(lse_dtype).log(), out=block_lse)
        # The label's logit as a row-wise dot product: cheaper than picking it out of each tile.
        w_label = as_fp32(weight.index_select(0, y))
        label_logit = torch.einsum("nh,nh->n", h, w_label)
        if bias is not None:
            label_logit += as_fp32(bias.index_select(0, y))
        block_label_slope = None if label_slope is None else label_slope[t0 : t0 + rows]
        torch.sub(transform.apply_(label_logit, block_label_slope), block_lse.float(), out=logp[t0 : t0 + rows])
        if factor is not None:
            # s_y W[y] - sum_v p_v s_v W_v, in place in acc.
            acc.div_(running_sum[:, None]).neg_()
            if capped:
                acc.addcmul_(block_label_slope[:, None], w_label)
            else:
                acc.add_(w_label).mul_(transform.out_scale)
        if spread is not None:
            torch.sub(running_sum.log(), spread / running_sum, out=stats["entropy"][t0 : t0 + rows])
        if square_sum is not None:
            # log sum_v p_v^2 = log sum_v exp(2 (z_v - max)) - 2 log sum_v exp(z_v - max)
            torch.sub(square_sum.log_(), running_sum.log().mul_(2), out=stats["log_sum_sq_probs"][t0 : t0 + rows])
        if tile_label_logit is not None:
            torch.ge(tile_label_logit, running_max, out=stats["is_top1"][t0 : t0 + rows])
        if logit_sum is not None:
            torch.div(logit_sum, vocab, out=stats["mean_logits"][t0 : t0 + rows])
    if "mean_logits" in stats and not capped:
        # The mean over the vocabulary is linear: mean_v z_v = (h . mean_v W_v + mean_v b_v) * out_scale.
        mean_w = weight.mean(0, dtype=torch.float32)
        mean_logits = as_fp32(hidden) @ mean_w
        if bias is not None:
            mean_logits += bias.mean(dtype=torch.float32)
        torch.mul(mean_logits, transform.out_scale, out=stats["mean_logits"])
    return logp, lse, factor, stats, kept_max, label_slope


@cpu_linear.in_operand_precision_of("hidden")
def cpu_backward(grad_logp, hidden, weight, bias, labels, lse, transform, need_hidden, need_weight, need_bias,
                 kept=None, label_slope=None, grad_entropy=None, entropy=None):
    """Turn each tile into the logits gradient in place and run the gradient GEMMs: the tiles `cpu_forward` kept
    (`kept = (logits_store, kept_max)`, the first tokens; their gradient rows are the store) are read back, the
    others recomputed. `label_slope`: `cpu_forward`'s, for a capped `transform`. `grad_entropy`: the upstream
    gradient of the per-token `entropy` (`cpu_forward`'s statistic), None when it has none.

    d logp_t / d z_tv = (1[v = y_t] - p_tv) s_tv and d H_t / d z_tv = -p_tv (log p_tv + H_t) s_tv, s the
    transform's d logits / d z.
    """
    n, width = hidden.shape
    vocab = weight.shape[0]
    block, tile = tile_sizes(n, vocab)
    dev = hidden.device
    grad_hidden = torch.zeros(n, width, dtype=torch.float32, device=dev) if need_hidden else None
    n_kept = 0 if kept is None else kept[1].shape[1]
    # The first tokens write every row of the weight gradient (`write_weight_grad`): no zero-fill. Kept logits
    # already live in its buffer.
    grad_weight = (kept[0] if n_kept else weight_grad_buffer(weight)) if need_weight else None
    if grad_weight is not None and n == 0:
        grad_weight.zero_()
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_bias else None
    scale = grad_logp.float() * transform.grad_factor
    # The entropy's gradient reaches z through the same d logits / d z: its constant part folds in here too.
    entropy_scale = None if grad_entropy is None else grad_entropy.float() * transform.grad_factor
    rows_max = max(block, n_kept)
    slopes = torch.empty(rows_max, tile, dtype=torch.float32, device=dev) if transform.capped else None
    log_probs = torch.empty(rows_max, tile, dtype=torch.float32, device=dev) if entropy_scale is not None else None
    weight_scratch = weight_tile_scratch(weight, tile)
    if n_kept:
        logits_store, kept_max = kept
        h, y, g = as_fp32(hidden[:n_kept]), labels[:n_kept], scale[:n_kept]
        # A kept tile's rows are also its gradient's: z.T goes to this scratch before they are written.
        scratch = torch.empty(n_kept * tile, dtype=torch.float32, device=dev) if grad_weight is not None else None
        for i, v0 in enumerate(range(0, vocab, tile)):
            w = fp32_weight_tile(weight, v0, tile, weight_scratch)
            z = kept_logits_tile(logits_store, v0, w.shape[0], 0, n_kept)
            slope = None if slopes is None else slopes_of_kept_tile(transform, z, kept_max[i], slopes)
            # softmax = exp(z/T - m) * exp(m - lse): the kept tile turns into its gradient without a GEMM.
            to_softmax = (kept_max[i] - lse[:n_kept]).exp_()
            entropy_term = None
            if entropy_scale is None:
                row_scale = g * to_softmax
            else:
                # log p = log(exp(logits - m)) + m - lse; where the exponential underflowed, p = 0 and the finite
                # clamp keeps p * log p at 0 rather than 0 * -inf.
                log_p = torch.log(z, out=log_probs[:n_kept, : w.shape[0]])
                log_p.add_((kept_max[i] - lse[:n_kept])[:, None]).clamp_(min=torch.finfo(torch.float32).min)
                row_scale = g
                entropy_term = entropy_tile_term(z.mul_(to_softmax[:, None]), log_p, entropy[:n_kept],
                                                 entropy_scale[:n_kept])
            tile_backward(z, row_scale, g, y, v0, h, w,
                           None if grad_hidden is None else grad_hidden[:n_kept], grad_weight, grad_bias,
                           write_weight_grad=True, scratch=scratch, slope=slope,
                           label_slope=None if label_slope is None else label_slope[:n_kept],
                           entropy_term=entropy_term)
    logits = torch.empty(block, tile, dtype=torch.float32, device=dev) if n_kept < n else None
    for t0 in range(n_kept, n, block):
        h = as_fp32(hidden[t0 : t0 + block])
        rows = h.shape[0]
        y = labels[t0 : t0 + rows]
        g = scale[t0 : t0 + rows]
        for v0 in range(0, vocab, tile):
            z, w = logits_tile(h, weight, bias, v0, tile, logits, weight_scratch)
            slope = None if slopes is None else slopes[:rows, : w.shape[0]]
            # z <- softmax = exp(logits - lse), then -g * softmax (* slope) + g (* the label's slope) at each label.
            transform.apply_(z, slope).sub_(lse[t0 : t0 + rows, None])
            log_p = None if entropy_scale is None else log_probs[:rows, : w.shape[0]].copy_(z)
            z.exp_()
            entropy_term = None if log_p is None else entropy_tile_term(z, log_p, entropy[t0 : t0 + rows],
                                                                        entropy_scale[t0 : t0 + rows])
            tile_backward(z, g, g, y, v0, h, w, None if grad_hidden is None else grad_hidden[t0 : t0 + rows],
                           grad_weight, grad_bias, write_weight_grad=t0 == 0, slope=slope,
                           label_slope=None if label_slope is None else label_slope[t0 : t0 + rows],
                           entropy_term=entropy_term)
    return grad_hidden, grad_weight, grad_bias


def entropy_tile_term(p, log_p, entropy, entropy_scale):
    """`entropy_scale * p * (log p + H)` in place in `log_p`: minus the entropy's share of d / dlogits over a tile,
    from H = -sum_v p_v log p_v, dH / dlogits_v = -p_v (log p_v + H)."""
    return log_p.add_(entropy[:, None]).mul_(p).mul_(entropy_scale[:, None])


def slopes_of_kept_tile(transform, kept, tile_max, buffer):
    """A capped transform's d logits / d z over a kept tile of exp(logits - tile_max), recovered from it: logits =
    tile_max + log(kept). Where the exponential underflowed the softmax is 0 and so is the slope's use; the
    logits are clamped into the transform's range there so that the slope stays finite."""
    logits = torch.log(kept, out=buffer[: kept.shape[0], : kept.shape[1]])
    logits.add_(tile_max[:, None]).clamp_(-transform.out_scale, transform.out_scale)
    return transform.slope_from_logits_(logits)


class FusedLinearLogprobsFunction(torch.autograd.Function):
    """Autograd over rows whose labels are all valid (ignored rows are dropped before the call).
    Outputs: logp, lse, then the requested statistics in `statistics` order; of these only the entropy is
    differentiable (an entropy bonus in the loss), and its gradient costs nothing unless the loss uses it."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, transform, use_triton, grad_enabled, statistics):
        # `requires_grad` still reads True in here under an outer torch.no_grad(); `grad_enabled` is the
        # caller's grad mode, so evaluation never pays for a gradient factor nobody will use.
        need_hidden = grad_enabled and hidden.requires_grad
        need_weight = weight.requires_grad
        need_bias = bias is not None and bias.requires_grad
        # A frozen head and bias: the forward forms d logp / d h on CPU, so backward never recomputes.
        factorised = need_hidden and not need_weight and not need_bias and not use_triton
        if use_triton:
            from pyprefopt.kernels import fused_linear_logprobs as triton_kernels

            logp, lse = triton_kernels.forward(hidden, weight, bias, labels, transform)
            factor = kept_max = label_slope = blocked_lse = None
            # The Triton kernels compute log-probs only: statistics cost one more (no-grad) blocked pass, which
            # also gives an entropy gradient what the blocked backward needs (see `backward`).
            stats = {}
            if statistics:
                _, blocked_lse, _, stats, _, label_slope = cpu_forward(hidden, weight, bias, labels, transform, False,
                                                                       statistics)
        else:
            # A trained head keeps the first H tokens' logits in its weight gradient's buffer, where backward would
            # write their gradient anyway: up to H tokens cost 3 GEMMs, not 4. Only the buffer the last backward
            # left free: the forward never allocates one (see `weight_grad_buffer`).
            store = weight_grad_buffer(weight, only_if_free=True) if grad_enabled and need_weight else None
            logp, lse, factor, stats, kept_max, label_slope = cpu_forward(
                hidden, weight, bias, labels, transform, factorised, statistics, logits_store=store
            )
            blocked_lse = lse
        entropy = stats.get("entropy")
        # The factor serves the log-probs alone; an entropy that may yet get a gradient keeps the inputs as well.
        inputs = (() if factorised and entropy is None else
                  (hidden, weight, bias, labels, lse, blocked_lse, label_slope, entropy))
        ctx.save_for_backward(factor, *inputs)
        ctx.factorised = factorised
        # Held on ctx, not saved for backward: backward hands the store over as the weight gradient, so it must
        # not stay reachable from the graph afterwards (autograd would copy it rather than take it).
        ctx.kept = None if kept_max is None else (store, kept_max)
        ctx.hidden_dtype = hidden.dtype
        ctx.transform = transform
        ctx.use_triton = use_triton
        ctx.entropy_index = statistics.index("entropy") if entropy is not None else None
        extra = tuple(stats[name] for name in statistics)
        ctx.mark_non_differentiable(lse, *(t for name, t in zip(statistics, extra) if name != "entropy"))
        # An unused entropy (a metric) reaches backward as None, not as zeros to differentiate.
        ctx.set_materialize_grads(False)
        return (logp, lse, *extra)

    @staticmethod
    def backward(ctx, grad_logp, _grad_lse, *grad_statistics):
        grad_entropy = None if ctx.entropy_index is None else grad_statistics[ctx.entropy_index]
        factor, *inputs = ctx.saved_tensors
        if ctx.factorised and grad_entropy is None:
            return (factor * grad_logp[:, None]).to(ctx.hidden_dtype), None, None, None, None, None, None, None
        hidden, weight, bias, labels, lse, blocked_lse, label_slope, entropy = inputs
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        # Kept logits are consumed: a second backward (retain_graph) recomputes them.
        kept, ctx.kept = ctx.kept, None
        if ctx.use_triton and grad_entropy is None:
            from pyprefopt.kernels import fused_linear_logprobs as triton_kernels

            grads = triton_kernels.backward(
                grad_logp, hidden, weight, bias, labels, lse, ctx.transform, need_hidden, need_weight, need_bias
            )
        else:
            # The Triton kernels differentiate the log-probs only: an entropy gradient takes the blocked PyTorch
            # backward, on whatever device the tensors are, with the blocked pass's own log-sum-exp (the softmax of
            # its tiles sums to 1 with it; with the Triton kernels', rounded from other logits, it does not).
            grads = cpu_backward(grad_logp, hidden, weight, bias, labels, blocked_lse, ctx.transform,
                                 need_hidden, need_weight, need_bias, kept, label_slope, grad_entropy, entropy)
        grad_hidden, grad_weight, grad_bias = (None if g is None else g.to(hidden.dtype) for g in grads)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


class VocabShard(NamedTuple):
    """Where this process's rows of a vocabulary-sharded head sit: rows [start, start + local) of `vocab`."""

    group: object
    start: int
    vocab: int


def vocab_shard(weight: torch.Tensor, process_group=None) -> tuple[torch.Tensor, VocabShard | None]:
    """(this process's head rows, their place) for a head sharded along the vocabulary: a DTensor placed
    `Shard(0)` on a 1-D mesh (tensor parallelism's `ColwiseParallel` head, a loss-parallel head), or this
    process's contiguous rows with `process_group` (rank order is vocabulary order). (weight, None) unsharded."""
    from torch.distributed.tensor import DTensor, Shard

    if isinstance(weight, DTensor):
        if process_group is not None:
            raise ValueError("give a DTensor head or a process_group with a local shard, not both")
        if weight.device_mesh.ndim != 1 or weight.placements != (Shard(0),):
            raise ValueError(f"a DTensor head must be sharded along the vocabulary (placements (Shard(0),) on a 1-D "
                             f"mesh), got {weight.placements} on a {weight.device_mesh.ndim}-D mesh")
        process_group = weight.device_mesh.get_group()
        weight = weight.to_local()  # differentiable: the shard's gradient becomes the DTensor's
    if process_group is None:
        return weight, None
    sizes = [torch.empty(1, dtype=torch.int64) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(sizes, torch.tensor([weight.shape[0]], dtype=torch.int64), group=process_group)
    rank = dist.get_rank(process_group)
    return weight, VocabShard(process_group, int(sum(sizes[:rank])), int(sum(sizes)))


def _check_same_batch_everywhere(hidden, labels, group):
    """Refuse processes that pass different batches: a head sharded along dim 0 over a data-parallel mesh (FSDP2
    shards every parameter so) is not a vocabulary-parallel head, and folding it would silently mix batches."""
    # Sums in fp64 without an fp64 copy of the hidden states.
    fingerprint = torch.stack([hidden.sum(dtype=torch.float64), labels.sum(dtype=torch.float64),
                               torch.tensor(float(labels.numel()), dtype=torch.float64, device=labels.device)])
    low, high = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        raise ValueError("a vocabulary-sharded head needs the same hidden states and labels on every process of its "
                         "group, and these differ; for data parallelism (FSDP2 shards the head along dim 0 too) "
                         "pass the whole head, e.g. `weight.full_tensor()`")


class VocabParallelLogprobsFunction(torch.autograd.Function):
    """Log-probs over a vocabulary sharded across `shard.group` (Megatron's vocabulary-parallel cross-entropy,
    Shoeybi et al. 2019, over fused tiles): each process folds its slice into a log-sum-exp and the label's logit
    where it owns the label; one gather of [world, N] log-sum-exps and one all-reduce of [N] label logits combine
    them. Backward turns each process's tiles into its slice's weight gradient with the global log-sum-exp, and
    sums the hidden gradient over processes. Every process holds the same hidden states and labels."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, transform, use_triton, shard):
        group = shard.group
        _check_same_batch_everywhere(hidden, labels, group)
        local = labels - shard.start
        owned = (local >= 0) & (local < weight.shape[0])
        in_slice = torch.where(owned, local, 0)
        if use_triton:
            from pyprefopt.kernels import fused_linear_logprobs as triton_kernels

            local_lse = triton_kernels.forward(hidden, weight, bias, in_slice, transform)[1].double()
        else:
            local_lse = cpu_forward(hidden, weight, bias, in_slice, transform, False, lse_dtype=torch.float64)[1]
        # Each label's logit, computed where its row of the head lives, zero elsewhere, summed over processes.
        rows = owned.nonzero().squeeze(1)
        label_logit = torch.zeros(labels.shape[0], dtype=torch.float32, device=hidden.device)
        owned_logit = torch.einsum("nh,nh->n", as_fp32(hidden.index_select(0, rows)),
                                   as_fp32(weight.index_select(0, in_slice.index_select(0, rows))))
        if bias is not None:
            owned_logit += as_fp32(bias.index_select(0, in_slice.index_select(0, rows)))
        label_slope = torch.zeros_like(label_logit) if transform.capped else None
        owned_slope = torch.empty_like(owned_logit) if transform.capped else None
        label_logit.index_copy_(0, rows, transform.apply_(owned_logit, owned_slope))
        if label_slope is not None:
            label_slope.index_copy_(0, rows, owned_slope)
        dist.all_reduce(label_logit, group=group)
        # In fp64 until the one rounding of the global log-sum-exp, as the unsharded op rounds it once.
        every_lse = [torch.empty_like(local_lse) for _ in range(dist.get_world_size(group))]
        dist.all_gather(every_lse, local_lse, group=group)
        lse = torch.logsumexp(torch.stack(every_lse), dim=0).float()
        # Backward finds each label in the tiles of its owner only.
        ctx.save_for_backward(hidden, weight, bias, torch.where(owned, local, -1), lse, label_slope)
        ctx.transform, ctx.use_triton, ctx.group = transform, use_triton, group
        ctx.mark_non_differentiable(lse)
        return label_logit - lse, lse

    @staticmethod
    def backward(ctx, grad_logp, _grad_lse):
        hidden, weight, bias, local_labels, lse, label_slope = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if ctx.use_triton:
            from pyprefopt.kernels import fused_linear_logprobs as triton_kernels

            grads = triton_kernels.backward(grad_logp, hidden, weight, bias, local_labels, lse, ctx.transform,
                                            need_hidden, need_weight, need_bias)
        else:
            grads = cpu_backward(grad_logp, hidden, weight, bias, local_labels, lse, ctx.transform, need_hidden,
                                 need_weight, need_bias, label_slope=label_slope)
        grad_hidden, grad_weight, grad_bias = grads
        if grad_hidden is not None:
            dist.all_reduce(grad_hidden, group=ctx.group)
        grad_hidden, grad_weight, grad_bias = (None if g is None else g.to(hidden.dtype) for g in
                                               (grad_hidden, grad_weight, grad_bias))
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    backend: str = "auto",
    statistics: tuple[str, ...] = (),
    softcap: float | None = None,
    logit_scale: float = 1.0,
    process_group=None,
):
    """Log-prob of each label under `softmax(softcap(logit_scale * (hidden @ weight.T + bias)) / temperature)`,
    with `softcap(x) = softcap * tanh(x / softcap)` when `softcap` is given (transformers' order; see
    `LogitTransform`).

    Args:
        hidden: `[..., H]` hidden states (fp32, bf16 or fp16).
        weight: `[V, H]` LM-head weight, same dtype as `hidden`.
        labels: `[...]` token ids aligned with `hidden` (position t scores `labels[t]`; shift beforehand
            for causal LMs), `ignore_index` where no log-prob is wanted.
        bias: optional `[V]` LM-head bias.
        backend: "auto" (Triton on CUDA, blocked PyTorch on CPU), "triton" or "torch".
        statistics: names from STATISTICS to compute in the same pass: "entropy" (of the softmax;
            differentiable, for an entropy bonus), and without gradient (metrics) "log_sum_sq_probs"
            (`log sum_v p_v^2`), "mean_logits" (over the vocabulary, after every transform) and "is_top1" (the
            label's logit is the largest; ties count).
        softcap: Gemma 2/3/3n's `final_logit_softcapping`; None for none.
        logit_scale: the multiplier a model applies to its head's output (Cohere's `logit_scale`, Granite's
            `1 / logits_scaling`).
        process_group: with `weight` this process's rows of a head sharded along the vocabulary across the group
            (in rank order); a DTensor `weight` placed `Shard(0)` needs none. Every process passes the same
            hidden states and labels (global ids); each holds and differentiates only its shard, and the hidden
            gradient is summed over the group (`VocabParallelLogprobsFunction`). `bias`: this process's rows too.

    Returns:
        fp32 tensor of `labels.shape`: the log-probs, 0 at ignored positions. Differentiable w.r.t.
        hidden, weight and bias; a weight or bias that does not require grad costs no gradient work. A trained
        fp32 head on CPU takes its weight gradient's buffer in the forward pass when that buffer is free (see
        `weight_grad_buffer`) and keeps the first H tokens' logits in it until backward.
        Ignored positions are dropped before any matmul. With `statistics`: `(log-probs, {name: tensor
        of labels.shape})`, 0 (False) at ignored positions.
    """
    weight, shard = vocab_shard(weight, process_group)
    if shard is not None and statistics:
        raise NotImplementedError("statistics of a vocabulary-sharded head are not supported")
    check_inputs(hidden, weight, labels, bias)
    transform = LogitTransform(temperature, softcap, logit_scale)
    statistics = tuple(statistics)
    unknown = [name for name in statistics if name not in STATISTICS]
    if unknown or len(set(statistics)) != len(statistics):
        raise ValueError(f"statistics must be distinct names from {STATISTICS}, got {statistics}")
    use_triton = backend_choice.use_triton(hidden.device, backend)
    flat_labels = labels.reshape(-1)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    keep = (flat_labels != ignore_index).nonzero().squeeze(1)
    valid_labels = flat_labels.index_select(0, keep).long()
    check_label_range(valid_labels, weight.shape[0] if shard is None else shard.vocab)
    if keep.numel() == flat_labels.numel():
        rows = flat_hidden
    else:
        rows = flat_hidden.index_select(0, keep)
    # Nothing to score still goes through the Function (on the CPU path, which handles 0 rows), so the
    # result stays in the autograd graph and backward gives zero gradients instead of an error.
    if shard is not None:
        valid_logp, _ = VocabParallelLogprobsFunction.apply(rows, weight, bias, valid_labels, transform,
                                                           use_triton and keep.numel() > 0, shard)
        valid_stats = []
    else:
        valid_logp, _, *valid_stats = FusedLinearLogprobsFunction.apply(
            rows, weight, bias, valid_labels, transform, use_triton and keep.numel() > 0, torch.is_grad_enabled(),
            statistics,
        )
    outputs = [valid_logp, *valid_stats]
    if keep.numel() != flat_labels.numel():
        outputs = [torch.zeros(flat_labels.shape[0], dtype=t.dtype, device=hidden.device).index_copy(0, keep, t)
                   for t in outputs]
    logp, *stats = (t.view(labels.shape) for t in outputs)
    return (logp, dict(zip(statistics, stats))) if statistics else logp
