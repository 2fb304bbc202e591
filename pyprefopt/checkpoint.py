"""A train run's directory as a --resume finds it: checkpoints/step-<N>/ (the trainable weights, optimizer state,
schedule, RNG and data position; sharded with --fsdp, by torch.distributed.checkpoint, so that another number of
processes may read them back), the cached reference log-probs beside them, and run_args.json, against which a
--resume's options are checked. Every file is written to a staging directory and renamed into place, so a killed run
leaves complete files or none; a damaged checkpoint is reported and the one before it used.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from pyprefopt import losses
from pyprefopt.distributed import is_sharded, log
from pyprefopt.errors import RunError
from pyprefopt.files import publishable, remove_stale_staging, staging_dir

CHECKPOINTS = "checkpoints"
REFERENCE_FILE = "reference_logps.safetensors"
# A --fsdp checkpoint's trainable weights and optimizer state: torch.distributed.checkpoint's directory.
SHARDED_STATE = "sharded"
RUN_ARGS_FILE = "run_args.json"
# Options that may differ between a run and its --resume (they do not change what is computed, only when it is
# saved or what backward recomputes rather than keeps).
RESUMABLE_CHANGES = {"resume", "eval_every", "save_every", "save_total_limit", "merge", "output_dir",
                     "gradient_checkpointing", "recompute_mlp"}
# Options a --resume may change with the number of processes, as long as the checkpoint's global batch, and the
# split that the method's loss depends on, stay the same (check_batch_split).
BATCH_SPLIT_OPTIONS = {"batch_size", "grad_accum"}


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _flatten_state(state, prefix="", seen=None):
    """A nested state dict split into tensors keyed by their slash-joined path (for safetensors) and the nested
    plain JSON values. A tensor whose storage was met before (bitsandbytes' 8-bit AdamW shares its quantisation
    maps between parameters) is saved as a copy, since safetensors stores no shared tensors."""
    seen = set() if seen is None else seen
    tensors, plain = {}, {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            storage = tensor.untyped_storage().data_ptr()
            tensors[name] = tensor.clone() if storage in seen else tensor
            seen.add(storage)
        elif isinstance(value, dict):
            sub_tensors, sub_plain = _flatten_state(value, name + "/", seen)
            tensors.update(sub_tensors)
            plain[str(key)] = sub_plain
        else:
            plain[str(key)] = value
    return tensors, plain


def _unflatten_optimizer_state(tensors, plain):
    """The optimizer state dict back from _flatten_state's halves (JSON turned its parameter ids into strings)."""
    state = json.loads(json.dumps(plain))
    for path, tensor in tensors.items():
        *parents, leaf = path.split("/")
        node = state
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = tensor
    return {"state": {int(k): v for k, v in state.get("state", {}).items()}, "param_groups": state["param_groups"]}


