"""`FusedLinearPreferenceLoss`: LM head + log-probs + SFT/DPO/IPO/CPO/KTO loss, logits never materialised."""

from __future__ import annotations

import inspect

import torch

from pyprefopt import losses
from pyprefopt.fused_linear_logprobs import fused_linear_logprobs

_LOSS_FUNCTIONS = {
    "sft": losses.sft_loss,
    "dpo": losses.dpo_loss,
    "ipo": losses.ipo_loss,
    "cpo": losses.cpo_loss,
    "kto": losses.kto_loss,
}


def _hyperparameters(method):
    """Names of a method's keyword hyper-parameters (those with defaults in its loss function)."""
    params = inspect.signature(_LOSS_FUNCTIONS[method]).parameters.values()
    return {p.name for p in params if p.default is not inspect.Parameter.empty}


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
        logps, lengths = self.sequence_logps(hidden, weight, labels, bias)
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
        return losses.from_sequence_stats(self.method, logps, lengths, ref_logps=ref, **extra, **self.hparams)
