"""A CPU training run's resident memory: flat over a long run when every batch has a new shape, and free of the pages
of a checkpoint the loader read through but no weight needs.

**Primitive caches.** On CPU the training loop packs each micro-batch's sequences into one row, so the token count
every GEMM runs on changes from step to step (and the LM head's token blocks with it). Each fp32 GEMM that
`pyprefopt.cpu_linear` (or torch itself, for bf16) sends to oneDNN builds a primitive (descriptors and a JIT-compiled
kernel) for its exact shape, and two shape-keyed LRU caches keep it: oneDNN's own primitive cache
(ONEDNN_PRIMITIVE_CACHE_CAPACITY) and ideep's, PyTorch's oneDNN wrapper (LRU_CACHE_CAPACITY), 1024 entries each by
default. A shape of one step is rarely seen again, so both fill with dead entries over hundreds of steps and the
resident set grows with them, with glibc's heap fragmenting around what they hold. Bounding them to a few steps' worth
of shapes keeps the ones a step reuses (its layers share shapes, its backward repeats its forward's) and drops the
rest; building a primitive costs far less than the GEMM it runs.

`python -m pyprefopt.train` calls `bound_onednn_caches()` first thing; a program of its own that trains on CPU
with varying shapes can do the same before its first GEMM.

**Mapped checkpoints.** transformers reads a safetensors checkpoint through a memory map of each file, and a weight
it keeps in the file's dtype stays a view of that map (a bf16 checkpoint loaded in bf16; with `--load-in-4bit`,
whatever is not quantised, such as Gemma-3n's embeddings). The map then lives as long as the model, and every page
the loader read through it stays in the process's resident set: with `--load-in-4bit`, the 16-bit originals of
every quantised layer, which no tensor refers to any more, several GiB for a 7 B model. `release_mapped_file_pages`
unmaps those pages (madvise MADV_DONTNEED): they stay in the kernel's page cache, and a page a view reads later maps
back in from there. The model loader calls it once the model is loaded.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from pathlib import Path

MADV_DONTNEED = 4
# A /proc/<pid>/smaps entry's first line: "start-end perms offset dev inode [path]".
_SMAPS_RANGE = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")

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


def smaps_mappings(smaps: str):
    """(start, end, path, fields in kB) of each mapping in the text of a /proc/<pid>/smaps file."""
    entry = None
    for line in smaps.splitlines():
        match = _SMAPS_RANGE.match(line)
        if match:
            if entry:
                yield entry
            entry = (int(match[1], 16), int(match[2], 16), match[4], {})
        elif entry and line.endswith(" kB"):
            key, value = line.split(":", 1)
            entry[3][key] = int(value.split()[0])
    if entry:
        yield entry


def release_mapped_file_pages(paths) -> int:
    """Unmap from this process the resident pages of its memory maps of the files `paths` (a checkpoint's
    safetensors files); the bytes released. Linux only (elsewhere 0). A map one of whose pages has been written
    (a private copy, which unmapping would revert to the file's contents) or that is locked is left as it is; a
    clean page unmapped is read back from the page cache when a tensor viewing it is next read."""
    smaps = Path("/proc/self/smaps")
    if not sys.platform.startswith("linux") or not smaps.exists():
        return 0
    wanted = {os.path.realpath(p) for p in paths}
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for start, end, path, fields in smaps_mappings(smaps.read_text()):
        if path not in wanted or not fields.get("Rss"):
            continue
        # A private map's written pages are its own copies, counted as Anonymous ("Private_Dirty" also counts pages
        # of a file written but not yet flushed to disk, which the page cache keeps).
        if fields.get("Anonymous") or fields.get("Locked"):
            continue
        if libc.madvise(start, end - start, MADV_DONTNEED) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"madvise(MADV_DONTNEED) of the memory map of {path}: {os.strerror(errno)}")
        released += 1024 * fields["Rss"]
    return released
