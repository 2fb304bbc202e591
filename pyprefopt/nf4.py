"""Merge a LoRA adapter into its bitsandbytes NF4 base weight: decode, add `scale * B @ A`, write 16-bit once.

Public API (the merge CLI and in-memory trainers code against this):

    NF4Weight                                   one NF4-quantised weight in bitsandbytes' format
    NF4Weight.from_quant_state(packed, quant_state) -> NF4Weight
        from a `bitsandbytes.functional.QuantState` (e.g. `Linear4bit.weight.quant_state`) and its packed data
    NF4Weight.from_safetensors_state(tensors, name) -> NF4Weight
        from the tensors bitsandbytes serialises for the weight called `name` (e.g. "model.q_proj.weight"):
        `name` (packed uint8), `name.absmax`, `name.quant_map`, optionally `name.nested_absmax` and
        `name.nested_quant_map`, and `name.quant_state.bitsandbytes__nf4` (the packed JSON of shape,
        dtype, blocksize, nested_blocksize, nested_offset), as `QuantState.as_dict(packed=True)` writes them
    dequantize_nf4(weight, out_dtype=None, out=None) -> Tensor
        the decoded weight, of `weight.shape`, in `out_dtype` (default: the dtype it was quantised from)
    dequant_merge_nf4(weight, lora_A=None, lora_B=None, scale=1.0, out_dtype=torch.bfloat16, out=None) -> Tensor
        `W + scale * lora_B @ lora_A`, of `weight.shape` (2-D), computed in fp32 and rounded once to `out_dtype`
        (bf16, fp16 or fp32); lora_A is [r, in_features], lora_B [out_features, r]; pass `out=` (contiguous,
        right shape and dtype, same device) to reuse a buffer across calls
    lora_scale(alpha, r, use_rslora=False) -> float
        `alpha / r`, or `alpha / sqrt(r)` for rsLoRA

Backends: the CUDA kernel (`pyprefopt._C_cuda`) for CUDA tensors when it was built, the C++ kernel
(`pyprefopt._C`) for CPU tensors, and `dequant_merge_nf4_torch` (plain PyTorch,
with a one-time warning) when the needed extension is missing. All of them decode bit for bit like
`bitsandbytes.functional.dequantize_4bit`; merged outputs agree within one output ulp.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

try:
    from pyprefopt import _C
except ImportError:
    _C = None

try:
    from pyprefopt import _C_cuda
except ImportError:
    _C_cuda = None

# bitsandbytes' NF4 table (`get_4bit_type("nf4")`): quantiles of N(0, 1), index = the 4-bit code.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# The kernels' output dtype codes (csrc/nf4.h OutDtype).
_OUT_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# The CPU instruction set limit passed to pyprefopt._C ("auto": the widest the CPU has); tests pin it to check
# that every path gives the same bits.
_CPU_ISA = "auto"

_warned_fallback = False


@dataclass(frozen=True)
class NF4Weight:
    """One NF4-quantised weight in bitsandbytes' layout.

    codes: uint8, ceil(numel / 2) packed bytes, high nibble = first element, flat over the row-major weight.
    absmax: fp32 [n_blocks] block scales, or uint8 [n_blocks] when nested (double quantisation).
    nested_absmax: fp32 [ceil(n_blocks / nested_blocksize)]; nested_code: fp32 [256]; nested_offset: the
    fp32 mean added back after decoding the uint8 absmax. All three are None when not nested.
    dtype: the dtype the weight was quantised from.
    """

    codes: torch.Tensor
    absmax: torch.Tensor
    shape: tuple[int, ...]
    blocksize: int
    dtype: torch.dtype = torch.float32
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    nested_offset: float | None = None
    nested_blocksize: int = 256

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        _validate_weight(self)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @classmethod
    def from_quant_state(cls, packed: torch.Tensor, quant_state) -> NF4Weight:
        """From bitsandbytes' packed data (any quant_storage dtype) and its `QuantState`."""
        if quant_state.quant_type != "nf4":
            raise ValueError(f"unsupported quant_type {quant_state.quant_type!r}: only 'nf4' is supported")
        _check_quant_map(quant_state.code)
        nested = {}
        if quant_state.nested:
            nested = dict(nested_absmax=quant_state.state2.absmax, nested_code=quant_state.state2.code,
                          nested_offset=float(quant_state.offset), nested_blocksize=quant_state.state2.blocksize)
        return cls(codes=_as_bytes(packed), absmax=quant_state.absmax, shape=tuple(quant_state.shape),
                   blocksize=quant_state.blocksize, dtype=quant_state.dtype, **nested)

    @classmethod
    def from_safetensors_state(cls, tensors: Mapping[str, torch.Tensor], name: str) -> NF4Weight:
        """From the tensors bitsandbytes serialises for the weight `name` (see the module docstring)."""
        state_keys = [k for k in tensors if k.startswith(f"{name}.quant_state.bitsandbytes__")]
        if len(state_keys) != 1:
            raise ValueError(f"expected one '{name}.quant_state.bitsandbytes__<type>' tensor, found {state_keys}")
        quant_type = state_keys[0].rsplit("__", 1)[1]
        if quant_type != "nf4":
            raise ValueError(f"{name}: unsupported quant_type {quant_type!r}: only 'nf4' is supported")
        meta = json.loads(bytes(tensors[state_keys[0]].cpu().to(torch.uint8).tolist()).decode("utf-8"))
        for key in (name, f"{name}.absmax", f"{name}.quant_map"):
            if key not in tensors:
                raise ValueError(f"missing tensor {key!r}")
        _check_quant_map(tensors[f"{name}.quant_map"])
        nested = {}
        if f"{name}.nested_absmax" in tensors:
            if f"{name}.nested_quant_map" not in tensors or "nested_offset" not in meta:
                raise ValueError(f"{name}: nested_absmax without nested_quant_map or nested_offset")
            nested = dict(nested_absmax=tensors[f"{name}.nested_absmax"],
                          nested_code=tensors[f"{name}.nested_quant_map"],
                          nested_offset=float(meta["nested_offset"]),
                          nested_blocksize=int(meta.get("nested_blocksize", 256)))
        return cls(codes=_as_bytes(tensors[name]), absmax=tensors[f"{name}.absmax"], shape=tuple(meta["shape"]),
                   blocksize=int(meta["blocksize"]), dtype=getattr(torch, meta["dtype"]), **nested)


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """PEFT's LoRA scaling: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def dequantize_nf4(weight: NF4Weight, out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None):
    """The decoded weight, of `weight.shape`, in `out_dtype` (default: the dtype it was quantised from)."""
    return _run(weight, None, None, 1.0, weight.dtype if out_dtype is None else out_dtype, out)


def dequant_merge_nf4(weight: NF4Weight, lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None,
                      scale: float = 1.0, out_dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None):
    """`W + scale * lora_B @ lora_A` in fp32, rounded once to `out_dtype`; `out=` reuses a buffer."""
    if (lora_A is None) != (lora_B is None):
        raise ValueError("pass both lora_A and lora_B, or neither")
    if lora_A is not None:
        _validate_lora(weight, lora_A, lora_B)
    return _run(weight, lora_A, lora_B, scale, out_dtype, out)


def dequant_merge_nf4_torch(codes, absmax, shape, blocksize, nested_absmax=None, nested_code=None,
                                nested_offset=None, nested_blocksize=256, lora_A=None, lora_B=None, scale=1.0,
                                out_dtype=torch.float32):
    """bitsandbytes NF4 dequantisation plus the LoRA delta `scale * B @ A`, in fp32, cast once to `out_dtype`: the
    plain-PyTorch kernel, for devices with no extension built, and the reference of the others.

    codes: packed uint8, ceil(numel / 2) bytes, high nibble first, flat over the row-major weight.
    absmax: fp32 per block of `blocksize` elements; or, nested (double quantisation), uint8 indices into
    `nested_code` scaled by `nested_absmax[block // nested_blocksize]`, plus `nested_offset`.
    Every step is one fp32 rounding, in the order bitsandbytes takes them (no fused multiply-add), so
    the decoded weight equals `bitsandbytes.functional.dequantize_4bit` bit for bit.
    """
    numel = math.prod(shape)
    n_blocks = -(-numel // blocksize)
    if nested_absmax is not None:
        group = torch.arange(n_blocks, device=absmax.device) // nested_blocksize
        scales = nested_code.float()[absmax.long()] * nested_absmax.float()[group]
        scales = scales + torch.tensor(nested_offset, dtype=torch.float32, device=scales.device)
    else:
        scales = absmax.float()
    packed = codes.reshape(-1).view(torch.uint8)
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=-1).reshape(-1)[:numel]
    values = NF4_CODE.to(packed.device)[nibbles.long()]
    weight = values * scales.repeat_interleave(blocksize)[:numel]
    weight = weight.reshape(shape)
    if lora_A is not None:
        weight = weight + scale * (lora_B.float() @ lora_A.float())
    return weight.to(out_dtype)


def _run(weight, lora_A, lora_B, scale, out_dtype, out):
    if not isinstance(weight, NF4Weight):
        raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
    if out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if out is not None:
        _validate_out(weight, out, out_dtype)
    backend = _C_cuda if weight.device.type == "cuda" else _C if weight.device.type == "cpu" else None
    if backend is None:
        _warn_fallback(weight.device)
        result = dequant_merge_nf4_torch(
            weight.codes, weight.absmax, weight.shape, weight.blocksize, weight.nested_absmax, weight.nested_code,
            weight.nested_offset, weight.nested_blocksize, lora_A, lora_B, scale, out_dtype)
        return result if out is None else out.copy_(result)
    if out is None:
        out = torch.empty(weight.shape, dtype=out_dtype, device=weight.device)
    rows, cols = _rows_cols(weight.shape)
    rank = 0 if lora_A is None else lora_A.shape[0]
    # fp32 copies of the small factors; the kernel reads them row-major.
    lora_A32 = None if rank == 0 else lora_A.detach().to(torch.float32).contiguous()
    lora_B32 = None if rank == 0 else lora_B.detach().to(torch.float32).contiguous()
    nested_absmax = None if not weight.nested else weight.nested_absmax.to(torch.float32).contiguous()
    nested_code = None if not weight.nested else weight.nested_code.to(torch.float32).contiguous()
    args = dict(
        codes=weight.codes.data_ptr(), absmax=weight.absmax.data_ptr(), nested=weight.nested,
        nested_absmax=_ptr(nested_absmax), nested_code=_ptr(nested_code),
        nested_offset=0.0 if weight.nested_offset is None else weight.nested_offset,
        nested_blocksize=weight.nested_blocksize, rows=rows, cols=cols, blocksize=weight.blocksize,
        lora_A=_ptr(lora_A32), lora_B=_ptr(lora_B32), rank=rank, scale=float(scale),
        out=out.data_ptr(), out_dtype=_OUT_DTYPE_CODE[out_dtype])
    if backend is _C_cuda:
        backend.dequant_merge_nf4(**args, stream=torch.cuda.current_stream(weight.device).cuda_stream)
    else:
        backend.dequant_merge_nf4(**args, num_threads=torch.get_num_threads(), isa=_CPU_ISA)
    return out


def _rows_cols(shape):
    """The 2-D view the kernels walk: rows split between threads; the LoRA delta is [rows, cols]."""
    if len(shape) == 0:
        return 1, 1
    return math.prod(shape[:-1]), shape[-1]


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _as_bytes(packed):
    """bitsandbytes stores the packed codes in `quant_storage` (uint8 by default); the bytes are the same."""
    packed = packed.contiguous()
    return packed if packed.dtype == torch.uint8 else packed.view(torch.uint8)


def _check_quant_map(quant_map):
    if quant_map.numel() != 16 or not torch.equal(quant_map.detach().cpu().float().reshape(-1), NF4_CODE):
        raise ValueError("quant_map is not the NF4 table (fp4 and custom 4-bit maps are not supported)")


def _warn_fallback(device):
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        missing = "pyprefopt._C_cuda" if device.type == "cuda" else "pyprefopt._C"
        warnings.warn(f"{missing} is not built: NF4 dequant-merge on {device.type} falls back to the slow "
                      "PyTorch kernel (pyprefopt.nf4.dequant_merge_nf4_torch)", RuntimeWarning,
                      stacklevel=3)


def _validate_weight(w: NF4Weight):
    if w.blocksize not in BLOCKSIZES:
        raise ValueError(f"unsupported blocksize {w.blocksize}: must be one of {BLOCKSIZES}")
    if any(s < 0 for s in w.shape):
        raise ValueError(f"shape must be non-negative, got {w.shape}")
    if w.codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8 packed bytes, got {w.codes.dtype}")
    if not w.codes.is_contiguous():
        raise ValueError("codes must be contiguous")
    if w.codes.numel() != -(-w.numel // 2):
        raise ValueError(f"codes hold {w.codes.numel()} bytes; shape {w.shape} needs ceil({w.numel} / 2) = "
                         f"{-(-w.numel // 2)}")
    if w.absmax.dim() != 1 or w.absmax.numel() != w.n_blocks:
        raise ValueError(f"absmax must be 1-D with {w.n_blocks} entries (numel {w.numel}, blocksize "
                         f"{w.blocksize}), got shape {tuple(w.absmax.shape)}")
    if not w.absmax.is_contiguous():
        raise ValueError("absmax must be contiguous")
    tensors = [("codes", w.codes), ("absmax", w.absmax)]
    if w.nested:
        if w.nested_code is None or w.nested_offset is None:
            raise ValueError("nested_absmax needs nested_code and nested_offset")
        if w.absmax.dtype != torch.uint8:
            raise TypeError(f"nested (double-quantised) absmax must be uint8, got {w.absmax.dtype}")
        if w.nested_blocksize <= 0 or w.nested_blocksize & (w.nested_blocksize - 1):
            raise ValueError(
                f"nested_blocksize must be a power of two (bitsandbytes uses 256), got {w.nested_blocksize}")
        n_nested = -(-w.n_blocks // w.nested_blocksize)
        if w.nested_absmax.dim() != 1 or w.nested_absmax.numel() != n_nested:
            raise ValueError(f"nested_absmax must be 1-D with {n_nested} entries ({w.n_blocks} blocks, "
                             f"nested_blocksize {w.nested_blocksize}), got shape {tuple(w.nested_absmax.shape)}")
        if w.nested_absmax.dtype != torch.float32 or w.nested_code.dtype != torch.float32:
            raise TypeError(f"nested_absmax and nested_code must be float32, got {w.nested_absmax.dtype} and "
                            f"{w.nested_code.dtype}")
        if w.nested_code.numel() != 256:
            raise ValueError(f"nested_code must have 256 entries, got {w.nested_code.numel()}")
        if not math.isfinite(w.nested_offset):
            raise ValueError(f"nested_offset must be finite, got {w.nested_offset}")
        tensors += [("nested_absmax", w.nested_absmax), ("nested_code", w.nested_code)]
    else:
        if w.nested_code is not None or w.nested_offset is not None:
            raise ValueError("nested_code/nested_offset given without nested_absmax")
        if w.absmax.dtype != torch.float32:
            raise TypeError(f"absmax must be float32 (or uint8 with nested_absmax), got {w.absmax.dtype}")
    for label, t in tensors:
        if t.device != w.codes.device:
            raise ValueError(f"{label} is on {t.device} but codes are on {w.codes.device}")


def _validate_lora(weight, lora_A, lora_B):
    if len(weight.shape) != 2:
        raise ValueError(f"a LoRA merge needs a 2-D weight, got shape {weight.shape}")
    out_features, in_features = weight.shape
    for label, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{label} must be a tensor, got {type(t).__name__}")
        if t.dtype not in OUT_DTYPES:
            raise TypeError(f"{label} must be float32, bfloat16 or float16, got {t.dtype}")
        if t.device != weight.device:
            raise ValueError(f"{label} is on {t.device} but the weight is on {weight.device}")
        if t.dim() != 2:
            raise ValueError(f"{label} must be 2-D, got shape {tuple(t.shape)}")
    rank = lora_A.shape[0]
    if rank < 1 or lora_A.shape[1] != in_features or tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(f"LoRA shapes do not fit weight {weight.shape}: need lora_A [r, {in_features}] and "
                         f"lora_B [{out_features}, r], got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}")


def _validate_out(weight, out, out_dtype):
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a tensor, got {type(out).__name__}")
    if out.dtype != out_dtype:
        raise TypeError(f"out has dtype {out.dtype}, expected {out_dtype}")
    if tuple(out.shape) != weight.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {weight.shape}")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    if out.device != weight.device:
        raise ValueError(f"out is on {out.device} but the weight is on {weight.device}")
