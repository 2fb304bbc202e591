"""pyprefopt.lora and its Triton kernels against the plain PyTorch reference and PEFT's LoRA layers.

- Triton kernels (under TRITON_INTERPRET=1, on CPU tensors): forward and backward vs
  `reference.lora_linear_reference` at odd shapes, ranks 1..64, 3-D inputs, with and without dropout,
  fp32 tightly and bf16/fp16 within 2x torch's same-dtype error; an NF4 base decoded in the kernel vs the
  bitsandbytes-dequantised base.
- CPU path: `LoRALinear` vs PEFT's `lora.Linear` (and PEFT over bitsandbytes `Linear4bit`) on the same
  weights, forward and every gradient; dropout draws the same mask as PEFT.
- PEFT format both ways on a tiny randomly initialised Llama (no hub access), `disable_adapters`, and
  the clear errors for bad input.
"""

import copy
import json
import os

import peft
import pytest
import torch
import transformers
from bitsandbytes.functional import dequantize_4bit, quantize_4bit

from pyprefopt import lora, peft_format
from pyprefopt.kernels import fused_lora_linear as kernels
from pyprefopt.reference import lora_linear_reference
from tests.tensor_asserts import assert_close_verbose, assert_within_torch_error

# (tokens, in_features, out_features, r): features off multiples of 16, rank 1 and rank 64.
KERNEL_SHAPES = [(37, 50, 70, 5), (19, 33, 24, 1), (24, 40, 36, 64), (16, 64, 48, 16)]


def _factors(in_features, out_features, r, dtype=torch.float32):
    weight = torch.randn(out_features, in_features) / in_features**0.5
    lora_a = torch.randn(r, in_features) / in_features**0.5
    lora_b = torch.randn(out_features, r) / r**0.5
    bias = torch.randn(out_features)
    return [t.to(dtype) for t in (weight, lora_a, lora_b, bias)]


def _dropout_scale(x, dropout_p, seed):
    """What `nn.functional.dropout(x, dropout_p)` multiplies x by after `torch.manual_seed(seed)`: 0 or 1 / (1 - p),
    drawn for x's shape and dtype."""
    torch.manual_seed(seed)
    return torch.nn.functional.dropout(torch.ones_like(x), dropout_p, True)


