"""Naive references: materialised logits, `log_softmax`, `gather`. Used by the tests and the benches.

They are what every fused path must equal; they are deliberately the plainest PyTorch there is.
"""

from __future__ import annotations

import torch

from pyprefopt import losses


def reference_logprobs(hidden, weight, labels, bias=None, ignore_index=-100, temperature=1.0, dtype=torch.float32):
    """Per-token log-probs through the full `[..., V]` logits, computed in `dtype`."""
    logits = torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels)).long()
    picked = logprobs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked))


def reference_preference_loss(method, hidden, weight, labels, bias=None, ignore_index=-100, **kwargs):
    """The same loss as `FusedLinearPreferenceLoss(method, ...)` computed through materialised logits.

    kwargs: the loss hyper-parameters plus, as the method needs, `ref_logps` (per-sequence),
    `desirable` (KTO) and `kl_logps`/`ref_kl_logps` (KTO, per-sequence).
    """
    logps = reference_logprobs(hidden, weight, labels, bias, ignore_index)
    mask = labels != ignore_index
    seq_logps = logps.sum(-1)
    lengths = mask.sum(-1)
    return losses.from_sequence_stats(method, seq_logps, lengths, **kwargs)
