"""Which implementation an op runs: its Triton kernels or its PyTorch path."""

from __future__ import annotations

import torch

BACKENDS = ("auto", "triton", "torch")


def use_triton(device: torch.device, backend: str) -> bool:
    """`backend` "auto": the Triton kernels on CUDA, the PyTorch path elsewhere; "triton" forces the kernels (CPU
    tensors run them under TRITON_INTERPRET=1); "torch" the PyTorch path."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "auto":
        return device.type == "cuda"
    return backend == "triton"
