"""SwiGLU's gating h = silu(gate) * up (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6), keeping only its
two inputs for backward, and the Llama/Qwen2/Qwen3 MLP built on it: `down_proj(silu(gate_proj(x)) * up_proj(x))`.

Autograd through transformers' MLP keeps three [tokens, intermediate] tensors for the gating (SiLU's input, and
silu(gate) and up for the product) and, when down_proj has a LoRA branch, a fourth: h, that branch's input.
`SwiGLUFunction` keeps gate and up and recomputes silu(gate) in backward. `SwiGLUMLP` also has down_proj's saved
h rebuilt from gate and up when its backward asks for it (a saved-tensor hook): the MLP keeps two intermediate-wide
tensors instead of three or four, for one elementwise pass per recomputation. With `recompute` (the train CLI's
--recompute-mlp) it keeps none: the MLP keeps its input alone and recomputes from it in backward. `GatedMLP` holds
what the SwiGLU and GeGLU (`pyprefopt.geglu`) MLPs share.

- CUDA: the Triton kernels of `pyprefopt.kernels.swiglu` (fp32 math, one rounding per output).
- CPU: PyTorch's own `silu` and `silu_backward`, so the forward is transformers' bit for bit and the gradients are
  those autograd computes through their module.
"""

from __future__ import annotations

import contextlib
import functools
import weakref

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pyprefopt.backend import use_triton as triton_for


def check_gating_inputs(gate, up):
    """A gated activation's operands: floating-point tensors of one shape, dtype and device."""
    for label, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{label} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{label} must be a floating-point tensor, got {t.dtype}")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"gate and up must have one shape, dtype and device, got {tuple(gate.shape)} {gate.dtype} "
                         f"{gate.device} and {tuple(up.shape)} {up.dtype} {up.device}")


def _gated(gate, up, use_triton):
    if use_triton:
        from pyprefopt.kernels import swiglu as kernels

        return kernels.forward(gate.contiguous(), up.contiguous())
    return nn.functional.silu(gate).mul_(up)


