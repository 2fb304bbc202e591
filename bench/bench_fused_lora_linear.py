"""Benchmarks of `pyprefopt.lora.LoRALinear` (forward + backward) against the frozen base linear alone and
PEFT's LoRA linear, and of the QLoRA layer (NF4 base) against bitsandbytes `Linear4bit` alone and PEFT
over it. CPU; every variant is checked against the plain reference before it is timed.

    python -m pytest bench/bench_fused_lora_linear.py                       # quick shapes (CI)
    PYPREFOPT_BENCH_QUICK=0 python -m pytest bench/bench_fused_lora_linear.py -m heavy   # full shapes
    python -m bench.bench_fused_lora_linear [--quick] [--rounds N] [--threads T]        # the table

The table times all variants of one (shape, dtype) in interleaved rounds in one process (a shared
machine drifts; ratios are medians of per-round ratios) and measures each variant's peak extra memory
in a fresh process (RSS high-water mark over one step minus RSS before it). `gpu_cost` gives the GPU
case on paper: bytes moved and FLOPs per call for the fused kernels vs the unfused ops.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

import pytest
import torch

from bench.resident_memory import peak_rss_mib, reset_peak_rss, rss_mib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
R = 16
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# frozen_base_onednn: the frozen base linear with its two GEMMs through pyprefopt.cpu_linear, the GEMM library
# pyprefopt's layer uses (torch's F.linear takes MKL for fp32, at half speed on AMD CPUs): the floor that
# isolates the LoRA overhead from the choice of GEMM.
LORA_VARIANTS = ("frozen_base", "frozen_base_onednn", "pyprefopt", "peft")
QLORA_VARIANTS = ("bnb_4bit_frozen", "pyprefopt_qlora", "peft_qlora")


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    in_features: int
    out_features: int


FULL_SHAPES = (Shape("attn", 2048, 4096, 4096), Shape("mlp", 2048, 4096, 11008))
QUICK_SHAPES = (Shape("attn", 256, 512, 512), Shape("mlp", 256, 512, 1376))


def quick() -> bool:
    return os.environ.get("PYPREFOPT_BENCH_QUICK", "1") != "0"


def _base(kind: str, shape: Shape, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    linear = torch.nn.Linear(shape.in_features, shape.out_features, bias=False, dtype=dtype)
    if kind == "dense":
        return linear.requires_grad_(False)
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(shape.in_features, shape.out_features, bias=False, compute_dtype=dtype,
                              quant_type="nf4", compress_statistics=True)
    layer.load_state_dict(linear.float().state_dict())
    return layer.to("cpu").requires_grad_(False)


class _FrozenLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        from pyprefopt import cpu_linear

        ctx.save_for_backward(weight)
        return cpu_linear.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_y):
        from pyprefopt import cpu_linear

        (weight,) = ctx.saved_tensors
        return cpu_linear.linear(grad_y, weight.t()), None


class FrozenLinearSameGemm(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear):
        super().__init__()
        self.base_layer = base

    def forward(self, x):
        return _FrozenLinearFunction.apply(x, self.base_layer.weight)


def _with_nonzero_b(params):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.02)


def build(variant: str, shape: Shape, dtype: torch.dtype):
    """(module, its trainable LoRA parameters, x, grad_y) for one variant; r=16, alpha=32, no dropout."""
    from pyprefopt import lora

    kind = "nf4" if variant in QLORA_VARIANTS else "dense"
    base = _base(kind, shape, dtype)
    if variant in ("frozen_base", "bnb_4bit_frozen"):
        module, params = base, []
    elif variant == "frozen_base_onednn":
        module, params = FrozenLinearSameGemm(base), []
    elif variant in ("pyprefopt", "pyprefopt_qlora"):
        module = lora.LoRALinear(base, R, 2 * R)
        params = [module.lora_A, module.lora_B]
        _with_nonzero_b([module.lora_B])
    else:
        import peft

        holder = torch.nn.Module()
        holder.proj = base
        peft.get_peft_model(holder, peft.LoraConfig(r=R, lora_alpha=2 * R, target_modules=["proj"]))
        module = holder.proj
        params = [module.lora_A["default"].weight, module.lora_B["default"].weight]
        _with_nonzero_b([params[1]])
        # PEFT keeps the adapter in fp32 over a 4-bit base; in the activations' dtype over a 16-bit one.
        if kind == "dense":
            module.to(dtype)
    torch.manual_seed(2)
    x = torch.randn(shape.tokens, shape.in_features, dtype=dtype).requires_grad_()
    grad_y = torch.randn(shape.tokens, shape.out_features, dtype=dtype)
    return module, params, x, grad_y


def step_fn(module, params, x, grad_y):
    """One forward + backward; gradients are dropped between steps (set_to_none, as optimisers do)."""
    def step():
        x.grad = None
        for p in params:
            p.grad = None
        module(x).backward(grad_y)
    return step


def check(variant, shape, dtype):
    """The variant's output and input gradient equal the plain reference on its own weights."""
    from pyprefopt import lora, nf4
    from pyprefopt.reference import lora_linear_reference

    module, params, x, grad_y = build(variant, shape, torch.float32)
    step_fn(module, params, x, grad_y)()
    base = module.base_layer if hasattr(module, "base_layer") else module
    weight = base.weight
    if not weight.is_floating_point():
        weight = nf4.dequantize_nf4(lora._nf4_weight(weight), out_dtype=torch.float32)
    xr = x.detach().clone().requires_grad_()
    if params:
        scale = 2.0
        y = lora_linear_reference(xr, weight, params[0].detach(), params[1].detach(), scale)
    else:
        y = torch.nn.functional.linear(xr, weight)
    y.backward(grad_y)
    torch.testing.assert_close(module(x), y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-4)