def _reference_grads(x, weight, lora_a, lora_b, scale, bias, grad_y, dropout_p=0.0, dtype=torch.float64, seed=0):
    """(y, dx, da, db, dbias) of the plain reference, computed in `dtype`, the LoRA branch's input dropped out with
    the mask the Function draws after `torch.manual_seed(seed)`."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, lora_a, lora_b, bias)]
    xs, a, b, bs = leaves
    lx = xs * _dropout_scale(x, dropout_p, seed).to(dtype) if dropout_p else None
    y = lora_linear_reference(xs, weight.to(dtype), a, b, scale, bs, lx)
    y.backward(grad_y.to(dtype))
    return y, xs.grad, a.grad, b.grad, bs.grad


def _function_grads(x, weight, lora_a, lora_b, scale, bias, grad_y, use_triton, dropout_p=0.0, seed=0):
    leaves = [t.detach().clone().requires_grad_() for t in (x, lora_a, lora_b, bias)]
    xs, a, b, bs = leaves
    torch.manual_seed(seed)
    y = lora.FusedLoRALinearFunction.apply(xs, dropout_p, weight, bs, a, b, scale, use_triton)
    torch.manual_seed(seed + 1)  # backward draws the forward's mask whatever the generator has done since
    y.backward(grad_y)
    return y, xs.grad, a.grad, b.grad, bs.grad


NAMES = ("y", "dx", "dA", "dB", "dbias")


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "cpu"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_reference(shape, dropout_p, use_triton):
    tokens, in_features, out_features, r = shape
    weight, lora_a, lora_b, bias = _factors(in_features, out_features, r)
    x = torch.randn(tokens, in_features)
    grad_y = torch.randn(tokens, out_features)
    ours = _function_grads(x, weight, lora_a, lora_b, 1.7, bias, grad_y, use_triton, dropout_p)
    truth = _reference_grads(x, weight, lora_a, lora_b, 1.7, bias, grad_y, dropout_p)
    for name, a, t in zip(NAMES, ours, truth):
        assert_close_verbose(a, t, rtol=1e-4, atol=1e-4, name=name)
    if dropout_p:  # the mask was real: some inputs dropped from the LoRA branch
        assert 0 < (_dropout_scale(x, dropout_p, 0) == 0).sum() < x.numel()


def test_dropout_keeps_only_the_input():
    """With dropout the layer keeps x for backward (which draws the mask again), not the mask and the dropped-out
    input as `nn.functional.dropout` ahead of the layer would."""
    weight, lora_a, lora_b, bias = _factors(48, 40, 4)
    x = torch.randn(2, 24, 48, requires_grad=True)
    a = lora_a.clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora.FusedLoRALinearFunction.apply(x, 0.3, weight, bias, a, lora_b, 2.0, False)
    inputs_wide = [t for t in saved if t.shape[-1] == 48 and t.numel() >= x.numel()]
    assert len(inputs_wide) == 1 and inputs_wide[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "cpu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_within_torch_error(dtype, use_triton):
    tokens, in_features, out_features, r = 40, 72, 56, 16
    weight, lora_a, lora_b, bias = _factors(in_features, out_features, r, dtype)
    x = torch.randn(2, tokens // 2, in_features, dtype=dtype)
    grad_y = torch.randn(2, tokens // 2, out_features, dtype=dtype)
    ours = _function_grads(x, weight, lora_a, lora_b, 2.0, bias, grad_y, use_triton)
    truth = _reference_grads(x, weight, lora_a, lora_b, 2.0, bias, grad_y)
    same_dtype = _reference_grads(x, weight, lora_a, lora_b, 2.0, bias, grad_y, dtype=dtype)
    assert ours[0].dtype == dtype and ours[0].shape == (2, tokens // 2, out_features)
    for name, a, t, s in zip(NAMES, ours, truth, same_dtype):
        if t is not None:
            assert_within_torch_error(a, t, s, name=name)


@pytest.mark.parametrize("use_triton", [True, False], ids=["triton", "cpu"])
@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quant"])
def test_nf4_base_matches_dequantised_base(nested, use_triton):
    """The NF4 base (decoded in the kernel's load path, or by bitsandbytes on CPU) equals the layer over
    bitsandbytes' own dequantised weight. 70 x 50 = 3500 weights: the last 64-block is partial."""
    import bitsandbytes as bnb

    tokens, in_features, out_features, r = 21, 50, 70, 8
    base = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=torch.float32, quant_type="nf4",
                             compress_statistics=nested)
    base.load_state_dict(torch.nn.Linear(in_features, out_features).state_dict())
    base = base.to("cpu")
    assert base.weight.quant_state.nested == nested
    dense = dequantize_4bit(base.weight.data, base.weight.quant_state).float()
    _, lora_a, lora_b, _ = _factors(in_features, out_features, r)
    x = torch.randn(tokens, in_features)
    grad_y = torch.randn(tokens, out_features)
    ours = _function_grads(x, lora._nf4_weight(base.weight), lora_a, lora_b, 0.5, base.bias.detach(), grad_y,
                           use_triton)
    truth = _reference_grads(x, dense, lora_a, lora_b, 0.5, base.bias.detach(), grad_y)
    for name, a, t in zip(NAMES, ours, truth):
        if t is not None:
            assert_close_verbose(a, t, rtol=1e-4, atol=1e-4, name=name)


