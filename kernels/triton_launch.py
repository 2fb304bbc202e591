"""What the Triton kernels share: whether they run interpreted, the `tl.dot` precision flags, the launch (autotuned
on a GPU over the configs of the device's family, `pyprefopt.kernels.tuning`; one fixed config under the
interpreter) and how many programs fill the device at hand.

Nothing here touches CUDA at import time: the device is read at the first launch on it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pyprefopt.kernels import tuning

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


@triton.jit
def rounded(value, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 `value` in `dtype`, rounded to nearest even as on the GPU. The interpreter (triton 3.9)
    truncates fp32 -> bf16 whatever the rounding mode, so there the rounding is done on the bits."""
    if INTERPRETED and dtype == tl.bfloat16:
        bits = value.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)
    return value.to(dtype)


def dot_flags(dtype: torch.dtype) -> dict:
    """`DOT_FP32`: upcast tiles before `tl.dot` (the interpreter's is wrong on bf16 operands); `IEEE`: fp32 dots in
    IEEE fp32, as torch's own fp32 matmul computes unless TF32 is allowed."""
    interpreted = interpreting()
    return {
        "DOT_FP32": interpreted,
        "IEEE": dtype == torch.float32 and not interpreted and not torch.backends.cuda.matmul.allow_tf32,
    }


class TunedKernel:
    """A Triton kernel and its autotune configs per device family (`configs[family name]`, a list or a dict of
    lists by `variant`, such as the input element size). On a GPU a launch autotunes over the configs of the
    device's family: one `triton.autotune` per (family, variant), built at its first launch. Under the interpreter
    it runs `interpreter_config` (autotuning there would only multiply test time)."""

    def __init__(self, kernel, configs: dict, interpreter_config: dict, key, prune=None, reset_to_zero=None):
        missing = set(tuning.FAMILY_NAMES) - set(configs)
        if missing:
            raise ValueError(f"{kernel.__name__}: no configs for the families {sorted(missing)}")
        self.kernel, self.table, self.interpreter_config = kernel, configs, interpreter_config
        self.key, self.prune, self.reset_to_zero = key, prune, reset_to_zero
        self._tuned = {}

    def configs(self, family: tuning.Family, variant=None) -> list:
        configs = self.table[family.name]
        return configs if variant is None else configs[variant]

    def launch(self, grid, device: torch.device, variant=None, **kwargs):
        """Run on `device`; `grid` maps a config to the grid."""
        if interpreting():
            self.kernel[grid(self.interpreter_config)](**kwargs, **self.interpreter_config)
            return
        family = tuning.device_family(device)
        tuned = self._tuned.get((family.name, variant))
        if tuned is None:
            tuned = triton.autotune(
                self.configs(family, variant), key=self.key, reset_to_zero=self.reset_to_zero,
                prune_configs_by={"early_config_prune": self.prune} if self.prune else None,
            )(self.kernel)
            self._tuned[family.name, variant] = tuned
        tuned[grid](**kwargs)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def target_programs(device: torch.device) -> int:
    """Programs a split reduction on `device` aims at: PROGRAMS_PER_SM per SM of that very GPU."""
    if device.type != "cuda":
        return PROGRAMS_PER_SM * INTERPRETED_SMS
    return PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
