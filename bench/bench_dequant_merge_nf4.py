"""NF4 dequant + LoRA merge on CPU (r = 16, bf16 out): pyprefopt's one-pass kernel against bitsandbytes'
`dequantize_4bit` alone, `dequantize_4bit` + torch `addmm` + cast, and PEFT's `Linear4bit.merge()`.

    pytest bench/bench_dequant_merge_nf4.py                                  # quick shapes (default, CI)
    PYPREFOPT_BENCH_QUICK=0 pytest bench/bench_dequant_merge_nf4.py -m heavy  # 4096x4096, 4096x11008, 8192x8192
    python -m bench.bench_dequant_merge_nf4 --table [--quick] [--peft]       # the table with both floors

Floors (the larger one is the limit): memory traffic, 0.5 byte read + 2 bytes written per weight over the
measured copy bandwidth (a large torch copy into a reused buffer, read + write bytes); and the rank-r delta's
r FMAs per output element over the peak fp32 FMA rate (`pyprefopt._C.peak_fma_rate`: independent FMA chains
in registers on every thread; a torch GEMM reaches well under it, so its rate would flatter the kernel).
pyprefopt writes into a reused `out=` buffer: a fresh 100+ MiB output pays page faults on every call (the
"fresh out" row shows how much).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from dataclasses import dataclass

import pytest
import torch

from pyprefopt import nf4

RANK = 16
ALPHA = 32
BLOCKSIZE = 64
FULL_SHAPES = ((4096, 4096), (4096, 11008), (8192, 8192))
QUICK_SHAPES = ((256, 512), (512, 1376))
QUICK = os.environ.get("PYPREFOPT_BENCH_QUICK", "1").strip().lower() not in ("0", "false", "no", "off")
ROUNDS = 3 if QUICK else 5
VARIANTS = ("pyprefopt", "pyprefopt-fresh-out", "bnb-dequant", "bnb-dequant-addmm", "peft-merge")


@dataclass
class Case:
    """One quantised weight (QLoRA's defaults: blocksize 64, double-quantised scales) and a rank-16 adapter."""

    packed: torch.Tensor
    state: object
    weight: nf4.NF4Weight
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float
    out: torch.Tensor


def build_case(rows: int, cols: int) -> Case:
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(torch.randn(rows, cols) * 0.02, blocksize=BLOCKSIZE, compress_statistics=True,
                                    quant_type="nf4")
    return Case(packed=packed, state=state, weight=nf4.NF4Weight.from_quant_state(packed, state),
                lora_A=torch.randn(RANK, cols) / cols ** 0.5, lora_B=torch.randn(rows, RANK) * 0.01,
                scale=nf4.lora_scale(ALPHA, RANK), out=torch.empty(rows, cols, dtype=torch.bfloat16))


def bnb_dequant_addmm(case: Case) -> torch.Tensor:
    """The usual merge: dequantise to fp32, W + s * B @ A with one addmm, cast to bf16."""
    import bitsandbytes.functional as F

    weight = F.dequantize_4bit(case.packed, case.state)
    return torch.addmm(weight, case.lora_B, case.lora_A, alpha=case.scale).to(torch.bfloat16)


def peft_layer(case: Case):
    """PEFT's LoRA layer for bitsandbytes (peft.tuners.lora.bnb.Linear4bit) over the same quantised weight."""
    import bitsandbytes as bnb
    from peft import LoraConfig
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    rows, cols = case.weight.shape
    base = bnb.nn.Linear4bit(cols, rows, bias=False, compute_dtype=torch.bfloat16, compress_statistics=True,
                             quant_type="nf4")
    base.weight = bnb.nn.Params4bit(case.packed, requires_grad=False, quant_state=case.state, bnb_quantized=True,
                                    quant_type="nf4", blocksize=BLOCKSIZE, compress_statistics=True)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights=False)
    layer = LoraLinear4bit(base, "default", config=config, r=RANK, lora_alpha=ALPHA, init_lora_weights=False)
    # PEFT warns on every merge/unmerge that re-quantising to NF4 rounds; that is what is being measured.
    warnings.filterwarnings("ignore", message="(Merge|Unmerge) lora module to 4-bit linear")
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(case.lora_A)
        layer.lora_B["default"].weight.copy_(case.lora_B)
    return layer


def runner(variant: str, case: Case):
    """(setup, call) for one variant; setup runs untimed before each call."""
    if variant == "pyprefopt":
        return None, lambda: nf4.dequant_merge_nf4(case.weight, case.lora_A, case.lora_B, case.scale,
                                                   torch.bfloat16, out=case.out)
    if variant == "pyprefopt-fresh-out":
        return None, lambda: nf4.dequant_merge_nf4(case.weight, case.lora_A, case.lora_B, case.scale, torch.bfloat16)
    if variant == "bnb-dequant":
        import bitsandbytes.functional as F

        return None, lambda: F.dequantize_4bit(case.packed, case.state)
    if variant == "bnb-dequant-addmm":
        return None, lambda: bnb_dequant_addmm(case)
    if variant == "peft-merge":
        # merge() dequantises, adds the delta and re-quantises to NF4 in place; unmerge (untimed) restores it.
        layer = peft_layer(case)

        def setup():
            if layer.merged:
                layer.unmerge()

        return setup, layer.merge
    raise ValueError(f"unknown variant {variant!r}")


