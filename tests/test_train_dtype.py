"""`python -m pyprefopt.train --dtype bf16`: frozen weights stored in bf16 and the decoder under bf16 autocast, while
trained weights and the optimizer state stay fp32 and the fused head accumulates in fp32. Its loss and gradients are
held to the standard of the rest of the suite: within 2x the error of PyTorch's own bf16 computation of the same
model, both against fp64."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pyprefopt import FusedLinearPreferenceLoss, model_loading, train
from pyprefopt.head_config import head_logit_transform, head_operands
from pyprefopt.lora import lora_layers
from tests.cli_fixtures import data_dir, one_thread_and_private_cache  # noqa: F401 (fixtures)
from tests.tiny_models import gemma3n_config, qwen_config, save_tiny_model


def _qwen3(vocab_size, **ids):
    from transformers import Qwen3Config

    return qwen_config(Qwen3Config)(vocab_size, **ids)


def _gemma3n_bent(vocab_size, **ids):
    # A cap small enough that the random head's logits reach into its bend.
    return gemma3n_config(vocab_size, softcap=0.5, **ids)


@pytest.mark.parametrize("make_config", [_qwen3, _gemma3n_bent], ids=["qwen3", "gemma3n-softcap"])
def test_bf16_loss_and_adapter_gradients_are_within_twice_torchs_bf16_error(make_config, data_dir, tmp_path):
    model_dir = save_tiny_model(tmp_path / "model", data_dir, make_config)
    args = train.parse_args(["--method", "sft", "--model", str(model_dir), "--dtype", "bf16",
                             "--target-modules", "all-linear", "--output-dir", str(tmp_path / "run")])
    device = torch.device("cpu")
    model, _, _ = model_loading.load_model(args, [], device)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    torch.manual_seed(1)
    for layer in lora_layers(model).values():  # a non-zero update, so the adapter's gradients all flow
        torch.nn.init.normal_(layer.lora_B, std=0.05)

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(2, model.config.vocab_size, (3, 14), generator=generator)
    lengths = torch.tensor([14, 9, 11])
    labels = input_ids.masked_fill(torch.arange(14) < 4, -100).masked_fill(torch.arange(14) >= lengths[:, None], -100)
    adapter = [p for p in model.parameters() if p.requires_grad]

    def ours():
        decoder, head = train.decoder_and_head(model)
        hidden, weight, bias = head_operands(train.last_hidden(decoder, input_ids, lengths, device,
                                                               torch.bfloat16)[:, :-1], head.weight, head.bias,
                                             torch.bfloat16)
        loss, _ = FusedLinearPreferenceLoss("sft", **head_logit_transform(model.config))(hidden, weight,
                                                                                        labels[:, 1:], bias)
        return loss

    def models_own(dtype):
        # The model's own forward and loss: under bf16 autocast (PyTorch's bf16 error), or all in fp64 (the truth).
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            mask = (torch.arange(14) < lengths[:, None]).long()
            return model(input_ids=input_ids, attention_mask=mask, labels=labels).loss

    def loss_and_grads(compute):
        loss = compute()
        return [loss.double()] + [g.double() for g in torch.autograd.grad(loss, adapter)]

    got = loss_and_grads(ours)
    torch_bf16 = loss_and_grads(lambda: models_own(torch.bfloat16))
    model.double()
    truth = loss_and_grads(lambda: models_own(torch.float64))
    for name, g, t, w in zip(["loss"] + [f"grad {i}" for i in range(len(adapter))], got, truth, torch_bf16):
        ours_error, torch_error = (g - t).abs().max(), (w - t).abs().max()
        assert ours_error <= 2 * torch_error + 1e-6 * t.abs().max(), (name, ours_error, torch_error)


def test_cli_bf16_trains_fp32_weights_and_says_so(data_dir, tmp_path):
    for extra, run in ((["--target-modules", "all-linear"], "lora"), (["--full"], "full"),
                       (["--load-in-4bit"], "qlora")):
        out = tmp_path / run
        assert train.main(["--method", "dpo", "--data", str(data_dir / "preference"), "--output-dir", str(out),
                           "--max-steps", "2", "--batch-size", "4", "--dtype", "bf16"] + extra) == 0
        weights = load_file(out / ("model.safetensors" if run == "full" else "adapter_model.safetensors"))
        assert {t.dtype for t in weights.values()} == {torch.float32}, run
        assert "| compute dtype (trained weights and optimizer state: fp32) | bfloat16 |" in \
            (out / "README.md").read_text(encoding="utf-8")
        assert json.loads((out / "run_args.json").read_text(encoding="utf-8"))["dtype"] == "bf16"


def _skeleton_and_loaded(make_config, dtype, data_dir, tmp_path):
    """(the --fsdp skeleton of a tiny model of `make_config`, with its LoRA layers; the model loaded)."""
    from transformers import AutoConfig

    from pyprefopt.text_model import causal_lm_class

    model_dir = save_tiny_model(tmp_path / "model", data_dir, make_config)
    args = train.parse_args(["--method", "sft", "--model", str(model_dir), "--dtype", dtype,
                             "--output-dir", str(tmp_path / "run")])
    device = torch.device("cpu")
    loaded, _, _ = model_loading.load_model(args, [], device)
    _, model_config = causal_lm_class(AutoConfig.from_pretrained(model_dir))
    skeleton = model_loading._prepared(model_loading._skeleton(args, model_config, str(model_dir), device), args,
                                       str(model_dir), device, None, skeleton=True)
    return skeleton, loaded


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("make_config", [_qwen3, _gemma3n_bent], ids=["qwen3-tied", "gemma3n"])
def test_the_fsdp_skeleton_is_the_loaded_model_with_its_weights_on_the_meta_device(make_config, dtype, data_dir,
                                                                                   tmp_path):
    """What the processes of an --fsdp run build instead of loading the checkpoint: the loaded model's parameters
    and buffers (names, shapes, dtypes, ties), LoRA layers included, with no memory behind the weights, and the
    buffers from_pretrained computes (rotary frequencies, Gemma's scales) as it computes them."""
    skeleton, loaded = _skeleton_and_loaded(make_config, dtype, data_dir, tmp_path)
    assert model_loading._layout(skeleton) == model_loading._layout(loaded)
    assert all(param.is_meta for param in skeleton.parameters())
    loaded_buffers = dict(loaded.named_buffers())
    for name, buffer in skeleton.named_buffers():
        assert torch.equal(buffer, loaded_buffers[name]), name
    assert not skeleton.training and skeleton.generation_config == loaded.generation_config


def test_the_fsdp_skeleton_keeps_in_fp32_what_from_pretrained_loads_in_fp32(monkeypatch, data_dir, tmp_path):
    """A model's `_keep_in_fp32_modules_strict` (an MoE router's weight in some models): from_pretrained loads those
    weights in fp32 under bf16, and the skeleton gives them the same dtype."""
    from transformers import Qwen3ForCausalLM

    monkeypatch.setattr(Qwen3ForCausalLM, "_keep_in_fp32_modules_strict", ["self_attn.q_norm"])
    skeleton, loaded = _skeleton_and_loaded(_qwen3, "bf16", data_dir, tmp_path)
    assert model_loading._layout(skeleton) == model_loading._layout(loaded)
    dtypes = {name: param.dtype for name, param in skeleton.named_parameters()}
    assert {dtype for name, dtype in dtypes.items() if "q_norm" in name} == {torch.float32}
    assert dtypes["model.layers.0.self_attn.k_norm.weight"] == torch.bfloat16
