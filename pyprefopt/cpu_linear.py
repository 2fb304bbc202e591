"""`x @ weight.T (+ bias)` on CPU through the faster of PyTorch's two CPU GEMM libraries.

PyTorch sends fp32 `torch.mm` / `F.linear` to MKL's sgemm, and bf16 / fp16 to oneDNN. On AMD CPUs MKL's
sgemm runs far below the FMA peak: on a 2-core EPYC Zen 5, 2048x4096 @ 4096x4096 took 332 ms in MKL and
156 ms in oneDNN (`torch.ops.mkldnn._linear_pointwise`, the op Inductor's CPU backend uses), with the same
fp32 accuracy class (max error against fp64 3.7e-4 vs 1.1e-4 over 4096-long dot products of N(0, 1)
values). So large fp32 GEMMs go through oneDNN here. oneDNN builds a kernel per new shape (about 1 ms),
so small GEMMs, which change shape from batch to batch in training, stay on `torch.mm`.
"""

from __future__ import annotations

import torch

# Multiply-adds from which a GEMM takes oneDNN: at 2^27 (e.g. 512 x 512 x 512) a GEMM takes ~1 ms on two
# cores, the order of oneDNN's cost for a shape it has not seen.
ONEDNN_MIN_MACS = 1 << 27


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() == 2
        and x.shape[0] * x.shape[1] * weight.shape[0] >= ONEDNN_MIN_MACS
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T (+ bias)` for 2-D `x` [M, K] and `weight` [N, K] (a transposed view is fine)."""
    if _use_onednn(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
