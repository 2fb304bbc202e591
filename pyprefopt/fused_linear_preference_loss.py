"""`FusedLinearPreferenceLoss`: LM head + log-probs + SFT/DPO/IPO/CPO/KTO loss, logits never materialised.

Two ways to the gradient:
- frozen head, or any head on GPU: through `fused_linear_logprobs` (on CPU its forward already forms
  d logp / d h, so fwd+bwd costs the two GEMMs the maths needs);
- trained head (weight or bias requires grad) on CPU: one pass. All five losses are separable over
  groups of rows (a chosen/rejected pair, or one row for SFT and KTO, whose KL point is detached), so
  once a chunk of whole groups has its log-probs the loss's gradient w.r.t. them is known, and the
  chunk's logits turn into their gradient right away: three GEMMs (logits, dH, dW) instead of the
  four a recompute costs. Groups too long for one chunk fall back to the first way.
"""

from __future__ import annotations

import inspect

import torch

from pyprefopt import losses
from pyprefopt.fused_linear_logprobs import (
    _check_inputs,
    _check_label_range,
    _fp32,
    _logits_tile,
    fused_linear_logprobs,
)

# Bytes of fp32 logits one chunk of whole groups may hold on the trained-head path.
TRAINED_HEAD_CHUNK_BYTES = 64 * 2**20

_LOSS_FUNCTIONS = {
    "sft": losses.sft_loss,
    "dpo": losses.dpo_loss,
    "ipo": losses.ipo_loss,
    "cpo": losses.cpo_loss,
    "kto": losses.kto_loss,
}


_REFERENCE_INPUTS = {"ref_logps", "ref_hidden", "ref_weight", "ref_bias"}
_INPUTS_USED = {
    "sft": set(),
    "cpo": set(),
    "dpo": _REFERENCE_INPUTS,
    "ipo": _REFERENCE_INPUTS,
    "kto": _REFERENCE_INPUTS
    | {"desirable", "kl", "kl_hidden", "kl_labels", "kl_logps", "ref_kl_hidden", "ref_kl_logps"},
}


def _hyperparameters(method):
    """Names of a method's keyword hyper-parameters (those with defaults in its loss function)."""
    params = inspect.signature(_LOSS_FUNCTIONS[method]).parameters.values()
    return {p.name for p in params if p.default is not inspect.Parameter.empty}


def _group_chunks(method, labels, ignore_index, vocab):
    """Row ids of consecutive chunks of whole groups, each within TRAINED_HEAD_CHUNK_BYTES of logits;
    None when one group alone is over it."""
    rows = labels.shape[0]
    counts = (labels != ignore_index).sum(-1)
    if method in losses.PAIRED_METHODS:
        half = rows // 2
        groups = [torch.tensor([i, i + half]) for i in range(half)]
        group_tokens = (counts[:half] + counts[half:]).tolist()
    else:
        groups = [torch.tensor([i]) for i in range(rows)]
        group_tokens = counts.tolist()
    budget = TRAINED_HEAD_CHUNK_BYTES // (4 * vocab)
    if max(group_tokens) > budget:
        return None
    chunks, current, tokens = [], [], 0
    for group, n in zip(groups, group_tokens):
        if current and tokens + n > budget:
            chunks.append(torch.cat(current))
            current, tokens = [], 0
        current.append(group)
        tokens += n
    chunks.append(torch.cat(current))
    return chunks


