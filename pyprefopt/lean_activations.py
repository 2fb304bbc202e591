"""A decoder's MLPs and RMSNorms swapped for ops that keep less for backward (`pyprefopt.swiglu`,
`pyprefopt.rms_norm`), over the same parameters.

Only the transformers classes whose forward is the one those ops compute are swapped: the SiLU MLP
`down_proj(silu(gate_proj(x)) * up_proj(x))` and the RMSNorm `w * round_x(x * rstd)` of Llama, Mistral, Qwen2 and
Qwen3. Other families (Gemma's RMSNorm scales by 1 + w, in fp32; Gemma-3n's MLP is GELU with activation sparsity)
keep their own modules.
"""

from __future__ import annotations

from torch import nn

from pyprefopt.rms_norm import RMSNorm
from pyprefopt.swiglu import SwiGLUMLP

FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3")
MLP_CLASSES = frozenset(f"{family}MLP" for family in FAMILIES)
RMS_NORM_CLASSES = frozenset(f"{family}RMSNorm" for family in FAMILIES)


def _from_transformers(module: nn.Module, names) -> bool:
    cls = type(module)
    return cls.__name__ in names and cls.__module__.startswith("transformers.models.")


def _is_silu_mlp(module: nn.Module) -> bool:
    act = getattr(module, "act_fn", None)
    return _from_transformers(module, MLP_CLASSES) and type(act).__name__ in ("SiLU", "SiLUActivation")


def use_lean_activations(model: nn.Module, backend: str = "auto") -> dict[str, int]:
    """Swaps, in place, every SiLU MLP and RMSNorm of the families above for `SwiGLUMLP` and `RMSNorm` holding the
    same projection modules and weight parameters (state-dict keys, LoRA layers and optimizer state are
    unchanged). Call it before sharding (FSDP) or compiling. Returns how many of each were swapped."""
    swapped = {"mlp": 0, "rms_norm": 0}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_silu_mlp(child):
                parent.add_module(name, SwiGLUMLP(child.gate_proj, child.up_proj, child.down_proj, backend))
                swapped["mlp"] += 1
            elif _from_transformers(child, RMS_NORM_CLASSES):
                parent.add_module(name, RMSNorm(child.weight, child.variance_epsilon, backend))
                swapped["rms_norm"] += 1
    return swapped
