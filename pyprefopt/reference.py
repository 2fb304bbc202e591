"""Naive references: materialised logits, `log_softmax`, `gather`. Used by the tests and the benches.

They are what every fused path must equal; they are deliberately the plainest PyTorch there is.
"""

from __future__ import annotations

import torch

from pyprefopt import losses, nf4


def reference_logits(hidden, weight, bias=None, temperature=1.0, softcap=None, logit_scale=1.0, dtype=torch.float32):
    """The full `[..., V]` logits in `dtype` as a transformers head gives them (scale, then soft-cap), divided by
    the temperature: `softcap * tanh(logit_scale * z / softcap) / T`, z = hidden @ W.T + b."""
    logits = torch.nn.functional.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    logits = logits * logit_scale
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits / temperature


def reference_logprobs(hidden, weight, labels, bias=None, ignore_index=-100, temperature=1.0, dtype=torch.float32,
                       softcap=None, logit_scale=1.0):
    """Per-token log-probs through the full `[..., V]` logits, computed in `dtype` (the softmax in fp32 at
    least, as TRL does; float64 gives the tests their truth)."""
    logits = reference_logits(hidden, weight, bias, 1.0, softcap, logit_scale, dtype)
    logprobs = torch.log_softmax(logits.to(torch.promote_types(dtype, torch.float32)) / temperature, dim=-1)
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels)).long()
    picked = logprobs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, picked, torch.zeros_like(picked))


def reference_token_statistics(hidden, weight, labels, bias=None, ignore_index=-100, temperature=1.0,
                               dtype=torch.float32, softcap=None, logit_scale=1.0):
    """`fused_linear_logprobs`'s statistics through the full logits in `dtype`: entropy, log sum p^2, mean
    logit, and whether the label's logit is the largest; 0 (False) at ignored positions."""
    logits = reference_logits(hidden, weight, bias, temperature, softcap, logit_scale, dtype)
    logprobs = torch.log_softmax(logits, dim=-1)
    mask = labels != ignore_index
    safe = torch.where(mask, labels, torch.zeros_like(labels)).long()
    stats = {
        "entropy": -(logprobs.exp() * logprobs).sum(-1),
        "log_sum_sq_probs": torch.logsumexp(2 * logprobs, dim=-1),
        "mean_logits": logits.mean(-1),
        "is_top1": logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1) >= logits.amax(-1),
    }
    return {name: torch.where(mask, value, torch.zeros_like(value)) for name, value in stats.items()}


def reference_preference_loss(method, hidden, weight, labels, bias=None, ignore_index=-100, temperature=1.0,
                              softcap=None, logit_scale=1.0, nll_labels=None, **kwargs):
    """The same loss as `FusedLinearPreferenceLoss(method, ...)` computed through materialised logits.

    kwargs: the loss hyper-parameters plus, as the method needs, `ref_logps` (per-sequence),
    `desirable` (KTO) and `kl_logps`/`ref_kl_logps` (KTO, per-sequence); `nll_labels` as the module takes them.
    """
    def sequence_logps(labels):
        return reference_logprobs(hidden, weight, labels, bias, ignore_index, temperature, softcap=softcap,
                                  logit_scale=logit_scale).sum(-1), (labels != ignore_index).sum(-1)

    if nll_labels is not None:
        kwargs["nll_logps"], kwargs["nll_lengths"] = sequence_logps(nll_labels)
    return losses.from_sequence_stats(method, *sequence_logps(labels), **kwargs)


# The NF4 decode's pure-PyTorch kernel is the reference the C++ and CUDA kernels are tested against, as in
# bitsandbytes; it lives with the other NF4 kernels, where it also serves devices with no extension built.
dequant_merge_nf4_reference = nf4.dequant_merge_nf4_torch


def lora_linear_reference(x, weight, lora_a, lora_b, scale, bias=None, lora_x=None):
    """A LoRA linear layer as three plain ops: `x @ W.T + bias + scale * (lora_x @ A.T) @ B.T`, where
    `lora_x` is the LoRA branch's (dropped-out) input, x itself by default. Computed in x's dtype."""
    lora_x = x if lora_x is None else lora_x
    low = torch.nn.functional.linear(torch.nn.functional.linear(lora_x, lora_a), lora_b)
    return torch.nn.functional.linear(x, weight, bias) + scale * low


def swiglu_reference(gate, up):
    """SwiGLU's gating as transformers' Llama/Qwen MLP computes it: `silu(gate) * up`, in the inputs' dtype."""
    return torch.nn.functional.silu(gate) * up


def geglu_reference(gate, up, activation_sparsity=0.0):
    """GeGLU's gating as transformers' Gemma 2, 3 and 3n MLPs compute it, in the inputs' dtype: `gelu_tanh(s) * up`,
    s = gate, or with Gemma-3n's activation sparsity `relu(gate - mean - k * std)` over each row, k the normal
    quantile of `activation_sparsity` in the inputs' dtype."""
    if activation_sparsity > 0:
        k = torch.distributions.Normal(0, 1).icdf(torch.tensor(activation_sparsity)).to(gate.dtype)
        cutoff = gate.mean(-1, keepdim=True) + gate.std(-1, keepdim=True, unbiased=False) * k
        gate = torch.relu(gate - cutoff)
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


def rms_norm_reference(x, weight, eps=1e-6, scale_in_fp32=False, weight_offset=0.0):
    """RMSNorm as transformers' Llama/Qwen RMSNorm computes it: statistics in fp32 (fp64 for fp64 inputs), the
    normalised row rounded to x's dtype, then scaled by the weight; with `scale_in_fp32` as Gemma's: scaled by
    weight_offset + weight (none for weight None) in fp32, then rounded to x's dtype."""
    x_wide = x.to(torch.promote_types(x.dtype, torch.float32))
    normed = x_wide * torch.rsqrt(x_wide.pow(2).mean(-1, keepdim=True) + eps)
    if not scale_in_fp32:
        return weight * normed.to(x.dtype)
    if weight is not None:
        normed = normed * (weight.to(x_wide.dtype) + weight_offset)
    return normed.to(x.dtype)
