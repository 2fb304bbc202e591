"""Packed rows on CPU: the real tokens of a batch's right-padded rows run as one row through the decoder, each
sequence with its own positions and its own causal attention, so no padding is computed at all.

transformers' attention interface lets a model's attention be swapped by name: `use_packed_attention` registers
an SDPA that runs each packed sequence's range alone (its mask: none, the sequences' own causal attention is the
packed attention's), and `packed_last_hidden` runs one packed forward. Outside a packed forward the registered
attention is transformers' SDPA itself, so the model computes exactly what it did.
"""

from __future__ import annotations

import torch

# The attention implementation given to a CPU model whose attention is transformers' SDPA.
PACKED_ATTENTION = "pyprefopt_packed_sdpa"

# While packed_last_hidden runs a packed forward: transformers builds no attention mask (the sequences' own causal
# attention is the packed attention's), and every call of the packed attention is counted.
_packed_forward = {"active": False, "calls": 0}


def _packed_sdpa_attention(module, query, key, value, attention_mask, pyprefopt_lengths=None, **kwargs):
    """transformers' SDPA attention; with `pyprefopt_lengths` (the token counts of the sequences packed one after
    the other in one row, query/key/value [1, heads, tokens, head_dim]) run on each sequence alone, causal within it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if pyprefopt_lengths is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    _packed_forward["calls"] += 1
    window = kwargs.get("sliding_window")
    outputs = []
    # split, not slicing: its backward writes the sequences' gradients into one tensor instead of adding up one
    # full-size zero-padded gradient per sequence.
    for q, k, v in zip(*(t.split(pyprefopt_lengths, dim=2) for t in (query, key, value))):
        mask = None
        n = q.shape[2]
        if window is not None and n > window:
            # transformers' sliding window: a query sees the `window` most recent keys, itself included.
            i = torch.arange(n, device=q.device)
            mask = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < window)
        outputs.append(sdpa_attention_forward(module, q, k, v, mask, **kwargs)[0])  # [1, n, heads, head_dim]
    return torch.cat(outputs, dim=1), None


def _packed_sdpa_mask(*args, **kwargs):
    """transformers' SDPA mask, none during a packed forward (the packed attention keeps the sequences apart)."""
    from transformers.masking_utils import sdpa_mask

    return None if _packed_forward["active"] else sdpa_mask(*args, **kwargs)


def use_packed_attention(model) -> bool:
    """Give `model` the packed SDPA attention if its attention is transformers' SDPA through the attention
    interface (models with their own attention code keep it, and last_hidden its length groups). Outside
    last_hidden's packed forwards the model computes exactly what it did. Returns whether it was set."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, _packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, _packed_sdpa_mask)
    model.set_attn_implementation(PACKED_ATTENTION)  # warns and changes nothing for a model that cannot
    return model.config._attn_implementation == PACKED_ATTENTION


def packed_last_hidden(decoder, input_ids, lengths, device):
    """Last hidden states [B, T, H] of right-padded rows whose real tokens (`lengths` of each row) run as one
    packed row through a decoder given the packed attention (use_packed_attention), each sequence with its own
    positions 0..n-1; zero past each row's length. Raises RuntimeError if the decoder bypassed the packed
    attention, which would have let the sequences attend to each other."""
    rows, width = input_ids.shape
    real = torch.arange(width) < lengths[:, None]  # [B, T]: row-major, so row 0's tokens come first
    counts = tuple(lengths.tolist())
    positions = torch.cat([torch.arange(n) for n in counts])
    _packed_forward.update(active=True, calls=0)
    try:
        hidden = decoder(input_ids=input_ids[real][None].to(device), position_ids=positions[None].to(device),
                         use_cache=False, pyprefopt_lengths=counts).last_hidden_state[0]
    finally:
        _packed_forward["active"] = False
    if _packed_forward["calls"] == 0:
        raise RuntimeError(f"{type(decoder).__name__} did not run its attention through {PACKED_ATTENTION!r}: "
                           "the packed sequences would have attended to each other")
    index = real.reshape(-1).nonzero().squeeze(1).to(device)
    return hidden.new_zeros(rows * width, hidden.shape[-1]).index_copy(0, index, hidden).view(rows, width, -1)
