"""The train CLI's processes: torchrun's process group (or one process), sums over the processes, and the model
wrapped for them, whole on each (DDP) or sharded (FSDP2), with what writes its files after training (the sharded
trainable weights gathered whole on the first process).

`data_parallel` gives the loop one calling convention for all three: `run(compute)` runs the decoder and the fused
head in one function, as a forward of the DDP module or of the FSDP root, so that the gradients are reduced over the
processes by the end of backward; `no_sync()` holds back that reduction until an accumulation window's last
micro-batch.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types

import torch
import torch.distributed as dist

from pyprefopt.errors import RunError
from pyprefopt.safetensors_io import TensorEntry, read_tensor

# The attribute under which the first process's model carries its FirstProcessWeights until it is sharded.
FIRST_PROCESS_WEIGHTS = "pyprefopt_first_process_weights"


def setup_distributed(fsdp=False):
    """(rank, world size, device): torchrun's environment, else one process (in a process group of its own with
    `fsdp`, which shards over a group, so that one process can resume a sharded run)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1:
        dist.init_process_group(backend)
        return dist.get_rank(), world, device
    if fsdp:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return 0, 1, device


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place (a no-op with one process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


class _Forward(torch.nn.Module):
    """A module whose forward is `compute()`, over `model`'s parameters: DDP prepares a step's gradient all-reduce in
    its module's forward, and the loop runs the decoder and the fused head on the LM head's weight in one function
    rather than through the model's own forward."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, compute):
        return compute()


def _call(compute):
    return compute()


def data_parallel(model, fsdp: bool, world: int, device, from_first_process: bool = False):
    """(run, no_sync) for the loop: `run(compute)` returns `compute()`, which runs the decoder and reads the LM head's
    weight, with the parameters whole and their gradients reduced over the processes by the end of backward;
    `no_sync()` holds back that reduction for the micro-batches before an accumulation window's last one.

    One process: `compute()` itself. Several: DDP over a module whose forward is `compute()`. With `fsdp`, the
    model sharded (shard_model) and `compute()` run as a forward method of its root, where the root's own
    parameters (embeddings, final norm, LM head) are whole: FSDP unshards them for the root's forwards only, and
    the head's weight is read outside the model's forward. FSDP reduce-scatters each micro-batch's gradients into
    the shards (no_sync does nothing), so no whole gradient is kept between them. `from_first_process`: see
    shard_model."""
    if fsdp:
        shard_model(model, world, device, from_first_process)
        return model.pyprefopt_forward, contextlib.nullcontext
    if world == 1:
        return _call, contextlib.nullcontext
    from torch.nn.parallel import DistributedDataParallel

    # The trainable weights were broadcast from rank 0 already (init_sync would send the frozen ones too), and no
    # buffer changes while training.
    ddp = DistributedDataParallel(_Forward(model), device_ids=[device] if device.type == "cuda" else None,
                                  init_sync=False, forward_sync_buffers=False)
    return ddp, ddp.no_sync


def shard_model(model, world: int, device, from_first_process: bool = False):
    """FSDP2 over the processes: each decoder layer (the classes in the model's `_no_split_modules`) sharded as a
    group of its own, then the root with the rest; `model.pyprefopt_forward(compute)` runs `compute()` as a forward
    of the root. Raises RunError for a model that names no layer class.

    `from_first_process`: every process holds the model's skeleton, its parameters on the meta device, but the first
    process, whose model carries the FirstProcessWeights its weights come from (pyprefopt.model_loading). Once
    sharded, every process gets memory for its shards and buffers alone, and the first process hands each process
    its rows of each weight, and every buffer, one weight at a time."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in layer_classes]
    if not layers:
        raise RunError(f"--fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules) to shard "
                       "by; train it without --fsdp")
    weights = None
    if from_first_process and dist.get_rank() == 0:
        weights = getattr(model, FIRST_PROCESS_WEIGHTS)
        delattr(model, FIRST_PROCESS_WEIGHTS)  # what it holds is freed once handed out
    mesh = init_device_mesh(device.type, (world,))
    # The CLI trains fp32 weights (under bf16 autocast on CUDA, see last_hidden): gathered in fp32, they compute
    # what they do without --fsdp, and gradients are reduced in fp32.
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
    # bitsandbytes' 4-bit weights (Params4bit) hold their quantisation state, which the plain DTensor shards
    # fully_shard makes of a weight would drop: left whole on every process (frozen, and a quarter of 16-bit's size).
    bnb = sys.modules.get("bitsandbytes")
    whole_4bit = {param for param in model.parameters() if bnb is not None and isinstance(param, bnb.nn.Params4bit)}
    for layer in reversed(layers):  # a layer inside another is sharded first
        fully_shard(layer, mesh=mesh, mp_policy=policy, ignored_params=whole_4bit)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=whole_4bit)
    if from_first_process:
        _fill_from_first_process(model, weights, device)
    model.pyprefopt_forward = types.MethodType(lambda self, compute: compute(), model)
    register_fsdp_forward_method(model, "pyprefopt_forward")


class FirstProcessWeights:
    """What the first process of a sharded run fills every process's shards and buffers from (see shard_model), by
    the name of each parameter and buffer of its model: `held`, tensors it holds whole (a loaded model's own, or a
    skeleton's LoRA factors, --adapter's weights and computed buffers), and `stored`, where the checkpoint keeps the
    others (pyprefopt.safetensors_io entries), each read when its turn comes, a block of rows at a time."""

    def __init__(self, held: dict[str, torch.Tensor], stored: dict[str, TensorEntry]):
        self.held, self.stored = held, stored

    def rows(self, name: str, rows: range | None = None) -> torch.Tensor:
        """Rows `rows` of tensor `name` (all of it: None) as held or as stored, in the dtype it has there."""
        if name in self.held:
            whole = self.held[name]
            return whole if rows is None else whole[rows.start:rows.stop]
        return read_tensor(self.stored[name], rows=rows)


def _fill_from_first_process(model, weights: FirstProcessWeights | None, device):
    """A sharded model's shards and buffers on every process set from the first process's `weights` (None on the
    others). Each process receives its own rows of each parameter alone, the first process reading and sending one
    process's rows at a time, so that beyond its shards it never holds more than one process's rows of one weight
    (the embedding's whole is as large as the rest of a small model); the buffers, the non-persistent ones (a rotary
    embedding's inv_freq) included, are broadcast whole."""
    from torch.distributed.tensor import DTensor

    model.to_empty(device=device)
    world, rank = dist.get_world_size(), dist.get_rank()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not isinstance(param, DTensor):
                if rank == 0:
                    param.data.copy_(weights.rows(name))
                dist.broadcast(param.data, 0)
                continue
            # fully_shard (given no shard_placement_fn) shards dim 0 as torch.chunk does: `rows` rows a process, the
            # last ones shorter or empty.
            local, rows = param.to_local(), -(-param.shape[0] // world)
            if rank != 0:
                if len(local):
                    dist.recv(local, 0)
                continue
            for owner in range(world):
                block = range(min(owner * rows, param.shape[0]), min((owner + 1) * rows, param.shape[0]))
                if not block:
                    continue
                if owner == 0:
                    local.copy_(weights.rows(name, block))
                else:
                    dist.send(weights.rows(name, block).to(device, param.dtype).contiguous(), owner)
        for name, buffer in model.named_buffers():
            if rank == 0:
                buffer.copy_(weights.rows(name))
            dist.broadcast(buffer, 0)


def is_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gather_trainable(model) -> dict[str, torch.Tensor]:
    """A sharded model's trainable weights, whole, on rank 0's CPU (empty elsewhere); every process calls this."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                ignore_frozen_params=True))


@contextlib.contextmanager
def whole_parameters(model, whole: dict[str, torch.Tensor] | None):
    """Within the block, the model's parameters named in `whole` (gather_trainable's) are those whole tensors
    instead of their shards, a parameter shared under two names (a tied head) still one, so that what writes
    the model's files reads them as any model's; None leaves the model as it is."""
    if whole is None:
        yield model
        return
    named = list(model.named_parameters(remove_duplicate=False))
    replacement = {id(param): torch.nn.Parameter(whole[name], requires_grad=False)
                   for name, param in named if name in whole}
    swapped = []
    for name, param in named:
        if id(param) in replacement:
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name)
            swapped.append((owner, leaf, param))
            owner._parameters[leaf] = replacement[id(param)]
    try:
        yield model
    finally:
        for owner, leaf, param in swapped:
            owner._parameters[leaf] = param


def log(rank, message):
    """A line on stderr from the first process only: every process runs the same code and would say it again."""
    if rank == 0:
        print(message, file=sys.stderr, flush=True)
