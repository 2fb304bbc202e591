"""Keeping a long CPU training run's resident memory flat when every batch has a new shape.

On CPU the training loop packs each micro-batch's sequences into one row, so the token count every GEMM runs on
changes from step to step (and the LM head's token blocks with it). Each fp32 GEMM that `pyprefopt.cpu_linear`
(or torch itself, for bf16) sends to oneDNN builds a primitive (descriptors and a JIT-compiled kernel) for its
exact shape, and two shape-keyed LRU caches keep it: oneDNN's own primitive cache
(ONEDNN_PRIMITIVE_CACHE_CAPACITY) and ideep's, PyTorch's oneDNN wrapper (LRU_CACHE_CAPACITY), 1024 entries each
by default. A shape of one step is rarely seen again, so both fill with dead entries over hundreds of steps and
the resident set grows with them, with glibc's heap fragmenting around what they hold. Bounding them to a few
steps' worth of shapes keeps the ones a step reuses (its layers share shapes, its backward repeats its
forward's) and drops the rest; building a primitive costs far less than the GEMM it runs.

`python -m pyprefopt.train` calls `bound_onednn_caches()` first thing; a program of its own that trains on CPU
with varying shapes can do the same before its first GEMM.
"""

from __future__ import annotations

import os

# Entries kept by each of oneDNN's two shape-keyed primitive caches: more than one step's distinct GEMM shapes
# (a decoder layer's projections forward and backward, the head's tiles), so a step still reuses what it built,
# and few enough that the dead shapes of past steps hold little memory.
ONEDNN_CACHE_CAPACITY = 64
# The cache sizes as oneDNN and ideep read them, each once, when they build their first primitive. Never 0:
# ideep's LRU cache crashes the process with a capacity of 0.
ONEDNN_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")


def bound_onednn_caches(capacity: int = ONEDNN_CACHE_CAPACITY) -> dict[str, str]:
    """Bound oneDNN's and ideep's primitive caches to `capacity` entries each, unless the user set them. Takes
    effect only before the process builds its first oneDNN primitive (both read their setting once); returns
    the settings in force from then on."""
    for name in ONEDNN_CACHE_VARIABLES:
        os.environ.setdefault(name, str(max(1, capacity)))
    return {name: os.environ[name] for name in ONEDNN_CACHE_VARIABLES}
