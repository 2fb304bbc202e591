"""The train CLI's model: --model (a local checkpoint or a hub id) or the embedded default, with its tokenizer, its
frozen weights in the compute dtype or NF4 (--load-in-4bit), and LoRA layers (fresh, or --adapter's) unless --full.

With --fsdp over several processes only the first process reads the checkpoint: the others build the model's skeleton
(parameters and buffers on the meta device, the same LoRA layers), checked to have the loaded model's tensors, shapes
and ties and given its dtypes; pyprefopt.distributed.shard_model then shards both and fills every process's shards
from the first process's weights, so no other process ever holds the whole model. A --load-in-4bit base, which FSDP
leaves whole on every process, each process loads itself.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from pyprefopt import data as D
from pyprefopt.distributed import log
from pyprefopt.errors import RunError
from pyprefopt.head_config import check_fused_head_support
from pyprefopt.packed_attention import use_packed_attention

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def compute_dtype(args, device) -> torch.dtype:
    """The dtype the model computes in: --dtype, or by default bf16 on CUDA (tensor cores) and fp32 on CPU."""
    return COMPUTE_DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]


def target_spec(targets: str):
    """--target-modules as inject_lora takes it: 'all-linear', a regex, or the list of comma-separated names."""
    if targets != "all-linear" and "," in targets:
        return [t.strip() for t in targets.split(",") if t.strip()]
    return targets


def read_adapter_options(args):
    """With --adapter: the adapter's config (pyprefopt.lora.LoRAConfig), its rank, alpha, dropout and targets put
    into args, which then say what the run trains (the run's arguments, a --resume's comparison, the card). An
    explicitly given LoRA option that differs is refused: the adapter's weights fix them. Raises RunError when the
    directory holds no adapter."""
    from pyprefopt.lora import read_adapter_config
    from pyprefopt.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    directory = Path(args.adapter)
    if not directory.is_dir():
        raise RunError(f"--adapter {directory}: no such directory")
    missing = [name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (directory / name).is_file()]
    if missing:
        raise RunError(f"--adapter {directory} holds no LoRA adapter (no {' and no '.join(missing)}); name a PEFT "
                       "adapter directory, such as a LoRA run's --output-dir")
    try:
        config = read_adapter_config(directory)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"--adapter {directory}: cannot read its {ADAPTER_CONFIG} as a PEFT LoRA config "
                       f"({type(e).__name__}: {e})") from e
    targets = config.target_modules
    adapter_options = {"lora_r": config.r, "lora_alpha": float(config.lora_alpha), "lora_dropout": config.lora_dropout,
                       "target_modules": targets if isinstance(targets, str) else ",".join(sorted(targets))}

    def comparable(name, value):  # a list of target names in any order, or the value itself
        spec = target_spec(value) if name == "target_modules" else value
        return sorted(spec) if isinstance(spec, list) else spec

    for name, value in adapter_options.items():
        given = getattr(args, name)
        if given is not None and comparable(name, given) != comparable(name, value):
            option = f"--{name.replace('_', '-')}"
            raise RunError(f"{option} {given} differs from the --adapter's {value} ({directory / ADAPTER_CONFIG}): "
                           f"the adapter sets it; drop {option}")
        setattr(args, name, value)
    return config


def is_hub_id(name: str) -> bool:
    """Whether `name`, not a local directory, has the form of a hub id (name or org/name) rather than of a path."""
    return not name.startswith((".", "/", "~")) and name.count("/") <= 1


def check_adapter_base(adapter_dir, trained_on, base):
    """Refuse an adapter trained on another model than `base` where the names tell (two local checkpoints, or two hub
    ids); where they cannot (a hub id and a path, or a path not on this machine), say which was which. Whether its
    weights fit the model's layers is checked when they are loaded."""
    if trained_on is None or trained_on == base:
        return
    local = Path(trained_on).is_dir(), Path(base).is_dir()
    if local == (True, True):
        different = not Path(trained_on).samefile(base)
    elif local == (False, False) and is_hub_id(trained_on) and is_hub_id(base):
        different = trained_on.casefold() != base.casefold()  # the hub's names ignore case
    else:
        log(0, f"--adapter {adapter_dir} was trained on {trained_on}; this run continues it on --model {base}")
        return
    if different:
        raise RunError(f"--adapter {adapter_dir} was trained on {trained_on}, not on --model {base}: pass --model "
                       f"{trained_on}")


def first_process_loads(args, world: int) -> bool:
    """Whether the first process alone reads the checkpoint (the others build a skeleton, see load_model): with --fsdp
    over several processes, which then fills every process's shards from the first one's weights. Not for a 4-bit
    base, which FSDP leaves whole on every process (pyprefopt.distributed.shard_model): each process loads it."""
    return args.fsdp and world > 1 and not args.load_in_4bit


