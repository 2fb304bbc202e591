"""A decoder's MLPs and RMSNorms swapped for ops that keep less for backward (`pyprefopt.swiglu`, `pyprefopt.geglu`,
`pyprefopt.rms_norm`), over the same parameters.

Only the transformers classes whose forward is the one those ops compute are swapped:
- the SiLU MLP `down_proj(silu(gate_proj(x)) * up_proj(x))` of Llama, Mistral, Qwen2 and Qwen3, and the
  GELU-tanh MLP of Gemma 2, 3 and 3n (Gemma-3n's with its layer's Gaussian top-k activation sparsity);
- the RMSNorm `w * round_x(x * rstd)` of Llama, Mistral, Qwen2 and Qwen3, and Gemma's `round_x(x * rstd * s)` in
  fp32, with s = 1 + w (Gemma 2, 3), w or nothing (Gemma-3n's `with_scale`).
Other modules, and these with another activation in their config, keep their own.
"""

from __future__ import annotations

import functools

from torch import nn

from pyprefopt.geglu import GeGLUMLP
from pyprefopt.rms_norm import RMSNorm
from pyprefopt.swiglu import SwiGLUMLP

LLAMA_ORDER_FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3")
SILU_MLP_CLASSES = frozenset(f"{family}MLP" for family in LLAMA_ORDER_FAMILIES)
GELU_TANH_MLP_CLASSES = frozenset({"Gemma2MLP", "Gemma3MLP", "Gemma3nTextMLP"})
LEAN_MLP_CLASSES = SILU_MLP_CLASSES | GELU_TANH_MLP_CLASSES
# RMSNorm classes: (scale_in_fp32, weight_offset, the attribute holding eps).
RMS_NORM_CLASSES = {f"{family}RMSNorm": (False, 0.0, "variance_epsilon") for family in LLAMA_ORDER_FAMILIES} | {
    "Gemma2RMSNorm": (True, 1.0, "eps"), "Gemma3RMSNorm": (True, 1.0, "eps"),
    "Gemma3nRMSNorm": (True, 0.0, "variance_epsilon")}


def _from_transformers(module: nn.Module, names) -> bool:
    cls = type(module)
    return cls.__name__ in names and cls.__module__.startswith("transformers.models.")


def _activation(module: nn.Module) -> str | None:
    act = getattr(module, "act_fn", None)
    name = type(act).__name__
    if name in ("SiLU", "SiLUActivation"):
        return "silu"
    # transformers' GELUTanh calls torch's GELU with approximate="tanh", unless built with its Python formula.
    inner = getattr(act, "act", None)
    if name == "GELUTanh" and isinstance(inner, functools.partial) and inner.func is nn.functional.gelu \
            and inner.keywords == {"approximate": "tanh"}:
        return "gelu_tanh"
    return None


def lean_mlp(module: nn.Module, backend: str = "auto") -> nn.Module | None:
    """The activation-lean MLP over `module`'s projections, or None for a module of another class or activation."""
    if _from_transformers(module, SILU_MLP_CLASSES) and _activation(module) == "silu":
        return SwiGLUMLP(module.gate_proj, module.up_proj, module.down_proj, backend)
    if _from_transformers(module, GELU_TANH_MLP_CLASSES) and _activation(module) == "gelu_tanh":
        return GeGLUMLP(module.gate_proj, module.up_proj, module.down_proj,
                        getattr(module, "activation_sparsity", 0.0))
    return None


def lean_rms_norm(module: nn.Module, backend: str = "auto") -> RMSNorm | None:
    """The activation-lean RMSNorm over `module`'s weight (if it has one), or None for a module of another class."""
    if not _from_transformers(module, RMS_NORM_CLASSES):
        return None
    scale_in_fp32, offset, eps = RMS_NORM_CLASSES[type(module).__name__]
    return RMSNorm(getattr(module, "weight", None), getattr(module, eps), backend, scale_in_fp32=scale_in_fp32,
                   weight_offset=offset)


def use_lean_activations(model: nn.Module, backend: str = "auto", recompute_mlp: bool = False) -> dict[str, int]:
    """Swaps, in place, every MLP and RMSNorm of the classes above for `SwiGLUMLP`, `GeGLUMLP` and `RMSNorm` holding
    the same projection modules and weight parameters (state-dict keys, LoRA layers and optimizer state are
    unchanged). Call it before sharding (FSDP) or compiling. Returns how many of each were swapped.

    `recompute_mlp`: the MLPs keep only their input and run gate_proj, up_proj and the gating (and down_proj where
    it has a LoRA branch) again in backward (`GatedMLP.recompute`): less memory for more time, cheapest where the
    MLP has no LoRA branch, and nothing gained under whole-layer activation checkpointing, which recomputes the MLP
    anyway."""
    swapped = {"mlp": 0, "rms_norm": 0}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (mlp := lean_mlp(child, backend)) is not None:
                mlp.recompute = recompute_mlp
                parent.add_module(name, mlp)
                swapped["mlp"] += 1
            elif (norm := lean_rms_norm(child, backend)) is not None:
                parent.add_module(name, norm)
                swapped["rms_norm"] += 1
    return swapped
