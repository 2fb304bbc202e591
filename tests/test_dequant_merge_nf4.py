"""NF4 dequant-merge: bit-exact decoding against bitsandbytes, merges within one output ulp of the fp32
reference, every CPU instruction-set path giving the same bits, buffer reuse, input errors, the PyTorch
fallback, and the CUDA source compiling with nvcc."""

import json
import math
import pathlib
import shutil
import subprocess
import sysconfig
import warnings

import bitsandbytes as bnb
import bitsandbytes.functional as F
import pybind11
import pytest
import safetensors.torch
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

from pyprefopt import nf4
from pyprefopt.reference import dequant_merge_nf4_reference

C = pytest.importorskip("pyprefopt._C", reason="the C++ extension is not built (pip install -e .)")
ISAS = C.supported_isas()
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Odd shapes (the last block short, rows not a multiple of the row tile, widths that are not a multiple of any
# vector width), widths that take the 8-wide but not the 16-wide path, and shapes large enough for two threads.
SHAPES = [(1, 1), (3, 47), (33, 65), (127, 129), (37, 40), (5, 96), (64, 256), (67, 2048)]


@pytest.fixture(scope="module", autouse=True)
def _eager_bitsandbytes():
    """bitsandbytes wraps its portable kernels in torch.compile; eager gives the same values without a compile
    per shape. torch's own patch, not pytest's monkeypatch: torch keeps its config outside the module __dict__, so
    pytest (>= 9.1) undoes a setattr there with a delattr, which hides the option from dynamo itself."""
    with torch._dynamo.config.patch(disable=True):
        yield


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    """Pin the CPU kernel's instruction set (the widest allowed, falling back when the width does not divide
    the columns): every path must give the same bits."""
    monkeypatch.setattr(nf4, "_CPU_ISA", request.param)
    return request.param


def quantize(shape, blocksize, nested, dtype=torch.float32, quant_storage=torch.uint8):
    weight = torch.randn(shape, dtype=dtype) * 0.05
    return F.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested, quant_type="nf4",
                           quant_storage=quant_storage)


def bnb_dequantize_fp32(packed, state):
    """bitsandbytes' fp32 dequantisation. Its native CPU kernel (taken for an even last dimension) indexes the
    block scales as row * (cols // blocksize) + col // blocksize, which is wrong when blocks span rows
    (blocksize does not divide cols): its quantiser and CUDA kernel cut the flat weight into blocks. There we
    compare with bitsandbytes' portable implementation of the flat layout."""
    cols = state.shape[-1]
    if cols % 2 or cols % state.blocksize == 0:
        return F.dequantize_4bit(packed, state)
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset if state.nested else state.absmax
    portable = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)
    return portable(packed.view(torch.uint8).reshape(-1), absmax, F.get_4bit_type("nf4", "cpu"), state.blocksize,
                    state.shape, torch.float32)


def reference(weight, lora_A=None, lora_B=None, scale=1.0, out_dtype=torch.float32):
    return dequant_merge_nf4_reference(weight.codes, weight.absmax, weight.shape, weight.blocksize,
                                       weight.nested_absmax, weight.nested_code, weight.nested_offset,
                                       weight.nested_blocksize, lora_A, lora_B, scale, out_dtype)


