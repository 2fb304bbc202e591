"""What a transformers model's LM head is beyond `hidden @ W.T + b`, as the fused head must reproduce it: the logit
transform its forward applies and what the fused head cannot compute (read off the config), and the dtype its
operands are projected in. No model and no transformers import; shared by the train CLI and the drop-in."""

from __future__ import annotations

import torch

# Config fields that multiply a model's head output, in the order they are looked for; Granite's and MiniCPM3's
# `logits_scaling` divides it (HyperCLOVA X's multiplies).
LOGIT_SCALE_FIELDS = ("logit_scale", "output_multiplier", "lm_head_multiplier")


def head_logit_transform(config) -> dict:
    """The transform a transformers model applies to its head's output before returning the logits, as the
    `softcap` and `logit_scale` arguments of `fused_linear_logprobs` and `FusedLinearPreferenceLoss`: Gemma 2/3/3n
    soft-cap (`final_logit_softcapping`), Cohere (`logit_scale`), Falcon-H1 (`lm_head_multiplier`) and others
    multiply, Granite and MiniCPM3 divide by `logits_scaling`. The fields TRL's own fused head reads."""
    text_config = config.get_text_config()
    scale = next((value for value in (getattr(text_config, name, None) for name in LOGIT_SCALE_FIELDS)
                  if value is not None), None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return {"softcap": getattr(text_config, "final_logit_softcapping", None),
            "logit_scale": 1.0 if scale is None else scale}


def check_fused_head_support(config, what, router_losses: bool = False):
    """Refuse (NotImplementedError naming `what`) an encoder-decoder model, whose decoder the fused head does not
    reach, and an MoE model that adds its router's load-balancing loss unless the caller adds it (`router_losses`)."""
    if getattr(config.get_text_config(), "output_router_logits", False) and not router_losses:
        raise NotImplementedError(f"{what}: MoE router auxiliary losses (output_router_logits) are not supported")
    if getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError(f"{what}: encoder-decoder models are not supported")


def head_operands(hidden, weight, bias, dtype=None):
    """(hidden, weight, bias) in the dtype the head projects in, for the fused op called outside autocast: `dtype`
    when given, else what a model's own lm_head Linear gets, autocast's dtype under autocast and the weight's
    otherwise. Whatever the operands, the fused head accumulates and keeps its logits in fp32."""
    if dtype is None:
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
