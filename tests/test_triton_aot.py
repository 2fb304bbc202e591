"""Every Triton kernel, in every autotune config, compiles ahead of time for sm_80 and sm_90 (no GPU
needed), and ptxas reports its registers and zero spills.

The compile runs in a subprocess: this test session sets TRITON_INTERPRET=1, under which `@triton.jit`
functions are interpreted and cannot be compiled. Run this file directly to print the table.
"""

import json
import os
import re
import subprocess
import sys

import pytest

TARGETS = {80: "sm_80", 90: "sm_90a"}
DTYPES = {"bf16": ("*bf16", 2), "fp32": ("*fp32", 4)}
INPUT_POINTERS = {"h_ptr", "w_ptr", "b_ptr"}


def _signature(kernel, pointer_type):
    sig = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name == "y_ptr":
            sig[name] = "*i64"
        elif name in INPUT_POINTERS:
            sig[name] = pointer_type
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name == "inv_t":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def compile_all():
    """One JSON line per (kernel, config, dtype, target) with ptxas's registers and spill bytes."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pyprefopt.kernels import fused_linear_logprobs as k

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    kernels = [
        ("fused_linear_logprobs_fwd", k.fused_linear_logprobs_fwd_kernel, k.FORWARD_CONFIGS, {"HAS_BIAS": True}),
        ("fused_linear_logprobs_bwd", k.fused_linear_logprobs_bwd_kernel, k.BACKWARD_CONFIGS,
         {"HAS_BIAS": True, "HIDDEN_GRAD": True, "WEIGHT_GRAD": True, "BIAS_GRAD": True}),
    ]
    for name, kernel, configs, flags in kernels:
        for dtype, (pointer_type, element_size) in DTYPES.items():
            for config in k.kept_configs(configs, element_size):
                constexprs = dict(flags, **config.kwargs, DOT_FP32=False, IEEE=dtype == "fp32")
                for cc, arch in TARGETS.items():
                    compiled = triton.compile(
                        ASTSource(kernel, _signature(kernel, pointer_type), constexprs),
                        target=GPUTarget("cuda", cc, 32),
                        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
                    )
                    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                        f.write(compiled.asm["ptx"])
                    out = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull],
                                         capture_output=True, text=True, check=True).stderr
                    os.unlink(f.name)
                    print(json.dumps({
                        "kernel": name, "config": config.kwargs, "num_warps": config.num_warps, "dtype": dtype,
                        "arch": arch, "cubin_bytes": len(compiled.asm["cubin"]),
                        "registers": int(re.search(r"Used (\d+) registers", out).group(1)),
                        "spill_bytes": int(re.search(r"(\d+) bytes spill stores", out).group(1)),
                    }), flush=True)


def test_kernels_compile_for_sm80_and_sm90_without_spills():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {(r["kernel"], r["arch"]) for r in rows} == {
        (k, a) for k in ("fused_linear_logprobs_fwd", "fused_linear_logprobs_bwd") for a in TARGETS.values()
    }
    for r in rows:
        print(f"{r['kernel']:28s} {r['arch']:7s} {r['dtype']:5s} {r['config']} warps={r['num_warps']}: "
              f"{r['registers']} registers, {r['spill_bytes']} B spilled")
        assert r["cubin_bytes"] > 0
    spilled = [r for r in rows if r["spill_bytes"]]
    assert not spilled, f"register spills: {spilled}"


if __name__ == "__main__":
    compile_all()
