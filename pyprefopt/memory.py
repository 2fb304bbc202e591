"""Keeping a long CPU training run's resident memory flat when every batch has a new shape.

On CPU the training loop packs each micro-batch's sequences into one row, so the token count every GEMM runs on
changes from step to step (and the LM head's token blocks with it). Two things then grow the process's resident
set step after step although no Python object is kept:

- oneDNN's caches. Each fp32 GEMM that `pyprefopt.cpu_linear` sends to oneDNN builds a primitive (descriptors
  and a JIT-compiled kernel) for its exact shape, and two shape-keyed LRU caches keep it: oneDNN's own primitive
  cache (ONEDNN_PRIMITIVE_CACHE_CAPACITY) and ideep's, PyTorch's oneDNN wrapper (LRU_CACHE_CAPACITY), 1024
  entries each by default. A shape of one step is rarely seen again, so both fill with dead entries over
  hundreds of steps. Bounding them to a few steps' worth of shapes keeps the ones a step reuses (its layers
  share shapes, its backward repeats its forward's) and drops the rest; building a primitive costs far less
  than the GEMM it runs here.
- glibc malloc. Tensors of ever new sizes freed back to the heap leave holes that the next, differently sized
  tensors fit only in part, and glibc raises its mmap threshold each time a large mapped block is freed, so
  after a few steps even the largest tensors come from the heap, and free pages in the middle of a heap are
  never given back on their own. Smaller mmap/trim thresholds or fewer arenas (mallopt) would return them, but
  at the price of page faults or lock contention on every step; a malloc_trim every few steps returns them at
  a small fraction of that price.

`bound_onednn_caches()` runs when `pyprefopt.cpu_linear` is imported (before any oneDNN GEMM of pyprefopt's);
`bound_cpu_memory_growth()` is the same for a caller's run start; `release_cpu_memory(step)` goes between steps.
Each is a no-op where it does not apply (a cache size the user set, not glibc).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# Entries kept by each of oneDNN's two shape-keyed primitive caches: more than one step's distinct GEMM shapes
# (a decoder layer's projections forward and backward, the head's tiles), so a step still reuses what it built,
# and few enough that the dead shapes of past steps hold little memory.
ONEDNN_CACHE_CAPACITY = 64
# The cache sizes as oneDNN and ideep read them, each once, when they build their first primitive. 0 is not used
# for ideep's: its LRU cache crashes with a capacity of 0.
ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")

# Steps between two malloc_trim calls (release_cpu_memory): often enough that the heap's free pages never pile
# up, rarely enough that faulting the trimmed pages back in costs little of a step's time.
TRIM_EVERY_STEPS = 16


def bound_onednn_caches(capacity: int = ONEDNN_CACHE_CAPACITY) -> dict[str, str]:
    """Bound oneDNN's and ideep's primitive caches to `capacity` entries each, unless the user set them. Takes
    effect only before the process builds its first oneDNN primitive (both read their setting once); returns
    the settings in force from then on."""
    for name in ONEDNN_CACHE_VARIABLES:
        os.environ.setdefault(name, str(max(1, capacity)))
    return {name: os.environ[name] for name in ONEDNN_CACHE_VARIABLES}


def _glibc():
    """glibc (with malloc_trim), or None elsewhere (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _glibc()


def release_cpu_memory(step: int | None = None) -> bool:
    """Between steps (every TRIM_EVERY_STEPS-th `step`, or always when `step` is None): give the heaps' free
    pages back to the OS (glibc's malloc_trim), so that memory freed in the middle of a heap, which glibc's own
    top-of-heap trim cannot reach, is not kept for good. Returns whether it trimmed."""
    if _LIBC is None or (step is not None and step % TRIM_EVERY_STEPS):
        return False
    _LIBC.malloc_trim(0)
    return True


def bound_cpu_memory_growth() -> dict[str, str]:
    """Once, at the start of a CPU run, before its first oneDNN GEMM: bounded oneDNN caches (what importing
    pyprefopt.cpu_linear already did, unless oneDNN ran first). Returns the settings in force."""
    return bound_onednn_caches()