def load_model(args, train_rows, device, adapter=None):
    """(model, tokenizer, base path or hub id). LoRA layers are injected unless --full: fresh ones, or with
    `adapter` (read_adapter_options' config) those of --adapter with its weights. Where first_process_loads, the
    processes but the first return the model's skeleton instead (see _load_on_first_process)."""
    from transformers import AutoConfig, AutoTokenizer

    from pyprefopt.default_model import default_model_path
    from pyprefopt.text_model import causal_lm_class

    base = args.model
    if base is None:
        # transformers writes a checkpoint from the first process of a distributed run only: that one builds the
        # cached default, the others read it once it is there.
        first = not dist.is_initialized() or dist.get_rank() == 0
        if not first:
            dist.barrier()
        base = str(default_model_path(D.corpus(train_rows)))
        if first and dist.is_initialized():
            dist.barrier()
    elif not Path(base).is_dir() and not is_hub_id(base):
        raise RunError(f"--model {base}: no such directory (a hub id has the form name or org/name)")
    if adapter is not None:
        check_adapter_base(args.adapter, adapter.base_model_name_or_path, base)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as e:
        # transformers and huggingface_hub report a missing local model, an unknown hub id and an unreachable
        # hub as OSError (or ValueError for a malformed id), with long multi-line texts.
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"--model {base}: cannot load its tokenizer ({reason}); name a local checkpoint directory, "
                       "or a hub id reachable from here") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = AutoConfig.from_pretrained(base)
    try:
        check_fused_head_support(config, f"--model {base}")
    except NotImplementedError as e:
        raise RunError(str(e)) from e
    model_class, model_config = causal_lm_class(config)
    if model_config is not config:
        log(0, f"--model {base}: a multimodal checkpoint; its language model is trained alone ({model_class.__name__})"
            + (", and written alone" if args.full else ", and the adapter named as in the whole model"))

    def load():
        return _prepared(_from_checkpoint(args, base, model_class, model_config, config is not model_config, device),
                         args, base, device, adapter)

    if dist.is_initialized() and first_process_loads(args, dist.get_world_size()):
        model = _load_on_first_process(load, lambda: _prepared(_skeleton(args, model_config, device), args, base,
                                                               device, adapter, skeleton=True))
    else:
        model = load()
    return model, tokenizer, base


def _from_checkpoint(args, base, model_class, model_config, multimodal, device):
    """The model read from the checkpoint at `base`: frozen weights in the compute dtype (or NF4), on `device`."""
    from transformers import BitsAndBytesConfig

    from pyprefopt.peft_format import CHECKPOINT_PREFIX
    from pyprefopt.safetensors_io import checkpoint_tensor_names
    from pyprefopt.text_model import checkpoint_prefix

    dtype = compute_dtype(args, device)
    kwargs = {"dtype": _weights_dtype(args, device)}
    if args.load_in_4bit:
        kept, head = layers_left_16bit(model_config)
        if kept:
            log(0, f"--load-in-4bit: {len(kept)} linear layers stay 16-bit (fewer than {NF4_MIN_WEIGHTS} weights, "
                f"or outputs not a multiple of {NF4_CPU_ROW_BLOCK}): {', '.join(kept)}")
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=kept + head,
            bnb_4bit_compute_dtype=dtype)
        kwargs["device_map"] = {"": device}
    model = model_class.from_pretrained(base, config=model_config, **kwargs)
    if multimodal:
        try:
            prefix = checkpoint_prefix(model, checkpoint_tensor_names(checkpoint_dir(base)))
        except (ValueError, OSError) as e:
            raise RunError(f"--model {base}: {e}") from e
        setattr(model, CHECKPOINT_PREFIX, prefix)
    if not args.load_in_4bit:
        model.to(device)
    return model


def _weights_dtype(args, device) -> torch.dtype:
    """Frozen weights are stored in the compute dtype; --full trains every weight, and trained weights stay fp32."""
    return torch.float32 if args.full else compute_dtype(args, device)


