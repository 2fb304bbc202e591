"""pyprefopt: fused kernels for preference fine-tuning (SFT, DPO, IPO, CPO, KTO) of language models."""

from pyprefopt import lora, losses, nf4
from pyprefopt.fused_linear_logprobs import fused_linear_logprobs
from pyprefopt.fused_linear_preference_loss import FusedLinearPreferenceLoss
from pyprefopt.lean_activations import use_lean_activations

__all__ = ["FusedLinearPreferenceLoss", "fused_linear_logprobs", "lora", "losses", "nf4", "use_lean_activations"]
__version__ = "0.1.0"
