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
# oneDNN writes a new tensor (no in-place accumulation), so `addmm_` adds it in a separate pass over the
# output; that pays from a depth of about 512. Measured z.T @ h into a gradient tile [tile, 1024] (MKL
# addmm_ vs oneDNN + add): depth 192 40.1 vs 51.3 ms, 384 78.9 vs 72.3, 768 39.4 vs 23.1, 1024 39.8 vs 22.9;
# p @ W into [384, 1024] at depth 21845: 80.1 vs 41.5 ms.
ONEDNN_MIN_ACCUMULATE_DEPTH = 512
# oneDNN returns a new tensor and lays each weight out anew for its kernel. Where the result goes into a
# caller's buffer, the product is made in blocks whose output and weight block are each at most this many
# bytes, so the transient stays small whatever the sizes (a whole [384, 32000] pair of logits at once added
# 47 MiB to the trained head's peak): `linear` blocks the output columns, `addmm_` the depth (a deep,
# narrow product would otherwise re-read its wide input once per column block).
ONEDNN_TRANSIENT_BYTES = 4 * 2**20


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


def _onednn(x, weight, bias=None):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _blocks(length: int, step: int):
    step = max(1, step)
    return ((i0, min(length, i0 + step)) for i0 in range(0, length, step))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T (+ bias)` for 2-D `x` [M, K] and `weight` [N, K] (a transposed view is fine), into `out`
    when given."""
    if _use_onednn(x, weight):
        if out is None:
            return _onednn(x, weight, bias)
        m, k = x.shape
        for n0, n1 in _blocks(weight.shape[0], ONEDNN_TRANSIENT_BYTES // (4 * max(m, k, 1))):
            out[:, n0:n1].copy_(_onednn(x, weight[n0:n1], None if bias is None else bias[n0:n1]))
        return out
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def addmm_(acc: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`acc += x @ weight.T` in place; returns acc."""
    if x.shape[1] >= ONEDNN_MIN_ACCUMULATE_DEPTH and _use_onednn(x, weight):
        depth_step = max(ONEDNN_MIN_ACCUMULATE_DEPTH, ONEDNN_TRANSIENT_BYTES // (4 * max(weight.shape[0], 1)))
        for k0, k1 in _blocks(x.shape[1], depth_step):
            acc.add_(_onednn(x[:, k0:k1], weight[:, k0:k1]))
        return acc
    return acc.addmm_(x, weight.t())