def _skeleton(args, model_config, device):
    """The model from_pretrained would load, with its parameters and buffers on the meta device (no memory), in eval
    mode as from_pretrained leaves it. Without the checkpoint prefix of a multimodal checkpoint: only what the first
    process writes reads it."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        # The class causal_lm_class picks: the text model's own one for a multimodal config's text config.
        model = AutoModelForCausalLM.from_config(model_config, dtype=_weights_dtype(args, device))
    return model.eval()


def _prepared(model, args, base, device, adapter, skeleton=False):
    """`model` made ready to train: no KV cache, packed attention on CPU, gradient checkpointing if asked, and every
    weight trainable (--full) or LoRA layers injected, fresh or --adapter's (a skeleton gets the adapter's layers
    alone: the first process reads their weights)."""
    from pyprefopt.lora import inject_lora, load_lora_adapter

    model.config.use_cache = False
    if device.type == "cpu":
        use_packed_attention(model)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if args.full:
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if adapter is None:
        inject_lora(model, target_spec(args.target_modules), r=args.lora_r, lora_alpha=args.lora_alpha,
                    lora_dropout=args.lora_dropout)
    else:
        try:
            if skeleton:
                inject_lora(model, adapter.target_modules, r=adapter.r, lora_alpha=adapter.lora_alpha,
                            lora_dropout=adapter.lora_dropout, use_rslora=adapter.use_rslora, bias=adapter.bias)
            else:
                load_lora_adapter(model, args.adapter)
        except (ValueError, TypeError, OSError, SafetensorError) as e:
            raise RunError(f"--adapter {args.adapter} does not fit --model {base}: {e}") from e
    # The adapter is created in its base's dtype: fp32 master weights for AdamW (LoRALinear casts them to the
    # input's dtype in forward, and autograd brings their gradients back in fp32).
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    model.pyprefopt_lora_config.base_model_name_or_path = base
    return model


def _load_on_first_process(load, build_skeleton):
    """The first process's `load()`, the others' `build_skeleton()`, given the loaded model's dtypes (transformers
    keeps some weights of some models in fp32 when it loads them in another dtype). Where a process fails with what
    an `error:` line reports, every process raises that error (its own, else the first one's), rather than wait for
    the others; and a RunError where a skeleton's tensors differ from the loaded model's in names, shapes or ties."""
    model = failure = None
    try:
        model = load() if dist.get_rank() == 0 else build_skeleton()
    except (RunError, OSError, SafetensorError) as e:
        failure = e
    layouts = [None] * dist.get_world_size()
    dist.all_gather_object(layouts, failure or _layout(model))
    failures = [layout for layout in layouts if isinstance(layout, BaseException)]
    if failures:
        raise failure or failures[0]
    loaded = layouts[0]
    for layout in layouts[1:]:
        for a, b in itertools.zip_longest(loaded, layout, fillvalue=(None,) * 4):
            if (a[0], a[1], a[3]) != (b[0], b[1], b[3]):
                raise RunError(f"--fsdp: {type(model).__name__} built without its checkpoint differs from the loaded "
                               f"one (name, shape, dtype, first name: loaded {a}, built {b}); train it without --fsdp")
    if dist.get_rank() != 0:
        tensors = dict(_named_tensors(model))
        for name, _, dtype, _ in loaded:
            tensors[name].data = tensors[name].data.to(dtype)
    return model


def _named_tensors(model):
    """Every parameter and buffer of `model` under each of its names (a tied weight under both)."""
    return itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))


def _layout(model) -> list[tuple]:
    """(name, shape, dtype, the first name of the same tensor) of every parameter and buffer of `model`."""
    first_name = {}
    return [(name, tuple(tensor.shape), tensor.dtype, first_name.setdefault(id(tensor), name))
            for name, tensor in _named_tensors(model)]


def checkpoint_dir(base: str) -> Path:
    """The local directory of --model: itself, or a hub model's snapshot (downloaded when not cached and a network is
    there)."""
    if Path(base).is_dir():
        return Path(base)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(base))


# --load-in-4bit leaves a linear layer in 16-bit when 4-bit would save next to nothing (its weights at 4 bits
# save under 96 KiB, while it still pays a dequantise per call) or when bitsandbytes' CPU kernel cannot run it
# (it packs output rows in blocks of 32): routers and gates such as Gemma-3n's AltUp `Linear(hidden, 4)`.
NF4_MIN_WEIGHTS = 2**16
NF4_CPU_ROW_BLOCK = 32


def layers_left_16bit(config) -> tuple[list[str], list[str]]:
    """(the linear layers --load-in-4bit leaves 16-bit, the LM head's name), read off the model built on the meta
    device. The head is named because bitsandbytes' skip list replaces transformers' default one, which holds it."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    head = skeleton.get_output_embeddings()
    kept = [name for name, module in skeleton.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head
            and (module.weight.numel() < NF4_MIN_WEIGHTS or module.out_features % NF4_CPU_ROW_BLOCK)]
    return kept, [name for name, module in skeleton.named_modules() if module is head]
