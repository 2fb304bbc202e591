"""pyprefopt.lean_activations on tiny random Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3 and Gemma-3n models, with
and without LoRA layers: the same logits and gradients as the model's own modules, less saved for backward (the gated
MLPs' intermediate-wide tensors and the RMSNorms' fp32 copies), under activation checkpointing too; with
`recompute_mlp`, the same logits and gradients again and no intermediate-wide tensor kept where the MLP has no LoRA
branch. The train CLI uses it."""

import copy

import pytest
import torch
import transformers

from bench.saved_activations import saved_bytes_by_module
from pyprefopt import lora
from pyprefopt.lean_activations import use_lean_activations
from pyprefopt.rms_norm import RMSNorm
from pyprefopt.swiglu import GatedMLP, SwiGLUMLP
from tests.tensor_asserts import assert_close_verbose
from tests.tiny_models import gemma3n_config

SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**SIZES),
    "mistral": lambda: transformers.MistralConfig(**SIZES),
    "qwen2": lambda: transformers.Qwen2Config(**SIZES),
    "qwen3": lambda: transformers.Qwen3Config(head_dim=16, **SIZES),
}


def _model(family, targets, dtype=torch.float32, lora_dropout=0.0):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[family](), dtype=dtype)
    if targets:
        lora.inject_lora(model, targets, r=4, lora_alpha=8, lora_dropout=lora_dropout)
        for layer in lora.lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B, std=0.1)  # a live LoRA branch: B starts at zero
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    return model.train()


def _loss_and_grads(model, input_ids):
    model.zero_grad()
    logits = model(input_ids).logits
    logits.float().logsumexp(-1).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("targets", [None, "all-linear", ["q_proj", "v_proj"]], ids=["full", "lora-all", "lora-qv"])
@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_the_lean_model_computes_what_the_model_does(family, targets):
    model = _model(family, targets)
    lean = copy.deepcopy(model)
    swapped = use_lean_activations(lean, backend="torch")
    layers = SIZES["num_hidden_layers"]
    norms = layers * (4 if family == "qwen3" else 2) + 1  # qwen3 adds q_norm and k_norm; the final norm
    assert swapped == {"mlp": layers, "rms_norm": norms}
    assert sum(isinstance(m, SwiGLUMLP) for m in lean.modules()) == layers
    assert sum(isinstance(m, RMSNorm) for m in lean.modules()) == norms
    assert lean.state_dict().keys() == model.state_dict().keys()
    input_ids = torch.randint(0, SIZES["vocab_size"], (2, 11))
    logits, grads = _loss_and_grads(model, input_ids)
    lean_logits, lean_grads = _loss_and_grads(lean, input_ids)
    assert torch.equal(lean_logits, logits)  # the PyTorch path's forward is transformers' own ops
    assert lean_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        assert_close_verbose(lean_grads[name], grad, rtol=1e-4, atol=1e-5, name=name)


def _saved_kib(model, input_ids):
    layer = model.model.layers[1]
    return sum(saved_bytes_by_module(model, layer, input_ids).values()) / 1024


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]], ids=["lora-all", "lora-qv"])
def test_the_lean_layer_saves_two_intermediate_tensors_and_no_fp32_copies(targets):
    """Per token of a bf16 Qwen3 layer: transformers' MLP saves SiLU's input, silu(gate), up (and h for down_proj's
    LoRA branch); the lean one gate and up. Its RMSNorms save their bf16 input, not an fp32 copy."""
    model = _model("qwen3", targets, dtype=torch.bfloat16)
    lean = copy.deepcopy(model)
    use_lean_activations(lean, backend="torch")
    tokens = 64
    input_ids = torch.randint(0, SIZES["vocab_size"], (1, tokens))
    plain_kib, lean_kib = _saved_kib(model, input_ids), _saved_kib(lean, input_ids)
    intermediate = SIZES["intermediate_size"] * 2 * tokens / 1024  # one bf16 [tokens, I] tensor
    hidden, heads = SIZES["hidden_size"] * 2 * tokens / 1024, 4 * 16 * 2 * tokens / 1024
    kv_heads = 2 * 16 * 2 * tokens / 1024
    mlp_saved = (2 if targets == "all-linear" else 1) * intermediate
    # Each norm's fp32 copy (twice its bf16 input) becomes the bf16 input: the two layer norms, q_norm, k_norm.
    norm_saved = 2 * hidden + heads + kv_heads
    assert plain_kib - lean_kib == pytest.approx(mlp_saved + norm_saved, rel=0.02)


def test_lean_activations_under_activation_checkpointing_give_the_same_gradients():
    model = _model("qwen3", "all-linear")
    lean = copy.deepcopy(model)
    use_lean_activations(lean, backend="torch")
    for m in (model, lean):
        m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    input_ids = torch.randint(0, SIZES["vocab_size"], (2, 9))
    logits, grads = _loss_and_grads(model, input_ids)
    lean_logits, lean_grads = _loss_and_grads(lean, input_ids)
    assert torch.equal(lean_logits, logits)
    for name, grad in grads.items():
        assert_close_verbose(lean_grads[name], grad, rtol=1e-4, atol=1e-5, name=name)