def save_checkpoint(output_dir: Path, step, model, optimizer, scheduler, keep: int, data_position: dict, rank=0):
    """checkpoints/step-<N>/: trainable weights, optimizer state and RNG in safetensors, the rest in JSON (the
    scheduler, and the data position: the epoch's seeded order is rebuilt from it); written to a staging
    directory and renamed into place, then the oldest beyond `keep` removed. `optimizer=None` for the final
    step's checkpoint: nothing will step again, and it keeps the trained weights safe while the outputs are
    written (a resume from it only writes them).

    A sharded (--fsdp) model's trainable weights and optimizer state go to SHARDED_STATE/ instead, written by
    torch.distributed.checkpoint, each process its own shards (any number of processes reads them back): every
    process calls this then, rank 0 alone otherwise."""
    from safetensors.torch import save_file

    sharded = is_sharded(model)
    root = output_dir / CHECKPOINTS
    final = root / f"step-{step:08d}"
    staging = staging_dir(root, "step") if rank == 0 else None
    if sharded:
        shared = [staging]
        dist.broadcast_object_list(shared, 0)
        staging = shared[0]
    try:
        if sharded:
            save_sharded_state(staging / SHARDED_STATE, model, optimizer)
        if rank == 0:
            if sharded:
                opt_plain = None if optimizer is None else {}  # its state is all in SHARDED_STATE/
            else:
                save_file({k: v.detach().cpu().contiguous() for k, v in trainable_parameters(model).items()},
                          staging / "trainable.safetensors")
                opt_plain = None
                if optimizer is not None:
                    opt_tensors, opt_plain = _flatten_state(optimizer.state_dict())
                    save_file(opt_tensors, staging / "optimizer.safetensors")
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            save_file(rng, staging / "rng.safetensors")
            state = {"step": step, "data_position": data_position, "optimizer": opt_plain,
                     "scheduler": scheduler.state_dict()}
            (staging / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
            if final.exists():
                # A damaged checkpoint of this step, skipped by the --resume that led here.
                shutil.rmtree(final)
            os.rename(publishable(staging), final)
    finally:
        if rank == 0 and staging.exists():
            shutil.rmtree(staging)
    if rank == 0:
        for old in sorted(root.glob("step-*"))[:-keep] if keep else []:
            shutil.rmtree(old)
    return final


def _sharded_state(model, optimizer) -> dict:
    """A sharded model's trainable weights and, unless `optimizer` is None, the optimizer's state, as
    torch.distributed.checkpoint's state dict: this process's shards, keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    if optimizer is None:
        return {"model": get_model_state_dict(model, options=options)}
    model_state, optimizer_state = get_state_dict(model, optimizer, options=options)
    return {"model": model_state, "optimizer": optimizer_state}


def _first_failure(error) -> BaseException:
    """The exception of the first process that failed, from torch.distributed.checkpoint's CheckpointException."""
    return next(iter(error.failures.values()))[0]


def save_sharded_state(directory: Path, model, optimizer):
    """torch.distributed.checkpoint's files of _sharded_state in `directory` (every process writes its own)."""
    import torch.distributed.checkpoint as dcp

    try:
        dcp.save(_sharded_state(model, optimizer), checkpoint_id=directory)
    except dcp.CheckpointException as e:
        failure = _first_failure(e)
        if isinstance(failure, OSError):
            raise failure from None  # main() reports it (a full disk, say) as it reports any other write's
        raise


def load_sharded_state(directory: Path, model, optimizer):
    """save_sharded_state's files read into the model (and the optimizer unless None), resharded for this run's
    processes. Raises DamagedCheckpoint when they cannot be read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    state = _sharded_state(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=directory)
    except dcp.CheckpointException as e:
        failure = _first_failure(e)
        raise DamagedCheckpoint(f"{directory} is damaged ({type(failure).__name__}: {failure})") from None
    # Not strict: the frozen weights, never in the checkpoint, are the base's (apply_checkpoint compared the rest).
    options = StateDictOptions(ignore_frozen_params=True, strict=False)
    if optimizer is None:
        set_model_state_dict(model, state["model"], options=options)
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=options)


def read_reference(path: Path, device, rank) -> dict | None:
    """The cached reference log-probs, or None (recomputed then) when the file is missing or damaged."""
    from safetensors.torch import load_file

    try:
        saved = load_file(path, device=str(device))
    except (OSError, SafetensorError) as e:
        if path.exists():
            log(rank, f"recomputing the reference log-probs: {path} is damaged ({e})")
        return None
    return saved if {"train", "eval"} <= set(saved) else None


def checkpoints_newest_first(output_dir: Path) -> list[Path]:
    return sorted((output_dir / CHECKPOINTS).glob("step-*"), reverse=True)


class DamagedCheckpoint(RunError):
    """A checkpoint's file is missing or cannot be read: a --resume tries the one before it."""


def read_checkpoint(path: Path, device) -> dict:
    """Every file of a checkpoint read and parsed, nothing applied yet: a damaged one (a truncated file, say) is
    found before it has changed the model. Of a sharded (--fsdp) checkpoint only the index of SHARDED_STATE/ is
    read here (its trainable tensors' names, under SHARDED_STATE), its shards by load_sharded_state. Raises
    DamagedCheckpoint naming the file."""
    import pickle

    from safetensors.torch import load_file

    current = path / "state.json"
    try:
        state = json.loads(current.read_text(encoding="utf-8"))
        if (path / SHARDED_STATE).is_dir():
            from torch.distributed.checkpoint import FileSystemReader

            current = path / SHARDED_STATE / ".metadata"
            keys = FileSystemReader(path / SHARDED_STATE).read_metadata().state_dict_metadata
            state[SHARDED_STATE] = {key.removeprefix("model.") for key in keys if key.startswith("model.")}
        else:
            current = path / "trainable.safetensors"
            state["trainable"] = load_file(current)
            if state["optimizer"] is not None:
                current = path / "optimizer.safetensors"
                state["optimizer_tensors"] = load_file(current, device=str(device))
        current = path / "rng.safetensors"
        state["rng"] = load_file(current)
    except (OSError, ValueError, SafetensorError, pickle.UnpicklingError, EOFError) as e:
        raise DamagedCheckpoint(f"{current} is damaged or missing ({type(e).__name__}: {e})") from e
    fields = {"step": int, "data_position": dict, "optimizer": (dict, type(None)), "scheduler": dict}
    if any(not isinstance(state.get(key), kind) for key, kind in fields.items()) or \
            "examples_per_step" not in state["data_position"]:
        raise DamagedCheckpoint(f"{path / 'state.json'} is damaged: it lacks one of {sorted(fields)}")
    return state


def check_batch_split(path: Path, position: dict, args, world: int):
    """Refuse a checkpoint whose steps this run would compute differently: another global batch; for a method with a KL
    batch (kto) another global micro-batch (--batch-size x processes: its KL completions rotate, and its KL point is
    taken, within each); for one with a token-mean term (cpo, orpo) another --batch-size (its NLL term is a mean over
    each micro-batch's tokens). Otherwise how the
    global batch is split into micro-batches and processes may change, so a run resumes with another number of
    processes."""
    global_batch = args.batch_size * args.grad_accum * world
    # A checkpoint from before splits were recorded was resumable only with its run's split (check_resume_args).
    position = {"batch_size": args.batch_size, "processes": world} | position
    if position["examples_per_step"] != global_batch:
        raise RunError(f"{path} was written with {position['examples_per_step']} examples per step, this run takes "
                       f"{global_batch} (batch size x accumulation x processes): resume with the same global batch")
    written_micro = position["batch_size"] * position["processes"]
    record = losses.METHODS[args.method]
    if record.kl_batch and written_micro != args.batch_size * world:
        raise RunError(f"{path} was written with a global micro-batch of {written_micro} examples (--batch-size x "
                       f"processes), this run takes {args.batch_size * world}: kto's KL completions and KL point "
                       f"come from each, so resume with --batch-size x processes = {written_micro}")
    if record.token_mean_term and position["batch_size"] != args.batch_size:
        raise RunError(f"{path} was written with --batch-size {position['batch_size']}, this run has "
                       f"{args.batch_size}: {args.method}'s NLL term is a mean over each micro-batch's tokens, so "
                       f"resume with --batch-size {position['batch_size']}")


def apply_checkpoint(path: Path, state: dict, model, optimizer, scheduler, args, world, total_steps) -> int:
    """Restore what read_checkpoint read; returns the checkpoint's step. Nothing is unpickled but the index of a
    sharded checkpoint's SHARDED_STATE/ (torch.distributed.checkpoint's format pickles it)."""
    params = trainable_parameters(model)
    sharded = SHARDED_STATE in state
    saved = state[SHARDED_STATE] if sharded else set(state["trainable"])
    # A sharded state dict names a parameter under each of its names (a tied head's too).
    names = set(_sharded_state(model, None)["model"]) if sharded else set(params)
    if saved != names:
        raise RunError(f"{path}: its trainable tensors do not match this model's "
                       f"(missing {sorted(names - saved)[:3]}, extra {sorted(saved - names)[:3]})")
    check_batch_split(path, state["data_position"], args, world)
    if state["optimizer"] is None and state["step"] != total_steps:
        raise RunError(f"{path} is the final checkpoint of a {state['step']}-step run; this run has {total_steps} "
                       "steps")
    if sharded:
        load_sharded_state(path / SHARDED_STATE, model, None if state["optimizer"] is None else optimizer)
    else:
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state["trainable"][name])
        if state["optimizer"] is not None:
            optimizer.load_state_dict(_unflatten_optimizer_state(state["optimizer_tensors"], state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["cpu"])
    if "cuda" in state["rng"]:
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state["step"]


def resume_from_checkpoint(output_dir: Path, model, optimizer, scheduler, device, args, world, total_steps,
                           rank) -> tuple[int, Path | None]:
    """(step, checkpoint) of the newest intact checkpoint, (0, None) when there is none; a damaged one is
    reported and the one before it tried (which sets everything a damaged sharded one may have half loaded)."""
    damaged = []
    for path in checkpoints_newest_first(output_dir):
        try:
            state = read_checkpoint(path, device)
            return apply_checkpoint(path, state, model, optimizer, scheduler, args, world, total_steps), path
        except DamagedCheckpoint as e:
            log(rank, f"skipping checkpoint {path.name}: {e}")
            damaged.append(str(e))
    if damaged:
        raise RunError(f"no intact checkpoint in {output_dir / CHECKPOINTS}: {'; '.join(damaged)}. Delete the "
                       "damaged ones to restart from step 0, or rerun without --resume in a new --output-dir")
    return 0, None


def check_output_dir(output_dir: Path, args):
    """Refuse an output directory this run may not write to, before anything is read or written."""
    if output_dir.exists() and not output_dir.is_dir():
        raise RunError(f"--output-dir {output_dir} is a file, not a directory")
    has_content = output_dir.is_dir() and any(output_dir.iterdir())
    if has_content and not args.resume:
        raise RunError(f"--output-dir {output_dir} is not empty: pass --resume to continue the run there, or "
                       "name another --output-dir")
    if has_content and not (output_dir / RUN_ARGS_FILE).is_file():
        raise RunError(f"--resume: {output_dir} is not a pyprefopt run (it has no {RUN_ARGS_FILE}), so nothing "
                       "there was touched: name the run's directory, or a new --output-dir")
    if args.resume and (output_dir / RUN_ARGS_FILE).is_file():
        check_resume_args(output_dir, args)


def make_output_dir(output_dir: Path, rank):
    """The output directory, created and shown writable, cleared of what a killed earlier run left half-written."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        for directory in (output_dir, output_dir / CHECKPOINTS):
            for path in remove_stale_staging(directory):
                log(rank, f"removed {path}, left half-written by an interrupted run")
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as e:
        raise RunError(f"--output-dir {output_dir}: cannot write there ({e.strerror}); name a writable "
                       "directory") from e


def check_resume_args(output_dir: Path, args):
    path = output_dir / RUN_ARGS_FILE
    saved = json.loads(path.read_text(encoding="utf-8"))
    current = vars(args)
    # A run from before an option existed ran without it: its absence matches the option left off. Such a run also
    # predates resuming with another batch split, so its split must stay.
    fixed = RESUMABLE_CHANGES if "fsdp" not in saved else RESUMABLE_CHANGES | BATCH_SPLIT_OPTIONS
    changed = {k: (saved.get(k), v) for k, v in current.items()
               if k not in fixed and saved.get(k) != v and not (k not in saved and v in (None, False))}
    if changed:
        raise RunError(f"--resume with different options than the run in {output_dir}: "
                         + ", ".join(f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in changed.items()))
