"""Every Triton kernel, in every autotune config of every device family, compiles ahead of time for that family's
target (no GPU needed), and ptxas reports its registers and zero spills; with the shared memory Triton reports,
each row gives the kernel's resident programs per SM on that family. The soft-capped frozen backward keeps the
resident programs of the plain one, config by config (issue 16).

The compile runs in a subprocess: this test session sets TRITON_INTERPRET=1, under which `@triton.jit`
functions are interpreted and cannot be compiled. `python -m tests.test_triton_aot` from the repository root prints
the table (kernel names as arguments compile only those).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"bf16": ("*bf16", 2), "fp32": ("*fp32", 4)}
FLOAT_SCALARS = {"out_scale", "in_scale", "scale", "nested_offset", "eps", "weight_offset"}
# Triton specialises a launch on which pointers and integers are multiples of 16. "aligned": the operands and the
# hidden size (with the strides it sets) are, the token count and the vocabulary not necessarily (GPT-2's 50257);
# "unaligned": nothing is (a hidden size that is no multiple of 16). Each is compiled as the launcher's prune runs
# it: with the configs' register budgets only for the soft-capped frozen backward, aligned.
ALIGNED_INTEGERS = {"n_hidden", "stride_h", "stride_w"}


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


def _aligned_attrs(signature):
    return {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(signature.items())
            if ty.startswith("*") or name in ALIGNED_INTEGERS}


class Case:
    """One kernel to compile: its name, `configs(family, element_size)` (the configs its launcher autotunes over
    there), its flags and pointer types, and the specialisations to compile."""

    def __init__(self, name, kernel, configs, flags, input_pointers, other_types=None, dtypes=tuple(DTYPES),
                 specialisations=("unaligned",), budgeted=False):
        self.name, self.kernel, self.configs, self.budgeted = name, kernel, configs, budgeted
        self.flags, self.input_pointers = flags, input_pointers
        self.other_types, self.dtypes, self.specialisations = other_types or {}, dtypes, specialisations


def cases():
    import triton

    from pyprefopt.kernels import fused_linear_logprobs as k
    from pyprefopt.kernels import fused_lora_linear as lora

    def logprobs_configs(table):
        return lambda family, element_size: table[family.name][element_size]

    # The log-prob kernels plain and soft-capped; the backward of a frozen head (hidden gradient only) and of a
    # trained one with a bias (every gradient).
    logprobs_inputs = {"h_ptr", "w_ptr", "b_ptr"}
    backward_heads = {"frozen": {"HAS_BIAS": False, "HIDDEN_GRAD": True, "WEIGHT_GRAD": False, "BIAS_GRAD": False},
                      "trained": {"HAS_BIAS": True, "HIDDEN_GRAD": True, "WEIGHT_GRAD": True, "BIAS_GRAD": True}}
    logprobs = []
    for softcap, suffix in ((False, ""), (True, "_softcap")):
        cap = {"SOFTCAP": softcap, "PER_ELEMENT_TANH": softcap}
        logprobs.append(Case(f"fused_linear_logprobs_fwd{suffix}", k.fused_linear_logprobs_fwd_kernel,
                             logprobs_configs(k.FORWARD_CONFIGS), dict(cap, HAS_BIAS=True), logprobs_inputs,
                             {"y_ptr": "*i64"}, specialisations=("aligned", "unaligned")))
        for head, flags in backward_heads.items():
            logprobs.append(Case(f"fused_linear_logprobs_bwd_{head}{suffix}", k.fused_linear_logprobs_bwd_kernel,
                                 logprobs_configs(k.BACKWARD_CONFIGS), dict(cap, **flags), logprobs_inputs,
                                 {"y_ptr": "*i64"}, specialisations=("aligned", "unaligned"),
                                 budgeted=softcap and head == "frozen"))
    # LoRA: every kernel at the rank blocks 16 (r <= 16) and 64 (the largest); the NF4 main kernel with
    # double-quantised absmax (the heavier decode) for 16-bit activations, as QLoRA runs.
    main_inputs = {"x_ptr", "w_ptr", "bias_ptr", "l_ptr", "y_ptr"}
    nf4_types = {"codes_ptr": "*u8", "absmax_code_ptr": "*u8"}
    lora_cases = []
    for block_r in (16, 64):
        def lora_configs(kind, table, block_r=block_r):
            return lambda family, element_size: lora.kept_configs(kind, table[family.name], element_size, block_r)

        lora_cases += [
            Case(f"lora_main_r{block_r}", lora.lora_main_kernel, lora_configs("main", lora.MAIN_CONFIGS),
                 {"HAS_BIAS": True, "HAS_LORA": True, "NF4": False, "NESTED": False, "BLOCK_R": block_r},
                 main_inputs, nf4_types),
            Case(f"lora_main_nf4_r{block_r}", lora.lora_main_kernel, lora_configs("main", lora.MAIN_CONFIGS),
                 {"HAS_BIAS": True, "HAS_LORA": True, "NF4": True, "NESTED": True, "BLOCK_R": block_r},
                 main_inputs, nf4_types, dtypes=("bf16",)),
            Case(f"lora_down_r{block_r}", lora.lora_down_kernel, lora_configs("skinny", lora.DOWN_CONFIGS),
                 {"BLOCK_R": block_r}, {"p_ptr", "q_ptr"}),
            Case(f"lora_dy_r{block_r}", lora.lora_dy_kernel, lora_configs("skinny", lora.DY_CONFIGS),
                 {"BLOCK_R": block_r}, {"dy_ptr", "b_ptr"}),
            Case(f"lora_grad_r{block_r}", lora.lora_grad_kernel, lora_configs("skinny", lora.GRAD_CONFIGS),
                 {"BLOCK_R": block_r}, {"x_ptr"}),
        ]
    # The activation-lean ops: RMSNorm at a head's width, Qwen2.5-1.5B's and Qwen3-1.7B's hidden sizes and the widest
    # row the kernels take (its config is the heaviest); SwiGLU's elementwise kernels.
    from pyprefopt.kernels import rms_norm, swiglu

    def row_configs(family, element_size):
        return [rms_norm.row_config(width) for width in (128, 1536, 2048, rms_norm.MAX_ROW)]

    def elementwise_config(family, element_size):
        return [triton.Config({"BLOCK": swiglu.BLOCK}, num_warps=swiglu.NUM_WARPS)]

    both = ("aligned", "unaligned")
    # RMSNorm in the Llama order and in the Gemma order (the weight multiplies in fp32), both with a weight.
    norm_orders = {"": {"SCALE_IN_FP32": False}, "_gemma": {"SCALE_IN_FP32": True}}
    lean = [case for suffix, order in norm_orders.items() for case in (
        Case(f"rms_norm_fwd{suffix}", rms_norm.rms_norm_fwd_kernel, row_configs,
             dict(order, INTERPRETED=False, HAS_WEIGHT=True), {"x_ptr", "w_ptr", "y_ptr"}, specialisations=both),
        Case(f"rms_norm_bwd{suffix}", rms_norm.rms_norm_bwd_kernel, row_configs,
             dict(order, INTERPRETED=False, HAS_WEIGHT=True, WEIGHT_GRAD=True), {"dy_ptr", "x_ptr", "w_ptr", "dx_ptr"},
             specialisations=both))] + [
        Case("swiglu_fwd", swiglu.swiglu_fwd_kernel, elementwise_config, {"INTERPRETED": False},
             {"g_ptr", "u_ptr", "h_ptr"}, specialisations=both),
        Case("swiglu_bwd", swiglu.swiglu_bwd_kernel, elementwise_config, {"INTERPRETED": False},
             {"dh_ptr", "g_ptr", "u_ptr", "dg_ptr", "du_ptr"}, specialisations=both),
    ]
    return logprobs + lora_cases + lean


def compile_all():
    """One JSON line per (kernel, family, dtype, config, specialisation) with ptxas's registers and spill bytes,
    Triton's shared memory and the resident programs per SM they allow."""
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pyprefopt.kernels import fused_linear_logprobs as k
    from pyprefopt.kernels import tuning

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
    only = set(sys.argv[1:])
    for case in cases():
        if only and case.name not in only:
            continue
        for family in tuning.FAMILIES:
            cc = family.capability[0] * 10 + family.capability[1]
            for dtype in case.dtypes:
                pointer_type, element_size = DTYPES[dtype]
                signature = _signature(case.kernel, pointer_type, case.input_pointers, case.other_types)
                for config in case.configs(family, element_size):
                    for specialisation in case.specialisations:
                        if specialisation == "unaligned" or not case.budgeted:
                            config = k.without_register_budget(config)
                        attrs = _aligned_attrs(signature) if specialisation == "aligned" else None
                        constexprs = {name: value for name, value in dict(
                            case.flags, **config.kwargs, DOT_FP32=False, IEEE=dtype == "fp32").items()
                            if name in {p.name for p in case.kernel.params}}
                        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
                        if config.maxnreg:
                            options["maxnreg"] = config.maxnreg
                        compiled = triton.compile(ASTSource(case.kernel, signature, constexprs, attrs),
                                                  target=GPUTarget("cuda", cc, 32), options=options)
                        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
                            f.write(compiled.asm["ptx"])
                        out = subprocess.run([ptxas, "-v", f"--gpu-name={family.ptxas_arch}", f.name, "-o",
                                              os.devnull], capture_output=True, text=True, check=True).stderr
                        os.unlink(f.name)
                        registers = int(re.search(r"Used (\d+) registers", out).group(1))
                        shared = compiled.metadata.shared
                        print(json.dumps({
                            "kernel": case.name, "family": family.name, "dtype": dtype, "config": config.kwargs,
                            "num_warps": config.num_warps, "maxnreg": config.maxnreg,
                            "specialisation": specialisation, "cubin_bytes": len(compiled.asm["cubin"]),
                            "registers": registers, "spill_bytes": int(re.search(r"(\d+) bytes spill stores",
                                                                                 out).group(1)),
                            "shared_bytes": shared,
                            "programs_per_sm": tuning.programs_per_sm(family, registers, config.num_warps, shared),
                        }), flush=True)


