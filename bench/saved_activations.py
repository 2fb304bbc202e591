"""What autograd saves for backward per token per decoder layer, by module, at a reference card's real width: where
the training step's memory beyond the weights goes, and what an activation-lean op would save.

    python -m bench.saved_activations [--model Qwen3-1.7B|Qwen2.5-1.5B|Gemma-3n-E4B --targets all-linear
                                       --lora-dropout 0 --tokens 512 --lean [--recompute-mlp]]

Builds the card's architecture (`bench.bench_train.real_configs`) with two decoder layers and a small vocabulary,
bf16 weights, LoRA layers of rank 16 on `--targets` (fp32 factors, as the CLI trains them), with `--lean` the
activation-lean MLP and RMSNorm the train CLI uses (`pyprefopt.lean_activations`; with `--recompute-mlp`, the
MLPs recomputing gate and up in backward, as `--recompute-mlp` of the train CLI), and runs one forward under bf16
autocast as the train CLI does on CPU with `--dtype bf16`. Every tensor saved for backward inside the second layer
is counted once (by storage), and so are the inputs a checkpoint keeps to recompute from; the weights, which backward
reads in place, are left out; the LoRA factors' bf16 casts, a fixed size, are counted per token too (a fraction of a
KiB). Prints KiB per token by module, dtype and shape.
"""

from __future__ import annotations

import argparse
import collections

import torch

from bench.bench_train import real_configs
from pyprefopt import lora, swiglu
from pyprefopt.lean_activations import use_lean_activations


def saved_bytes_by_module(model, layer, input_ids) -> collections.Counter:
    """Bytes of the distinct storages autograd saves while `layer` (a module of `model`) runs its forward, by (the
    innermost submodule running, dtype, shape); parameters' storages left out."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    running, seen, saved = [], set(), collections.Counter()
    handles = []

    def enter(name):
        def hook(module, args):
            running.append(name or "layer")
        return hook

    def leave(module, args, output):
        running.pop()

    for name, module in layer.named_modules():
        handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    checkpoint = swiglu.checkpoint

    def counted_checkpoint(function, *args, **kwargs):
        # What a checkpoint keeps is its inputs, held by its recomputation rather than saved through the hooks.
        for arg in args:
            if isinstance(arg, torch.Tensor):
                pack(arg)
        return checkpoint(function, *args, **kwargs)

    def pack(tensor):
        storage = tensor.untyped_storage().data_ptr()
        if running and storage not in parameters and (storage, tensor.dtype) not in seen:
            seen.add((storage, tensor.dtype))
            saved[(running[-1], str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))] += (
                tensor.untyped_storage().nbytes())
        return tensor

    swiglu.checkpoint = counted_checkpoint
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            model.model(input_ids)
    finally:
        swiglu.checkpoint = checkpoint
        for handle in handles:
            handle.remove()
    return saved


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("Qwen3-1.7B", "Qwen2.5-1.5B", "Gemma-3n-E4B"), default="Qwen3-1.7B")
    p.add_argument("--targets", default="all-linear", help="LoRA targets: all-linear or comma-separated names")
    p.add_argument("--lora-dropout", type=float, default=0.0)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--lean", action="store_true", help="the train CLI's activation-lean MLP and RMSNorm")
    p.add_argument("--recompute-mlp", action="store_true",
                   help="with --lean, the MLPs recomputing gate and up in backward (the train CLI's --recompute-mlp)")
    a = p.parse_args(argv)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = real_configs(pad_token_id=0, eos_token_id=1)[a.model]
    config.num_hidden_layers, config.vocab_size = 2, 1024
    if a.model.startswith("Gemma"):
        # Two layers of Gemma-3n's first ten (sparse MLPs), neither sharing another's KV cache.
        config.vocab_size_per_layer_input, config.num_kv_shared_layers = 1024, 0
        config.activation_sparsity_pattern = config.activation_sparsity_pattern[:2]
        config.layer_types, config.intermediate_size = config.layer_types[:2], config.intermediate_size[:2]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    targets = a.targets if a.targets == "all-linear" else a.targets.split(",")
    if a.recompute_mlp and not a.lean:
        p.error("--recompute-mlp is an option of the lean MLP: give --lean too")
    if a.lean:
        use_lean_activations(model, recompute_mlp=a.recompute_mlp)
    lora.inject_lora(model, targets, r=16, lora_alpha=32, lora_dropout=a.lora_dropout)
    model.train()
    for param in model.parameters():
        if param.requires_grad:  # fp32 master weights, as the CLI trains them
            param.data = param.data.float()
    saved = saved_bytes_by_module(model, model.model.layers[1], torch.randint(0, 1024, (1, a.tokens)))
    kib = {key: nbytes / a.tokens / 1024 for key, nbytes in saved.items()}
    lean = " with lean activations" + (", the MLP recomputed" if a.recompute_mlp else "") if a.lean else ""
    print(f"{a.model}{lean}, LoRA on {a.targets} (dropout {a.lora_dropout}), "
          f"{a.tokens} tokens: "
          f"{sum(kib.values()):.1f} KiB saved per token per layer")
    print("| module | dtype | shape | KiB per token |\n|---|---|---|---:|")
    for (module, dtype, shape), size in sorted(kib.items(), key=lambda item: -item[1]):
        if size >= 0.05:
            print(f"| {module} | {dtype} | {list(shape)} | {size:.2f} |")


if __name__ == "__main__":
    main()
