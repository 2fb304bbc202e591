"""`FusedLinearPreferenceLoss`: LM head + log-probs + the loss of any method of `pyprefopt.losses.METHODS` (SFT, DPO,
IPO, CPO, KTO, ORPO), logits never materialised.

Two ways to the gradient:
- frozen head, or any head on GPU: through `fused_linear_logprobs` (on CPU its forward already forms
  d logp / d h, so fwd+bwd costs the two GEMMs the maths needs);
- trained head (weight or bias requires grad) on CPU: one pass. Every loss is separable over
  groups of rows (a chosen/rejected pair, or one row for SFT and KTO, whose KL point is detached), so
  once a chunk of whole groups has its per-token log-probs the loss's gradient w.r.t. them is known, and the
  chunk's logits turn into their gradient right away: three GEMMs (logits, dH, dW) instead of the
  four a recompute costs. A chunk holds at most TRAINED_HEAD_CHUNK_BYTES of fp32 logits.

  A group over that budget is a chunk of its own, kept in part: it is walked in tiles (token blocks x
  vocabulary tiles, those of `fused_linear_logprobs`, narrowed so that several fit in the budget)
  folded into an online log-sum-exp. The last tiles walked that fit in the budget keep their logits;
  the earlier ones keep only the per-token log-sum-exp. Once the group's log-probs are complete, the
  kept tiles turn into their gradient directly (2 more GEMMs) and the dropped ones are recomputed
  from the stored log-sum-exp (3 GEMMs, back to back on one weight tile). So an over-budget group costs
  3 + (fraction of its logits dropped) GEMMs, growing smoothly with its length instead of jumping to
  the 4 of a recompute, and the peak extra memory stays at the budget plus the weight gradient. The
  walk runs along the vocabulary rather than in token sub-chunks so that every GEMM keeps all the
  group's tokens (up to a token block) as rows: a token sub-chunk would re-read the whole weight for
  each of its GEMMs at a third of the rows, which costs more than it saves. One over-budget chunk recomputes
  nothing: the one (of one token block and at most H tokens) that would recompute the most goes first, and
  the weight gradient, not written yet and counted in the memory anyway, holds its logits, each tile in the
  rows its own gradient goes to (copied out just before those rows are written). A batch of at most H
  projected tokens (in one token block) is a single such chunk, whatever its pairs: 3 GEMMs at any
  vocabulary, with the whole batch as the weight-gradient GEMMs' depth.
"""

from __future__ import annotations

import math
import numbers

import torch

from pyprefopt import cpu_linear, losses
from pyprefopt.fused_linear_logprobs import (
    LogitTransform,
    as_fp32,
    check_inputs,
    check_label_range,
    fold_tile,
    fp32_weight_tile,
    fused_linear_logprobs,
    kept_logits_tile,
    labels_in_tile,
    logits_tile,
    slopes_of_kept_tile,
    tile_backward,
    tile_sizes,
    weight_grad_buffer,
    weight_tile_scratch,
)

# Bytes of fp32 logits one chunk of whole groups may hold on the trained-head path.
TRAINED_HEAD_CHUNK_BYTES = 64 * 2**20

_REFERENCE_INPUTS = {"ref_logps", "ref_hidden", "ref_weight", "ref_bias"}
_KL_INPUTS = {"kl", "kl_hidden", "kl_labels", "kl_logps", "ref_kl_hidden", "ref_kl_logps"}


def _inputs_used(record):
    """The forward's optional inputs that a method's record (`losses.Method`) says it takes."""
    used = set()
    if record.needs_reference:
        used |= _REFERENCE_INPUTS
    if record.desirable:
        used.add("desirable")
    if record.kl_batch:
        used |= _KL_INPUTS
    if record.nll_over_labels:
        used.add("nll_labels")
    return used


