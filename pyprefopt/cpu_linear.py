"""`x @ weight.T (+ bias)` on CPU through the faster of PyTorch's two CPU GEMM libraries.

PyTorch sends fp32 `torch.mm` / `F.linear` to MKL's sgemm, and bf16 / fp16 to oneDNN. On AMD CPUs MKL's
sgemm runs far below the FMA peak, while oneDNN (`torch.ops.mkldnn._linear_pointwise`, the op Inductor's CPU
backend uses) reaches it with the same fp32 accuracy class; so large fp32 GEMMs go through oneDNN here. oneDNN
builds a kernel per new shape, so small GEMMs, which change shape from batch to batch in training, stay on
`torch.mm`.

The blocked fused head upcasts a bf16 model's operands to fp32 to keep fp32 logits; `operand_precision` then tells
oneDNN that bf16 products are enough, which sends torch's own fp32 GEMMs to oneDNN's matmul (bf16 instructions where
the CPU has bf16 matrix units, its fp32 kernels elsewhere), in place and without the copies below. Each blocked
computation declares it once at its entry (`in_operand_precision_of`), so that no caller has to.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch

# Multiply-adds from which a GEMM takes oneDNN: from about 2^27 (e.g. 512 x 512 x 512) the GEMM itself costs
# as much as oneDNN's kernel build for a shape it has not seen.
ONEDNN_MIN_MACS = 1 << 27
# oneDNN writes a new tensor (no in-place accumulation), so `addmm_` adds each product in a separate pass over
# an output block small enough to still be in cache. That extra pass costs as much as the product's own
# arithmetic at small depths: oneDNN pays from a depth of about 64 (an unblocked product plus one add over the
# whole output loses the cache and with it the gain).
ONEDNN_MIN_ACCUMULATE_DEPTH = 64
# oneDNN returns a new tensor and lays each weight out anew for its kernel. Where the result goes into a
# caller's buffer, the product is made in blocks whose output and weight block are each at most this many
# bytes, so the transient stays small whatever the sizes and each block is copied or added while it is in cache:
# both block the output rows and columns (`addmm_` blocks the depth in place of the columns).
ONEDNN_TRANSIENT_BYTES = 4 * 2**20


@contextlib.contextmanager
def operand_precision(dtype: torch.dtype):
    """Within: fp32 GEMMs on CPU may round their operands to `dtype` when that is bfloat16 (oneDNN's bf16 fp32-math
    mode: it does so where the CPU has bf16 matrix units, and runs its fp32 kernels elsewhere); they accumulate in
    fp32 and return fp32. Any other dtype changes nothing. For operands that hold bf16 values (a bf16 model's hidden
    states and head, upcast tile by tile) each product is exact either way, so the logits are those of an fp32 GEMM;
    an fp32 operand such as a softmax gradient is at worst rounded to bf16, as torch's own bf16 autograd rounds it."""
    if dtype != torch.bfloat16:
        yield
        return
    matmul = torch.backends.mkldnn.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


def in_operand_precision_of(argument: str):
    """Decorator: the function runs under `operand_precision` of the dtype of its tensor argument named `argument`
    (the model's operands, before any upcast)."""

    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def run(*args, **kwargs):
            with operand_precision(signature.bind(*args, **kwargs).arguments[argument].dtype):
                return function(*args, **kwargs)

        return run

    return decorate


def _use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # Under `operand_precision` torch's own GEMMs take oneDNN's matmul, which writes or accumulates in place: the
    # blocked copies below would only slow it down. Transposed operands (the weight gradient's z.T @ h, the hidden
    # gradient's z @ W) stay with torch.mm, whose BLAS reads either layout at full speed: oneDNN's inner product
    # falls back to a kernel orders of magnitude slower for some of their shapes and strides.
    return (
        torch.backends.mkldnn.matmul.fp32_precision != "bf16"
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and x.dim() == 2
        and x.stride(-1) == 1
        and weight.stride(-1) == 1
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
        (m, k), n = x.shape, weight.shape[0]
        for n0, n1 in _blocks(n, ONEDNN_TRANSIENT_BYTES // (4 * max(k, 1))):
            w, b = weight[n0:n1], None if bias is None else bias[n0:n1]
            for m0, m1 in _blocks(m, ONEDNN_TRANSIENT_BYTES // (4 * (n1 - n0))):
                out[m0:m1, n0:n1].copy_(_onednn(x[m0:m1], w, b))
        return out
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def addmm_(acc: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`acc += x @ weight.T` in place; returns acc."""
    if x.shape[1] >= ONEDNN_MIN_ACCUMULATE_DEPTH and _use_onednn(x, weight):
        (m, k), n = x.shape, weight.shape[0]
        step = ONEDNN_TRANSIENT_BYTES // (4 * max(n, 1))
        for m0, m1 in _blocks(m, step):
            for k0, k1 in _blocks(k, max(ONEDNN_MIN_ACCUMULATE_DEPTH, step)):
                acc[m0:m1].add_(_onednn(x[m0:m1, k0:k1], weight[:, k0:k1]))
        return acc
    return acc.addmm_(x, weight.t())