@pytest.mark.parametrize("nested", [False, True], ids=["absmax", "double-quant"])
@pytest.mark.parametrize("shape", [(48, 40), (70, 50), (40, 48)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_nf4_tile_decode_is_bit_exact(dtype, shape, nested):
    """A GEMM with an identity input returns the decoded base itself: bit-exact vs the NF4 reference
    (`pyprefopt.nf4.dequantize_nf4`) and vs bitsandbytes' `dequantize_4bit`. bitsandbytes 0.50.2's CPU
    dequantize mis-decodes some shapes (here 40 x 48: its error to the original weight is 5x the
    codes' own), so it is the oracle only at the others."""
    from pyprefopt import nf4

    out_features, in_features = shape
    packed, state = quantize_4bit(torch.randn(out_features, in_features, dtype=dtype), blocksize=64,
                                  quant_type="nf4", compress_statistics=nested)
    weight = nf4.NF4Weight.from_quant_state(packed, state)
    eye = torch.eye(in_features, dtype=dtype)
    decoded = kernels._main(eye, kernels.NF4Base(weight), False, None, None, None, (0, 0), 1.0,
                            torch.empty(in_features, out_features, dtype=dtype)).t()
    assert torch.equal(decoded, nf4.dequantize_nf4(weight))
    if shape != (40, 48):
        assert torch.equal(decoded, dequantize_4bit(packed, state))


def _peft_linear(base, r, alpha, dropout=0.0, use_rslora=False):
    """PEFT's LoRA around `base` (PEFT's own lora.Linear, or its bitsandbytes Linear4bit variant)."""
    holder = torch.nn.Module()
    holder.proj = base
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora,
                             target_modules=["proj"])
    model = peft.get_peft_model(holder, config)
    layer = model.base_model.model.proj
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    return model, layer


def _ours_like(peft_layer, base, r, alpha, dropout=0.0, use_rslora=False):
    ours = lora.LoRALinear(base, r, alpha, dropout, use_rslora)
    with torch.no_grad():
        ours.lora_A.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.copy_(peft_layer.lora_B["default"].weight)
    return ours


def _forward_backward(module, x, grad_y, params):
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(grad_y)
    return [y, x.grad] + [p.grad for p in params]


@pytest.mark.parametrize("use_rslora", [False, True], ids=["alpha/r", "rslora"])
@pytest.mark.parametrize(("in_features", "out_features", "r", "lead"),
                         [(50, 70, 1, (13,)), (64, 96, 16, (3, 7)), (33, 24, 64, (2, 5))])
def test_cpu_layer_matches_peft(in_features, out_features, r, lead, use_rslora, cpu_gemm):
    base = torch.nn.Linear(in_features, out_features)
    _, peft_layer = _peft_linear(copy.deepcopy(base), r, 2 * r, use_rslora=use_rslora)
    ours = _ours_like(peft_layer, base, r, 2 * r, use_rslora=use_rslora)
    x = torch.randn(*lead, in_features)
    grad_y = torch.randn(*lead, out_features)
    theirs = _forward_backward(peft_layer, x, grad_y, [peft_layer.lora_A["default"].weight,
                                                       peft_layer.lora_B["default"].weight])
    mine = _forward_backward(ours, x, grad_y, [ours.lora_A, ours.lora_B])
    # The truth: PEFT's layer in float64. fp32 sums in another order (oneDNN's, the scale folded into a
    # rank-wide weight) differ from PEFT's by a few ulps, so the bound is PEFT's own fp32 error, not an atol.
    peft64 = copy.deepcopy(peft_layer).double()
    truth = _forward_backward(peft64, x.double(), grad_y.double(), [peft64.lora_A["default"].weight,
                                                                   peft64.lora_B["default"].weight])
    for name, a, t, p in zip(("y", "dx", "dA", "dB"), mine, truth, theirs):
        assert a.dtype == torch.float32
        assert_within_torch_error(a, t, p, name=name)


def test_cpu_layer_bf16_within_twice_peft_error():
    in_features, out_features, r = 96, 80, 16
    base32 = torch.nn.Linear(in_features, out_features)
    _, peft32 = _peft_linear(copy.deepcopy(base32), r, 32)
    ours32 = _ours_like(peft32, copy.deepcopy(base32), r, 32)
    x = torch.randn(4, 9, in_features)
    grad_y = torch.randn(4, 9, out_features)
    truth = _forward_backward(ours32.double(), x.double(), grad_y.double(), [ours32.lora_A, ours32.lora_B])
    peft16 = copy.deepcopy(peft32).to(torch.bfloat16)
    ours16 = copy.deepcopy(ours32).float().to(torch.bfloat16)
    theirs = _forward_backward(peft16, x.bfloat16(), grad_y.bfloat16(), [peft16.lora_A["default"].weight,
                                                                           peft16.lora_B["default"].weight])
    mine = _forward_backward(ours16, x.bfloat16(), grad_y.bfloat16(), [ours16.lora_A, ours16.lora_B])
    for name, a, t, s in zip(("y", "dx", "dA", "dB"), mine, truth, theirs):
        assert a.dtype == torch.bfloat16
        assert_within_torch_error(a, t, s, name=name)


def test_cpu_layer_over_linear4bit_matches_peft():
    import bitsandbytes as bnb

    in_features, out_features, r = 64, 48, 8

    def quantised():
        torch.manual_seed(1)
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=True, compute_dtype=torch.float32,
                                  quant_type="nf4")
        layer.load_state_dict(torch.nn.Linear(in_features, out_features).state_dict())
        return layer.to("cpu")

    _, peft_layer = _peft_linear(quantised(), r, 16)
    ours = _ours_like(peft_layer, quantised(), r, 16)
    x = torch.randn(5, in_features)
    grad_y = torch.randn(5, out_features)
    theirs = _forward_backward(peft_layer, x, grad_y, [peft_layer.lora_A["default"].weight,
                                                       peft_layer.lora_B["default"].weight])
    mine = _forward_backward(ours, x, grad_y, [ours.lora_A, ours.lora_B])
    for name, a, t in zip(("y", "dx", "dA", "dB"), mine, theirs):
        assert_close_verbose(a, t, rtol=1e-5, atol=1e-5, name=name)


