"""`pyprefopt.cpu_linear`: x @ W.T (+ b) through oneDNN for large fp32 GEMMs, torch.mm otherwise, for plain
and transposed weights. Every element must lie within the worst-case error of an fp32 dot product in any
summation order, (K + 1) u (|x| @ |W|.T + |b|) with u = 2^-24 (a GEMM that dropped to bf16 measured 26x
over it), and the largest error within 8x that of torch's own fp32 GEMM against an fp64 truth (oneDNN sums
in another order: its error measured 2-3.4x MKL's here), which a 1e-3 slip in scale would not be."""

import pytest
import torch

from pyprefopt import cpu_linear
from tests.tensor_asserts import assert_within_torch_error


def assert_within_fp32_dot_bound(out, x, weight, addend):
    """`out` = x @ weight.T + addend (a bias row or a whole matrix) within the bound."""
    k = x.shape[1]
    truth = x.double() @ weight.double().t() + (0 if addend is None else addend.double())
    size = x.double().abs() @ weight.double().abs().t() + (0 if addend is None else addend.double().abs())
    bound = (k + 1) * 2.0**-24 * size
    worst = ((out.double() - truth).abs() / bound.clamp_min(1e-300)).max().item() if out.numel() else 0.0
    assert worst <= 1.0, f"error reaches {worst:.2f}x the fp32 dot-product bound"
    torch_fp32 = torch.mm(x, weight.t()) + (0 if addend is None else addend)
    assert_within_torch_error(out, truth, torch_fp32, factor=8.0, name="cpu_linear")


