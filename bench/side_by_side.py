"""Two or more implementations of one step measured side by side in one process: forward + backward time in
interleaved rounds (a shared machine drifts; each round runs every variant, in turn order rotated), and the bytes
autograd saves for backward."""

from __future__ import annotations

import statistics
import time

import torch


def interleaved_ms(steps: dict, rounds: int) -> dict[str, float]:
    """Median ms per call of each `steps[name]()` over `rounds` rounds after one warm-up round."""
    names = list(steps)
    times = {name: [] for name in names}
    for r in range(rounds + 1):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            steps[name]()
            if r:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def saved_bytes(forward, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves while `forward()` runs, those of the tensors in `exclude`
    (weights, which backward reads in place) left out. The graph is dropped on return."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(seen.values())


def print_comparison(title: str, label: str, modules: dict, step, x, grad_y, rounds: int, frozen, digits: int):
    """Times `step(module, x, grad_y)` for each of `modules` ("transformers" and "pyprefopt") side by side, counts
    the KiB per token (row of x) each saves for backward, its `frozen(module)` weights left out, and prints the table
    under `title` with `label` heading its first column."""
    ms = interleaved_ms({name: lambda m=m: step(m, x, grad_y) for name, m in modules.items()}, rounds)
    tokens = x.shape[0]
    kib = {name: saved_bytes(lambda m=m: step(m, x, grad_y), frozen(m)) / 1024 / tokens for name, m in modules.items()}
    print(title)
    print(f"| {label} | forward + backward ms | saved KiB per token |\n|---|---:|---:|")
    for name in ms:
        print(f"| {name} | {ms[name]:.{digits}f} | {kib[name]:.{digits}f} |")
    print(f"time ratio (pyprefopt / transformers) {ms['pyprefopt'] / ms['transformers']:.3f}, saved "
          f"{kib['pyprefopt'] / kib['transformers']:.3f}")