class SwiGLUFunction(torch.autograd.Function):
    """silu(gate) * up, elementwise; gradients for gate and up."""

    @staticmethod
    def forward(ctx, gate, up, use_triton):
        check_gating_inputs(gate, up)
        ctx.use_triton = use_triton
        ctx.save_for_backward(gate, up)
        return _gated(gate, up, use_triton)

    @staticmethod
    def backward(ctx, grad_h):
        gate, up = ctx.saved_tensors
        if ctx.use_triton:
            from pyprefopt.kernels import swiglu as kernels

            return (*kernels.backward(grad_h.contiguous(), gate.contiguous(), up.contiguous()), None)
        grad_up = grad_h * nn.functional.silu(gate)
        grad_gate = torch.ops.aten.silu_backward(grad_h * up, gate)
        return grad_gate, grad_up, None


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up, keeping gate and up (nothing else) for backward. backend: "auto" (Triton on CUDA, PyTorch
    elsewhere), "triton" or "torch"."""
    return SwiGLUFunction.apply(gate, up, triton_for(gate.device, backend))


class _RecomputedGating:
    """A saved tensor's stand-in: the view of h = gating(gate, up) it was, rebuilt from gate and up when unpacked.
    gate and up are held as the enclosing saved-tensor hooks packed them (themselves, without such hooks)."""

    __slots__ = ("gate", "up", "gating", "size", "stride", "offset")

    def __init__(self, gate, up, gating, saved, h_offset):
        self.gate, self.up, self.gating = gate, up, gating
        self.size, self.stride = saved.size(), saved.stride()
        self.offset = saved.storage_offset() - h_offset

    def rebuilt(self, unpack):
        h = self.gating(unpack(self.gate), unpack(self.up))
        return h.as_strided(self.size, self.stride, h.storage_offset() + self.offset)


def _unchanged(tensor):
    return tensor


@contextlib.contextmanager
def saves_of_gating_recomputed(h, gate, up, gating):
    """Within the block, autograd saves views of `h` (made contiguous by `gating(gate, up)`, a gated activation's
    forward with no graph, which gives h bit for bit again) as a stand-in that rebuilds them from gate and up,
    which the gating's own backward keeps anyway.

    Saved-tensor hooks already in force (activation checkpointing, offloading, a count of saved bytes) keep
    their say: every other tensor, and gate and up inside the stand-in, go through them, so under checkpointing
    gate and up are dropped and recomputed as the checkpoint drops its own. A no-op when nothing saves gate and
    up (neither needs a gradient) or without grad mode."""
    if not torch.is_grad_enabled() or not (gate.requires_grad or up.requires_grad) or not h.numel():
        yield
        return
    # The hooks in force, which a nested `saved_tensors_hooks` replaces rather than composes with (no public API
    # reads them).
    outer_pack, outer_unpack = torch._C._autograd._top_saved_tensors_default_hooks(False) or (_unchanged,
                                                                                           _unchanged)
    # Autograd keeps these hooks with every tensor saved in the block until its backward: they refer to h, gate and
    # up by address and weak reference only, or they would keep h (and, under checkpointing, gate and up) alive.
    storage, device, dtype, offset = h.untyped_storage().data_ptr(), h.device, h.dtype, h.storage_offset()
    gate_ref, up_ref = weakref.ref(gate), weakref.ref(up)

    def pack(t):
        if t.device == device and t.dtype == dtype and t.numel() and t.untyped_storage().data_ptr() == storage:
            return _RecomputedGating(outer_pack(gate_ref()), outer_pack(up_ref()), gating, t, offset)
        return outer_pack(t)

    def unpack(saved):
        return saved.rebuilt(outer_unpack) if isinstance(saved, _RecomputedGating) else outer_unpack(saved)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class GatedMLP(nn.Module):
    """`down_proj(gating(gate_proj(x), up_proj(x)))` over the given projection modules (plain, LoRA or 4-bit; their
    state-dict keys unchanged), keeping gate and up and nothing else intermediate-wide; a subclass gives the gating
    (`activation`).

    With `recompute` it keeps only x, its share of a decoder layer's activations going from two intermediate-wide
    tensors to one hidden-wide: gate_proj, up_proj and the gating run again in backward (a non-reentrant checkpoint,
    which stops once they have run), two more [tokens, hidden] x [hidden, intermediate] GEMMs a layer; and down_proj
    too where it has a LoRA branch (or a trained weight), which would otherwise keep h, its input: a third GEMM."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.recompute = False

    def activation(self, gate, up):
        """(h, rebuild): the gating's output, through an autograd Function that keeps gate and up, and a function of
        (gate, up) that computes h again bit for bit, without a graph."""
        raise NotImplementedError

    def _gating(self, x):
        return self.activation(self.gate_proj(x), self.up_proj(x))[0]

    def _whole(self, x):
        return self.down_proj(self._gating(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            if any(p.requires_grad for p in self.down_proj.parameters()):
                return checkpoint(self._whole, x, use_reentrant=False)
            return self.down_proj(checkpoint(self._gating, x, use_reentrant=False))
        gate, up = self.gate_proj(x), self.up_proj(x)
        h, rebuild = self.activation(gate, up)
        with saves_of_gating_recomputed(h, gate, up, rebuild):
            return self.down_proj(h)


class SwiGLUMLP(GatedMLP):
    """A drop-in for transformers' Llama/Qwen2/Qwen3 MLP (SiLU)."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, backend: str = "auto"):
        super().__init__(gate_proj, up_proj, down_proj)
        self.backend = backend

    def activation(self, gate, up):
        use_triton = triton_for(gate.device, self.backend)
        return SwiGLUFunction.apply(gate, up, use_triton), functools.partial(_gated, use_triton=use_triton)
