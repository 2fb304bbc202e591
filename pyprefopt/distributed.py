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

    `from_first_process`: the first process holds the loaded model and the others its skeleton, with parameters and
    buffers on the meta device (pyprefopt.model_loading). Once sharded, the skeletons get memory for their shards
    and buffers alone, and every process's shards and buffers are filled from the first process's, whose whole copy
    is then dropped."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    layers = [module for module in model.modules() if type(module).__name__ in layer_classes]
    if not layers:
        raise RunError(f"--fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules) to shard "
                       "by; train it without --fsdp")
    loaded = dict(model.named_parameters()) if from_first_process and dist.get_rank() == 0 else None
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
        _fill_from_first_process(model, loaded, device)
    model.pyprefopt_forward = types.MethodType(lambda self, compute: compute(), model)
    register_fsdp_forward_method(model, "pyprefopt_forward")


def _fill_from_first_process(model, loaded: dict[str, torch.Tensor] | None, device):
    """A sharded model's shards and buffers on every process set from the first process's: `loaded` holds its
    parameters as they were before sharding (None on the others, whose model is still on the meta device). Each process
    receives its own shard of each parameter alone (a scatter, where a broadcast would put every whole tensor, the
    embedding among them, on every process), and the buffers whole, the non-persistent ones (a rotary embedding's
    inv_freq) included."""
    from torch.distributed.tensor import DTensor

    if loaded is None:
        model.to_empty(device=device)
    world, rank = dist.get_world_size(), dist.get_rank()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not isinstance(param, DTensor):
                dist.broadcast(param.data, 0)
                continue
            # fully_shard (given no shard_placement_fn) shards dim 0 as torch.chunk does: `rows` rows a process, the
            # last ones shorter or empty.
            local, rows = param.to_local(), -(-param.shape[0] // world)
            received = local if len(local) == rows else local.new_empty((rows, *param.shape[1:]))
            chunks = None
            if rank == 0:
                whole = loaded[name].to(received.device, received.dtype)
                chunks = [whole[r * rows:(r + 1) * rows] for r in range(world)]
                chunks = [chunk if len(chunk) == rows else torch.cat([chunk, chunk.new_zeros(rows - len(chunk),
                                                                                                *chunk.shape[1:])])
                          for chunk in chunks]
            dist.scatter(received, chunks, src=0)
            if received is not local:
                local.copy_(received[:len(local)])
        for buffer in model.buffers():
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