def _compiled_rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-m", "tests.test_triton_aot"], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_kernels_compile_for_every_family_without_spills():
    pytest.importorskip("triton")
    from pyprefopt.kernels import tuning

    rows = _compiled_rows()
    assert {(r["kernel"], r["family"]) for r in rows} == {(c.name, f) for c in cases() for f in tuning.FAMILY_NAMES}
    for r in rows:
        print(f"{r['kernel']:36s} {r['family']:6s} {r['dtype']:4s} {r['specialisation']:9s} {r['config']} "
              f"warps={r['num_warps']} maxnreg={r['maxnreg']}: {r['registers']} registers, "
              f"{r['spill_bytes']} B spilled, {r['shared_bytes']} B shared, {r['programs_per_sm']} programs/SM")
        assert r["cubin_bytes"] > 0
    spilled = [r for r in rows if r["spill_bytes"]]
    assert not spilled, f"register spills: {spilled}"
    # The soft-cap's epilogue must not cost the frozen head's backward a resident program (issue 16: that kernel is
    # bound by its atomics and slows with occupancy), in the code real models launch (aligned hidden sizes).
    programs = {(r["kernel"], r["family"], r["dtype"], json.dumps(r["config"])): r["programs_per_sm"]
                for r in rows if r["specialisation"] == "aligned" and r["kernel"].startswith(
                    "fused_linear_logprobs_bwd_frozen")}
    fewer = {key: (programs[(key[0].removesuffix("_softcap"), *key[1:])], n) for key, n in programs.items()
             if key[0].endswith("_softcap") and n < programs[(key[0].removesuffix("_softcap"), *key[1:])]}
    assert not fewer, f"capped frozen backward with fewer resident programs per SM than plain (plain, capped): {fewer}"


