"""The train CLI's model: --model (a local checkpoint or a hub id) or the embedded default, with its tokenizer, its
frozen weights in the compute dtype or NF4 (--load-in-4bit), and LoRA layers (fresh, or --adapter's) unless --full.

With --fsdp over several processes only the first process reads the checkpoint, and never holds it whole: every
process builds the model's skeleton (its weights on the meta device, its buffers computed, the same LoRA layers), and
the first one finds where the checkpoint keeps each weight; pyprefopt.distributed.shard_model then shards the
skeletons and the first process reads each weight a block of rows at a time, sending each process its rows. A
checkpoint whose weights transformers converts as it loads them (a mixture of experts', one tensor an expert) the
first process loads whole instead, handing out the loaded model's weights. A --load-in-4bit base, which FSDP leaves
whole on every process, each process loads itself.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from pyprefopt import data as D
from pyprefopt.distributed import FIRST_PROCESS_WEIGHTS, FirstProcessWeights, log
from pyprefopt.errors import RunError
from pyprefopt.head_config import check_fused_head_support
from pyprefopt.lean_activations import LEAN_MLP_CLASSES, use_lean_activations
from pyprefopt.memory import release_mapped_file_pages
from pyprefopt.packed_attention import use_packed_attention
from pyprefopt.safetensors_io import TensorEntry

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
    """Whether the first process alone reads the checkpoint (every process builds a skeleton, see load_model): with
    --fsdp over several processes, whose shards the first one then fills. Not for a 4-bit
    base, which FSDP leaves whole on every process (pyprefopt.distributed.shard_model): each process loads it."""
    return args.fsdp and world > 1 and not args.load_in_4bit


def load_model(args, train_rows, device, adapter=None):
    """(model, tokenizer, base path or hub id). LoRA layers are injected unless --full: fresh ones, or with
    `adapter` (read_adapter_options' config) those of --adapter with its weights. Where first_process_loads, every
    process returns the model's skeleton instead, the first one's carrying what fills the shards (see
    _load_on_first_process)."""
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

    multimodal = config is not model_config

    def load():
        return _prepared(_from_checkpoint(args, base, model_class, model_config, multimodal, device), args, base,
                         device, adapter)

    if dist.is_initialized() and first_process_loads(args, dist.get_world_size()):
        model = _load_on_first_process(load, args, base, config, model_config, device, adapter)
    else:
        model = load()
    return model, tokenizer, base


def _from_checkpoint(args, base, model_class, model_config, multimodal, device):
    """The model read from the checkpoint at `base`: frozen weights in the compute dtype (or NF4), on `device`."""
    from transformers import BitsAndBytesConfig

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
    # from_pretrained has the checkpoint locally now: found again with no request to the hub.
    directory = checkpoint_dir(base, cached=True)
    if multimodal:
        _set_checkpoint_prefix(model, base, _checkpoint_entries(base, directory))
    if not args.load_in_4bit:
        model.to(device)
    # The pages the loader read through the checkpoint's memory maps, which views of them keep mapped
    # (pyprefopt.memory): before any weight is trained or any page written.
    release_mapped_file_pages(directory.glob("*.safetensors"))
    return model


def _weights_dtype(args, device) -> torch.dtype:
    """Frozen weights are stored in the compute dtype; --full trains every weight, and trained weights stay fp32."""
    return torch.float32 if args.full else compute_dtype(args, device)


def _checkpoint_entries(base, directory: Path) -> dict[str, TensorEntry]:
    """Where each tensor of the safetensors checkpoint of --model `base`, in `directory`, lies (its files' headers);
    RunError where they cannot be read."""
    from pyprefopt.safetensors_io import checkpoint_entries

    try:
        return checkpoint_entries(directory)
    except (ValueError, OSError) as e:
        raise RunError(f"--model {base}: {e}") from e


def _set_checkpoint_prefix(model, base, names):
    """The prefix under which a multimodal checkpoint, whose tensors are `names`, keeps `model`'s decoder, set on
    the model (peft_format.CHECKPOINT_PREFIX)."""
    from pyprefopt.peft_format import CHECKPOINT_PREFIX
    from pyprefopt.text_model import checkpoint_prefix

    try:
        setattr(model, CHECKPOINT_PREFIX, checkpoint_prefix(model, names))
    except ValueError as e:
        raise RunError(f"--model {base}: {e}") from e


def _skeleton(args, model_config, base, device):
    """The model from_pretrained would load but for its weights, which are on the meta device (no memory): in the
    dtypes from_pretrained gives them (_keep_in_fp32), tied as it ties them, with what it makes besides them, in
    eval mode. Its buffers are computed as from_pretrained computes those a checkpoint does not hold (a rotary
    embedding's inv_freq): on the CPU, by the model's own weight initialisation, told (transformers' mark) that every
    parameter is loaded; that draws no random numbers, so a seeded LoRA init after it is the loaded model's. Without
    the checkpoint prefix of a multimodal checkpoint: only the first process reads the checkpoint's names."""
    from transformers import AutoModelForCausalLM

    dtype = _weights_dtype(args, device)
    with torch.device("meta"):
        # The class causal_lm_class picks: the text model's own one for a multimodal config's text config.
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    _keep_in_fp32(model, dtype)
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = torch.empty_like(buffer, device="cpu")
    for param in model.parameters():
        param._is_hf_initialized = True
    model.initialize_weights()
    model.config.name_or_path = base
    if model.can_generate():
        # from_pretrained's generation config: the checkpoint's generation_config.json, else its config.json's.
        model.adjust_generation_fn(None, False, None, base, cache_dir=None, force_download=False, proxies=None,
                                   local_files_only=False, token=None, revision="main", subfolder="",
                                   trust_remote_code=None)
    return model.eval()


def _keep_in_fp32(model, dtype):
    """The weights from_pretrained loads in fp32 whatever `dtype` made fp32: those its dtype plan names (the model's
    `_keep_in_fp32_modules_strict` in 16-bit, and `_keep_in_fp32_modules` in fp16), whose entries transformers
    matches as regular expressions in which `*` stands for any text."""
    plan = model._get_dtype_plan(dtype)
    patterns = [(re.compile(entry.replace("*", ".*")), kept) for entry, kept in plan.items()]
    for name, tensor in model.state_dict(keep_vars=True).items():
        kept = next((kept for pattern, kept in patterns if pattern.search(name)), None)
        if kept is not None:
            tensor.data = tensor.data.to(kept)


def _prepared(model, args, base, device, adapter, skeleton=False, lora_device=None):
    """`model` made ready to train: no KV cache, packed attention on CPU, activation-lean MLPs and RMSNorms where the
    architecture has them, gradient checkpointing or the MLPs' recomputation if asked, and every weight trainable
    (--full) or LoRA layers injected, fresh or --adapter's (a skeleton gets the adapter's layers alone: the first
    process holds their weights, see _first_process_model). `lora_device`: where a skeleton's LoRA factors are made
    (lora.inject_lora; by default on the meta device, as its weights)."""
    from pyprefopt.lora import inject_lora, load_lora_adapter

    model.config.use_cache = False
    if device.type == "cpu":
        use_packed_attention(model)
    swapped = use_lean_activations(model, recompute_mlp=args.recompute_mlp)
    if args.recompute_mlp and not swapped["mlp"]:
        mlp_classes = sorted({type(m).__name__ for name, m in model.named_modules() if name.endswith(".mlp")})
        raise RunError(f"--recompute-mlp: none of --model {base}'s MLPs ({', '.join(mlp_classes) or 'none found'}) "
                       f"is one it recomputes ({', '.join(sorted(LEAN_MLP_CLASSES))}); leave the option off, or use "
                       "--gradient-checkpointing")
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if args.full:
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    if adapter is None:
        inject_lora(model, target_spec(args.target_modules), r=args.lora_r, lora_alpha=args.lora_alpha,
                    lora_dropout=args.lora_dropout, device=lora_device)
    else:
        try:
            if skeleton:
                inject_lora(model, adapter.target_modules, r=adapter.r, lora_alpha=adapter.lora_alpha,
                            lora_dropout=adapter.lora_dropout, use_rslora=adapter.use_rslora, bias=adapter.bias,
                            device=lora_device)
            else:
                load_lora_adapter(model, args.adapter)
        except (ValueError, TypeError, OSError, SafetensorError) as e:
            raise _adapter_misfit(args, base, e) from e
    # The adapter is created in its base's dtype: fp32 master weights for AdamW (LoRALinear casts them to the
    # input's dtype in forward, and autograd brings their gradients back in fp32).
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    model.pyprefopt_lora_config.base_model_name_or_path = base
    return model


def _adapter_misfit(args, base, error) -> RunError:
    return RunError(f"--adapter {args.adapter} does not fit --model {base}: {error}")


def _load_on_first_process(load, args, base, config, model_config, device, adapter):
    """Every process builds the model's skeleton (_skeleton) with its LoRA layers, the first one also what fills every
    process's shards of it (_first_process_model). Where a process fails with what an `error:` line reports, every
    process raises that error (its own, else the first one's), rather than wait for the others; and a RunError where
    a skeleton's tensors differ from the first process's model in names, shapes or ties. A model the first process
    loaded whole gives the skeletons its dtypes (transformers keeps some weights of some models in fp32 when it
    loads them in another dtype)."""
    model = failure = None
    try:
        skeleton = _skeleton(args, model_config, base, device)
        if dist.get_rank() == 0:
            model = _first_process_model(skeleton, load, args, base, config, config is not model_config, device,
                                          adapter)
        else:
            model = _prepared(skeleton, args, base, device, adapter, skeleton=True)
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


def _first_process_model(skeleton, load, args, base, config, multimodal, device, adapter):
    """The first process's model, carrying (distributed.FIRST_PROCESS_WEIGHTS) what fills every process's shards of
    it: the skeleton, with its LoRA factors made as a loaded model's are (the same seed draws the same values), which
    it holds with --adapter's weights and its buffers, its other weights read from the checkpoint when their turn
    comes; or, where the checkpoint does not keep every weight under the model's name of it (_stored_tensors), the
    whole model loaded (`load()`), which holds them all."""
    from pyprefopt.lora import adapter_weights

    stored_by_tensor, not_streamed = _stored_tensors(skeleton, base, config, multimodal)
    if not_streamed:
        log(0, f"--fsdp: the first process loads --model {base} whole, then shards it: {not_streamed}")
        model = load()
        setattr(model, FIRST_PROCESS_WEIGHTS, FirstProcessWeights(dict(_named_tensors(model, every_name=False)), {}))
        return model
    model = _prepared(skeleton, args, base, device, adapter, skeleton=True, lora_device=device)
    tensors = dict(_named_tensors(model, every_name=False))
    stored = {name: stored_by_tensor[id(tensor)] for name, tensor in tensors.items() if id(tensor) in stored_by_tensor}
    held = {name: tensor for name, tensor in tensors.items() if name not in stored}
    if adapter is not None:
        try:
            from_adapter = adapter_weights(model, args.adapter)
        except (ValueError, TypeError, OSError, SafetensorError) as e:
            raise _adapter_misfit(args, base, e) from e
        held.update(from_adapter)
        for name in from_adapter:
            stored.pop(name, None)
    setattr(model, FIRST_PROCESS_WEIGHTS, FirstProcessWeights(held, stored))
    return model


def _stored_tensors(model, base, config, multimodal) -> tuple[dict[int, TensorEntry], str | None]:
    """(where the checkpoint at `base` keeps each weight and persistent buffer of the skeleton `model`, by the
    tensor's id; why not every weight can be read so, else None), the checkpoint's names made the model's as
    from_pretrained makes them: by transformers' renamings of the model (a multimodal checkpoint's prefix of its
    language model, older names), which it records on the model for save_pretrained to name the weights back as the
    checkpoint did. Not every weight can be read so where the checkpoint is quantised (transformers undoes that as it
    loads), not safetensors, or keeps some weights otherwise: transformers converts those as it loads them (a mixture
    of experts' weights, one tensor an expert, into one), and initialises afresh a weight the checkpoint lacks. A
    buffer the checkpoint does not keep is the skeleton's computed one (see _skeleton). Also sets a multimodal
    checkpoint's prefix on the model (see _set_checkpoint_prefix). RunError for a weight the checkpoint keeps in
    another shape, or for files it cannot read."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    from pyprefopt.safetensors_io import INDEX_FILE, SINGLE_FILE

    if getattr(config, "quantization_config", None) is not None:
        return {}, "its config.json declares a quantization_config, which transformers undoes as it loads"
    directory = checkpoint_dir(base)
    if not any((directory / name).is_file() for name in (SINGLE_FILE, INDEX_FILE)):
        return {}, "it holds no safetensors weights"
    entries = _checkpoint_entries(base, directory)
    if multimodal:
        _set_checkpoint_prefix(model, base, entries)
    conversions = get_model_conversion_mapping(model)
    renamings = [conversion for conversion in conversions if isinstance(conversion, WeightRenaming)]
    converters = [conversion for conversion in conversions if isinstance(conversion, WeightConverter)]
    state = model.state_dict(keep_vars=True)
    prefix = model.base_model_prefix
    stored = {}
    for key, entry in entries.items():
        # As from_pretrained renames a checkpoint's key, falling back on the key itself (with or without the base
        # model's prefix) where the renamings lead to no tensor of the model; `converted`: a converter's pattern.
        name, converted = rename_source_key(key, renamings, converters, prefix, state)
        if name not in state and key in state:
            name, converted = rename_source_key(key, [], [], prefix, state)
        if name not in state or converted is not None:
            continue
        tensor = state[name]
        if entry.shape != tuple(tensor.shape):
            raise RunError(f"--model {base}: its checkpoint's {key} is {list(entry.shape)}, where the model its "
                           f"config.json describes has {name} {list(tensor.shape)}")
        stored.setdefault(id(tensor), entry)
    model._weight_conversions = [conversion for conversion in conversions if conversion.was_used()]
    unstored = [name for name, param in model.named_parameters() if id(param) not in stored]
    if unstored:
        listed = ", ".join(unstored[:3]) + (" ..." if len(unstored) > 3 else "")
        return stored, (f"it keeps {len(unstored)} weights under names other than the model's ({listed}), which "
                        "transformers converts as it loads them")
    return stored, None


def _named_tensors(model, every_name=True):
    """Every parameter and buffer of `model` under each of its names (a tied weight under both), or under its first."""
    return itertools.chain(model.named_parameters(remove_duplicate=not every_name),
                           model.named_buffers(remove_duplicate=not every_name))


def _layout(model) -> list[tuple]:
    """(name, shape, dtype, the first name of the same tensor) of every parameter and buffer of `model`."""
    first_name = {}
    return [(name, tuple(tensor.shape), tensor.dtype, first_name.setdefault(id(tensor), name))
            for name, tensor in _named_tensors(model)]


def checkpoint_dir(base: str, cached: bool = False) -> Path:
    """The local directory of --model: itself, or a hub model's snapshot (downloaded when not cached and a network is
    there; `cached`: the one in the cache, with no request to the hub, for a model already loaded)."""
    if Path(base).is_dir():
        return Path(base)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(base, local_files_only=cached))


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
