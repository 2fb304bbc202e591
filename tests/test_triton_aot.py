"""Every Triton kernel, in every autotune config, compiles ahead of time for sm_80 and sm_90 (no GPU
needed), and ptxas reports its registers and zero spills.

The compile runs in a subprocess: this test session sets TRITON_INTERPRET=1, under which `@triton.jit`
functions are interpreted and cannot be compiled. Run this file directly to print the table (kernel
names as arguments compile only those).
"""

import json
import os
import re
import subprocess
import sys

import pytest

TARGETS = {80: "sm_80", 90: "sm_90a"}
DTYPES = {"bf16": ("*bf16", 2), "fp32": ("*fp32", 4)}
FLOAT_SCALARS = {"out_scale", "in_scale", "scale", "nested_offset"}


def _signature(kernel, pointer_type, input_pointers, other_types):
    """Triton's signature: `input_pointers` in the input dtype, `other_types` as given, other pointers
    fp32, float scalars fp32, other scalars i32."""
    sig = {}
    for param in kernel.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in other_types:
            sig[name] = other_types[name]
        elif name in input_pointers:
            sig[name] = pointer_type
        elif name.endswith("_ptr"):
            sig[name] = "*fp32"
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


class Case:
    """One kernel to compile: its name, its configs and keep filter, its flags and pointer types."""

    def __init__(self, name, kernel, configs, kept, flags, input_pointers, other_types=None, dtypes=tuple(DTYPES)):
        self.name, self.kernel, self.configs, self.kept = name, kernel, configs, kept
        self.flags, self.input_pointers = flags, input_pointers
        self.other_types, self.dtypes = other_types or {}, dtypes


def cases():
    from pyprefopt.kernels import fused_linear_logprobs as k
    from pyprefopt.kernels import fused_lora_linear as lora

    # The log-prob kernels plain and soft-capped (the tanh in the tile epilogue takes registers of its own).
    logprobs_inputs = {"h_ptr", "w_ptr", "b_ptr"}
    logprobs = []
    for softcap, suffix in ((False, ""), (True, "_softcap")):
        head = {"HAS_BIAS": True, "SOFTCAP": softcap, "PER_ELEMENT_TANH": softcap}
        logprobs += [
            Case(f"fused_linear_logprobs_fwd{suffix}", k.fused_linear_logprobs_fwd_kernel, k.FORWARD_CONFIGS,
                 k.kept_configs, head, logprobs_inputs, {"y_ptr": "*i64"}),
            Case(f"fused_linear_logprobs_bwd{suffix}", k.fused_linear_logprobs_bwd_kernel, k.BACKWARD_CONFIGS,
                 k.kept_configs, dict(head, HIDDEN_GRAD=True, WEIGHT_GRAD=True, BIAS_GRAD=True), logprobs_inputs,
                 {"y_ptr": "*i64"}),
        ]
    # LoRA: every kernel at the rank blocks 16 (r <= 16) and 64 (the largest); the NF4 main kernel with
    # double-quantised absmax (the heavier decode) for 16-bit activations, as QLoRA runs.
    main_inputs = {"x_ptr", "w_ptr", "bias_ptr", "l_ptr", "y_ptr"}
    nf4_types = {"codes_ptr": "*u8", "absmax_code_ptr": "*u8"}
    lora_cases = []
    for block_r in (16, 64):
        def main_kept(configs, element_size, block_r=block_r):
            return lora.kept_configs("main", configs, element_size, block_r)

        def skinny_kept(configs, element_size, block_r=block_r):
            return lora.kept_configs("skinny", configs, element_size, block_r)

        lora_cases += [
            Case(f"lora_main_r{block_r}", lora.lora_main_kernel, lora.MAIN_CONFIGS, main_kept,
                 {"HAS_BIAS": True, "HAS_LORA": True, "NF4": False, "NESTED": False, "BLOCK_R": block_r},
                 main_inputs, nf4_types),
            Case(f"lora_main_nf4_r{block_r}", lora.lora_main_kernel, lora.MAIN_CONFIGS, main_kept,
                 {"HAS_BIAS": True, "HAS_LORA": True, "NF4": True, "NESTED": True, "BLOCK_R": block_r},
                 main_inputs, nf4_types, dtypes=("bf16",)),
            Case(f"lora_down_r{block_r}", lora.lora_down_kernel, lora.DOWN_CONFIGS, skinny_kept,
                 {"BLOCK_R": block_r}, {"p_ptr", "q_ptr"}),
            Case(f"lora_dy_r{block_r}", lora.lora_dy_kernel, lora.DY_CONFIGS, skinny_kept, {"BLOCK_R": block_r},
                 {"dy_ptr", "b_ptr"}),
            Case(f"lora_grad_r{block_r}", lora.lora_grad_kernel, lora.GRAD_CONFIGS, skinny_kept,
                 {"BLOCK_R": block_r}, {"x_ptr"}),
        ]
    return logprobs + lora_cases