def _budget_tokens(vocab):
    """Tokens whose fp32 logits fit in TRAINED_HEAD_CHUNK_BYTES (at least one)."""
    return max(1, TRAINED_HEAD_CHUNK_BYTES // (4 * vocab))


def _group_chunks(method, labels, ignore_index, vocab):
    """Row ids of consecutive chunks of whole groups, each within TRAINED_HEAD_CHUNK_BYTES of logits,
    except that a group over it alone is a chunk of its own (walked in tiles: `_walk_tiles`)."""
    rows = labels.shape[0]
    counts = (labels != ignore_index).sum(-1)
    if losses.METHODS[method].paired:
        half = rows // 2
        groups = [torch.tensor([i, i + half]) for i in range(half)]
        group_tokens = (counts[:half] + counts[half:]).tolist()
    else:
        groups = [torch.tensor([i]) for i in range(rows)]
        group_tokens = counts.tolist()
    budget = _budget_tokens(vocab)
    chunks, current, tokens = [], [], 0
    for group, n in zip(groups, group_tokens):
        if current and tokens + n > budget:
            chunks.append(torch.cat(current))
            current, tokens = [], 0
        current.append(group)
        tokens += n
    chunks.append(torch.cat(current))
    return chunks


def _walk_tiles(n_tokens, vocab, upcast=False):
    """`(token block, vocabulary tile, slots)`: the tiles a chunk of `n_tokens` is walked in, and how many
    of them the budget holds. A chunk within the budget is one tile, all its logits at once (`upcast`, a 16-bit
    head's, which is upcast to fp32 a tile at a time: its CPU tiles, every one kept); a group over it is walked
    in `fused_linear_logprobs`' CPU tiles, narrowed so that at least four fit in the budget."""
    if n_tokens <= _budget_tokens(vocab):
        if not upcast:
            return max(1, n_tokens), vocab, 1
        block, tile = tile_sizes(n_tokens, vocab)
        return block, tile, -(-max(1, n_tokens) // block) * -(-vocab // tile)
    block, tile = tile_sizes(n_tokens, vocab)
    tile = max(1, min(tile, TRAINED_HEAD_CHUNK_BYTES // (16 * block)))
    return block, tile, max(1, TRAINED_HEAD_CHUNK_BYTES // (4 * block * tile))


def _logits_kept_in_gradient(n_tokens, plan, vocab, width):
    """Logits that a chunk walked by `plan` (`_walk_tiles`) would recompute and can keep in an unwritten [vocab,
    width] weight gradient instead: those of a chunk over the budget in one token block of at most `width`
    tokens, else 0."""
    block, tile, slots = plan
    tiles = -(-n_tokens // block) * -(-vocab // tile)
    return (tiles - slots) * block * tile if tiles > slots and n_tokens <= block and n_tokens <= width else 0


def _tensor_description(value):
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _check_labels(name, labels, device=None):
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must be an integer tensor [batch, seq_len], got {_tensor_description(labels)}")
    if labels.dim() != 2:
        raise ValueError(f"{name} must be [batch, seq_len], got shape {tuple(labels.shape)}")
    if device is not None and labels.device != device:
        raise ValueError(f"{name} must be on hidden's device {device}, got {labels.device}")


def _given_sequence_logps(name, given, labels, labels_name, ignore_index, device):
    """Frozen log-probs `given` per sequence [B], or per token shaped as `labels`, as detached fp32 sums [B]."""
    if not isinstance(given, torch.Tensor) or not given.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {_tensor_description(given)}")
    if given.device != device:
        raise ValueError(f"{name} must be on hidden's device {device}, got {given.device}")
    if labels is None:
        if given.dim() != 1:
            raise ValueError(f"{name} has shape {tuple(given.shape)}, expected [batch] per sequence (per token "
                             f"[batch, seq_len] needs {labels_name})")
        return given.detach().float()
    rows = labels.shape[0]
    if given.shape == (rows,):
        return given.detach().float()
    if given.shape != labels.shape:
        raise ValueError(f"{name} has shape {tuple(given.shape)}, expected ({rows},) per sequence or "
                         f"{tuple(labels.shape)} per token (the shape of {labels_name})")
    # A sequence's log-prob sums its completion tokens only, the same ones as the policy's: TRL masks the policy's and
    # the reference's per-token log-probs with one completion mask. Selected, not multiplied: a non-finite value at
    # an ignored position must not leak in.
    return torch.where(labels != ignore_index, given.detach().float(), 0.0).sum(-1)


def _check_frozen_hidden(name, hidden, labels, labels_name, weight, weight_name):
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {_tensor_description(hidden)}")
    if tuple(hidden.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"{name} must be [batch, seq_len, hidden] with [batch, seq_len] = {tuple(labels.shape)} (the "
                         f"shape of {labels_name}), got shape {tuple(hidden.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{name}'s hidden size ({hidden.shape[-1]}) must equal {weight_name}'s ({weight.shape[1]}): "
                         f"{name} {tuple(hidden.shape)}, {weight_name} {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"{name} ({hidden.dtype}) and {weight_name} ({weight.dtype}) must share a dtype")
    if hidden.device != weight.device:
        raise ValueError(f"{name} must be on {weight_name}'s device {weight.device}, got {hidden.device}")


def _check_reference_head(ref_weight, ref_bias, weight, device):
    """The reference head: `ref_weight` [vocab, hidden] (default: the policy's `weight`) and `ref_bias` [vocab]."""
    if ref_weight is not None:
        if not isinstance(ref_weight, torch.Tensor) or not ref_weight.is_floating_point():
            raise TypeError(f"ref_weight must be a floating-point tensor, got {_tensor_description(ref_weight)}")
        if ref_weight.dim() != 2:
            raise ValueError(f"ref_weight must be [vocab, hidden], got shape {tuple(ref_weight.shape)}")
        if ref_weight.device != device:
            raise ValueError(f"ref_weight must be on hidden's device {device}, got {ref_weight.device}")
    head, head_name = (weight, "weight") if ref_weight is None else (ref_weight, "ref_weight")
    if ref_bias is None:
        return
    if not isinstance(ref_bias, torch.Tensor) or ref_bias.shape != (head.shape[0],):
        raise ValueError(f"ref_bias must be [vocab]=({head.shape[0]},) as {head_name}, got "
                         f"{_tensor_description(ref_bias)}")
    if ref_bias.dtype != head.dtype:
        raise TypeError(f"ref_bias ({ref_bias.dtype}) must have {head_name}'s dtype ({head.dtype})")
    if ref_bias.device != device:
        raise ValueError(f"ref_bias must be on hidden's device {device}, got {ref_bias.device}")


class _TrainedHeadLossFunction(torch.autograd.Function):
    """Loss and all its gradients in the forward pass; backward scales them by the upstream gradient."""

    @staticmethod
    @cpu_linear.in_operand_precision_of("hidden")
    def forward(ctx, hidden, weight, bias, labels, transform, ignore_index, chunks, loss_of_token_logps):
        rows, seq_len = labels.shape
        vocab = weight.shape[0]
        flat_hidden = hidden.reshape(rows * seq_len, -1)
        flat_labels = labels.reshape(-1)
        dev = hidden.device
        # Per-token log-probs, 0 at ignored positions (as fused_linear_logprobs gives them), filled chunk by chunk.
        token_logps = torch.zeros(rows * seq_len, dtype=torch.float32, device=dev)
        grad_hidden = torch.zeros(flat_hidden.shape, dtype=torch.float32, device=dev) if hidden.requires_grad else None
        # Written, not zero-filled: the first chunk with tokens writes every row (see `first_visit`).
        grad_weight = weight_grad_buffer(weight) if weight.requires_grad else None
        weight_grad_written = False
        grad_bias = (
            torch.zeros(vocab, dtype=torch.float32, device=dev) if bias is not None and bias.requires_grad else None
        )
        b = None if bias is None else as_fp32(bias)
        positions = torch.arange(seq_len, device=dev)
        token_lists = []
        for chunk in chunks:
            tokens = (chunk.to(dev)[:, None] * seq_len + positions).reshape(-1)
            tokens = tokens[flat_labels.index_select(0, tokens) != ignore_index]
            token_lists.append(tokens)
        upcast = weight.dtype != torch.float32
        plans = [_walk_tiles(t.numel(), vocab, upcast) for t in token_lists]
        if grad_weight is not None:
            # The first chunk with tokens may keep its logits in the weight gradient (see `keep_in_gradient`). If the
            # whole batch can (at most H tokens in one token block), it is one chunk: nothing recomputed, and the
            # weight-gradient GEMMs take all its tokens as depth. Otherwise the place goes to the chunk that would
            # recompute the most (chunks are independent, so their order is free).
            total = sum(t.numel() for t in token_lists)
            whole_plan = _walk_tiles(total, vocab, upcast)
            if len(token_lists) > 1 and _logits_kept_in_gradient(total, whole_plan, vocab, weight.shape[1]):
                token_lists, plans = [torch.cat(token_lists)], [whole_plan]
            else:
                saved = [_logits_kept_in_gradient(t.numel(), plan, vocab, weight.shape[1])
                         for t, plan in zip(token_lists, plans)]
                best = max(range(len(saved)), key=saved.__getitem__)
                if saved[best] > 0:
                    order = [best] + [i for i in range(len(saved)) if i != best]
                    token_lists, plans = [token_lists[i] for i in order], [plans[i] for i in order]
        # One buffer for every chunk, cut into [block, tile] slots: at most the budget (or one tile).
        buffer = torch.empty(
            max(min(slots, -(-t.numel() // block) * -(-vocab // tile)) * block * tile
                for t, (block, tile, slots) in zip(token_lists, plans)),
            dtype=torch.float32, device=dev,
        )
        # A 16-bit head is upcast one tile at a time into this buffer, never whole; a kept tile's weight rows are
        # upcast again for its gradient (a copy, against the GEMMs over its tokens).
        weight_scratch = weight_tile_scratch(weight, max(tile for _, tile, _ in plans))
        # A capped transform's per-logit slopes, one tile at a time.
        slopes = (torch.empty(max(block for block, _, _ in plans), max(tile for _, tile, _ in plans),
                              dtype=torch.float32, device=dev) if transform.capped else None)

        def logits(h, v0, tile, out, slope=None):
            """Transformed logits of rows `h` and vocabulary tile [v0, v0 + tile) in `out` (a capped transform's
            slopes in `slope`); returns (them, the fp32 weight tile)."""
            z, w_tile = logits_tile(h, weight, b, v0, tile, out, weight_scratch)
            transform.apply_(z, None if slope is None else slope[: z.shape[0], : z.shape[1]])
            return z, w_tile

        def slot(i, block, tile):
            """The buffer's slot i of [block, tile]."""
            return buffer[i * block * tile : (i + 1) * block * tile].view(block, tile)

        for tokens, (block, tile, slots) in zip(token_lists, plans):
            n = tokens.numel()
            if n == 0:
                continue
            h_all = as_fp32(flat_hidden.index_select(0, tokens))
            y_all = flat_labels.index_select(0, tokens).long()
            tiles = [(slice(t0, t0 + block), v0) for t0 in range(0, n, block) for v0 in range(0, vocab, tile)]
            # Partial keep: the last `slots` tiles walked keep their logits in the buffer until the loss
            # gradient is known; the earlier ones (none when the chunk fits the budget) keep only the
            # log-sum-exp, sharing the first slot, and are recomputed. Except in the first chunk with tokens, if it
            # is over the budget in one token block of at most H tokens: the weight gradient, not yet written and
            # counted in the memory anyway, holds all its logits, each tile in the rows its own gradient goes to.
            keep_in_gradient = (grad_weight is not None and not weight_grad_written and
                                _logits_kept_in_gradient(n, (block, tile, slots), vocab, grad_weight.shape[1]) > 0)
            first_kept = 0 if keep_in_gradient else max(0, len(tiles) - slots)
            running_max = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)
            running_sum = torch.zeros(n, dtype=torch.float32, device=dev)
            label_logit = torch.empty(n, dtype=torch.float32, device=dev)
            kept = []
            for i, (rows_, v0) in enumerate(tiles):
                y = y_all[rows_]
                out = (kept_logits_tile(grad_weight, v0, min(tile, vocab - v0), 0, n) if keep_in_gradient
                       else slot(max(0, i - first_kept), block, tile))
                z, w_tile = logits(h_all[rows_], v0, tile, out)
                r = labels_in_tile(y, v0, w_tile.shape[0])
                label_logit[rows_][r] = z[r, y[r] - v0]
                # In place: z <- exp(z - max), the softmax's numerator (passes over the tile, no copies).
                tile_max, _ = fold_tile(z, running_max[rows_], running_sum[rows_])
                running_max[rows_] = tile_max
                if i >= first_kept:
                    kept.append((rows_, v0, z, tile_max))
            lse = running_max.add_(running_sum.log_())
            label_slope = transform.slope_from_logits_(label_logit.clone()) if transform.capped else None
            token_logps.index_copy_(0, tokens, label_logit - lse)
            # Separability: the loss's gradient w.r.t. this chunk's tokens depends on their rows alone
            # (plus batch constants), so evaluating it now on the partly filled tensor is exact for them.
            with torch.enable_grad():
                probe = token_logps.view(rows, seq_len).clone().requires_grad_()
                (grad_token_logps,) = torch.autograd.grad(loss_of_token_logps(probe), probe)
            g_all = grad_token_logps.reshape(-1).index_select(0, tokens).mul_(transform.grad_factor)
            grad_h = (None if grad_hidden is None else
                      torch.zeros(n, h_all.shape[1], dtype=torch.float32, device=dev))
            # The first chunk with tokens writes the weight gradient's rows (no zero-fill): each vocabulary tile's
            # first visit writes, the later ones add. Kept tiles (of the last token blocks) come before the
            # recomputed ones (of the first blocks), so the first visit is not always token block 0's.
            unwritten = set() if weight_grad_written else {v0 for _, v0 in tiles}

            def first_visit(v0):
                first = v0 in unwritten
                unwritten.discard(v0)
                return first

            for rows_, v0, z, tile_max in kept:
                # softmax = exp(z - max) * exp(max - lse): a kept tile turns into its gradient directly.
                w_tile = fp32_weight_tile(weight, v0, z.shape[1], weight_scratch)
                scale = g_all[rows_] * (tile_max - lse[rows_]).exp_()
                slope = None if slopes is None else slopes_of_kept_tile(transform, z, tile_max, slopes)
                tile_backward(z, scale, g_all[rows_], y_all[rows_], v0, h_all[rows_], w_tile,
                               None if grad_h is None else grad_h[rows_], grad_weight, grad_bias,
                               write_weight_grad=first_visit(v0), scratch=buffer if keep_in_gradient else None,
                               slope=slope, label_slope=None if label_slope is None else label_slope[rows_])
            for rows_, v0 in tiles[:first_kept]:
                # A dropped tile: recompute its logits (one more GEMM); exp(z - lse) is the softmax itself.
                z, w_tile = logits(h_all[rows_], v0, tile, slot(0, block, tile), slopes)
                z.sub_(lse[rows_, None]).exp_()
                tile_backward(z, g_all[rows_], g_all[rows_], y_all[rows_], v0, h_all[rows_], w_tile,
                               None if grad_h is None else grad_h[rows_], grad_weight, grad_bias,
                               write_weight_grad=first_visit(v0),
                               slope=None if slopes is None else slopes[: z.shape[0], : z.shape[1]],
                               label_slope=None if label_slope is None else label_slope[rows_])
            weight_grad_written = True
            if grad_h is not None:
                grad_hidden.index_copy_(0, tokens, grad_h)
        if grad_weight is not None and not weight_grad_written:
            grad_weight.zero_()  # no tokens to score
        # Held on ctx, not saved for backward: backward hands these buffers over as the gradients (no copy
        # of a [V, H] tensor), so they must not stay reachable from the graph afterwards.
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.shapes = (hidden.shape, hidden.dtype, weight.dtype)
        token_logps = token_logps.view(rows, seq_len)
        ctx.mark_non_differentiable(token_logps)
        return loss_of_token_logps(token_logps), token_logps

    @staticmethod
    def backward(ctx, grad_loss, _grad_token_logps):
        if ctx.grads is None:
            raise RuntimeError(
                "FusedLinearPreferenceLoss with a trained head computes its gradients once, in the forward "
                "pass: run backward through it once (no retain_graph re-use)"
            )
        hidden_shape, hidden_dtype, weight_dtype = ctx.shapes
        grads, ctx.grads = ctx.grads, None
        # The usual upstream gradient of a loss is 1: hand the stored gradients over without a copy.
        unit = bool(grad_loss == 1)
        grad_hidden, grad_weight, grad_bias = (
            None if g is None else (g if unit else g.mul_(grad_loss)).to(dtype)
            for g, dtype in zip(grads, (hidden_dtype, weight_dtype, weight_dtype))
        )
        if grad_hidden is not None:
            grad_hidden = grad_hidden.view(hidden_shape)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


class FusedLinearPreferenceLoss(torch.nn.Module):
    """Drop-in loss from the last hidden states: `loss, metrics = module(hidden, lm_head.weight, labels, ...)`.

    Args:
        method: a name of `pyprefopt.losses.METHODS` (sft, dpo, ipo, cpo, kto, orpo).
        ignore_index: label value of positions that carry no loss (prompt, padding).
        temperature: logits are divided by it before the softmax.
        softcap, logit_scale: the model's own logit transform (Gemma's `final_logit_softcapping`, Cohere's
            `logit_scale`, ...), as in `fused_linear_logprobs`; `pyprefopt.head_config.head_logit_transform(config)`
            reads both from a transformers config.
        **hparams: the method's hyper-parameters (`losses.METHODS[method].hyperparameters`): `beta`
            (dpo/ipo/cpo/kto/orpo), `label_smoothing` (dpo/cpo), `alpha` and `simpo_gamma` (cpo), `desirable_weight`
            and `undesirable_weight` (kto).

    Batches follow TRL: `hidden [B, T, H]` and `labels [B, T]` aligned (position t scores labels[t]),
    and for paired methods (dpo/ipo/cpo/orpo) the chosen rows first, the rejected rows second. The head may be a
    DTensor sharded along the vocabulary (see `fused_linear_logprobs`).
    """

    def __init__(self, method: str, ignore_index: int = -100, temperature: float = 1.0, softcap: float | None = None,
                 logit_scale: float = 1.0, **hparams):
        super().__init__()
        record = losses.method_record(method)
        unknown = set(hparams) - set(record.hyperparameters)
        if unknown:
            raise TypeError(
                f"{method} takes hyper-parameters {sorted(record.hyperparameters)}, not {sorted(unknown)}"
            )
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an integer label value, got {ignore_index!r}")
        for name, value in {"temperature": temperature, **hparams}.items():
            if name == "simpo_gamma" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a real number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        self.transform = LogitTransform(temperature, softcap, logit_scale)
        if "beta" in hparams and not hparams["beta"] > 0:
            raise ValueError(f"beta must be > 0, got {hparams['beta']}")
        # The probability that a preference label is flipped (conservative DPO, Mitchell 2023), which TRL documents as
        # lying in [0, 0.5): above one half the loss prefers the rejected answers, below 0 it is unbounded below.
        if "label_smoothing" in hparams and not 0 <= hparams["label_smoothing"] <= 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5], got {hparams['label_smoothing']}")
        self.method = method
        self.record = record
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.softcap = softcap
        self.logit_scale = logit_scale
        self.hparams = hparams

    def extra_repr(self):
        return f"method={self.method!r}, " + ", ".join(f"{k}={v}" for k, v in self.hparams.items())

    def token_logps(self, hidden, weight, labels, bias=None):
        """Per-token log-probs [B, T] of the labels, 0 where a label is ignore_index."""
        if labels.dim() != 2:
            raise ValueError(f"labels must be [batch, seq_len], got shape {tuple(labels.shape)}")
        return fused_linear_logprobs(hidden, weight, labels, bias, self.ignore_index, self.temperature,
                                     softcap=self.softcap, logit_scale=self.logit_scale)

    def sequence_logps(self, hidden, weight, labels, bias=None):
        """Summed log-probs [B] and completion lengths [B] of each row."""
        return self.token_logps(hidden, weight, labels, bias).sum(-1), (labels != self.ignore_index).sum(-1)

    def _frozen_sequence_logps(self, name, given, hidden, head, labels, labels_name, device):
        """Per-sequence log-probs `name` under no grad: given directly as `{name}_logps` (per sequence, or per token
        shaped as `labels`), or from hidden states `{name}_hidden` through `head` = (weight, bias, weight's name)."""
        logps_name, hidden_name = f"{name}_logps", f"{name}_hidden"
        if given is not None and hidden is not None:
            raise ValueError(f"give {logps_name} or {hidden_name}, not both")
        if given is not None:
            return _given_sequence_logps(logps_name, given, labels, labels_name, self.ignore_index, device)
        if hidden is None:
            return None
        if labels is None:
            raise ValueError(f"{hidden_name} needs {labels_name}")
        weight, bias, weight_name = head
        _check_frozen_hidden(hidden_name, hidden, labels, labels_name, weight, weight_name)
        with torch.no_grad():
            return self.sequence_logps(hidden, weight, labels, bias)[0]

    def forward(
        self,
        hidden,
        weight,
        labels,
        bias=None,
        *,
        ref_logps=None,
        ref_hidden=None,
        ref_weight=None,
        ref_bias=None,
        desirable=None,
        kl=None,
        kl_hidden=None,
        kl_labels=None,
        kl_logps=None,
        ref_kl_hidden=None,
        ref_kl_logps=None,
        nll_labels=None,
    ):
        """Returns `(loss, metrics)`.

        Reference inputs (dpo/ipo/kto): `ref_logps` per sequence [B] or per token [B, T] (shaped as `labels`; only
        positions whose label is not ignore_index count), or `ref_hidden` [B, T, H] with `ref_weight`/`ref_bias`
        (default: the policy's head) computed under no grad.
        KTO: `desirable` [B] bool (or 0/1 integers, or a sequence of bools), and the KL reference point as `kl` (a
        number or one-element tensor), or from the mismatched pairs: `kl_hidden` with `kl_labels` (or `kl_logps`,
        [B_kl], or [B_kl, T_kl] with `kl_labels`) and `ref_kl_hidden` (or `ref_kl_logps`, shaped as `kl_logps`).
        ORPO: `nll_labels` [B, T], the tokens its NLL term scores (default: `labels`). TRL's ORPOTrainer scores every
        non-padding token of the chosen rows, prompt included: its input ids where the attention mask is set, shifted
        as `labels`. Where `labels` is not ignore_index they must agree (the same next token).
        """
        given = {name for name, value in (
            ("ref_logps", ref_logps), ("ref_hidden", ref_hidden), ("ref_weight", ref_weight), ("ref_bias", ref_bias),
            ("desirable", desirable), ("kl", kl), ("kl_hidden", kl_hidden), ("kl_labels", kl_labels),
            ("kl_logps", kl_logps), ("ref_kl_hidden", ref_kl_hidden), ("ref_kl_logps", ref_kl_logps),
            ("nll_labels", nll_labels),
        ) if value is not None}
        # An input the method does not use is a caller's mistake: say so rather than drop it (or compute it).
        unused = given - _inputs_used(self.record)
        if unused:
            raise ValueError(f"{self.method} does not use {sorted(unused)}")
        if kl is not None and given & {"kl_hidden", "kl_labels", "kl_logps", "ref_kl_hidden", "ref_kl_logps"}:
            raise ValueError(
                f"give {self.method} either `kl` or the mismatched-pair inputs it is estimated from, not both"
            )
        head_inputs = given & {"ref_weight", "ref_bias"}
        if head_inputs and not given & {"ref_hidden", "ref_kl_hidden"}:
            raise ValueError(f"{sorted(head_inputs)} project ref_hidden or ref_kl_hidden, and neither is given")
        _check_labels("labels", labels)
        check_inputs(hidden, weight, labels, bias)
        device = hidden.device
        if head_inputs:
            _check_reference_head(ref_weight, ref_bias, weight, device)
        ref_weight_name = "weight" if ref_weight is None else "ref_weight"
        ref_weight = weight if ref_weight is None else ref_weight
        ref_bias = bias if ref_bias is None and ref_weight is weight else ref_bias
        ref_head = (ref_weight, ref_bias, ref_weight_name)
        ref = self._frozen_sequence_logps("ref", ref_logps, ref_hidden, ref_head, labels, "labels", device)
        extra = {}
        if desirable is not None:
            extra["desirable"] = losses.desirable_mask(desirable, labels.shape[0], device)
        if self.record.kl_batch:
            if kl_hidden is not None and kl_labels is None:
                raise ValueError("kl_hidden needs kl_labels")
            if kl_labels is not None:
                _check_labels("kl_labels", kl_labels, device)
            extra["kl"] = None if kl is None else losses.kl_point(kl, device)
            extra["kl_logps"] = self._frozen_sequence_logps(
                "kl", kl_logps, kl_hidden, (weight, bias, "weight"), kl_labels, "kl_labels", device
            )
            extra["ref_kl_logps"] = self._frozen_sequence_logps(
                "ref_kl", ref_kl_logps, ref_kl_hidden, ref_head, kl_labels, "kl_labels", device
            )
        completion = labels != self.ignore_index
        lengths = completion.sum(-1)
        # The tokens scored: the completions', and those of the NLL term's own labels.
        scored = labels if nll_labels is None else self._union_with_nll_labels(labels, nll_labels, device)
        if nll_labels is not None:
            nll_mask = nll_labels != self.ignore_index
            extra["nll_lengths"] = nll_mask.sum(-1)

        def loss_and_metrics(token_logps):
            # Per-token log-probs are 0 at ignored positions; selected, not multiplied, where a row has two masks.
            logps = torch.where(completion, token_logps, 0.0).sum(-1)
            if nll_labels is not None:
                extra["nll_logps"] = torch.where(nll_mask, token_logps, 0.0).sum(-1)
            return losses.from_sequence_stats(self.method, logps, lengths, ref_logps=ref, **extra, **self.hparams)

        chunks = self._trained_head_chunks(hidden, weight, scored, bias)
        if chunks is None:
            return loss_and_metrics(self.token_logps(hidden, weight, scored, bias))
        loss, token_logps = _TrainedHeadLossFunction.apply(
            hidden, weight, bias, scored, self.transform, self.ignore_index, chunks,
            lambda token_logps: loss_and_metrics(token_logps)[0],
        )
        return loss, loss_and_metrics(token_logps)[1]

    def _union_with_nll_labels(self, labels, nll_labels, device):
        """`labels` where set, else `nll_labels`: every token the loss scores, each once."""
        _check_labels("nll_labels", nll_labels, device)
        if nll_labels.shape != labels.shape:
            raise ValueError(f"nll_labels has shape {tuple(nll_labels.shape)}, expected {tuple(labels.shape)} (the "
                             "shape of labels)")
        completion = labels != self.ignore_index
        disagree = completion & (nll_labels != labels)
        if bool(disagree.any()):
            row, position = disagree.nonzero()[0].tolist()
            raise ValueError(f"nll_labels and labels name different tokens at row {row}, position {position} "
                             f"({nll_labels[row, position].item()} vs {labels[row, position].item()}): where labels "
                             "scores a token, nll_labels must score the same one")
        return torch.where(completion, labels, nll_labels)

    def _trained_head_chunks(self, hidden, weight, labels, bias):
        """Chunks for the one-pass path, or None where it does not apply (see the module docstring)."""
        from torch.distributed.tensor import DTensor

        trained = weight.requires_grad or (bias is not None and bias.requires_grad)
        # A vocabulary-sharded (DTensor) head goes through fused_linear_logprobs, which combines the shards.
        if not (trained and torch.is_grad_enabled() and hidden.device.type == "cpu") or isinstance(weight, DTensor):
            return None
        if self.record.paired and labels.shape[0] % 2:
            return None  # from_sequence_stats names the error
        check_label_range(labels[labels != self.ignore_index].long(), weight.shape[0])
        return _group_chunks(self.method, labels, self.ignore_index, weight.shape[0])