GEMMA_SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16)
GEMMA_CONFIGS = {
    # Gemma-3n's first layer sparse (its real config: the first 10 of 35), the second dense.
    "gemma3n": lambda: gemma3n_config(96, activation_sparsity_pattern=[0.95, 0.0]),
    "gemma2": lambda: transformers.Gemma2Config(attn_implementation="eager", **GEMMA_SIZES),
    "gemma3": lambda: transformers.Gemma3TextConfig(**GEMMA_SIZES),
}
GEMMA_NORMS = {"gemma3n": "Gemma3nRMSNorm", "gemma2": "Gemma2RMSNorm", "gemma3": "Gemma3RMSNorm"}


@pytest.mark.parametrize("family, targets, checkpointing", [
    (family, targets, False) for family in sorted(GEMMA_CONFIGS) for targets in (None, "all-linear")] + [
    ("gemma3n", "all-linear", True)])
def test_the_lean_gemma_model_computes_what_the_model_does(family, targets, checkpointing):
    """Gemma 2, 3 and 3n: every MLP (GELU-tanh, Gemma-3n's with a sparse layer) and RMSNorm (1 + w, w, or no
    weight: Gemma-3n's v_norm) swapped; the same logits, and gradients within fp32 rounding (under activation
    checkpointing too)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(GEMMA_CONFIGS[family]())
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.normal_(param, 0.1, 0.3)  # Gemma 2 and 3 start them at 0, Gemma-3n at 1
    if targets:
        lora.inject_lora(model, targets, r=4, lora_alpha=8)
        for layer in lora.lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B, std=0.1)
    model.train()
    lean = copy.deepcopy(model)
    norms = sum(type(m).__name__ == GEMMA_NORMS[family] for m in model.modules())
    assert use_lean_activations(lean, backend="torch") == {"mlp": 2, "rms_norm": norms}
    assert lean.state_dict().keys() == model.state_dict().keys()
    if checkpointing:
        for m in (model, lean):
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    input_ids = torch.randint(0, 96, (2, 11))
    logits, grads = _loss_and_grads(model, input_ids)
    lean_logits, lean_grads = _loss_and_grads(lean, input_ids)
    assert torch.equal(lean_logits, logits)
    assert lean_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        assert_close_verbose(lean_grads[name], grad, rtol=1e-4, atol=1e-5, name=name)


def test_the_lean_gemma3n_layer_saves_two_intermediate_tensors_and_no_fp32_copies():
    """Per token of a bf16 Gemma-3n layer with a sparse MLP and LoRA on the MLP (the card's): transformers' MLP saves
    the gate, its sparse shift, GELU's output, up and down_proj's LoRA input h; the lean one gate and up. The norms
    save their bf16 input in place of an fp32 copy."""
    torch.manual_seed(0)
    config = gemma3n_config(96, activation_sparsity_pattern=[0.95, 0.95])
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    lora.inject_lora(model, ["gate_proj", "up_proj", "down_proj"], r=4, lora_alpha=8)
    model.train()
    lean = copy.deepcopy(model)
    use_lean_activations(lean, backend="torch")
    tokens = 64
    input_ids = torch.randint(0, 96, (1, tokens))
    saved = {name: saved_bytes_by_module(m, m.model.layers[1], input_ids) for name, m in (("plain", model),
                                                                                       ("lean", lean))}
    intermediate = 128 * 2 * tokens  # bytes of one bf16 [tokens, I] tensor (the tiny config's I = 128)
    mlp_wide = {name: sum(nbytes for (module, _, shape), nbytes in by_key.items()
                          if module.startswith("mlp") and torch.Size(shape).numel() == tokens * 128)
                for name, by_key in saved.items()}
    assert mlp_wide == {"plain": 5 * intermediate, "lean": 2 * intermediate}
    assert sum(saved["plain"].values()) - sum(saved["lean"].values()) >= 3 * intermediate


@pytest.mark.parametrize("recompute_mlp", [False, True], ids=["kept", "recompute-mlp"])
def test_a_peft_model_gets_the_lean_modules_around_its_lora_layers(recompute_mlp):
    """As a TRL user calls it: on a PEFT-wrapped model (PEFT's own LoRA layers on every projection), the same logits
    and LoRA gradients, with the MLPs recomputed too."""
    import peft

    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(CONFIGS["qwen3"]())
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(base, config).train()
    lean = copy.deepcopy(model)
    assert use_lean_activations(lean, recompute_mlp=recompute_mlp) == {"mlp": 2, "rms_norm": 9}
    input_ids = torch.randint(0, SIZES["vocab_size"], (2, 11))
    logits, grads = _loss_and_grads(model, input_ids)
    lean_logits, lean_grads = _loss_and_grads(lean, input_ids)
    assert torch.equal(lean_logits, logits)
    assert lean_grads.keys() == grads.keys() and any("mlp.down_proj.lora_A" in name for name in grads)
    for name, grad in grads.items():
        assert_close_verbose(lean_grads[name], grad, rtol=1e-4, atol=1e-5, name=name)


@pytest.mark.parametrize("targets, lora_dropout", [(["q_proj", "v_proj"], 0.0), ("all-linear", 0.1)],
                         ids=["lora-qv", "lora-all-dropout"])
@pytest.mark.parametrize("family", ["qwen3", "gemma3n"])
def test_recomputed_mlps_give_the_lean_models_logits_and_gradients(family, targets, lora_dropout):
    """The MLPs recomputing gate_proj, up_proj and the gating in backward: bit for bit the lean model's logits and
    gradients (the recomputation draws the LoRA branches' dropout masks of the forward again)."""
    if family == "gemma3n":
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(GEMMA_CONFIGS["gemma3n"]())
        lora.inject_lora(model, targets, r=4, lora_alpha=8, lora_dropout=lora_dropout)
        model.train()
    else:
        model = _model(family, targets, lora_dropout=lora_dropout)
    recomputed = copy.deepcopy(model)
    use_lean_activations(model, backend="torch")
    use_lean_activations(recomputed, backend="torch", recompute_mlp=True)
    assert all(m.recompute for m in recomputed.modules() if isinstance(m, GatedMLP))
    input_ids = torch.randint(0, 96, (2, 11))
    torch.manual_seed(1)
    logits, grads = _loss_and_grads(model, input_ids)
    torch.manual_seed(1)
    recomputed_logits, recomputed_grads = _loss_and_grads(recomputed, input_ids)
    assert torch.equal(recomputed_logits, logits)
    assert recomputed_grads.keys() == grads.keys() and grads
    for name, grad in grads.items():
        assert torch.equal(recomputed_grads[name], grad), name


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"], ids=["lora-qv", "lora-all"])
def test_a_recomputed_mlp_keeps_only_its_input(targets):
    """Per token of a bf16 Qwen3 layer: the lean MLP keeps gate and up (and, with LoRA on its projections, x for
    gate_proj's and up_proj's LoRA branches; down_proj's input h is rebuilt from gate and up), the recomputed one its
    hidden-wide input alone (held by its checkpoint), with a LoRA branch on down_proj too. Tensors at least
    hidden-wide are counted (the LoRA branches' rank-wide products are not)."""
    tokens = 64
    input_ids = torch.randint(0, SIZES["vocab_size"], (1, tokens))
    kept = {}
    for recompute in (False, True):
        model = _model("qwen3", targets, dtype=torch.bfloat16)
        use_lean_activations(model, backend="torch", recompute_mlp=recompute)
        saved = saved_bytes_by_module(model, model.model.layers[1], input_ids)
        hidden = SIZES["hidden_size"]
        kept[recompute] = {module: sum(nbytes for (name, _, shape), nbytes in saved.items()
                                       if name == module and tokens in shape and shape[-1] >= hidden)
                           for module in ("mlp", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    intermediate = SIZES["intermediate_size"]
    # gate and up; x, which gate_proj's LoRA branch saves first and up_proj's shares.
    assert kept[False] == {"mlp": 2 * 2 * tokens * intermediate,
                           "mlp.gate_proj": 2 * tokens * hidden * (targets == "all-linear"), "mlp.up_proj": 0,
                           "mlp.down_proj": 0}
    assert kept[True] == {"mlp": 2 * tokens * hidden, "mlp.gate_proj": 0, "mlp.up_proj": 0, "mlp.down_proj": 0}


@pytest.mark.parametrize("mode", ["plain", "checkpointed", "recompute-mlp"])
def test_what_the_graph_keeps_alive_after_forward(mode):
    """Counting saved tensors is not enough: a hook that held h would keep it alive however it packs it. After the
    forward, with the graph alive, down_proj's LoRA input h is gone; under activation checkpointing gate and up are
    too (the checkpoint drops them, to be recomputed), and so are they with the MLP recomputed."""
    import weakref

    model = _model("qwen3", "all-linear", dtype=torch.bfloat16)
    use_lean_activations(model, backend="torch", recompute_mlp=mode == "recompute-mlp")
    if mode == "checkpointed":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    mlp = model.model.layers[1].mlp
    refs = {}
    handles = [mlp.down_proj.register_forward_pre_hook(lambda m, args: refs.update(h=weakref.ref(args[0]))),
               mlp.gate_proj.register_forward_hook(lambda m, args, out: refs.update(gate=weakref.ref(out))),
               mlp.up_proj.register_forward_hook(lambda m, args, out: refs.update(up=weakref.ref(out)))]
    logits = model(torch.randint(0, SIZES["vocab_size"], (1, 16))).logits
    for handle in handles:
        handle.remove()
    alive = {name: ref() is not None for name, ref in refs.items()}
    assert alive == {"h": False, "gate": mode == "plain", "up": mode == "plain"}
    logits.float().sum().backward()
    assert all(p.grad is not None for p in lora.lora_layers(model)["model.layers.1.mlp.down_proj"].parameters()
               if p.requires_grad)
