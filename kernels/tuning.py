"""GPU tuning keyed by the device: the kernels' autotune configs are tabled per compute-capability family and looked
up by the capability of the device a launch runs on, read at the first launch there (never at import: nothing here
calls CUDA before a kernel runs).

A device of a capability no family names takes the family of the greatest capability below its own (sm_89 Ada runs
sm_86's configs, sm_103 sm_100's, a future major the newest family's); one below every family takes the lowest.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# The same on every family here: 64K 32-bit registers per SM, allocated per warp in blocks of 256.
REGISTERS_PER_SM = 65536
REGISTER_ALLOCATION_UNIT = 256
MAX_PROGRAMS_PER_SM = 32
MAX_REGISTERS_PER_THREAD = 255
# Shared memory the driver reserves per resident program (CUDA's cudaDevAttrReservedSharedMemoryPerBlock).
RESERVED_SHARED_PER_PROGRAM = 1024


@dataclass(frozen=True)
class Family:
    """A compute-capability family: `capability` the lowest it covers (the one its configs are compiled for ahead
    of time, as `ptxas_arch`), and the per-SM limits that set how many programs of a kernel are resident."""

    name: str
    capability: tuple[int, int]
    ptxas_arch: str
    shared_kib_per_sm: int
    max_threads_per_sm: int


FAMILIES = (
    Family("sm_80", (8, 0), "sm_80", 164, 2048),  # A100, A800
    Family("sm_86", (8, 6), "sm_86", 100, 1536),  # Ampere GA10x, Ada (sm_89)
    Family("sm_90", (9, 0), "sm_90a", 228, 2048),  # H100, H200, H20
    Family("sm_100", (10, 0), "sm_100a", 228, 2048),  # B200, GB200, B300 (sm_103)
    Family("sm_120", (12, 0), "sm_120a", 100, 1536),  # RTX 50xx, RTX PRO 6000 Blackwell, GB10 (sm_121)
)
FAMILY_NAMES = tuple(f.name for f in FAMILIES)


def family_of(capability: tuple[int, int]) -> Family:
    """The family whose configs a device of `capability` (major, minor) runs: the greatest family capability not
    above it, or the lowest family for a device older than every family."""
    below = [f for f in FAMILIES if f.capability <= tuple(capability)]
    return max(below, key=lambda f: f.capability) if below else min(FAMILIES, key=lambda f: f.capability)


@functools.cache
def _cuda_family(index: int) -> Family:
    return family_of(torch.cuda.get_device_capability(index))


def device_family(device: torch.device) -> Family:
    """The family of the CUDA `device`, its capability read once per device at the first call."""
    return _cuda_family(device.index if device.index is not None else torch.cuda.current_device())


def register_budget(programs_per_sm: int, num_warps: int) -> int:
    """The most registers per thread (a multiple of 8, ptxas's unit) at which `programs_per_sm` programs of
    `num_warps` warps fit an SM's register file: a config's `maxnreg` for that occupancy."""
    return min(MAX_REGISTERS_PER_THREAD, REGISTERS_PER_SM // (programs_per_sm * num_warps * 32) // 8 * 8)


def programs_per_sm(family: Family, registers: int, num_warps: int, shared_bytes: int) -> int:
    """Resident programs per SM of a kernel using `registers` per thread and `shared_bytes` of shared memory per
    program: the least of what the register file, the thread slots and the shared memory allow."""
    warp_registers = -(-registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    by_registers = REGISTERS_PER_SM // (warp_registers * num_warps)
    by_threads = family.max_threads_per_sm // (num_warps * 32)
    by_shared = family.shared_kib_per_sm * 1024 // (shared_bytes + RESERVED_SHARED_PER_PROGRAM)
    return min(by_registers, by_threads, by_shared, MAX_PROGRAMS_PER_SM)