def assert_bits_equal(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[actual.dtype]
    mismatched = (actual.view(bits) != expected.view(bits)).sum().item()
    assert mismatched == 0, f"{mismatched} of {actual.numel()} elements differ"


def mantissa_bits(dtype):
    return {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}[dtype]


def one_ulp(magnitude, dtype):
    """One ulp of `dtype` at `magnitude` (fp32): 2^(floor(log2 |m|) - mantissa bits), at least the smallest
    subnormal step."""
    info = torch.finfo(dtype)
    smallest_step = info.tiny * 2.0 ** -mantissa_bits(dtype)
    exponent = torch.floor(torch.log2(magnitude.abs().clamp(min=info.tiny)))
    return torch.maximum(torch.exp2(exponent - mantissa_bits(dtype)), torch.tensor(smallest_step))


def test_nf4_table_is_bitsandbytes():
    table = F.get_4bit_type("nf4", device="cpu")
    assert torch.equal(torch.tensor(C.nf4_code()), table)
    assert torch.equal(nf4.NF4_CODE, table)


@pytest.mark.parametrize("nested", [False, True], ids=["fp32-absmax", "nested"])
@pytest.mark.parametrize("blocksize", nf4.BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_dequantize_bit_exact_vs_bitsandbytes(isa, shape, blocksize, nested):
    packed, state = quantize(shape, blocksize, nested)
    weight = nf4.NF4Weight.from_quant_state(packed, state)
    assert_bits_equal(nf4.dequantize_nf4(weight, torch.float32), bnb_dequantize_fp32(packed, state))


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16])
def test_dequantize_16bit_matches_bitsandbytes(isa, out_dtype):
    packed, state = quantize((64, 256), 64, True, dtype=out_dtype)
    weight = nf4.NF4Weight.from_quant_state(packed, state)
    assert weight.dtype == out_dtype
    assert_bits_equal(nf4.dequantize_nf4(weight), F.dequantize_4bit(packed, state))


@pytest.mark.parametrize("quant_storage", [torch.float32, torch.bfloat16, torch.int8])
def test_quant_storage_is_read_as_bytes(quant_storage):
    packed, state = quantize((64, 256), 64, True, quant_storage=quant_storage)
    assert packed.dtype == quant_storage
    weight = nf4.NF4Weight.from_quant_state(packed, state)
    assert_bits_equal(nf4.dequantize_nf4(weight, torch.float32), F.dequantize_4bit(packed, state))


def test_from_safetensors_state_of_a_linear4bit(tmp_path):
    layer = bnb.nn.Linear4bit(96, 40, bias=False, compress_statistics=True, quant_type="nf4").to("cpu")
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({f"model.proj.{k}": v for k, v in layer.state_dict().items()}, str(path))
    weight = nf4.NF4Weight.from_safetensors_state(safetensors.torch.load_file(str(path)), "model.proj.weight")
    assert weight.shape == (40, 96) and weight.nested and weight.dtype == torch.float32
    expected = bnb_dequantize_fp32(layer.weight.data, layer.weight.quant_state)
    assert_bits_equal(nf4.dequantize_nf4(weight, torch.float32), expected)


