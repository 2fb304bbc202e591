"""`pyprefopt.cpu_linear.linear`: x @ W.T (+ b) through oneDNN for large fp32 GEMMs, torch.mm otherwise, for
plain and transposed weights. Every element must lie within the worst-case error of an fp32 dot product in
any summation order, K u (|x| @ |W|.T + |b|) with u = 2^-24: oneDNN's order differs from MKL's (its error
was 2-3x MKL's here), but a GEMM that dropped to TF32 or bf16 anywhere would be 2^13 or 2^16 times over."""

import pytest
import torch

from pyprefopt import cpu_linear

def assert_within_fp32_dot_bound(out, x, weight, bias):
    k = x.shape[1]
    truth = x.double() @ weight.double().t() + (0 if bias is None else bias.double())
    size = x.double().abs() @ weight.double().abs().t() + (0 if bias is None else bias.double().abs())
    bound = (k + 1) * 2.0**-24 * size
    worst = ((out.double() - truth).abs() / bound.clamp_min(1e-300)).max().item() if out.numel() else 0.0
    assert worst <= 1.0, f"error reaches {worst:.2f}x the fp32 dot-product bound"


@pytest.mark.parametrize("transposed", [False, True], ids=["weight", "weight.t()"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("m,k,n", [(512, 512, 512), (300, 1000, 600), (7, 33, 5), (0, 16, 8)], ids=str)
def test_linear_within_fp32_error_bound(m, k, n, with_bias, transposed):
    torch.manual_seed(0)
    x = torch.randn(m, k)
    weight = torch.randn(k, n).t() if transposed else torch.randn(n, k)
    bias = torch.randn(n) if with_bias else None
    large = m * k * n >= cpu_linear.ONEDNN_MIN_MACS
    assert cpu_linear._use_onednn(x, weight) == (large and torch.backends.mkldnn.is_available())
    out = cpu_linear.linear(x, weight, bias)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert_within_fp32_dot_bound(out, x, weight, bias)


def test_other_dtypes_take_torch_mm():
    x, weight = torch.randn(512, 512, dtype=torch.bfloat16), torch.randn(512, 512, dtype=torch.bfloat16)
    assert not cpu_linear._use_onednn(x, weight)
    assert torch.equal(cpu_linear.linear(x, weight), torch.mm(x, weight.t()))