def test_dropout_draws_peft_mask_and_scales_only_the_lora_branch():
    in_features, out_features, r = 40, 30, 4
    base = torch.nn.Linear(in_features, out_features)
    _, peft_layer = _peft_linear(copy.deepcopy(base), r, 8, dropout=0.4)
    ours = _ours_like(peft_layer, base, r, 8, dropout=0.4)
    x = torch.randn(6, in_features)
    grad_y = torch.randn(6, out_features)
    torch.manual_seed(123)
    theirs = _forward_backward(peft_layer.train(), x, grad_y, [peft_layer.lora_A["default"].weight,
                                                               peft_layer.lora_B["default"].weight])
    torch.manual_seed(123)
    mine = _forward_backward(ours.train(), x, grad_y, [ours.lora_A, ours.lora_B])
    for name, a, t in zip(("y", "dx", "dA", "dB"), mine, theirs):
        assert_close_verbose(a, t, rtol=1e-5, atol=1e-5, name=name)
    # The mask was real (some inputs dropped from the LoRA branch) and eval mode drops nothing.
    assert not torch.allclose(mine[0], ours.eval()(x))
    assert_close_verbose(ours.eval()(x), peft_layer.eval()(x), name="eval y")


def _tiny_llama():
    torch.manual_seed(7)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=88, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                                      attention_bias=True)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _randomise_adapters(model):
    """Non-zero B (a fresh adapter equals its base) and perturbed biases, reproducibly."""
    torch.manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)


INJECT_CASES = [
    dict(target_modules=["q_proj", "v_proj"], r=16, lora_alpha=32, bias="none"),
    dict(target_modules="all-linear", r=8, lora_alpha=16, bias="lora_only", use_rslora=True),
    dict(target_modules=["gate_proj", "up_proj", "down_proj", "o_proj"], r=3, lora_alpha=5, bias="all"),
]