@pytest.mark.parametrize("nested", [False, True], ids=["fp32-absmax", "nested"])
def test_from_safetensors_state_matches_from_quant_state(nested):
    packed, state = quantize((33, 65), 128, nested)
    tensors = {f"w.{k}": v for k, v in state.as_dict(packed=True).items()} | {"w": packed}
    from_file = nf4.NF4Weight.from_safetensors_state(tensors, "w")
    from_state = nf4.NF4Weight.from_quant_state(packed, state)
    assert (from_file.shape, from_file.blocksize, from_file.nested_offset) == \
        (from_state.shape, from_state.blocksize, from_state.nested_offset)
    assert_bits_equal(nf4.dequantize_nf4(from_file, torch.float32), nf4.dequantize_nf4(from_state, torch.float32))


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["fp32-absmax", "nested"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_merge_within_one_ulp_of_fp32_reference(isa, shape, nested, out_dtype):
    packed, state = quantize(shape, 64, nested)
    weight = nf4.NF4Weight.from_quant_state(packed, state)
    rank = 16
    lora_A = torch.randn(rank, shape[1]) / shape[1] ** 0.5
    lora_B = torch.randn(shape[0], rank) * 0.02
    scale = nf4.lora_scale(32, rank)
    merged = nf4.dequant_merge_nf4(weight, lora_A, lora_B, scale, out_dtype)
    expected = reference(weight, lora_A, lora_B, scale, out_dtype)
    assert merged.dtype == out_dtype and merged.shape == shape
    if out_dtype != torch.float32:
        # The fp32 sums differ from the GEMM's only in their last bits, so at most one rounding flips.
        diff = (merged.float() - expected.float()).abs()
        assert (diff <= one_ulp(torch.maximum(merged.float().abs(), expected.float().abs()), out_dtype)).all()
    else:
        # In fp32 the rank-r dot product's order shows: one ulp at the size of the terms added.
        terms = reference(weight).abs() + abs(scale) * (lora_B.abs() @ lora_A.abs())
        assert ((merged - expected).abs() <= one_ulp(terms, torch.float32)).all()


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
@pytest.mark.parametrize("blocksize", [32, 64])
# 40 and 48 columns: rows start mid-block, so vector pairs straddle two blocks (AVX2 at 40, AVX-512 at 48);
# (2048, 2048): outputs of 8 MiB and more are written with non-temporal stores.
@pytest.mark.parametrize("shape", [(33, 65), (37, 40), (21, 48), (67, 2048), (2048, 2048)], ids=str)
def test_every_isa_gives_the_same_bits(monkeypatch, shape, blocksize, out_dtype):
    packed, state = quantize(shape, blocksize, True)
    weight = nf4.NF4Weight.from_quant_state(packed, state)
    lora_A, lora_B = torch.randn(8, shape[1]), torch.randn(shape[0], 8) * 0.1
    results = {}
    for isa in ISAS:
        monkeypatch.setattr(nf4, "_CPU_ISA", isa)
        results[isa] = nf4.dequant_merge_nf4(weight, lora_A, lora_B, 0.7, out_dtype)
    for isa in ISAS:
        assert_bits_equal(results[isa], results["scalar"])


@pytest.mark.parametrize("out_dtype", OUT_DTYPES, ids=str)
def test_rounding_of_special_values_matches_torch(isa, out_dtype):
    """NF4 codes 15 (+1.0) and 0 (-1.0) pass each block's absmax through exactly, so the output is the
    rounding of chosen fp32 values: ties, subnormals, overflow, infinities, NaN."""
    finfo16 = torch.finfo(torch.float16)
    specials = torch.tensor([0.0, 1.0, 1.00390625, 1.01171875, 65504.0, 65519.99, 65520.0, 1e30, float("inf"),
                             float("nan"), finfo16.tiny, finfo16.tiny / 3, 2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * 1.01,
                             3.0 * 2.0 ** -26, 1e-40, 3.4e38, torch.finfo(torch.float32).max])
    absmax = torch.cat([specials, torch.randn(2000) * torch.exp2(torch.randint(-30, 30, (2000,)).float())])
    blocks, blocksize = absmax.numel(), 32
    byte = torch.tensor([0xFF, 0x00], dtype=torch.uint8).repeat_interleave(blocksize // 2).repeat(blocks // 2 + 1)
    weight = nf4.NF4Weight(codes=byte[: blocks * blocksize // 2].contiguous(), absmax=absmax,
                           shape=(blocks, blocksize), blocksize=blocksize)
    out = nf4.dequantize_nf4(weight, out_dtype)
    sign = torch.tensor([1.0, -1.0]).repeat(blocks // 2 + 1)[:blocks, None]
    assert_bits_equal(out, (absmax[:, None] * sign).expand(blocks, blocksize).to(out_dtype).contiguous())


def test_rslora_scale():
    assert nf4.lora_scale(16, 16) == 1.0
    assert nf4.lora_scale(16, 16, use_rslora=True) == 4.0
    packed, state = quantize((48, 80), 64, True)
    weight = nf4.NF4Weight.from_quant_state(packed, state)
    lora_A, lora_B = torch.randn(16, 80), torch.randn(48, 16) * 0.01
    scale = nf4.lora_scale(8, 16, use_rslora=True)
    assert_bits_equal(nf4.dequant_merge_nf4(weight, lora_A, lora_B, scale),
                      reference(weight, lora_A, lora_B, scale, torch.bfloat16))


def test_out_is_reused_and_fully_overwritten():
    packed, state = quantize((64, 256), 64, True)
    weight = nf4.NF4Weight.from_quant_state(packed, state)
    out = torch.full((64, 256), float("nan"), dtype=torch.bfloat16)
    for _ in range(2):
        lora_A, lora_B = torch.randn(4, 256), torch.randn(64, 4) * 0.1
        result = nf4.dequant_merge_nf4(weight, lora_A, lora_B, 2.0, torch.bfloat16, out=out)
        assert result is out
        assert_bits_equal(out, reference(weight, lora_A, lora_B, 2.0, torch.bfloat16))


def test_lora_in_16_bit_is_merged_from_its_fp32_values():
    packed, state = quantize((40, 96), 64, False)
    weight = nf4.NF4Weight.from_quant_state(packed, state)
    lora_A, lora_B = torch.randn(8, 96, dtype=torch.bfloat16), torch.randn(40, 8, dtype=torch.bfloat16)
    assert_bits_equal(nf4.dequant_merge_nf4(weight, lora_A, lora_B, 0.5, torch.float16),
                      nf4.dequant_merge_nf4(weight, lora_A.float(), lora_B.float(), 0.5, torch.float16))


def _bad_inputs():
    packed, state = quantize((8, 64), 64, True)
    good = dict(codes=packed.view(torch.uint8).reshape(-1), absmax=state.absmax, shape=(8, 64), blocksize=64,
                nested_absmax=state.state2.absmax, nested_code=state.state2.code, nested_offset=float(state.offset))
    plain_packed, plain_state = quantize((8, 64), 64, False)
    plain = dict(codes=plain_packed.reshape(-1), absmax=plain_state.absmax, shape=(8, 64), blocksize=64)
    return good, plain


@pytest.mark.parametrize("change, error, match", [
    (dict(blocksize=48), ValueError, "unsupported blocksize 48"),
    (dict(codes="int8"), TypeError, "codes must be uint8"),
    (dict(codes="short"), ValueError, r"codes hold 255 bytes; shape \(8, 64\) needs"),
    (dict(shape=(8, 65)), ValueError, "needs ceil"),
    (dict(absmax="float"), TypeError, "nested .* absmax must be uint8"),
    (dict(absmax="short"), ValueError, "absmax must be 1-D with 8 entries"),
    (dict(nested_code=None), ValueError, "nested_absmax needs nested_code"),
    (dict(nested_code="short"), ValueError, "nested_code must have 256 entries"),
    (dict(nested_absmax="long"), ValueError, "nested_absmax must be 1-D with 1 entries"),
    (dict(nested_offset=float("nan")), ValueError, "nested_offset must be finite"),
])
def test_bad_weights_are_rejected(change, error, match):
    good, _ = _bad_inputs()
    fields = dict(good)
    for key, value in change.items():
        if value == "int8":
            value = fields[key].view(torch.int8)
        elif value == "short":
            value = fields[key][:-1]
        elif value == "long":
            value = torch.cat([fields[key], fields[key]])
        elif value == "float":
            value = fields[key].float()
        fields[key] = value
    with pytest.raises(error, match=match):
        nf4.NF4Weight(**fields)


def test_non_nested_absmax_must_be_fp32():
    _, plain = _bad_inputs()
    with pytest.raises(TypeError, match="absmax must be float32"):
        nf4.NF4Weight(**(plain | dict(absmax=plain["absmax"].half())))


def test_fp4_is_rejected():
    packed, state = F.quantize_4bit(torch.randn(8, 64), blocksize=64, quant_type="fp4")
    with pytest.raises(ValueError, match="only 'nf4' is supported"):
        nf4.NF4Weight.from_quant_state(packed, state)
    tensors = {f"w.{k}": v for k, v in state.as_dict(packed=True).items()} | {"w": packed}
    with pytest.raises(ValueError, match="only 'nf4' is supported"):
        nf4.NF4Weight.from_safetensors_state(tensors, "w")
    state.quant_type = "nf4"
    with pytest.raises(ValueError, match="quant_map is not the NF4 table"):
        nf4.NF4Weight.from_quant_state(packed, state)


def test_missing_serialised_tensor_is_named():
    packed, state = quantize((8, 64), 64, True)
    tensors = {f"w.{k}": v for k, v in state.as_dict(packed=True).items()} | {"w": packed}
    del tensors["w.absmax"]
    with pytest.raises(ValueError, match="missing tensor 'w.absmax'"):
        nf4.NF4Weight.from_safetensors_state(tensors, "w")
    meta = json.loads(bytes(tensors["w.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["quant_type"] == "nf4"


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lora_A=torch.randn(4, 64)), ValueError, "pass both lora_A and lora_B"),
    (dict(lora_A=torch.randn(4, 63), lora_B=torch.randn(8, 4)), ValueError, "LoRA shapes do not fit"),
    (dict(lora_A=torch.randn(4, 64), lora_B=torch.randn(8, 5)), ValueError, "LoRA shapes do not fit"),
    (dict(lora_A=torch.randn(4, 64).double(), lora_B=torch.randn(8, 4)), TypeError, "lora_A must be float32"),
    (dict(lora_A=torch.randn(4, 64), lora_B=torch.randn(8, 4), scale=float("inf")), ValueError, "scale must be finite"),
    (dict(out_dtype=torch.float64), TypeError, "out_dtype must be one of"),
    (dict(out=torch.empty(8, 64, dtype=torch.float16)), TypeError, "out has dtype torch.float16"),
    (dict(out=torch.empty(64, 8, dtype=torch.bfloat16)), ValueError, r"out has shape \(64, 8\)"),
    (dict(out=torch.empty(64, 8, dtype=torch.bfloat16).t()), ValueError, "out must be contiguous"),
])
def test_bad_merge_arguments_are_rejected(kwargs, error, match):
    good, _ = _bad_inputs()
    with pytest.raises(error, match=match):
        nf4.dequant_merge_nf4(nf4.NF4Weight(**good), **kwargs)


def test_peak_fma_rate_counts_vector_lanes():
    """The benchmark's compute floor divides by this rate: each vector isa must sustain several times the
    scalar rate (8 or 16 lanes per FMA), or the probe is not measuring what it claims."""
    rates = {isa: C.peak_fma_rate(isa=isa, num_threads=1) for isa in ISAS}
    assert all(math.isfinite(rate) and rate > 0 for rate in rates.values())
    for isa in ISAS[1:]:
        assert rates[isa] > 3 * rates["scalar"], rates
    with pytest.raises(ValueError, match="num_threads must be positive"):
        C.peak_fma_rate(num_threads=0)
    with pytest.raises(ValueError, match="unknown isa 'sse9'"):
        C.peak_fma_rate(isa="sse9")


def test_extension_rejects_unknown_isa():
    with pytest.raises(ValueError, match="unknown isa 'sse9'"):
        C.dequant_merge_nf4(codes=0, absmax=0, nested=False, nested_absmax=0, nested_code=0, nested_offset=0.0,
                            nested_blocksize=256, rows=0, cols=0, blocksize=64, lora_A=0, lora_B=0, rank=0, scale=1.0,
                            out=0, out_dtype=1, num_threads=1, isa="sse9")


def test_reference_fallback_warns_once_and_matches(monkeypatch):
    packed, state = quantize((33, 65), 64, True)
    weight = nf4.NF4Weight.from_quant_state(packed, state)
    lora_A, lora_B = torch.randn(4, 65), torch.randn(33, 4) * 0.1
    compiled = nf4.dequant_merge_nf4(weight, lora_A, lora_B, 0.5, torch.float16)
    monkeypatch.setattr(nf4, "_C", None)
    monkeypatch.setattr(nf4, "_warned_fallback", False)
    with pytest.warns(RuntimeWarning, match="pyprefopt._C is not built"):
        fallback = nf4.dequant_merge_nf4(weight, lora_A, lora_B, 0.5, torch.float16)
    out = torch.empty(33, 65, dtype=torch.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert nf4.dequant_merge_nf4(weight, lora_A, lora_B, 0.5, torch.float16, out=out) is out
    assert_bits_equal(fallback, compiled)
    assert_bits_equal(out, compiled)


def test_cuda_kernel_compiles_with_nvcc(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    cmd = [nvcc, "-c", "csrc/dequant_merge_nf4.cu", "-o", str(tmp_path / "dequant_merge_nf4.o"), "-arch=sm_80",
           "-std=c++17", "-Xcompiler", "-fPIC", f"-I{pybind11.get_include()}",
           f"-I{sysconfig.get_paths()['include']}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=pathlib.Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "dequant_merge_nf4.o").stat().st_size > 0