def _params(variants):
    shapes = QUICK_SHAPES if quick() else FULL_SHAPES
    return [pytest.param(v, s, d, id=f"{v}-{s.name}-{s.tokens}x{s.in_features}x{s.out_features}-{d}",
                         marks=pytest.mark.heavy)
            for s in shapes for d in DTYPES for v in variants]


@pytest.mark.parametrize(("variant", "shape", "dtype_name"), _params(LORA_VARIANTS + QLORA_VARIANTS))
def test_lora_linear(benchmark, variant, shape, dtype_name):
    warnings.simplefilter("ignore", RuntimeWarning)  # pyprefopt.nf4's one-time "extension not built" note
    check(variant, shape, DTYPES[dtype_name])
    benchmark.group = f"lora {shape.name} {shape.tokens}x{shape.in_features}x{shape.out_features} {dtype_name}"
    benchmark.extra_info.update(variant=variant, shape=shape.name, dtype=dtype_name, r=R, quick=quick())
    benchmark.pedantic(step_fn(*build(variant, shape, DTYPES[dtype_name])), rounds=3 if quick() else 5,
                       warmup_rounds=1, iterations=1)


def gpu_cost(tokens: int, in_features: int, out_features: int, r: int, element_size: int = 2,
             nf4_blocksize: int = 64) -> dict:
    """Bytes moved through GPU memory and FLOPs per forward+backward call, on paper.

    Unfused: PEFT's ops, each reading its inputs and writing its output once (base GEMM, dropout-free
    `S = X A.T`, `S B.T`, scale, add; backward `dY W`, `dY B`, `T A`, add, `dA`, `dB`). Fused: our
    kernels (down; main with epilogue; dy pass for T and dB; main backward with epilogue; grad for dA),
    the small fp32 intermediates included. Each big operand is counted once per kernel that streams it
    (tiles re-read from L2 are not memory traffic). NF4: the base costs half a byte per weight plus one
    uint8 absmax per block, vs the unfused path's dequantise-to-16-bit temporary (written and read back).
    """
    e = element_size
    x = tokens * in_features * e
    y = tokens * out_features * e
    w16 = in_features * out_features * e
    w4 = in_features * out_features // 2 + in_features * out_features // nf4_blocksize
    a = r * in_features * e
    b = out_features * r * e
    low = tokens * r * e
    low32 = tokens * r * 4
    gemm = 2 * tokens * in_features * out_features
    lora_flops = 2 * tokens * r * (in_features + out_features)
    flops = {
        "forward": gemm + lora_flops,
        "backward": gemm + 2 * lora_flops,
    }
    # base GEMM, S = X A.T, S B.T, scale, add
    unfused_fwd = (x + w16 + y) + (x + a + low) + (low + b + y) + 2 * y + 3 * y
    # scale's backward, dS and dB, dX_lora and dA, dY @ W, the add of the two dX
    unfused_bwd = 2 * y + (y + b + low) + (y + low + b) + (low + a + x) + (low + x + a) + (y + w16 + x) + 3 * x
    # down; main with the S B.T epilogue
    fused_fwd = (x + a + low32) + (x + w16 + low32 + b + y)
    # dy pass (T and dB); main backward with the T A epilogue; dA
    fused_bwd = (y + b + low32 + low32 + b) + (y + w16 + low32 + a + x) + (low32 + x + a)
    dequant = w4 + w16 + w16  # decode to a temporary, then the GEMM reads it
    return {
        "flops_forward": flops["forward"], "flops_backward": flops["backward"],
        "bytes_unfused_16bit": unfused_fwd + unfused_bwd,
        "bytes_fused_16bit": fused_fwd + fused_bwd,
        "bytes_unfused_nf4": unfused_fwd + unfused_bwd + 2 * (dequant - w16),
        "bytes_fused_nf4": fused_fwd + fused_bwd + 2 * (w4 - w16),
    }