@pytest.mark.parametrize("case", INJECT_CASES, ids=["qv", "all-linear-lora_only-rslora", "mlp-all"])
def test_ours_saved_loads_in_peft_with_identical_outputs(case, tmp_path):
    base = _tiny_llama()
    ours = lora.inject_lora(copy.deepcopy(base), **case)
    _randomise_adapters(ours)
    lora.save_lora_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    ids = torch.randint(0, 101, (2, 9))
    assert_close_verbose(_logits(ours, ids), _logits(theirs, ids), rtol=1e-5, atol=1e-5, name="logits")
    assert not torch.allclose(_logits(ours, ids), _logits(base, ids))
    assert sorted(os.listdir(tmp_path)) == ["adapter"], "no staging directory is left behind"


@pytest.mark.parametrize("case", INJECT_CASES, ids=["qv", "all-linear-lora_only-rslora", "mlp-all"])
def test_peft_saved_loads_in_ours_with_identical_outputs(case, tmp_path):
    base = _tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**case))
    _randomise_adapters(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = lora.load_lora_adapter(copy.deepcopy(base), tmp_path / "peft")
    ids = torch.randint(0, 101, (2, 9))
    assert_close_verbose(_logits(ours, ids), _logits(theirs.eval(), ids), rtol=1e-5, atol=1e-5, name="logits")
    trainable = {name for name, p in ours.named_parameters() if p.requires_grad}
    peft_trainable = {name.removeprefix(peft_format.PEFT_PREFIX).replace(".default", "")
                      for name, p in theirs.named_parameters() if p.requires_grad}
    assert trainable == {name.replace("lora_A.weight", "lora_A").replace("lora_B.weight", "lora_B")
                         for name in peft_trainable}


def _quantise_linears(model):
    """Every nn.Linear but the head replaced by a bitsandbytes NF4 `Linear4bit` (double-quantised)."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and module is not head:
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=torch.float32, quant_type="nf4")
            layer.load_state_dict(module.state_dict())
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer.to("cpu"))
    return model


def _train_mode_logits(model, ids):
    """Logits in train mode (no dropout in the tiny model): bitsandbytes' CPU eval path repacks the 4-bit
    codes and rejects these small layers ("N must be divisible by block_n")."""
    with torch.no_grad():
        return model.train()(input_ids=ids).logits


def test_qlora_model_round_trip_with_peft(tmp_path):
    """inject_lora wraps Linear4bit bases ("all-linear" selects them, not the head); the adapter loads in
    PEFT over the same 4-bit model with the same outputs, and PEFT's loads in ours."""
    import bitsandbytes as bnb

    base = _quantise_linears(_tiny_llama())
    ours = lora.inject_lora(copy.deepcopy(base), "all-linear", r=8, lora_alpha=16)
    layers = lora.lora_layers(ours)
    assert len(layers) == 14 and all(isinstance(layer.base_layer, bnb.nn.Linear4bit) for layer in layers.values())
    _randomise_adapters(ours)
    lora.save_lora_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    ids = torch.randint(0, 101, (2, 8))
    ours_logits = _train_mode_logits(ours, ids)
    assert_close_verbose(ours_logits, _train_mode_logits(theirs, ids), rtol=1e-4, atol=1e-4, name="logits")
    theirs.save_pretrained(tmp_path / "peft")
    reloaded = lora.load_lora_adapter(copy.deepcopy(base), tmp_path / "peft")
    assert_close_verbose(_train_mode_logits(reloaded, ids), ours_logits, rtol=1e-4, atol=1e-4, name="logits")
    with lora.disable_adapters(ours):
        assert_close_verbose(_train_mode_logits(ours, ids), _train_mode_logits(base, ids), rtol=1e-4, atol=1e-4,
                             name="reference logits")


def test_qlora_model_gradients_match_peft(tmp_path):
    """Backward through a model of NF4 layers, several of one shape (on CPU they decode into one shared
    buffer, see lora._weight_for_one_gemm): every adapter gradient equals PEFT's over the same 4-bit model."""
    base = _quantise_linears(_tiny_llama())
    ours = lora.inject_lora(copy.deepcopy(base), "all-linear", r=8, lora_alpha=16)
    _randomise_adapters(ours)
    lora.save_lora_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours", is_trainable=True)
    ids = torch.randint(0, 101, (2, 8))
    for model in (ours, theirs):
        model.train()(input_ids=ids).logits.square().mean().backward()
    peft_modules = dict(theirs.base_model.model.named_modules())
    layers = lora.lora_layers(ours)
    shapes = [tuple(layer.base_layer.weight.quant_state.shape) for layer in layers.values()]
    assert len(set(shapes)) < len(shapes)  # the shared buffers are exercised
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            assert_close_verbose(getattr(layer, part).grad, getattr(peft_modules[name], part)["default"].weight.grad,
                                 rtol=1e-4, atol=1e-6, name=f"{name}.{part}")


def test_an_evaluation_leaves_frozen_4bit_layers_differentiable():
    """bitsandbytes repacks a CPU Linear4bit into an inference layout on its first eval-mode call without grad (on
    CPUs with AVX512-BF16), and from then on runs it, in training too, through a kernel without a backward.
    inject_lora keeps the standard layout, so the adapters' gradients through the frozen 4-bit layers (every
    layer but q_proj here; widths multiples of 32, which that layout needs) are the same after an evaluation."""
    torch.manual_seed(7)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=101)
    model = lora.inject_lora(_quantise_linears(transformers.AutoModelForCausalLM.from_config(config)), ["q_proj"],
                             r=4, lora_alpha=8)
    _randomise_adapters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, 101, (2, 8))

    def adapter_gradients():
        model.train()(input_ids=ids).logits.square().mean().backward()
        grads = [p.grad.clone() for p in trainable]
        model.zero_grad(set_to_none=True)
        return grads

    before = adapter_gradients()
    with torch.no_grad():
        model.eval()(input_ids=ids)
    for after, want in zip(adapter_gradients(), before):
        assert_close_verbose(after, want, rtol=1e-5, atol=1e-7, name="adapter gradient after an evaluation")


