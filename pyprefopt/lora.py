"""LoRA linear layers with a fused forward/backward, interoperable with PEFT.

    Y = X @ W.T (+ bias) + s * (dropout(X) @ A.T) @ B.T        s = alpha / r, or alpha / sqrt(r) (rsLoRA)

`LoRALinear` wraps a frozen base `nn.Linear` or bitsandbytes `Linear4bit` (NF4) without copying its
weight; `inject_lora` puts it into a model by `target_modules`; `save_lora_adapter` / `load_lora_adapter`
read and write PEFT's format (`adapter_config.json` + `adapter_model.safetensors`, PEFT's key names), so
`peft.PeftModel.from_pretrained` loads our adapters and we load PEFT's; `disable_adapters` runs the
base (reference) model without a second copy.

`FusedLoRALinearFunction` computes the layer:
- CUDA: the Triton kernels of `pyprefopt.kernels.fused_lora_linear` (Y written once, the rank-r update in
  the GEMM epilogue; an NF4 base decoded in the GEMM's load path).
- CPU: the big GEMM writes Y with the bias as the plain layer does (through `pyprefopt.cpu_linear`:
  oneDNN for large fp32 GEMMs, where torch's MKL sgemm runs at half speed on AMD CPUs), and one in-place
  GEMM of depth r adds `S_s @ B.T` into it (`addmm_`): no `[tokens, out]` temporary and no separate add.
  Interleaved timings favoured this order over writing `S_s @ B.T` first and accumulating the big GEMM
  into it (beta = 1): in bf16 the accumulating big GEMM lost 4-6 %. The backward does the same for
  `dX = dY @ W += T_s @ A`. The small products are scaled once at rank width (`S_s = s * S`,
  `T_s = s * dY @ B`: the GEMM's alpha, or in fp32 the rank-wide weight scaled, so that the skinny
  products also take oneDNN), and only X, S_s and the weights are kept for backward. With
  dropout 0 the dropped-out input is X itself: no copy and one dX. With dropout, backward draws the same mask
  again (the random generator's state at the forward, restored) rather than keeping the mask and the dropped-out
  input, two more [tokens, in] tensors a layer; the forward draws it as PEFT's `nn.Dropout` does, so the same seed
  gives PEFT's masks. An NF4 base is decoded per call by
  `pyprefopt.nf4.dequantize_nf4` (bitsandbytes-exact), in forward and again in backward, never stored.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from pyprefopt import cpu_linear
from pyprefopt.files import replace_dir, staging_dir
from pyprefopt.nf4 import lora_scale
from pyprefopt.peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    check_config,
    checkpoint_name,
    lora_keys,
    names_module,
    saved_key,
)

BIAS_MODES = ("none", "all", "lora_only")


def _is_linear4bit(module) -> bool:
    """Whether `module` is a bitsandbytes `Linear4bit`. Such a module exists only once bitsandbytes is loaded, so
    a model without one never imports it here (on AVX512-BF16 CPUs bitsandbytes' import logs a warning about an
    optional hub kernel, and it takes a second)."""
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def _dense_weight(base_weight, dtype):
    """The base weight as a dense `dtype` matrix: itself, or the NF4 base decoded for this call."""
    if isinstance(base_weight, torch.Tensor):
        return base_weight
    from pyprefopt import nf4

    return nf4.dequantize_nf4(base_weight, out_dtype=dtype)


# FusedLoRALinearFunction's CPU path decodes an NF4 base into one reused buffer per (shape, dtype): there the
# decoded weight lives for one GEMM and is never saved for backward, and a fresh [out, in] tensor per call
# pays a page fault per 4 KiB, which costs more than the decode itself (bench_dequant_merge_nf4 times both).
# Only for that Function: elsewhere autograd may keep the weight.
_decode_buffers: dict[tuple, torch.Tensor] = {}


def _weight_for_one_gemm(base_weight, dtype):
    """`_dense_weight`, for a weight used by one GEMM and dropped: an NF4 base on CPU is decoded into the
    shared buffer of its shape and dtype, which the next such call overwrites."""
    if isinstance(base_weight, torch.Tensor) or base_weight.device.type != "cpu":
        return _dense_weight(base_weight, dtype)
    from pyprefopt import nf4

    key = (tuple(base_weight.shape), dtype)
    buffer = _decode_buffers.get(key)
    if buffer is None:
        buffer = _decode_buffers[key] = torch.empty(base_weight.shape, dtype=dtype)
    return nf4.dequantize_nf4(base_weight, out_dtype=dtype, out=buffer)


def _nf4_weight(param):
    """The `pyprefopt.nf4.NF4Weight` view of a bitsandbytes `Params4bit` (no copy of the codes)."""
    from pyprefopt import nf4

    if param.quant_state is None:
        raise ValueError("the Linear4bit base is not quantised yet (move it to its device first)")
    if getattr(param.quant_state, "packing_format_for_cpu", False):
        # bitsandbytes' CPU inference path (eval mode, no grad) repacks the codes in place into its own
        # GEMM layout; back to the standard layout, as bitsandbytes itself does before saving.
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        param.data, param.quant_state = _convert_weight_packed_for_cpu_inverse(param.data, param.quant_state)
    return nf4.NF4Weight.from_quant_state(param.data, param.quant_state)


def _check_function_inputs(x, dropout_p, base_weight, bias, lora_a, lora_b, scale, use_triton):
    for label, t in (("x", x), ("lora_a", lora_a), ("lora_b", lora_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{label} must be a tensor, got {type(t).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if use_triton and x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"the Triton kernels take float32, bfloat16 or float16 inputs, got {x.dtype}")
    if lora_a.dim() != 2 or lora_b.dim() != 2:
        raise ValueError(f"lora_a must be [r, in] and lora_b [out, r], got {tuple(lora_a.shape)} and "
                         f"{tuple(lora_b.shape)}")
    rank, in_features = lora_a.shape
    out_features = base_weight.shape[0]
    if tuple(base_weight.shape) != (out_features, in_features) or tuple(lora_b.shape) != (out_features, rank):
        raise ValueError(f"shapes do not fit: base weight {tuple(base_weight.shape)} must be [out, in] = "
                         f"[{out_features}, {in_features}] for lora_a {tuple(lora_a.shape)}, and lora_b must be "
                         f"[{out_features}, {rank}], got {tuple(lora_b.shape)}")
    if rank < 1:
        raise ValueError("the LoRA rank must be >= 1")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x's last dimension must be in_features={in_features}, got shape {tuple(x.shape)}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    tensors = {"lora_a": lora_a, "lora_b": lora_b}
    if isinstance(base_weight, torch.Tensor):
        if base_weight.requires_grad:
            raise ValueError("the base weight must be frozen (requires_grad=False): LoRA trains only A and B")
        tensors["base weight"] = base_weight
    if bias is not None:
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must be [{out_features}], got {tuple(bias.shape)}")
        tensors["bias"] = bias
    for label, t in tensors.items():
        if t.dtype != x.dtype:
            raise TypeError(f"{label} ({t.dtype}) must have x's dtype ({x.dtype}); cast one of them")
        if t.device != x.device:
            raise ValueError(f"{label} is on {t.device} but x is on {x.device}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")


def _rank_linear(x, rank_weight, scale):
    """`scale * x @ rank_weight.T` for a rank-wide `rank_weight` [r, k]. fp32 goes through `cpu_linear` with the
    scale folded into the small weight (one rounding of `scale * A`, exact for a power-of-two scale), as oneDNN
    takes these skinny products much faster than MKL's sgemm does. Other dtypes keep the scale in the GEMM
    (alpha), where scaling a 16-bit weight would round it."""
    if scale == 1.0:
        return cpu_linear.linear(x, rank_weight)
    if x.dtype == torch.float32:
        return cpu_linear.linear(x, rank_weight * scale)
    return torch.addmm(x.new_zeros(()), x, rank_weight.t(), beta=0, alpha=scale)


def _rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch.get_rng_state()
    return torch.get_device_module(device.type).get_rng_state(device)


@contextlib.contextmanager
def _rng_state_restored(device: torch.device, state: torch.Tensor):
    """Within the block, `device`'s default generator starts from `state`; after it, both it and the CPU's are back
    where they were."""
    on_cpu = device.type == "cpu"
    with torch.random.fork_rng(devices=[] if on_cpu else [device], device_type="cuda" if on_cpu else device.type):
        if on_cpu:
            torch.set_rng_state(state)
        else:
            torch.get_device_module(device.type).set_rng_state(state, device)
        yield


class FusedLoRALinearFunction(torch.autograd.Function):
    """`x @ W.T + bias + scale * (dropout(x, dropout_p) @ A.T) @ B.T` over [..., in] inputs; W frozen (a dense tensor
    or a `pyprefopt.nf4.NF4Weight`, decoded in x's dtype), gradients for x, bias, A and B.

    The dropout is `nn.functional.dropout`'s, drawn from the default generator of x's device; backward draws its
    mask again from the generator's state at the forward. `use_triton` runs the Triton kernels (CUDA, or CPU
    tensors under TRITON_INTERPRET=1)."""

    @staticmethod
    def forward(ctx, x, dropout_p, base_weight, bias, lora_a, lora_b, scale, use_triton):
        _check_function_inputs(x, dropout_p, base_weight, bias, lora_a, lora_b, scale, use_triton)
        lead_shape = x.shape[:-1]
        in_features = x.shape[-1]
        x2 = x.reshape(-1, in_features)
        ctx.dropout_p = float(dropout_p)
        if dropout_p:
            ctx.rng_state = _rng_state(x.device)
            lora_x2 = nn.functional.dropout(x2, dropout_p, True)
        else:
            lora_x2 = x2
        if use_triton:
            from pyprefopt.kernels import fused_lora_linear as kernels

            base = kernels.DenseBase(base_weight) if isinstance(base_weight, torch.Tensor) else \
                kernels.NF4Base(base_weight)
            y, low = kernels.forward(x2, base, bias, lora_x2, lora_a, lora_b, scale)
            ctx.kernel_base = base
        else:
            weight = _weight_for_one_gemm(base_weight, x.dtype)
            # S_s = s * lora_x @ A.T at rank width; the base GEMM writes Y and S_s @ B.T is added in place.
            low = _rank_linear(lora_x2, lora_a, scale)
            y = cpu_linear.linear(x2, weight, bias)
            y.addmm_(low, lora_b.t())
        # `low` is S_s = s * S on CPU and the unscaled fp32 S from the kernels: each backward takes its own.
        ctx.base_weight = base_weight
        ctx.scale = scale
        ctx.use_triton = use_triton
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x2, low, lora_a, lora_b, base_weight if isinstance(base_weight, torch.Tensor)
                              else None)
        # The output as a tensor of its own over y's storage, not a view of y: autograd forbids modifying a view
        # that a custom Function made in place, and models do modify projections in place (Gemma-3n scales its
        # per-layer projection by `*=`).
        return y.new_empty(0).set_(y.untyped_storage(), y.storage_offset(), (*lead_shape, y.shape[-1]))

    @staticmethod
    @once_differentiable  # its CPU GEMMs read a shared decode buffer that a double backward could not keep
    def backward(ctx, grad_y):
        x2, low, lora_a, lora_b, dense = ctx.saved_tensors
        need_x, _, _, need_bias, need_a, need_b, _, _ = ctx.needs_input_grad
        lead_shape = grad_y.shape[:-1]
        grad_y2 = grad_y.reshape(-1, grad_y.shape[-1])
        merged = not ctx.dropout_p
        lora_x2 = x2
        if not merged:
            # The forward's mask drawn again: dropout(x) and, through its own graph, its gradient.
            with _rng_state_restored(x2.device, ctx.rng_state), torch.enable_grad():
                dropout_input = x2.detach().requires_grad_(need_x)
                dropped = nn.functional.dropout(dropout_input, ctx.dropout_p, True)
            lora_x2 = dropped.detach()
        grad_x = grad_lora_x = grad_a = grad_b = None
        if ctx.use_triton:
            from pyprefopt.kernels import fused_lora_linear as kernels

            grad_x, grad_lora_x, grad_a, grad_b = kernels.backward(
                grad_y2.to(lora_x2.dtype), lora_x2, ctx.kernel_base, lora_a, lora_b, low, ctx.scale, merged,
                need_x, need_a or need_b)
            grad_a = grad_a.to(lora_a.dtype) if need_a else None
            grad_b = grad_b.to(lora_b.dtype) if need_b else None
        else:
            weight = dense if dense is not None else _weight_for_one_gemm(ctx.base_weight, lora_x2.dtype)
            low_grad = _rank_linear(grad_y2, lora_b.t(), ctx.scale)  # T_s = s * dY @ B
            # dB right after T_s, while dY is still in cache. dB = (S_s.T @ dY).T: the [r, out] product streams
            # dY row-major, twice as fast as dY.T @ S_s (and through oneDNN in fp32, twice MKL's speed again).
            if need_b:
                grad_b = cpu_linear.linear(low.t(), grad_y2.t()).t()
            if need_a:
                grad_a = cpu_linear.linear(low_grad.t(), lora_x2.t())
            if need_x:
                grad_x = cpu_linear.linear(grad_y2, weight.t())
                if merged:
                    grad_x.addmm_(low_grad, lora_a)
                else:
                    grad_lora_x = torch.mm(low_grad, lora_a)
        if need_x and not merged:
            grad_x += torch.autograd.grad(dropped, dropout_input, grad_lora_x)[0]
        grad_bias = grad_y2.sum(0) if need_bias and ctx.has_bias else None
        if grad_x is not None:
            grad_x = grad_x.view(*lead_shape, grad_x.shape[-1])
        return grad_x, None, None, grad_bias, grad_a, grad_b, None, None


class LoRALinear(nn.Module):
    """A frozen base `nn.Linear` or bitsandbytes `Linear4bit` plus a trainable rank-r update.

    Holds the base module itself as `base_layer` (no weight copy) and `lora_A` [r, in], `lora_B` [out, r],
    initialised as PEFT does (A Kaiming-uniform, B zero: the layer starts equal to its base), on `device`, by
    default the base weight's: a base on the meta device, whose weights come later, may get real factors."""

    def __init__(self, base_layer: nn.Module, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                 use_rslora: bool = False, device: torch.device | None = None):
        super().__init__()
        is_4bit = _is_linear4bit(base_layer)
        if not (isinstance(base_layer, nn.Linear) or is_4bit):
            raise TypeError(f"LoRALinear wraps nn.Linear or bitsandbytes Linear4bit, got {type(base_layer).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive integer, got {r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if not math.isfinite(lora_alpha):
            raise ValueError(f"lora_alpha must be finite, got {lora_alpha}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.use_rslora = use_rslora
        self.scaling = lora_scale(lora_alpha, r, use_rslora)
        self.adapters_disabled = False
        # (packed data's address, QuantState, its NF4Weight): building one checks the NF4 table with a host
        # copy, so it is rebuilt only when the base is moved or re-quantised.
        self._nf4_cache = None
        base_layer.weight.requires_grad_(False)
        weight = base_layer.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        device = weight.device if device is None else device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    # The base layer's parameters under the names a Linear has, as PEFT's LoRA layers give them: model code reads
    # them from the module it owns (Gemma-3n's AltUp clamps `prediction_coefs.weight` in place while training).
    @property
    def weight(self) -> nn.Parameter:
        return self.base_layer.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.base_layer.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, use_rslora={self.use_rslora}")

    def _nf4_base(self):
        param = self.base_layer.weight
        cache = self._nf4_cache
        if cache is None or cache[0] != param.data_ptr() or cache[1] is not param.quant_state:
            weight = _nf4_weight(param)  # may restore the standard layout: the key is taken after it
            cache = self._nf4_cache = (param.data_ptr(), param.quant_state, weight)
        return cache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_linear4bit(self.base_layer):
            base_weight = self._nf4_base()
        else:
            base_weight = self.base_layer.weight
        bias = self.base_layer.bias
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if self.adapters_disabled:
            # The base alone, through the same decode as the adapted path: calling a Linear4bit itself in
            # eval mode without grad would make bitsandbytes repack its codes on CPU.
            return nn.functional.linear(x, _dense_weight(base_weight, x.dtype), bias)
        # PEFT's semantics: dropout on the LoRA branch's input only, in training.
        return FusedLoRALinearFunction.apply(x, self.lora_dropout if self.training else 0.0, base_weight, bias,
                                             self.lora_A.to(x.dtype), self.lora_B.to(x.dtype), self.scaling,
                                             x.is_cuda)


@dataclass
class LoRAConfig:
    """What `inject_lora` was called with; saved as PEFT's `adapter_config.json`."""

    r: int
    lora_alpha: float
    target_modules: str | list[str]
    lora_dropout: float = 0.0
    use_rslora: bool = False
    bias: str = "none"
    base_model_name_or_path: str | None = None

    def to_peft_dict(self) -> dict:
        return {
            "peft_type": "LORA", "task_type": None, "base_model_name_or_path": self.base_model_name_or_path,
            "r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
            "use_rslora": self.use_rslora, "bias": self.bias, "target_modules": self.target_modules,
            "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "lora_bias": False,
            "use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
            "layers_to_transform": None, "layers_pattern": None,
        }


# PEFT config fields whose non-default values change the model in ways this module does not implement.
_UNSUPPORTED_PEFT_FIELDS = {
    "use_dora": False, "lora_bias": False, "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
    "modules_to_save": None, "layers_to_transform": None, "exclude_modules": None, "target_parameters": None,
    "layer_replication": None, "trainable_token_indices": None,
}


def _is_linear(module) -> bool:
    return isinstance(module, nn.Linear) or _is_linear4bit(module)


def _target_names(model: nn.Module, target_modules) -> list[str]:
    """The names of the modules `target_modules` selects, with PEFT's rules: "all-linear" is every
    linear layer but the output head; a string is a full-match regex; a list matches a name exactly or
    as its dotted suffix."""
    names = [name for name, module in model.named_modules() if name]
    if target_modules == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [name for name in names if _is_linear(model.get_submodule(name))
                and model.get_submodule(name) is not head]
    if isinstance(target_modules, str):
        return [name for name in names if re.fullmatch(target_modules, name)]
    if not isinstance(target_modules, (list, tuple, set)) or not all(isinstance(t, str) for t in target_modules):
        raise TypeError(f"target_modules must be 'all-linear', a regex string or a list of names, got "
                        f"{target_modules!r}")
    return [name for name in names if names_module(name, set(target_modules))]


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in `model`, by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def inject_lora(model: nn.Module, target_modules, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                use_rslora: bool = False, bias: str = "none", device: torch.device | None = None) -> nn.Module:
    """Replace the selected linear layers of `model` (in place) by `LoRALinear`s and freeze everything
    but the adapters (and the biases `bias` names: "all", or "lora_only" for the wrapped layers').

    target_modules: "all-linear", a regex, or a list of module names / name suffixes (PEFT's rules).
    device: where the LoRA factors are made (see LoRALinear), by default on each base weight's device."""
    if bias not in BIAS_MODES:
        raise ValueError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
    if lora_layers(model):
        raise ValueError("model already has LoRA layers; load into it, or inject into a fresh model")
    names = _target_names(model, target_modules)
    if not names:
        raise ValueError(f"target_modules {target_modules!r} matched no module of {type(model).__name__}")
    for name in names:
        module = model.get_submodule(name)
        if not _is_linear(module):
            raise TypeError(f"target module {name!r} is a {type(module).__name__}; LoRA wraps nn.Linear and "
                            "bitsandbytes Linear4bit only")
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        if _is_linear4bit(module):
            # bitsandbytes repacks a CPU Linear4bit's codes into an inference layout the first time it runs in
            # eval mode without grad (an evaluation, a reference pass), and from then on runs it, in training too,
            # through a kernel without a backward: gradients through the frozen layer would be silently wrong.
            module.support_avx512bf16_for_cpu = False
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRALinear(getattr(parent, child), r, lora_alpha, lora_dropout, use_rslora, device)
        setattr(parent, child, layer)
        if bias == "lora_only" and layer.base_layer.bias is not None:
            layer.base_layer.bias.requires_grad_(True)
    if bias == "all":
        for name, param in model.named_parameters():
            if "bias" in name:  # PEFT's test for bias="all"
                param.requires_grad_(True)
    config = getattr(model, "config", None)
    model.pyprefopt_lora_config = LoRAConfig(
        r=r, lora_alpha=lora_alpha, target_modules=target_modules if isinstance(target_modules, str)
        else sorted(target_modules), lora_dropout=lora_dropout, use_rslora=use_rslora, bias=bias,
        base_model_name_or_path=getattr(config, "_name_or_path", None) or None)
    return model


def _adapter_state_dict(model: nn.Module, bias: str) -> dict[str, torch.Tensor]:
    """Our trainable tensors under PEFT's saved key names (those of the model's checkpoint: `checkpoint_name`)."""
    layers = lora_layers(model)
    state = {}
    for name, layer in layers.items():
        key_a, key_b = lora_keys(checkpoint_name(model, name))
        state[key_a], state[key_b] = layer.lora_A, layer.lora_B
        if bias == "lora_only" and layer.base_layer.bias is not None:
            state[saved_key(checkpoint_name(model, f"{name}.base_layer.bias"))] = layer.base_layer.bias
    if bias == "all":
        # Our module names are PEFT's (`<name>.base_layer.bias` inside a LoRA layer, `<name>.bias` elsewhere).
        for name, param in model.named_parameters():
            if "bias" in name:  # PEFT's test for bias="all"
                state[saved_key(checkpoint_name(model, name))] = param
    return {key: tensor.detach().contiguous() for key, tensor in state.items()}


def save_lora_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write `adapter_config.json` and `adapter_model.safetensors` in PEFT's format to `directory`.

    Atomic: both files go to a temporary sibling directory that then replaces `directory`."""
    from safetensors.torch import save_file

    config = getattr(model, "pyprefopt_lora_config", None)
    if config is None or not lora_layers(model):
        raise ValueError("model has no LoRA layers (call inject_lora or load_lora_adapter first)")
    directory = os.path.abspath(os.fspath(directory))
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    staging = str(staging_dir(Path(parent), os.path.basename(directory)))
    try:
        save_file(_adapter_state_dict(model, config.bias), os.path.join(staging, ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        with open(os.path.join(staging, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(config.to_peft_dict(), f, indent=2, sort_keys=True)
        replace_dir(Path(staging), Path(directory), os.path.basename(directory))
    finally:
        if os.path.exists(staging):
            shutil.rmtree(staging)


def read_adapter_config(directory: str | os.PathLike) -> LoRAConfig:
    """The LoRAConfig of a PEFT-format adapter directory (ours or PEFT's); ValueError naming the file for one this
    module cannot load (a field of the wrong type, or a PEFT feature it does not implement)."""
    path = os.path.join(os.fspath(directory), ADAPTER_CONFIG)
    with open(path, encoding="utf-8") as f:
        raw = json.load(f)
    check_config(raw, path)
    for key, default in _UNSUPPORTED_PEFT_FIELDS.items():
        value = raw.get(key, default)
        if value not in (default, None, {}, [], False):
            raise ValueError(f"{path}: {key}={value!r} is not supported by pyprefopt.lora")
    bias = raw.get("bias", "none")
    if bias not in BIAS_MODES:
        raise ValueError(f"{path}: bias must be one of {BIAS_MODES}, got {bias!r}")
    target_modules = raw.get("target_modules")
    if target_modules is None:
        raise ValueError(f"{path}: target_modules is missing")
    return LoRAConfig(r=int(raw["r"]), lora_alpha=raw["lora_alpha"], target_modules=target_modules,
                      lora_dropout=float(raw.get("lora_dropout", 0.0)), use_rslora=bool(raw.get("use_rslora", False)),
                      bias=bias, base_model_name_or_path=raw.get("base_model_name_or_path"))


def load_lora_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a PEFT-format LoRA adapter (ours or PEFT's) into `model`: injects the config's layers into a
    plain model, or loads into the LoRA layers it already has (same config). Returns `model`."""
    directory = os.fspath(directory)
    config = read_adapter_config(directory)
    if not lora_layers(model):
        inject_lora(model, config.target_modules, r=config.r, lora_alpha=config.lora_alpha,
                    lora_dropout=config.lora_dropout, use_rslora=config.use_rslora, bias=config.bias)
    else:
        mismatched = {name: layer.r for name, layer in lora_layers(model).items() if layer.r != config.r}
        if mismatched:
            raise ValueError(f"adapter r={config.r} does not match the model's LoRA layers: {mismatched}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in adapter_weights(model, directory).items():
            params[name].copy_(tensor)
    return model


def adapter_weights(model: nn.Module, directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of the PEFT-format adapter in `directory`, by the name of the parameter of `model` each sets
    (its LoRA layers' factors, and the biases the adapter trains), for a model that has the adapter's LoRA layers,
    its weights anywhere (the meta device included). ValueError for a key that matches no parameter, LoRA factors
    missing, or a shape that differs from the parameter's."""
    from safetensors.torch import load_file

    directory = os.fspath(directory)
    config = read_adapter_config(directory)
    tensors = load_file(os.path.join(directory, ADAPTER_WEIGHTS))
    expected = _adapter_state_dict(model, config.bias)
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"{directory}: keys that match no parameter of the model: {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    missing = sorted(key for key in set(expected) - set(tensors) if ".lora_" in key)
    if missing:
        raise ValueError(f"{directory}: LoRA weights missing for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    params = {saved_key(checkpoint_name(model, name)): param for name, param in _peft_named_parameters(model)}
    param_names = {id(param): name for name, param in model.named_parameters()}
    weights = {}
    for key, tensor in tensors.items():
        param = params[key]
        if param.shape != tensor.shape:
            raise ValueError(f"{key}: saved shape {tuple(tensor.shape)} does not match the model's "
                             f"{tuple(param.shape)}")
        weights[param_names[id(param)]] = tensor
    return weights


def _peft_named_parameters(model: nn.Module):
    """(PEFT key without prefix, parameter) for our adapters and every bias."""
    for name, layer in lora_layers(model).items():
        yield f"{name}.lora_A.weight", layer.lora_A
        yield f"{name}.lora_B.weight", layer.lora_B
    for name, param in model.named_parameters():
        if "bias" in name:  # PEFT's test for bias="all"
            yield name, param


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Run `model` as its base (the reference model of DPO/IPO/KTO) inside the block; no copy is made."""
    layers = list(lora_layers(model).values())
    if not layers:
        raise ValueError("model has no LoRA layers: disabling adapters would leave the policy as its own reference")
    previous = [layer.adapters_disabled for layer in layers]
    for layer in layers:
        layer.adapters_disabled = True
    try:
        yield model
    finally:
        for layer, state in zip(layers, previous):
            layer.adapters_disabled = state