def compile_all():
    """One JSON line per (kernel, config, dtype, target) with ptxas's registers and spill bytes."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    only = set(sys.argv[1:])
    for case in cases():
        if only and case.name not in only:
            continue
        for dtype in case.dtypes:
            pointer_type, element_size = DTYPES[dtype]
            signature = _signature(case.kernel, pointer_type, case.input_pointers, case.other_types)
            for config in case.kept(case.configs, element_size):
                constexprs = dict(case.flags, **config.kwargs, DOT_FP32=False, IEEE=dtype == "fp32")
                for cc, arch in TARGETS.items():
                    compiled = triton.compile(
                        ASTSource(case.kernel, signature, constexprs),
                        target=GPUTarget("cuda", cc, 32),
                        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
                    )
                    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                        f.write(compiled.asm["ptx"])
                    out = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", f.name, "-o", os.devnull],
                                         capture_output=True, text=True, check=True).stderr
                    os.unlink(f.name)
                    print(json.dumps({
                        "kernel": case.name, "config": config.kwargs, "num_warps": config.num_warps, "dtype": dtype,
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
    assert {(r["kernel"], r["arch"]) for r in rows} == {(c.name, a) for c in cases() for a in TARGETS.values()}
    for r in rows:
        print(f"{r['kernel']:28s} {r['arch']:7s} {r['dtype']:5s} {r['config']} warps={r['num_warps']}: "
              f"{r['registers']} registers, {r['spill_bytes']} B spilled")
        assert r["cubin_bytes"] > 0
    spilled = [r for r in rows if r["spill_bytes"]]
    assert not spilled, f"register spills: {spilled}"


if __name__ == "__main__":
    compile_all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_autotuners_prune_with_the_arguments_our_launchers_pass(monkeypatch, dtype):
    """On a GPU every launch goes through `triton.autotune`, which the interpreter bypasses: run the
    launchers as on a GPU, with Triton's own `Autotuner.run` prologue (positional arguments in
    `nargs`, keyword ones passed to the pruning) and the kernel launch itself left out, and check that
    each autotuner keeps exactly the configs its filter allows for that launch's dtype."""
    import torch
    import triton.runtime.autotuner as autotuner

    from pyprefopt import fused_linear_logprobs
    from pyprefopt.kernels import fused_linear_logprobs as k
    from pyprefopt.kernels import fused_lora_linear as lora
    from pyprefopt.kernels import triton_launch as launch
    from pyprefopt.lora import FusedLoRALinearFunction

    dtype = getattr(torch, dtype)
    launched = []

    def pruning_only_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        launched.append((self.fn.__name__, {**self.nargs, **kwargs}, self.prune_configs(kwargs)))
        self.nargs = None

    monkeypatch.setattr(autotuner.Autotuner, "run", pruning_only_run)
    monkeypatch.setattr(launch, "interpreting", lambda: False)

    hidden = torch.randn(6, 32, dtype=dtype, requires_grad=True)
    weight = torch.randn(300, 32, dtype=dtype, requires_grad=True)
    fused_linear_logprobs(hidden, weight, torch.randint(0, 300, (6,)), backend="triton").sum().backward()
    x = torch.randn(8, 32, dtype=dtype, requires_grad=True)
    base_weight = torch.randn(40, 32, dtype=dtype)
    lora_a = torch.randn(4, 32, dtype=dtype, requires_grad=True)
    lora_b = torch.randn(40, 4, dtype=dtype, requires_grad=True)
    FusedLoRALinearFunction.apply(x, x, base_weight, None, lora_a, lora_b, 2.0, True).sum().backward()

    element_size = torch.empty(0, dtype=dtype).element_size()
    expected = {
        "fused_linear_logprobs_fwd_kernel": lambda _: k.kept_configs(k.FORWARD_CONFIGS, element_size),
        "fused_linear_logprobs_bwd_kernel": lambda _: k.kept_configs(k.BACKWARD_CONFIGS, element_size),
        "lora_main_kernel": lambda r: lora.kept_configs("main", lora.MAIN_CONFIGS, element_size, r),
        "lora_down_kernel": lambda r: lora.kept_configs("skinny", lora.DOWN_CONFIGS, element_size, r),
        "lora_dy_kernel": lambda r: lora.kept_configs("skinny", lora.DY_CONFIGS, element_size, r),
        "lora_grad_kernel": lambda r: lora.kept_configs("skinny", lora.GRAD_CONFIGS, element_size, r),
    }
    assert {name for name, _, _ in launched} == set(expected)
    for name, args, kept in launched:
        assert kept == expected[name](args.get("BLOCK_R")), name