def test_save_overwrites_atomically_and_reloads(tmp_path):
    model = lora.inject_lora(_tiny_llama(), ["q_proj", "v_proj"], r=4, lora_alpha=8)
    _randomise_adapters(model)
    lora.save_lora_adapter(model, tmp_path / "adapter")
    _randomise_adapters(model)
    lora.save_lora_adapter(model, tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path)) == ["adapter"]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["q_proj", "v_proj"] and config["peft_type"] == "LORA"
    reloaded = lora.load_lora_adapter(_tiny_llama(), tmp_path / "adapter")
    ids = torch.randint(0, 101, (1, 6))
    assert_close_verbose(_logits(reloaded, ids), _logits(model, ids), name="logits")


def test_disable_adapters_runs_the_base_model_and_restores():
    base = _tiny_llama()
    model = lora.inject_lora(copy.deepcopy(base), "all-linear", r=4, lora_alpha=8)
    _randomise_adapters(model)
    ids = torch.randint(0, 101, (2, 7))
    with_adapters = _logits(model, ids)
    with lora.disable_adapters(model):
        assert_close_verbose(_logits(model, ids), _logits(base, ids), name="reference logits")
    assert_close_verbose(_logits(model, ids), with_adapters, name="logits after the block")
    with pytest.raises(ValueError, match="no LoRA layers"):
        with lora.disable_adapters(base):
            pass