class _TrainedHeadLossFunction(torch.autograd.Function):
    """Loss and all its gradients in the forward pass; backward scales them by the upstream gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, inv_t, ignore_index, chunks, loss_of_logps):
        rows, seq_len = labels.shape
        vocab = weight.shape[0]
        flat_hidden = hidden.reshape(rows * seq_len, -1)
        flat_labels = labels.reshape(-1)
        dev = hidden.device
        # Sequence sums accumulate token by token across chunks: in fp64, so a long row sums as accurately
        # as torch's pairwise `sum` does.
        logps = torch.zeros(rows, dtype=torch.float64, device=dev)
        grad_hidden = torch.zeros(flat_hidden.shape, dtype=torch.float32, device=dev) if hidden.requires_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=dev) if weight.requires_grad else None
        grad_bias = (
            torch.zeros(vocab, dtype=torch.float32, device=dev) if bias is not None and bias.requires_grad else None
        )
        w = _fp32(weight)
        b = None if bias is None else _fp32(bias)
        positions = torch.arange(seq_len, device=dev)
        token_lists = []
        for chunk in chunks:
            tokens = (chunk.to(dev)[:, None] * seq_len + positions).reshape(-1)
            tokens = tokens[flat_labels.index_select(0, tokens) != ignore_index]
            token_lists.append(tokens)
        logits_buffer = torch.empty(max(t.numel() for t in token_lists), vocab, dtype=torch.float32, device=dev)
        for tokens in token_lists:
            n = tokens.numel()
            if n == 0:
                continue
            h = _fp32(flat_hidden.index_select(0, tokens))
            y = flat_labels.index_select(0, tokens).long()
            row_of_token = tokens // seq_len
            z, _ = _logits_tile(h, w, b, 0, vocab, logits_buffer)
            if inv_t != 1.0:
                z.mul_(inv_t)
            arange = torch.arange(n, device=dev)
            label_logit = z[arange, y]
            # In-place softmax numerator: three passes over the chunk instead of logsumexp's copies.
            row_max = z.amax(dim=1)
            z.sub_(row_max[:, None]).exp_()
            row_sum = z.sum(dim=1)
            logps.index_add_(0, row_of_token, (label_logit - row_max - row_sum.log()).double())
            # Separability: the loss's gradient w.r.t. this chunk's rows depends on those rows alone
            # (plus batch constants), so evaluating it now on the partly filled vector is exact for them.
            with torch.enable_grad():
                probe = logps.float().requires_grad_()
                (grad_logps,) = torch.autograd.grad(loss_of_logps(probe), probe)
            g = grad_logps.index_select(0, row_of_token).mul_(inv_t)
            # z <- d loss / d z = g * (onehot(y) - softmax(z)), in place.
            z.mul_((-g / row_sum)[:, None])
            z[arange, y] += g
            if grad_hidden is not None:
                grad_hidden.index_copy_(0, tokens, z @ w)
            if grad_weight is not None:
                grad_weight.addmm_(z.T, h)
            if grad_bias is not None:
                grad_bias += z.sum(dim=0)
        # Held on ctx, not saved for backward: backward hands these buffers over as the gradients (no copy
        # of a [V, H] tensor), so they must not stay reachable from the graph afterwards.
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.shapes = (hidden.shape, hidden.dtype, weight.dtype)
        logps = logps.float()
        ctx.mark_non_differentiable(logps)
        return loss_of_logps(logps), logps

    @staticmethod
    def backward(ctx, grad_loss, _grad_logps):
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
        method: "sft", "dpo", "ipo", "cpo" or "kto".
        ignore_index: label value of positions that carry no loss (prompt, padding).
        temperature: logits are divided by it before the softmax.
        **hparams: the method's hyper-parameters, as in `pyprefopt.losses`: `beta` (dpo/ipo/cpo/kto),
            `label_smoothing` (dpo/cpo), `alpha` and `simpo_gamma` (cpo), `desirable_weight` and
            `undesirable_weight` (kto).

    Batches follow TRL: `hidden [B, T, H]` and `labels [B, T]` aligned (position t scores labels[t]),
    and for dpo/ipo/cpo the chosen rows first, the rejected rows second.
    """

    def __init__(self, method: str, ignore_index: int = -100, temperature: float = 1.0, **hparams):
        super().__init__()
        if method not in losses.METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {losses.METHODS}")
        unknown = set(hparams) - _hyperparameters(method)
        if unknown:
            raise TypeError(
                f"{method} takes hyper-parameters {sorted(_hyperparameters(method))}, not {sorted(unknown)}"
            )
        if "beta" in hparams and not hparams["beta"] > 0:
            raise ValueError(f"beta must be > 0, got {hparams['beta']}")
        self.method = method
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.hparams = hparams

    def extra_repr(self):
        return f"method={self.method!r}, " + ", ".join(f"{k}={v}" for k, v in self.hparams.items())

    def sequence_logps(self, hidden, weight, labels, bias=None):
        """Summed log-probs [B] and completion lengths [B] of each row."""
        if labels.dim() != 2:
            raise ValueError(f"labels must be [batch, seq_len], got shape {tuple(labels.shape)}")
        token_logps = fused_linear_logprobs(hidden, weight, labels, bias, self.ignore_index, self.temperature)
        return token_logps.sum(-1), (labels != self.ignore_index).sum(-1)

    def _frozen_sequence_logps(self, given, hidden, weight, bias, labels, name):
        """Per-sequence log-probs under no grad: given directly ([B] or per-token [B, T]), or from hidden states."""
        if given is not None:
            return given.detach().float().sum(-1) if given.dim() == 2 else given.detach().float()
        if hidden is None:
            return None
        if weight is None:
            raise ValueError(f"{name}_hidden needs a weight ({name}_weight or the policy's lm_head weight)")
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
    ):
        """Returns `(loss, metrics)`.

        Reference inputs (dpo/ipo/kto): `ref_logps` per sequence [B] or per token [B, T], or
        `ref_hidden` [B, T, H] with `ref_weight`/`ref_bias` (default: the policy's head) computed under no grad.
        KTO: `desirable` [B] bool, and the KL reference point as `kl`, or from the mismatched pairs:
        `kl_hidden` with `kl_labels` (or `kl_logps`) and `ref_kl_hidden` (or `ref_kl_logps`).
        """
        given = {name for name, value in (
            ("ref_logps", ref_logps), ("ref_hidden", ref_hidden), ("ref_weight", ref_weight), ("ref_bias", ref_bias),
            ("desirable", desirable), ("kl", kl), ("kl_hidden", kl_hidden), ("kl_labels", kl_labels),
            ("kl_logps", kl_logps), ("ref_kl_hidden", ref_kl_hidden), ("ref_kl_logps", ref_kl_logps),
        ) if value is not None}
        # An input the method does not use is a caller's mistake: say so rather than drop it (or compute it).
        unused = given - _INPUTS_USED[self.method]
        if unused:
            raise ValueError(f"{self.method} does not use {sorted(unused)}")
        if kl is not None and given & {"kl_hidden", "kl_labels", "kl_logps", "ref_kl_hidden", "ref_kl_logps"}:
            raise ValueError("give kto either `kl` or the mismatched-pair inputs it is estimated from, not both")
        ref_weight = weight if ref_weight is None else ref_weight
        ref_bias = bias if ref_bias is None and ref_weight is weight else ref_bias
        ref = self._frozen_sequence_logps(ref_logps, ref_hidden, ref_weight, ref_bias, labels, "ref")
        extra = {}
        if self.method == "kto":
            if kl_hidden is not None and kl_labels is None:
                raise ValueError("kl_hidden needs kl_labels")
            extra["desirable"] = desirable
            extra["kl"] = kl
            extra["kl_logps"] = self._frozen_sequence_logps(kl_logps, kl_hidden, weight, bias, kl_labels, "kl")
            extra["ref_kl_logps"] = self._frozen_sequence_logps(
                ref_kl_logps, ref_kl_hidden, ref_weight, ref_bias, kl_labels, "ref_kl"
            )
        lengths = (labels != self.ignore_index).sum(-1)

        def loss_and_metrics(logps):
            return losses.from_sequence_stats(self.method, logps, lengths, ref_logps=ref, **extra, **self.hparams)

        chunks = self._trained_head_chunks(hidden, weight, labels, bias)
        if chunks is None:
            logps, _ = self.sequence_logps(hidden, weight, labels, bias)
            return loss_and_metrics(logps)
        loss, logps = _TrainedHeadLossFunction.apply(
            hidden, weight, bias, labels, 1.0 / self.temperature, self.ignore_index, chunks,
            lambda logps: loss_and_metrics(logps)[0],
        )
        return loss, loss_and_metrics(logps)[1]

    def _trained_head_chunks(self, hidden, weight, labels, bias):
        """Chunks for the one-pass path, or None where it does not apply (see the module docstring)."""
        trained = weight.requires_grad or (bias is not None and bias.requires_grad)
        if not (trained and torch.is_grad_enabled() and hidden.device.type == "cpu"):
            return None
        _check_inputs(hidden, weight, labels, bias, self.temperature)
        if labels.dim() != 2:
            raise ValueError(f"labels must be [batch, seq_len], got shape {tuple(labels.shape)}")
        if self.method in losses.PAIRED_METHODS and labels.shape[0] % 2:
            return None  # from_sequence_stats names the error
        _check_label_range(labels[labels != self.ignore_index].long(), weight.shape[0])
        return _group_chunks(self.method, labels, self.ignore_index, weight.shape[0])