if __name__ == "__main__":
    compile_all()


@pytest.mark.parametrize("width", [32, 18], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("family", ["sm_80", "sm_90"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_autotuners_prune_with_the_arguments_our_launchers_pass(monkeypatch, dtype, family, width):
    """On a GPU every launch goes through `triton.autotune`, which the interpreter bypasses: run the
    launchers as on a GPU of `family`, with Triton's own `Autotuner.run` prologue (positional arguments in
    `nargs`, keyword ones passed to the pruning) and the kernel launch itself left out, and check that
    each autotuner keeps exactly the configs of that family its filter allows for that launch's dtype, the
    log-prob kernels' register budgets kept for the soft-capped frozen backward on a hidden size that is a
    multiple of 16 bytes only."""
    import torch
    import triton.runtime.autotuner as autotuner

    from pyprefopt import fused_linear_logprobs
    from pyprefopt.kernels import fused_linear_logprobs as k
    from pyprefopt.kernels import fused_lora_linear as lora
    from pyprefopt.kernels import triton_launch as launch
    from pyprefopt.kernels import tuning
    from pyprefopt.lora import FusedLoRALinearFunction

    dtype = getattr(torch, dtype)
    launched = []

    def pruning_only_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        launched.append((self.fn.__name__, {**self.nargs, **kwargs}, self.prune_configs(kwargs)))
        self.nargs = None

    monkeypatch.setattr(autotuner.Autotuner, "run", pruning_only_run)
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    device_family = next(f for f in tuning.FAMILIES if f.name == family)
    monkeypatch.setattr(tuning, "device_family", lambda device: device_family)

    hidden = torch.randn(6, width, dtype=dtype, requires_grad=True)
    weight = torch.randn(300, width, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 300, (6,))
    fused_linear_logprobs(hidden, weight, labels, backend="triton").sum().backward()
    # A soft-capped frozen head: the one launch that keeps its configs' register budgets (aligned).
    fused_linear_logprobs(hidden, weight.detach(), labels, backend="triton", softcap=30.0).sum().backward()
    x = torch.randn(8, 32, dtype=dtype, requires_grad=True)
    base_weight = torch.randn(40, 32, dtype=dtype)
    lora_a = torch.randn(4, 32, dtype=dtype, requires_grad=True)
    lora_b = torch.randn(40, 4, dtype=dtype, requires_grad=True)
    FusedLoRALinearFunction.apply(x, 0.0, base_weight, None, lora_a, lora_b, 2.0, True).sum().backward()

    element_size = torch.empty(0, dtype=dtype).element_size()

    def logprobs_configs(table, args):
        configs = table[family][element_size]
        capped_frozen = args["SOFTCAP"] and not args.get("WEIGHT_GRAD", True)
        return configs if width == 32 and capped_frozen else [k.without_register_budget(c) for c in configs]

    expected = {
        "fused_linear_logprobs_fwd_kernel": lambda args: logprobs_configs(k.FORWARD_CONFIGS, args),
        "fused_linear_logprobs_bwd_kernel": lambda args: logprobs_configs(k.BACKWARD_CONFIGS, args),
        "lora_main_kernel": lambda args: lora.kept_configs("main", lora.MAIN_CONFIGS[family], element_size,
                                                           args["BLOCK_R"]),
        "lora_down_kernel": lambda args: lora.kept_configs("skinny", lora.DOWN_CONFIGS[family], element_size,
                                                           args["BLOCK_R"]),
        "lora_dy_kernel": lambda args: lora.kept_configs("skinny", lora.DY_CONFIGS[family], element_size,
                                                         args["BLOCK_R"]),
        "lora_grad_kernel": lambda args: lora.kept_configs("skinny", lora.GRAD_CONFIGS[family], element_size,
                                                           args["BLOCK_R"]),
    }
    assert {name for name, _, _ in launched} == set(expected)
    if family == "sm_90" and width == 32 and element_size == 2:
        assert any(c.maxnreg for name, args, kept in launched for c in kept), "no launch kept a register budget"

    def described(configs):
        return [(c.kwargs, c.num_warps, c.num_stages, c.maxnreg) for c in configs]

    for name, args, kept in launched:
        assert described(kept) == described(expected[name](args)), name