def test_bad_inputs_raise_clear_errors(tmp_path):
    weight, lora_a, lora_b, bias = _factors(8, 6, 2)
    x = torch.randn(3, 8)
    apply = lora.FusedLoRALinearFunction.apply
    with pytest.raises(TypeError, match="lora_a .* must have x's dtype"):
        apply(x, 0.0, weight, bias, lora_a.double(), lora_b, 1.0, False)
    with pytest.raises(ValueError, match="last dimension must be in_features=8"):
        apply(torch.randn(3, 7), 0.0, weight, bias, lora_a, lora_b, 1.0, False)
    with pytest.raises(ValueError, match="shapes do not fit"):
        apply(x, 0.0, weight, bias, lora_a, lora_b[:5], 1.0, False)
    with pytest.raises(ValueError, match="dropout_p must be a number in"):
        apply(x, 1.0, weight, bias, lora_a, lora_b, 1.0, False)
    with pytest.raises(ValueError, match="base weight must be frozen"):
        apply(x, 0.0, weight.requires_grad_(), bias, lora_a, lora_b, 1.0, False)
    with pytest.raises(TypeError, match="Triton kernels take float32, bfloat16 or float16 inputs"):
        apply(x.double(), 0.0, weight.double(), None, lora_a.double(), lora_b.double(), 1.0, True)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        apply(x.long(), 0.0, weight, None, lora_a, lora_b, 1.0, False)
    with pytest.raises(ValueError, match="support ranks 1..64"):
        kernels.block_r(65)
    with pytest.raises(TypeError, match="wraps nn.Linear"):
        lora.LoRALinear(torch.nn.Conv1d(2, 2, 1), 4, 8)
    with pytest.raises(ValueError, match="r must be a positive integer"):
        lora.LoRALinear(torch.nn.Linear(4, 4), 0, 8)
    with pytest.raises(ValueError, match="lora_dropout must be in"):
        lora.LoRALinear(torch.nn.Linear(4, 4), 2, 8, lora_dropout=1.0)
    model = _tiny_llama()
    with pytest.raises(ValueError, match="matched no module"):
        lora.inject_lora(model, ["nonexistent_proj"])
    with pytest.raises(TypeError, match="is a LlamaRMSNorm"):
        lora.inject_lora(model, ["input_layernorm"])
    with pytest.raises(ValueError, match="bias must be one of"):
        lora.inject_lora(model, ["q_proj"], bias="some")
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora.save_lora_adapter(model, tmp_path / "x")
    lora.inject_lora(model, ["q_proj"], r=2)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        lora.inject_lora(model, ["v_proj"])
    lora.save_lora_adapter(model, tmp_path / "dora")
    config_path = tmp_path / "dora" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, use_dora=True)))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        lora.load_lora_adapter(_tiny_llama(), tmp_path / "dora")
    config_path.write_text(json.dumps(dict(config, r=3)))
    with pytest.raises(ValueError, match="adapter r=3 does not match"):
        lora.load_lora_adapter(model, tmp_path / "dora")


@pytest.mark.parametrize("use_triton", [False, True], ids=["cpu", "triton"])
def test_output_may_be_modified_in_place(use_triton):
    """Models scale projections in place (Gemma-3n's `per_layer_projection *= ...` on a [B, T, H] input):
    autograd must allow it on the fused layer's output, and the gradients must be those of the out-of-place
    product."""
    weight, lora_a, lora_b, bias = _factors(8, 6, 2)
    x = torch.randn(2, 3, 8, requires_grad=True)
    a, b = lora_a.clone().requires_grad_(), lora_b.clone().requires_grad_()
    y = lora.FusedLoRALinearFunction.apply(x, 0.0, weight, bias, a, b, 2.0, use_triton)
    y *= 3.0
    got = torch.autograd.grad(y.square().sum(), [x, a, b])
    want_y = lora_linear_reference(x, weight, a, b, 2.0, bias) * 3.0
    want = torch.autograd.grad(want_y.square().sum(), [x, a, b])
    assert y.shape == (2, 3, 6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