@pytest.mark.parametrize("transposed", [False, True], ids=["weight", "weight.t()"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("m,k,n", [(512, 512, 512), (300, 1000, 600), (7, 33, 5), (0, 16, 8)], ids=str)
def test_linear_within_fp32_error_bound(m, k, n, with_bias, transposed):
    torch.manual_seed(0)
    x = torch.randn(m, k)
    weight = torch.randn(k, n).t() if transposed else torch.randn(n, k)
    bias = torch.randn(n) if with_bias else None
    large = m * k * n >= cpu_linear.ONEDNN_MIN_MACS
    assert cpu_linear._use_onednn(x, weight) == (large and not transposed and torch.backends.mkldnn.is_available())
    out = cpu_linear.linear(x, weight, bias)
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert_within_fp32_dot_bound(out, x, weight, bias)


def test_other_dtypes_take_torch_mm():
    x, weight = torch.randn(512, 512, dtype=torch.bfloat16), torch.randn(512, 512, dtype=torch.bfloat16)
    assert not cpu_linear._use_onednn(x, weight)
    assert torch.equal(cpu_linear.linear(x, weight), torch.mm(x, weight.t()))


@pytest.mark.parametrize("m,k,n", [(512, 512, 512), (300, 4096, 200), (7, 33, 5)], ids=str)
def test_out_and_addmm_on_both_paths(m, k, n):
    torch.manual_seed(0)
    x, weight = torch.randn(m, k), torch.randn(n, k)
    out = torch.empty(m, n)
    assert cpu_linear.linear(x, weight, out=out) is out
    assert_within_fp32_dot_bound(out, x, weight, None)
    # acc += x @ W.T: oneDNN for a deep product (k = 4096), torch's addmm_ otherwise.
    assert cpu_linear._use_onednn(x, weight) == (m * k * n >= cpu_linear.ONEDNN_MIN_MACS)
    start = torch.randn(m, n)
    acc = start.clone()
    assert cpu_linear.addmm_(acc, x, weight) is acc
    assert_within_fp32_dot_bound(acc, x, weight, start)


def test_onednn_blocks_tile_the_whole_output(monkeypatch):
    """With a tiny transient budget, `linear(out=)` runs in ragged blocks of output columns and rows, and `addmm_`
    in ragged blocks of rows and depth: every element is written, or added to, once, and nothing outside the output
    is touched. Transposed operands (the weight gradient's z.T) take torch.mm instead, none of these blocks."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    monkeypatch.setattr(cpu_linear, "ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(cpu_linear, "ONEDNN_MIN_ACCUMULATE_DEPTH", 8)
    monkeypatch.setattr(cpu_linear, "ONEDNN_TRANSIENT_BYTES", 4 * 7 * 13)
    calls = []
    onednn = cpu_linear._onednn
    monkeypatch.setattr(cpu_linear, "_onednn", lambda *args: calls.append(args[0].shape) or onednn(*args))
    m, n = 37, 29
    x = torch.randn(m, 7)
    weight = torch.randn(n, 7)
    framed = torch.full((m + 2, n + 2), float("nan"))
    out = framed[1 : m + 1, 1 : n + 1]
    assert cpu_linear.linear(x, weight, out=out) is out
    # Columns in blocks of 13 (a 7-deep weight block of 4 * 7 * 13 bytes), rows in blocks of 7 (13 wide) or of
    # 30 (the last block, 3 wide): 2 * 6 + 2 products.
    assert len(calls) == 14
    assert_within_fp32_dot_bound(out, x, weight, None)
    frame = torch.ones_like(framed, dtype=torch.bool)
    frame[1 : m + 1, 1 : n + 1] = False
    assert framed[frame].isnan().all()
    calls.clear()
    deep, deep_weight = torch.randn(m, 20), torch.randn(n, 20)
    start = torch.randn(m, n)
    acc = start.clone()
    assert cpu_linear.addmm_(acc, deep, deep_weight) is acc
    # Rows in blocks of 3 (3 x 29 outputs), depth in blocks of 8: 13 * 3 products.
    assert len(calls) == 39
    assert_within_fp32_dot_bound(acc, deep, deep_weight, start)
    calls.clear()
    transposed, transposed_weight = torch.randn(20, m).t(), torch.randn(20, n).t()
    assert_within_fp32_dot_bound(cpu_linear.linear(transposed, weight=deep_weight, out=out), transposed, deep_weight,
                                 None)
    acc = start.clone()
    assert_within_fp32_dot_bound(cpu_linear.addmm_(acc, deep, transposed_weight), deep, transposed_weight, start)
    assert calls == []


def test_operand_precision_multiplies_bf16_values_exactly_and_restores():
    """Under `operand_precision(torch.bfloat16)` fp32 operands holding bf16 values still give fp32-accurate products
    (each product is exact), in `linear`, `linear(out=)` and `addmm_`; other dtypes leave the GEMMs alone, and the
    setting is restored on exit, an exception included."""
    torch.manual_seed(0)
    x, weight = torch.randn(300, 1000).bfloat16().float(), torch.randn(600, 1000).bfloat16().float()
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    with cpu_linear.operand_precision(torch.bfloat16):
        assert matmul.fp32_precision == "bf16"
        assert not cpu_linear._use_onednn(x, weight)
        assert_within_fp32_dot_bound(cpu_linear.linear(x, weight), x, weight, None)
        out = torch.empty(300, 600)
        assert_within_fp32_dot_bound(cpu_linear.linear(x, weight, out=out), x, weight, None)
        start = torch.randn(300, 600)
        assert_within_fp32_dot_bound(cpu_linear.addmm_(start.clone(), x, weight), x, weight, start)
    assert matmul.fp32_precision == before
    with cpu_linear.operand_precision(torch.float16):
        assert matmul.fp32_precision == before
    with pytest.raises(RuntimeError, match="inside"):
        with cpu_linear.operand_precision(torch.bfloat16):
            raise RuntimeError("inside")
    assert matmul.fp32_precision == before



def test_in_operand_precision_of_follows_the_named_argument_and_restores():
    """The decorated function runs under `operand_precision` of its named argument's dtype, passed by position or
    by keyword; the setting is restored on return and on an exception."""
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision

    @cpu_linear.in_operand_precision_of("hidden")
    def precision_inside(scale, hidden, fail=False):
        if fail:
            raise RuntimeError("inside")
        return matmul.fp32_precision

    assert precision_inside(1.0, torch.ones(1, dtype=torch.bfloat16)) == "bf16"
    assert precision_inside(1.0, hidden=torch.ones(1, dtype=torch.bfloat16)) == "bf16"
    assert precision_inside(1.0, torch.ones(1)) == before
    assert matmul.fp32_precision == before
    with pytest.raises(RuntimeError, match="inside"):
        precision_inside(1.0, torch.ones(1, dtype=torch.bfloat16), fail=True)
    assert matmul.fp32_precision == before
