"""What the Triton kernels share: whether they run interpreted, the `tl.dot` precision flags, the launch (autotuned
on a GPU, one fixed config under the interpreter) and how many programs fill the device at hand.

Nothing here touches CUDA at import time: the device is read at the first launch on it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

# Programs per SM a split reduction aims at: enough resident programs to hide the loads of each.
PROGRAMS_PER_SM = 4
# The interpreter has no device to fill; an H100's count keeps its splits those of a GPU run.
INTERPRETED_SMS = 132


def interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs") else False


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr):
    # fp32 operands: IEEE fp32 unless torch allows TF32 (torch.backends.cuda.matmul.allow_tf32).
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


def dot_flags(dtype: torch.dtype) -> dict:
    """`DOT_FP32`: upcast tiles before `tl.dot` (the interpreter's is wrong on bf16 operands); `IEEE`: fp32 dots in
    IEEE fp32, as torch's own fp32 matmul computes unless TF32 is allowed."""
    interpreted = interpreting()
    return {
        "DOT_FP32": interpreted,
        "IEEE": dtype == torch.float32 and not interpreted and not torch.backends.cuda.matmul.allow_tf32,
    }


def launch(tuned, plain, interpreter_config: dict, grid, **kwargs):
    """Run `tuned` (a `triton.autotune`d kernel) on the GPU, or under the interpreter `plain` with its single
    `interpreter_config` (autotuning there would only multiply test time). `grid` maps a config to the grid."""
    if interpreting():
        plain[grid(interpreter_config)](**kwargs, **interpreter_config)
    else:
        tuned[grid](**kwargs)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """Programs a split reduction on `device` aims at: PROGRAMS_PER_SM per SM of that very GPU."""
    if device.type != "cuda":
        return PROGRAMS_PER_SM * INTERPRETED_SMS
    return PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