def check(case: Case):
    """pyprefopt's merge against the fp32 reference: at most one bf16 ulp apart anywhere."""
    from pyprefopt.reference import dequant_merge_nf4_reference

    w = case.weight
    ours = nf4.dequant_merge_nf4(w, case.lora_A, case.lora_B, case.scale, torch.bfloat16, out=case.out).float()
    expected = dequant_merge_nf4_reference(w.codes, w.absmax, w.shape, w.blocksize, w.nested_absmax, w.nested_code,
                                           w.nested_offset, w.nested_blocksize, case.lora_A, case.lora_B, case.scale,
                                           torch.bfloat16).float()
    magnitude = torch.maximum(ours.abs(), expected.abs()).clamp(min=torch.finfo(torch.bfloat16).tiny)
    one_ulp = torch.exp2(torch.floor(torch.log2(magnitude)) - 7)
    assert ((ours - expected).abs() <= one_ulp).all(), "pyprefopt's merge is more than one bf16 ulp off"


def shape_params():
    shapes = QUICK_SHAPES if QUICK else FULL_SHAPES
    return [pytest.param(s, id=f"{s[0]}x{s[1]}", marks=pytest.mark.heavy) for s in shapes]


_cases: dict[tuple[int, int], Case] = {}


def cached_case(shape):
    if shape not in _cases:
        _cases.clear()
        _cases[shape] = build_case(*shape)
        check(_cases[shape])
    return _cases[shape]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", shape_params())
def test_dequant_merge_nf4(benchmark, shape, variant):
    pytest.importorskip("bitsandbytes")
    if variant == "peft-merge":
        pytest.importorskip("peft")
    case = cached_case(shape)
    setup, call = runner(variant, case)
    benchmark.group = f"nf4 dequant-merge {shape[0]}x{shape[1]} r={RANK} bf16"
    benchmark.extra_info.update(variant=variant, rows=shape[0], cols=shape[1], rank=RANK, quick=QUICK)
    if setup is None:
        benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    else:
        benchmark.pedantic(call, setup=setup, rounds=ROUNDS, warmup_rounds=0, iterations=1)


def min_seconds(call, rounds, setup=None):
    times = []
    for _ in range(rounds):
        if setup is not None:
            setup()
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth(nbytes=1 << 28, rounds=10):
    """Bytes read + written per second by a torch copy into a reused buffer."""
    src, dst = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    return 2 * nbytes / min_seconds(lambda: dst.copy_(src), rounds)


def with_isa(isa: str, call):
    """`call` with the extension limited to instruction set `isa` (nf4._CPU_ISA)."""
    def limited():
        saved, nf4._CPU_ISA = nf4._CPU_ISA, isa
        try:
            return call()
        finally:
            nf4._CPU_ISA = saved
    return limited


def table(quick: bool, with_peft: bool, rounds: int):
    from pyprefopt import _C

    threads = torch.get_num_threads()
    bandwidth, fmas = copy_bandwidth(), _C.peak_fma_rate(num_threads=threads)
    isas = _C.supported_isas()
    # The narrower x86 paths too, for CPUs without the widest one (e.g. AVX2-only AMD EPYC before Zen 4), each
    # with its ratio to the larger floor at that instruction set's own peak FMA rate.
    narrower = [isa for isa in ("avx512", "avx2") if isa in isas[:-1]]
    narrower_fmas = {isa: _C.peak_fma_rate(isa=isa, num_threads=threads) for isa in narrower}
    print(f"CPU, {threads} threads, widest isa {isas[-1]}: copy {bandwidth / 1e9:.1f} GB/s "
          f"(read + write), peak fp32 {fmas / 1e9:.1f} GFMA/s; r = {RANK}, blocksize {BLOCKSIZE}, double-quantised "
          f"scales, bf16 out; min of {rounds} runs, ms\n")
    columns = ["memory floor", "FMA floor", "pyprefopt (out=)", "pyprefopt (fresh out)", "bnb dequantize_4bit",
               "bnb dequant + addmm + cast"] + (["PEFT merge()"] if with_peft else []) + \
              [f"pyprefopt {isa} only (x its floor)" for isa in narrower] + \
              ["ours / larger floor", "ours / (bnb + addmm)"]
    print("| W | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for rows, cols in QUICK_SHAPES if quick else FULL_SHAPES:
        case = build_case(rows, cols)
        check(case)
        memory_floor = rows * cols * 2.5 / bandwidth
        fma_floor = rows * cols * RANK / fmas
        timed = {}
        for variant in VARIANTS:
            if variant == "peft-merge" and not with_peft:
                continue
            setup, call = runner(variant, case)
            if setup is None:
                call()
            timed[variant] = min_seconds(call, rounds if variant != "peft-merge" else min(rounds, 2), setup)
        for isa in narrower:
            timed[isa] = min_seconds(with_isa(isa, runner("pyprefopt", case)[1]), rounds)
        cells = [f"{t * 1e3:.1f}" for t in [memory_floor, fma_floor] + [timed[v] for v in VARIANTS if v in timed]]
        for isa in narrower:
            floor = max(memory_floor, rows * cols * RANK / narrower_fmas[isa])
            cells.append(f"{timed[isa] * 1e3:.1f} ({timed[isa] / floor:.2f}x)")
        ratios = [timed["pyprefopt"] / max(memory_floor, fma_floor), timed["pyprefopt"] / timed["bnb-dequant-addmm"]]
        print(f"| {rows}x{cols} | " + " | ".join(cells + [f"{r:.2f}x" for r in ratios]) + " |", flush=True)
        del case


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print the table (the default action)")
    parser.add_argument("--quick", action="store_true", help="small stand-in shapes")
    parser.add_argument("--peft", action="store_true", help="also time PEFT's Linear4bit.merge() (slow)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    table(args.quick, args.peft, args.rounds)