def _peak_extra_memory(variant, shape_name, dtype_name, quick_mode, threads) -> float:
    """Peak RSS above the pre-step RSS over one step (after a warm-up step), MiB, in a fresh process."""
    code = (
        "import json, warnings; warnings.simplefilter('ignore');"
        "import torch; torch.set_num_threads(%d); import bench.bench_fused_lora_linear as b;"
        "print(json.dumps(b._measure_memory_here(%r, %r, %r, %r)))"
    ) % (threads, variant, shape_name, dtype_name, quick_mode)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def _measure_memory_here(variant, shape_name, dtype_name, quick_mode):
    shape = next(s for s in (QUICK_SHAPES if quick_mode else FULL_SHAPES) if s.name == shape_name)
    step = step_fn(*build(variant, shape, DTYPES[dtype_name]))
    step()
    before = rss_mib()
    reset_peak_rss()
    step()
    return peak_rss_mib() - before


FAMILIES = {"lora": LORA_VARIANTS, "qlora": QLORA_VARIANTS}


def run_table(quick_mode: bool, rounds: int, threads: int, with_memory: bool = True, shape_names=None,
              dtype_names=None, families=None) -> list[dict]:
    """Rows of the table; `shape_names`, `dtype_names`, `families` ("lora", "qlora") select (all: None)."""
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore", RuntimeWarning)
    rows = []
    for shape in QUICK_SHAPES if quick_mode else FULL_SHAPES:
        if shape_names and shape.name not in shape_names:
            continue
        for dtype_name, dtype in DTYPES.items():
            if dtype_names and dtype_name not in dtype_names:
                continue
            for family, variants in FAMILIES.items():
                if families and family not in families:
                    continue
                steps = {v: step_fn(*build(v, shape, dtype)) for v in variants}
                times = {v: [] for v in variants}
                for step in steps.values():
                    step()
                for _ in range(rounds):
                    for v, step in steps.items():
                        t0 = time.perf_counter()
                        step()
                        times[v].append(time.perf_counter() - t0)
                del steps
                base, peer = variants[0], variants[-1]
                same_gemm = "frozen_base_onednn" if "frozen_base_onednn" in variants else None
                for v in variants:
                    rows.append({
                        "shape": f"{shape.tokens}x{shape.in_features}->{shape.out_features}", "dtype": dtype_name,
                        "variant": v, "median_ms": 1e3 * statistics.median(times[v]),
                        "x_base": statistics.median(t / b for t, b in zip(times[v], times[base])),
                        "x_same_gemm_base": None if same_gemm is None else
                        statistics.median(t / b for t, b in zip(times[v], times[same_gemm])),
                        "x_peer": statistics.median(t / p for t, p in zip(times[v], times[peer])),
                        "peak_extra_mib": _peak_extra_memory(v, shape.name, dtype_name, quick_mode, threads)
                        if with_memory else None,
                    })
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def render(rows: list[dict], gpu_rows: list[tuple[str, dict]]) -> str:
    lines = ["| shape | dtype | variant | fwd+bwd ms (median) | x frozen base | x same-GEMM frozen base | x PEFT "
             "| peak extra MiB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        mem = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}"
        same = "-" if r["x_same_gemm_base"] is None else f"{r['x_same_gemm_base']:.3f}"
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['variant']} | {r['median_ms']:.1f} | {r['x_base']:.3f} "
                     f"| {same} | {r['x_peer']:.3f} | {mem} |")
    lines += ["", "GPU on paper, per forward+backward call (bf16 activations, r=16):", "",
              "| shape | GFLOP fwd+bwd | 16-bit base: MB unfused | MB fused | NF4 base: MB unfused | MB fused |",
              "|---|---:|---:|---:|---:|---:|"]
    for label, c in gpu_rows:
        lines.append(f"| {label} | {(c['flops_forward'] + c['flops_backward']) / 1e9:.1f} | "
                     f"{c['bytes_unfused_16bit'] / 1e6:.0f} | {c['bytes_fused_16bit'] / 1e6:.0f} | "
                     f"{c['bytes_unfused_nf4'] / 1e6:.0f} | {c['bytes_fused_nf4'] / 1e6:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small CI shapes")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-variant memory processes")
    parser.add_argument("--shape", action="append", choices=[s.name for s in FULL_SHAPES], help="only these shapes")
    parser.add_argument("--dtype", action="append", choices=list(DTYPES), help="only these dtypes")
    parser.add_argument("--family", action="append", choices=list(FAMILIES), help="only LoRA or QLoRA rows")
    args = parser.parse_args(argv)
    rows = run_table(args.quick, args.rounds, args.threads, not args.no_memory, args.shape, args.dtype, args.family)
    gpu_rows = [(f"{s.tokens}x{s.in_features}->{s.out_features}", gpu_cost(s.tokens, s.in_features, s.out_features, R))
                for s in FULL_SHAPES]
    print(render(rows, gpu_rows))


if __name__ == "__main__":
    main()
