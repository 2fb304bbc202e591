"""`python -m pyprefopt.train --method {sft,dpo,ipo,cpo,kto,orpo}` (`pyprefopt.losses.METHODS`): LoRA / QLoRA /
full fine-tuning with pyprefopt's fused losses, on the embedded default (tiny Qwen3 + the bundled Arabic/Persian
data) or on any local checkpoint and data set. `--help` lists every option with its default.

`train()` is the loop; `Recipe` holds the run's state and one method per stage, in order:
1. data (`Recipe.setup`): load, check, tokenise (pyprefopt.data);
2. model (pyprefopt.model_loading): `--model` or the cached default (pyprefopt.default_model), LoRA layers injected
   (pyprefopt.lora) or loaded from --adapter, NF4 base with --load-in-4bit; wrapped for the processes
   (pyprefopt.distributed);
3. reference log-probs (the methods with a reference: dpo, ipo, kto): every example's, once, from the same model
   with its adapters disabled (for --full: before the first update), cached in the run's directory;
4. steps (`Recipe.step`): each micro-batch runs the decoder to its last hidden state and `FusedLinearPreferenceLoss`
   on the LM head's weight (no logits tensor), gradients accumulate, are summed over processes, clipped,
   and AdamW (torch's fused kernel, as the HF Trainer's default) steps; metrics go to metrics.jsonl every
   step. On CPU the decoder runs a micro-batch's sequences packed into one row without padding, each with
   its own positions and causal attention (see last_hidden): the same states, no padded tokens computed.
   Which examples share a micro-batch does not change;
5. evaluation (`Recipe.evaluate`) on the held-out split before the first step, every --eval-every steps and at the
   end;
6. checkpoints (`Recipe.checkpoint`, pyprefopt.checkpoint) every --save-every steps (atomic; --resume continues
   bit-for-bit);
7. output (`Recipe.write_outputs`): PEFT adapter (or full model), tokenizer, metrics, plots, model card; --merge.

Data parallel: under `torchrun --nproc_per_node N`, each process takes its slice of every global batch.
Every process holds the whole model and DDP all-reduces the trainable gradients at the end of each
accumulation window; with --fsdp the model is sharded instead (FSDP2's `fully_shard`: each decoder layer,
then the root with the embeddings, final norm and LM head), each process holding its shard of the weights,
gradients and optimizer state (the first process alone reads the checkpoint, the others receive their shards of
it; a --load-in-4bit base stays whole on each process, which loads it), and checkpoints are sharded
(torch.distributed.checkpoint) so that a --resume may use another number of processes. The decoder and the fused
head run in one function that runs as a forward of the DDP module or of the FSDP root (see
pyprefopt.distributed.data_parallel). Every loss is a mean
over "items" (`Method.mean_over`: target tokens for sft, pairs for dpo/ipo/cpo/orpo, rows for kto), and each
micro-batch's loss is weighted by its share of the global batch's items, so N processes with batch B compute the same
step as one process with batch N*B (for a loss with a token-mean term, the NLL of cpo and orpo, a per-batch token mean
as TRL's, it matches only approximately).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import math
import os
import platform
import resource
import shutil
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from pyprefopt import data as D
from pyprefopt import losses
from pyprefopt.checkpoint import (
    CHECKPOINTS,
    REFERENCE_FILE,
    RUN_ARGS_FILE,
    check_output_dir,
    checkpoints_newest_first,
    make_output_dir,
    read_reference,
    resume_from_checkpoint,
    save_checkpoint,
    trainable_parameters,
)
from pyprefopt.distributed import (
    all_reduce_sum,
    data_parallel,
    gather_trainable,
    is_sharded,
    log,
    setup_distributed,
    whole_parameters,
)
from pyprefopt.errors import RunError
from pyprefopt.files import atomic_write, atomic_write_text, publishable, staging_dir
from pyprefopt.fused_linear_preference_loss import FusedLinearPreferenceLoss
from pyprefopt.head_config import head_logit_transform, head_operands
from pyprefopt.memory import bound_onednn_caches
from pyprefopt.model_loading import (
    COMPUTE_DTYPES,
    checkpoint_dir,
    compute_dtype,
    first_process_loads,
    load_model,
    read_adapter_options,
)
from pyprefopt.packed_attention import PACKED_ATTENTION, packed_last_hidden

# The LoRA options' defaults; with --adapter they come from the adapter's adapter_config.json instead.
LORA_DEFAULTS = {"lora_r": 16, "lora_alpha": 32.0, "lora_dropout": 0.0, "target_modules": "all-linear"}
DEFAULT_WARMUP_RATIO = 0.1
METRICS_FILE = "metrics.jsonl"
# Most decoder calls one micro-batch is split into when its rows are not packed (see last_hidden).
MAX_LENGTH_GROUPS = 4


# --------------------------------------------------------------------------------------------- options


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to every option's help unless the help already says what the default is."""

    def _get_help_string(self, action):
        if "default" in (action.help or "") or action.required:
            return action.help
        return super()._get_help_string(action)


class _ArgumentParser(argparse.ArgumentParser):
    """A bad option is one `error: ...` line and exit status 2 (argparse's own prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"error: {message} (`{self.prog} --help` lists every option)\n")


def _methods_with_option(dest):
    return [m.name for m in losses.METHODS.values() if dest in m.options.values()]


def parse_args(argv=None) -> argparse.Namespace:
    p = _ArgumentParser(
        prog="python -m pyprefopt.train",
        description=f"Fine-tune a causal LM with {', '.join(name.upper() for name in losses.METHODS)} (LoRA by "
        "default). With no --model and no --data it trains the embedded default: a tiny Qwen3 built offline and the "
        "bundled data.",
        formatter_class=_DefaultsHelpFormatter,
    )
    p.add_argument("--method", required=True, choices=tuple(losses.METHODS), help="training objective")
    p.add_argument("--model", default=None,
                   help="local transformers checkpoint or hub id; default: the embedded tiny Qwen3 "
                   "(built and cached under $PYPREFOPT_CACHE or ~/.cache/pyprefopt at first use)")
    p.add_argument("--data", default=None,
                   help="a directory with train.* and test.* (.jsonl/.json/.parquet), one such file, or a "
                   f"`datasets` name; default: the bundled pyprefopt/data/{{{','.join(losses.DATA_FORMATS)}}}/")
    p.add_argument("--eval-data", default=None, help="held-out file; default: the data's test split, else "
                   f"{D.HELD_OUT_FRACTION:.0%}% of the training rows")
    p.add_argument("--output-dir", default=None, help="default: runs/<method>-<UTC time>")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in --output-dir (start fresh if it has none)")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps; default: --epochs worth")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the training set (when no --max-steps)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch per process")
    p.add_argument("--eval-batch-size", type=int, default=16, help="examples per evaluation batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--lr-scheduler", default="cosine", choices=("linear", "cosine", "constant_with_warmup"),
                   help="decay after warmup (transformers' schedulers)")
    p.add_argument("--warmup-ratio", type=float, default=None,
                   help=f"share of the steps spent warming up; default: {DEFAULT_WARMUP_RATIO} unless --warmup-steps")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="optimizer steps spent warming up (a count, instead of --warmup-ratio); default: none")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: none)")
    p.add_argument("--optim", default="adamw", choices=("adamw", "adamw_8bit"),
                   help="AdamW from torch, or bitsandbytes' 8-bit AdamW")
    p.add_argument("--beta", type=float, default=0.1, help=f"beta of {'/'.join(_methods_with_option('beta'))} "
                   "(ORPO's lambda)")
    p.add_argument("--cpo-alpha", type=float, default=1.0, help="weight of CPO's NLL term")
    p.add_argument("--desirable-weight", type=float, default=1.0, help="KTO weight of desirable rows")
    p.add_argument("--undesirable-weight", type=float, default=1.0, help="KTO weight of undesirable rows")
    p.add_argument("--max-length", type=int, default=512,
                   help="tokens per sequence (prompt + completion); longer ones are cut at the end")
    p.add_argument("--seed", type=int, default=0, help="seeds the adapter init, data order and dropout")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: before and after only)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: none)")
    p.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept")
    from_adapter = ", or the --adapter's"
    p.add_argument("--lora-r", type=int, default=None,
                   help=f"LoRA rank; default: {LORA_DEFAULTS['lora_r']}{from_adapter}")
    p.add_argument("--lora-alpha", type=float, default=None,
                   help=f"LoRA alpha (scale alpha / r); default: {LORA_DEFAULTS['lora_alpha']}{from_adapter}")
    p.add_argument("--lora-dropout", type=float, default=None,
                   help=f"dropout on the LoRA branch's input; default: {LORA_DEFAULTS['lora_dropout']}{from_adapter}")
    p.add_argument("--target-modules", default=None,
                   help="'all-linear', a regex, or comma-separated module names (PEFT's rules); default: "
                   f"{LORA_DEFAULTS['target_modules']}{from_adapter}")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="start from this PEFT LoRA adapter (e.g. an SFT run's --output-dir) instead of a fresh one: "
                   "its rank, alpha, dropout and target modules are kept, and a new run starts (--resume continues "
                   f"a run). The reference model of "
                   f"{'/'.join(m.name for m in losses.METHODS.values() if m.needs_reference)} "
                   "stays the base with the adapter disabled, as in TRL "
                   "with a PEFT model; default: none")
    p.add_argument("--load-in-4bit", action="store_true", help="QLoRA: the base in bitsandbytes NF4")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each decoder layer's activations in backward (keeps only each layer's input)")
    p.add_argument("--recompute-mlp", action="store_true",
                   help="each MLP keeps only its input and recomputes gate_proj, up_proj and the gating in backward "
                   "(and down_proj where it has a LoRA branch): about half the decoder's activations for two of the "
                   "MLP's three GEMMs again (all three with LoRA on down_proj)")
    p.add_argument("--dtype", default=None, choices=tuple(COMPUTE_DTYPES),
                   help="compute dtype: bf16 runs the model under bf16 autocast and keeps its frozen weights in bf16 "
                   "(half the memory); trained weights (the adapter, or every weight with --full) and the optimizer "
                   "state stay fp32, and the head accumulates in fp32 either way; default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun, shard the weights, gradients and optimizer state over the processes (PyTorch "
                   "FSDP2) instead of a full copy each (a --load-in-4bit base stays whole on each); checkpoints are "
                   "sharded and a --resume may use another number of processes (keeping the global batch)")
    p.add_argument("--merge", action="store_true",
                   help="also write the base merged with the adapter (bf16) to <output-dir>/merged")
    args = p.parse_args(argv)
    if args.adapter is None:
        for name, value in LORA_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
    if args.recompute_mlp and args.gradient_checkpointing:
        p.error("--recompute-mlp with --gradient-checkpointing: the layer's checkpoint already recomputes its MLP; "
                "give one of them")
    for name in ("batch_size", "eval_batch_size", "grad_accum", "lora_r"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_length < 2:
        p.error("--max-length must be at least 2 (a prompt token and a completion token)")
    # Every value is checked here, before anything is read or written, so a typo never leaves a half-made run.
    if "beta" in losses.METHODS[args.method].options and not (args.beta > 0 and math.isfinite(args.beta)):
        p.error(f"--beta must be a finite number > 0 for {args.method}, got {args.beta}")
    for name in ("cpo_alpha", "weight_decay", "max_grad_norm"):
        value = getattr(args, name)
        if not (value >= 0 and math.isfinite(value)):
            p.error(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")
    for name in ("desirable_weight", "undesirable_weight", "lora_alpha"):
        value = getattr(args, name)
        if value is not None and not (value > 0 and math.isfinite(value)):
            p.error(f"--{name.replace('_', '-')} must be a finite number > 0, got {value}")
    if args.lora_dropout is not None and not 0 <= args.lora_dropout < 1:
        p.error(f"--lora-dropout must be in [0, 1), got {args.lora_dropout}")
    for name in ("eval_every", "save_every", "save_total_limit"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.max_steps is not None and args.max_steps < 1:
        p.error("--max-steps must be at least 1")
    if not args.epochs > 0:
        p.error("--epochs must be > 0")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        p.error(f"--lr must be a finite number > 0, got {args.lr}")
    if args.warmup_steps is not None and args.warmup_ratio is not None:
        p.error("--warmup-steps and --warmup-ratio both set the warmup: give one of them")
    if args.warmup_steps is None and args.warmup_ratio is None:
        args.warmup_ratio = DEFAULT_WARMUP_RATIO
    if args.warmup_ratio is not None and not 0 <= args.warmup_ratio < 1:
        p.error("--warmup-ratio must be in [0, 1)")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        p.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    if args.fsdp and args.optim == "adamw_8bit":
        p.error("--fsdp cannot step with --optim adamw_8bit: bitsandbytes' 8-bit AdamW takes plain tensors, not the "
                "DTensor shards FSDP2 gives an optimizer; use --optim adamw")
    if args.full and args.load_in_4bit:
        p.error("--full trains every weight: it cannot train an NF4 (--load-in-4bit) base")
    if args.full and args.adapter is not None:
        p.error("--adapter continues a LoRA adapter; --full trains every weight instead")
    if args.full and args.merge:
        p.error("--merge merges an adapter; --full writes the full model already")
    if args.output_dir is None:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        args.output_dir = str(Path("runs") / f"{args.method}-{stamp}")
    return args


# ------------------------------------------------------------------------------------------ device


def peak_memory_mib(device) -> float:
    """Peak GPU memory allocated, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware_description(device, world) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()} ({os.cpu_count()} logical CPUs), {torch.get_num_threads()} torch threads"
    return f"{world} processes x {name}" if world > 1 else name


# ------------------------------------------------------------------------------------------ model


def decoder_and_head(model):
    """The model body (returning last hidden states) and its LM head."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head)")
    return model.base_model, head


def length_groups(rows: int) -> int:
    """Decoder calls per batch: one per ~4 rows, at most 4 (each call costs a little fixed overhead)."""
    return max(1, min(MAX_LENGTH_GROUPS, rows // 4))


def last_hidden(decoder, input_ids, lengths, device, dtype=torch.float32):
    """Last hidden states [B, T, H] of right-padded rows; zero (packed) or the pad tokens' states (groups) past
    each row's `lengths`, which no label reads.

    No attention mask: rows are right-padded and attention is causal, so no real token ever attends to padding,
    and a row's states depend neither on the other rows nor on how far it is padded. On CPU (use_packed_attention)
    the real tokens of all rows run as one packed row, each sequence with its own positions 0..n-1 and attention
    (the packed SDPA attention runs each sequence's range alone, causal): no padding is computed at all, in one
    decoder call. Otherwise the rows run sorted by length in a few groups, each cut to its own longest row: the
    padding the decoder computes shrinks from B * max_len to about the sum of the lengths. Either way each real
    token's state is what the padded batch computes for it, up to the rounding of differently shaped GEMMs.
    A `dtype` other than fp32 runs the decoder under autocast to it (compute_dtype)."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        if getattr(decoder.config, "_attn_implementation", None) == PACKED_ATTENTION and int(lengths.min()) > 0:
            return packed_last_hidden(decoder, input_ids, lengths, device)
        order = torch.argsort(lengths, stable=True)
        width = input_ids.shape[1]
        outputs = []
        for rows in order.tensor_split(length_groups(len(order))):
            group_width = int(lengths[rows].max())
            hidden = decoder(input_ids=input_ids[rows, :group_width].to(device), use_cache=False).last_hidden_state
            outputs.append(torch.nn.functional.pad(hidden, (0, 0, 0, width - group_width)))
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return torch.cat(outputs)[inverse.to(device)]


def reference_context(model, full: bool):
    """The reference model: this model with its adapters off (LoRA), or as it is now (--full, before any step)."""
    import contextlib

    from pyprefopt.lora import disable_adapters

    return contextlib.nullcontext() if full else disable_adapters(model)


# ------------------------------------------------------------------------------------------ batches


def collate_rows(data: D.TokenizedData, indices: list[int], which: int, pad_id: int, score_prompt=False):
    """input_ids, aligned labels (`score_prompt`: the prompt's tokens too) and input lengths of completion `which` of
    each example in `indices`."""
    prompts = [data.prompts[i] for i in indices]
    completions = [data.completions[i][which] for i in indices]
    return D.rows_to_tensors(prompts, completions, data.max_length, pad_id, score_prompt)


@torch.no_grad()
def sequence_logps_all(model, run, data, pad_id, batch_size, device, rank, world, dtype=torch.float32, nll=False):
    """Summed completion log-probs [N, k] and completion lengths [N, k] of every completion of every
    example (k = data.rows_per_example), and with `nll` the summed log-probs [N] and token counts [N] of the first
    completion with its prompt (what ORPO's NLL term scores), computed in eval mode through `run`
    (data_parallel's); each process takes every world-th batch and the results are summed over processes. The
    processes of a sharded model run the decoder in step (each of its calls gathers every layer's weights from all
    of them): each takes as many batches as any other, all as wide, a short or missing one filled up with rows that
    are not kept."""
    decoder, head = decoder_and_head(model)
    loss_fn = FusedLinearPreferenceLoss("sft", **head_logit_transform(model.config))
    n, k = len(data), data.rows_per_example
    logps = torch.zeros(n, k, dtype=torch.float64, device=device)
    lengths = torch.zeros(n, k, dtype=torch.float64, device=device)
    nll_logps = torch.zeros(n, dtype=torch.float64, device=device)
    nll_lengths = torch.zeros(n, dtype=torch.float64, device=device)
    batches = [list(range(start, min(start + batch_size, n))) for start in range(0, n, batch_size)]
    in_step = world > 1 and is_sharded(model)
    if in_step:
        batches += [[]] * (-len(batches) % world)

    def score():
        for indices in batches[rank::world]:
            kept = len(indices)
            if in_step:
                indices = indices + [indices[0] if indices else 0] * (min(batch_size, n) - kept)
            for which in range(k):
                input_ids, labels, input_lengths = collate_rows(data, indices, which, pad_id)
                labels = labels.to(device)
                hidden, weight, bias = head_operands(last_hidden(decoder, input_ids, input_lengths, device, dtype),
                                                     head.weight, head.bias, dtype)
                with_prompt = nll and which == 0
                scored = collate_rows(data, indices, which, pad_id, score_prompt=True)[1].to(device) \
                    if with_prompt else labels
                token_logps = loss_fn.token_logps(hidden, weight, scored, bias)
                completion = labels != D.IGNORE_INDEX
                logps[indices[:kept], which] = torch.where(completion, token_logps, 0.0).sum(-1)[:kept].double()
                lengths[indices[:kept], which] = completion.sum(-1)[:kept].double()
                if with_prompt:
                    nll_logps[indices[:kept]] = token_logps.sum(-1)[:kept].double()
                    nll_lengths[indices[:kept]] = (scored != D.IGNORE_INDEX).sum(-1)[:kept].double()

    was_training = model.training
    model.eval()
    run(score)
    model.train(was_training)
    for sums in (logps, lengths, nll_logps, nll_lengths):
        all_reduce_sum(sums)
    if nll:
        return logps.float(), lengths.long(), nll_logps.float(), nll_lengths.long()
    return logps.float(), lengths.long()


def loss_hparams(args) -> dict:
    """The method's hyper-parameters from their options (`Method.options`)."""
    return {name: getattr(args, dest) for name, dest in losses.METHODS[args.method].options.items()}


def trained_rows(record, per_example):
    """The loss's rows of per-example values [N, k] (or [B, k]): a paired method's chosen rows then its rejected rows,
    else the first of each example's completions (the others being KTO's KL completions)."""
    return torch.cat([per_example[:, 0], per_example[:, 1]]) if record.paired else per_example[:, 0]


def evaluate(model, run, data, reference, args, pad_id, device, rank, world) -> dict:
    """Held-out metrics over the whole split at once (eval_ prefix): the method's loss and TRL's reward
    metrics (rewards/accuracies and margins of the pairs; KTO's with its KL point over the split), and for
    a token-mean NLL (sft) the loss and its perplexity."""
    record = losses.METHODS[args.method]
    stats = sequence_logps_all(model, run, data, pad_id, args.eval_batch_size, device, rank, world,
                               compute_dtype(args, device), nll=record.nll_over_labels)
    logps, lengths = stats[:2]
    kwargs = loss_hparams(args)
    if record.needs_reference:
        kwargs["ref_logps"] = trained_rows(record, reference)
    if record.desirable:
        kwargs["desirable"] = torch.tensor(data.labels, device=device)
    if record.kl_batch:
        kwargs.update(kl_logps=logps[:, 1], ref_kl_logps=reference[:, 1])
    if record.nll_over_labels:
        # The rejected rows' entries are not read: the NLL term scores the chosen rows.
        kwargs.update(nll_logps=torch.cat([stats[2], logps[:, 1]]), nll_lengths=torch.cat([stats[3], lengths[:, 1]]))
    loss, metrics = losses.from_sequence_stats(args.method, trained_rows(record, logps), trained_rows(record, lengths),
                                               **kwargs)
    if record.mean_over == "tokens":
        return {"eval_loss": loss.item(), "eval_perplexity": math.exp(loss.item())}
    out = {"eval_loss": loss.item()}
    out.update({f"eval_{name}": value.item() for name, value in metrics.items()})
    return out


def eval_summary(evaluations: list[dict]) -> str:
    """One line for the terminal: the held-out metrics that say whether training worked, first and last."""
    first, last = evaluations[0], evaluations[-1]
    names = [n for n in ("loss", "perplexity", "rewards/accuracies", "rewards/margins", "kl") if f"eval_{n}" in last]
    def fmt(value):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3f}"

    moves = ", ".join(f"{n} {fmt(first[f'eval_{n}'])} -> {fmt(last[f'eval_{n}'])}" for n in names)
    return f"held-out eval, step {first['step']} -> {last['step']}: {moves}"


def metric_weight(record, name, batch) -> float:
    """What a micro-batch's metric is averaged over: its items, or for the class means of a method with desirable
    rows (KTO) that class's rows."""
    if record.desirable and name.endswith("/chosen"):
        return float(batch["desirable"].sum())
    if record.desirable and name.endswith("/rejected"):
        return float((~batch["desirable"]).sum())
    return float(batch["items"])


def micro_batch_loss(model, loss_fn, batch, reference, args, device):
    """(loss, metrics) of one micro-batch from the decoder's last hidden states and the LM head weight; run through
    data_parallel's `run`."""
    decoder, head = decoder_and_head(model)
    record = losses.METHODS[args.method]
    dtype = compute_dtype(args, device)
    kwargs = {}
    index = batch["index"].to(device)
    if record.needs_reference:
        kwargs["ref_logps"] = trained_rows(record, reference[index])
    if record.desirable:
        kwargs["desirable"] = batch["desirable"].to(device)
    if record.nll_over_labels:
        kwargs["nll_labels"] = batch["nll_labels"].to(device)
    if record.kl_batch:
        # KTO's reference point z0 from the mismatched pairs, over the global micro-batch (all processes),
        # as TRL gathers it (Ethayarajh et al. 2024, Eq. 7); under no grad, as TRL computes it.
        with torch.no_grad():
            kl_hidden, weight, bias = head_operands(
                last_hidden(decoder, batch["kl_input_ids"], batch["kl_input_lengths"], device, dtype), head.weight,
                head.bias, dtype)
            kl_logps, _ = loss_fn.sequence_logps(kl_hidden, weight, batch["kl_labels"].to(device), bias)
            del kl_hidden
            stats = torch.stack([(kl_logps.double() - reference[index, 1].double()).sum(),
                                 torch.tensor(float(len(index)), dtype=torch.float64, device=device)])
            all_reduce_sum(stats)
            kwargs["kl"] = (stats[0] / stats[1]).float().clamp(min=0)
    hidden = last_hidden(decoder, batch["input_ids"], batch["input_lengths"], device, dtype)
    hidden, weight, bias = head_operands(hidden, head.weight, head.bias, dtype)
    return loss_fn(hidden, weight, batch["labels"].to(device), bias, **kwargs)


def global_batch_indices(step, n_examples, global_batch, seed):
    """The examples of optimizer step `step`: a seeded permutation per epoch, cut into global batches
    (an incomplete last batch of an epoch is dropped)."""
    steps_per_epoch = n_examples // global_batch
    epoch, position = divmod(step, steps_per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n_examples, generator=generator)
    return order[position * global_batch:(position + 1) * global_batch].tolist(), epoch


# --------------------------------------------------------------------------------------- output


def save_outputs(output_dir: Path, model, tokenizer, full: bool):
    """The adapter in PEFT's format (or the full model with --full) and the tokenizer, each file written to a
    staging directory and renamed into output_dir."""
    from pyprefopt.lora import save_lora_adapter

    staging = staging_dir(output_dir, "output")
    try:
        if full:
            model.save_pretrained(staging)
        else:
            save_lora_adapter(model, staging / "adapter")
            for f in (staging / "adapter").iterdir():
                os.rename(f, staging / f.name)
            (staging / "adapter").rmdir()
        tokenizer.save_pretrained(staging)
        for f in publishable(staging).iterdir():
            os.replace(f, output_dir / f.name)
    finally:
        shutil.rmtree(staging)


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict]:
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in records if up_to_step is None or r["step"] <= up_to_step]


# ---------------------------------------------------------------------------------------- main


# What bitsandbytes' optional hub-kernel fetch logs (see _drop_bitsandbytes_hub_kernel_notices), by logger.
BITSANDBYTES_HUB_KERNEL_NOTICES = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "kernels._internals.hf_hub": "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'",
}


def _drop_bitsandbytes_hub_kernel_notices():
    """bitsandbytes (imported by peft, which transformers' trainer utilities import) tries, on a CPU with
    AVX512-BF16, to fetch an optional CPU 4-bit GEMM kernel from the Hugging Face hub through `kernels`, which logs
    when it cannot check the publisher offline, and bitsandbytes logs when the fetch fails (offline, or an
    unverified publisher); it then uses the kernel it ships. Nothing a user can or needs to act on, so exactly
    those messages are dropped; every other warning of both packages still shows."""
    for name, prefix in BITSANDBYTES_HUB_KERNEL_NOTICES.items():
        logging.getLogger(name).addFilter(lambda record, prefix=prefix: not record.getMessage().startswith(prefix))


def main(argv=None) -> int:
    # Before any GEMM: packed batches make new shapes every step (pyprefopt.memory).
    bound_onednn_caches()
    _drop_bitsandbytes_hub_kernel_notices()
    args = parse_args(argv)
    rank, world, device = setup_distributed(args.fsdp)
    try:
        return train(args, rank, world, device)
    except (D.DataError, RunError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; every file already written is complete (writes are staged and renamed). "
              f"`--resume --output-dir {args.output_dir}` continues from the last checkpoint, if any",
              file=sys.stderr, flush=True)
        return 130
    except OSError as e:
        # Writes stage and rename, so a failed one leaves the files as they were before it.
        hint = {errno.ENOSPC: "free some space there, then rerun the same command with --resume (the checkpoints "
                              "already written are intact)",
                errno.EDQUOT: "free some of your quota, then rerun the same command with --resume",
                errno.EROFS: "name a writable --output-dir",
                errno.EACCES: "check the permissions, or name another path"}.get(e.errno, "")
        print(f"error: {e.strerror}: {e.filename}" + (f"; {hint}" if hint else ""), file=sys.stderr, flush=True)
        return 2
    except SafetensorError as e:
        # safetensors reports its I/O errors, a full disk among them, in its own type with the OS error inside.
        print(f"error: a .safetensors file could not be read or written ({e}); if a disk is full, free some space "
              "there, then rerun the same command with --resume (the checkpoints already written are intact)",
              file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class StopAtStepBoundary:
    """While training, SIGINT (Ctrl-C) and SIGTERM ask the loop to stop after the current step, which then saves a
    checkpoint: stopping mid-step would leave the weights half-updated. A second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        # Handlers can only be set from the main thread; elsewhere signals keep their usual effect.
        on_main_thread = threading.current_thread() is threading.main_thread()
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS} if on_main_thread else {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint (a second one stops "
              "at once, without saving)", file=sys.stderr, flush=True)

    def restore(self):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def train(args, rank, world, device) -> int:
    """The run: Recipe's setup, an evaluation before the first step, the optimizer steps (each evaluated, logged and
    checkpointed as the options ask) until the last or a stop signal, then the outputs."""
    from tqdm.auto import tqdm

    recipe = Recipe(args, rank, world, device)
    recipe.setup()
    initial = recipe.evaluate() if recipe.start_step == 0 else None
    metrics_file = open(recipe.metrics_path, "a", encoding="utf-8") if rank == 0 else None
    if metrics_file and initial is not None:
        metrics_file.write(json.dumps({"step": 0, **initial}) + "\n")
    recipe.model.train()
    bar = tqdm(total=recipe.total_steps, initial=recipe.start_step, disable=rank != 0, desc=f"{args.method}",
               unit="step")
    stopped_at = None
    stop = StopAtStepBoundary()
    try:
        for step in range(recipe.start_step, recipe.total_steps):
            record, stopping = recipe.step(step, stop)
            done = step + 1
            if (args.eval_every and done % args.eval_every == 0) or done == recipe.total_steps:
                record.update(recipe.evaluate())
            if metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if stopping or done == recipe.total_steps or (args.save_every and done % args.save_every == 0):
                recipe.checkpoint(done)
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_second']:.0f}")
            bar.update(1)
            if stopping and done < recipe.total_steps:
                stopped_at = done
                break
    finally:
        stop.restore()
        bar.close()
        if metrics_file:
            metrics_file.close()

    if stopped_at is not None:
        log(rank, f"stopped at step {stopped_at} of {recipe.total_steps}; its checkpoint is in "
            f"{recipe.output_dir / CHECKPOINTS}: rerun the same command with --resume to continue")
        return 130
    recipe.write_outputs()
    return 0


class Recipe:
    """What `train()` runs, one method a stage: `setup()` reads the data, loads the model, wraps it for the processes,
    builds the optimizer and schedule, computes (or reads back) the reference log-probs and resumes from the newest
    checkpoint; `step()` is one optimizer step over its micro-batches; `evaluate()` the held-out metrics;
    `checkpoint()` a checkpoint; `write_outputs()` the adapter (or model), merged model, model card and plots.
    What a stage makes, the next reads off the recipe (`model`, `optimizer`, `train_data`, ...)."""

    def __init__(self, args, rank, world, device):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.started = time.perf_counter()
        self.output_dir = Path(args.output_dir)
        self.metrics_path = self.output_dir / METRICS_FILE
        self.method_record = losses.METHODS[args.method]
        self.dtype = compute_dtype(args, device)
        self.global_batch = args.batch_size * args.grad_accum * world
        self.reference_seconds = self.train_seconds = 0.0
        self.train_tokens = 0

    # ------------------------------------------------------------------------------------------ setup

    def setup(self):
        from transformers.utils import logging as hf_logging

        args, rank, world = self.args, self.rank, self.world
        hf_logging.disable_progress_bar()
        # Before the output directory's check: a --resume compares the LoRA options the adapter sets.
        adapter = read_adapter_options(args) if args.adapter is not None else None
        check_output_dir(self.output_dir, args)
        resuming = args.resume and bool(checkpoints_newest_first(self.output_dir))
        if world > 1:
            # Every process has looked at output_dir before rank 0 may create anything in it.
            dist.barrier()
        train_rows, eval_rows = self._read_rows()
        # Seeded first, so the adapter's init depends on --seed alone.
        torch.manual_seed(args.seed)
        self.model, self.tokenizer, self.base = load_model(args, train_rows, self.device, adapter)
        self._tokenize(train_rows, eval_rows)
        self._wrap_model()
        self._optimizer_and_schedule()
        if rank == 0:
            make_output_dir(self.output_dir, rank)
        self._reference_logps(resuming)
        self._resume(resuming)
        self.loss_fn = FusedLinearPreferenceLoss(args.method, **loss_hparams(args),
                                                 **head_logit_transform(self.model.config))

    def _read_rows(self):
        """The training and held-out rows, checked and normalised (pyprefopt.data)."""
        args = self.args
        # KTO's KL completions rotate within chunks of the global micro-batch (TRL's rule; see pyprefopt.data).
        self.kl_chunk = args.batch_size * self.world
        if self.method_record.kl_batch and self.kl_chunk < 2:
            raise RunError("kto needs a global micro-batch (--batch-size x processes) of at least 2: its KL "
                           "completions rotate within it, so with one example each would be paired with its own "
                           "completion (TRL's KTOTrainer likewise refuses a batch size of 1)")
        train_rows, eval_rows, self.data_source = D.load_splits(args.data, args.method, args.eval_data, args.seed)
        train_rows = D.normalise_rows(train_rows, args.method, f"{self.data_source} (train)")
        eval_rows = D.normalise_rows(eval_rows, args.method, f"{self.data_source} (eval)")
        return train_rows, eval_rows

    def _tokenize(self, train_rows, eval_rows):
        """Both splits tokenised, and the run's length in optimizer steps."""
        args, tokenizer = self.args, self.tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.train_data = D.tokenize(train_rows, args.method, tokenizer, args.max_length,
                                     f"{self.data_source} (train)", self.kl_chunk)
        self.eval_data = D.tokenize(eval_rows, args.method, tokenizer, args.max_length, f"{self.data_source} (eval)",
                                    self.kl_chunk)
        self.steps_per_epoch = len(self.train_data) // self.global_batch
        if self.steps_per_epoch == 0:
            raise RunError(f"{len(self.train_data)} training examples are fewer than one global batch of "
                           f"{self.global_batch} (--batch-size {args.batch_size} x --grad-accum {args.grad_accum} "
                           f"x {self.world} processes)")
        self.total_steps = args.max_steps or max(1, math.floor(args.epochs * self.steps_per_epoch))
        for name, split in (("train", self.train_data), ("eval", self.eval_data)):
            if split.truncated or split.dropped:
                log(self.rank, f"{name}: {split.truncated} of {split.sequences} sequences cut at --max-length "
                    f"{args.max_length}; {split.dropped} examples dropped (prompt alone fills it)")

    def _wrap_model(self):
        """The model wrapped for the processes (data_parallel's `run` and `no_sync`) and its trainable parameters."""
        from_first_process = first_process_loads(self.args, self.world)
        if self.world > 1 and not from_first_process:
            # Same seed, same init everywhere; broadcasting makes it so whatever the initialisers do.
            for param in trainable_parameters(self.model).values():
                dist.broadcast(param.data, 0)
        self.run, self.no_sync = data_parallel(self.model, self.args.fsdp, self.world, self.device, from_first_process)
        self.trainable = trainable_parameters(self.model)  # after sharding, which replaces them by their shards

    def _optimizer_and_schedule(self):
        from transformers import get_scheduler

        args, trainable = self.args, self.trainable
        if args.optim == "adamw_8bit":
            import bitsandbytes as bnb

            self.optimizer = bnb.optim.AdamW8bit(trainable.values(), lr=args.lr, weight_decay=args.weight_decay)
        else:
            # The fused kernel: what the HF Trainer (and so TRL) uses by default, one pass over all the adapters.
            self.optimizer = torch.optim.AdamW(trainable.values(), lr=args.lr, weight_decay=args.weight_decay,
                                               fused=self.device.type in ("cpu", "cuda") or None)
        if args.warmup_steps is None:
            warmup_steps = round(args.warmup_ratio * self.total_steps)
        else:
            warmup_steps = args.warmup_steps
            if warmup_steps >= self.total_steps:
                log(self.rank, f"--warmup-steps {warmup_steps} is not less than the run's {self.total_steps} steps: "
                    f"the learning rate never reaches --lr {args.lr}")
        self.scheduler = get_scheduler(args.lr_scheduler, self.optimizer, num_warmup_steps=warmup_steps,
                                       num_training_steps=self.total_steps)

    def _reference_logps(self, resuming: bool):
        """The reference log-probs of every example (the methods with a reference), once, before any update: read back
        from the run's cache when resuming, else computed and cached beside the checkpoints. Also writes the run's
        arguments, which mark the directory as a run's."""
        args, rank, output_dir = self.args, self.rank, self.output_dir
        reference_path = output_dir / CHECKPOINTS / REFERENCE_FILE
        self.train_reference = self.eval_reference = saved = None
        if self.method_record.needs_reference:
            saved = read_reference(reference_path, self.device, rank) if resuming else None
            if saved is not None:
                self.train_reference, self.eval_reference = saved["train"], saved["eval"]
            else:
                t0 = time.perf_counter()
                with reference_context(self.model, args.full):
                    self.train_reference, _ = self._sequence_logps(self.train_data)
                    self.eval_reference, _ = self._sequence_logps(self.eval_data)
                self.reference_seconds = time.perf_counter() - t0
        if rank == 0:
            (output_dir / CHECKPOINTS).mkdir(exist_ok=True)
            if not (output_dir / RUN_ARGS_FILE).exists():
                atomic_write_text(output_dir / RUN_ARGS_FILE, json.dumps(vars(args), indent=1))
            if self.method_record.needs_reference and saved is None:
                from safetensors.torch import save_file

                train_reference, eval_reference = self.train_reference.cpu(), self.eval_reference.cpu()
                atomic_write(reference_path, lambda tmp: save_file({"train": train_reference, "eval": eval_reference},
                                                                   tmp))

    def _sequence_logps(self, data):
        return sequence_logps_all(self.model, self.run, data, self.pad_id, self.args.eval_batch_size, self.device,
                                  self.rank, self.world, self.dtype)

    def _resume(self, resuming: bool):
        """The newest intact checkpoint's state restored (start_step its step, else 0), and metrics.jsonl cut back
        to it (or removed for a run from step 0)."""
        self.start_step, checkpoint = 0, None
        if resuming:
            self.start_step, checkpoint = resume_from_checkpoint(
                self.output_dir, self.model, self.optimizer, self.scheduler, self.device, self.args, self.world,
                self.total_steps, self.rank)
        if checkpoint is not None:
            log(self.rank, f"resuming from {checkpoint} (step {self.start_step} of {self.total_steps})")
            if self.rank == 0:
                kept = read_metrics(self.metrics_path, self.start_step)
                atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))
        elif self.rank == 0 and self.metrics_path.exists():
            self.metrics_path.unlink()

    # ------------------------------------------------------------------------------------------ training

    def step(self, step: int, stop: StopAtStepBoundary) -> tuple[dict, bool]:
        """Optimizer step `step` (from 0): this process's micro-batches of the global batch, their gradients
        accumulated (and summed over the processes), clipped, AdamW and the schedule stepped. Returns the step's
        metrics record and whether any process was asked to stop (`stop`, read after the update)."""
        args, device = self.args, self.device
        t0 = time.perf_counter()
        indices, epoch = global_batch_indices(step, len(self.train_data), self.global_batch, args.seed)
        micro_batches = []
        for micro in range(args.grad_accum):
            first = (micro * self.world + self.rank) * args.batch_size
            micro_batches.append(D.collate(self.train_data, indices[first:first + args.batch_size], self.pad_id))
        counts = torch.tensor([sum(b["items"] for b in micro_batches), sum(b["num_tokens"] for b in micro_batches)],
                              dtype=torch.float64, device=device)
        all_reduce_sum(counts)
        global_items, global_tokens = counts.tolist()
        sums = self._accumulate_gradients(micro_batches, global_items)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable.values(),
                                                   args.max_grad_norm if args.max_grad_norm > 0 else math.inf)
        if args.fsdp:  # a DTensor: the norm over every process's shards
            grad_norm = grad_norm.full_tensor()
        learning_rate = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums[-1] = float(stop.requested)
        all_reduce_sum(sums)
        elapsed = time.perf_counter() - t0
        self.train_seconds += elapsed
        self.train_tokens += int(global_tokens)
        record = {"step": step + 1,
                  "epoch": round(epoch + (step % self.steps_per_epoch + 1) / self.steps_per_epoch, 4),
                  "loss": sums[0].item()}
        names = self.method_record.step_metrics
        for i, name in enumerate(names):
            if sums[2 + 2 * i] > 0:
                record[name] = (sums[1 + 2 * i] / sums[2 + 2 * i]).item()
        if self.method_record.desirable and "rewards/chosen" in record and "rewards/rejected" in record:
            record["rewards/margins"] = record["rewards/chosen"] - record["rewards/rejected"]
        record.update(grad_norm=grad_norm.item(), learning_rate=learning_rate,
                      tokens_per_second=global_tokens / elapsed, num_tokens=int(global_tokens),
                      step_seconds=elapsed, peak_memory_mib=peak_memory_mib(device))
        if not math.isfinite(record["loss"]):
            raise RunError(f"step {step + 1}: the loss is {record['loss']}; lower --lr or check the data")
        return record, sums[-1].item() > 0

    def _accumulate_gradients(self, micro_batches, global_items) -> torch.Tensor:
        """Forward and backward of each micro-batch, each loss weighted by its share of the global batch's items;
        the gradients reduced over the processes with the last one. Returns [loss, per step metric: weighted sum and
        weight, then a slot for the stop request], this process's part."""
        names = self.method_record.step_metrics
        sums = torch.zeros(2 + 2 * len(names), dtype=torch.float64, device=self.device)
        for micro, batch in enumerate(micro_batches):
            with self.no_sync() if micro < self.args.grad_accum - 1 else contextlib.nullcontext():
                loss, metrics = self.run(lambda: micro_batch_loss(self.model, self.loss_fn, batch,
                                                                  self.train_reference, self.args, self.device))
                share = batch["items"] / global_items
                # DDP and FSDP average the processes' gradients: weighted by `world` too, the average is the
                # global batch's gradient.
                (loss * (share * self.world)).backward()
            sums[0] += loss.detach().double() * share
            for i, name in enumerate(names):
                weight = metric_weight(self.method_record, name, batch)
                if name in metrics and weight > 0:
                    sums[1 + 2 * i] += metrics[name].double() * weight
                    sums[2 + 2 * i] += weight
        return sums

    def evaluate(self) -> dict:
        return evaluate(self.model, self.run, self.eval_data, self.eval_reference, self.args, self.pad_id, self.device,
                        self.rank, self.world)

    def checkpoint(self, done: int):
        """The checkpoint after `done` steps, by rank 0 (every process with --fsdp, each writing its shards); the
        final step's holds no optimizer state (nothing steps again)."""
        if self.rank != 0 and not self.args.fsdp:
            return
        args = self.args
        position = {"epoch": done // self.steps_per_epoch, "batch_in_epoch": done % self.steps_per_epoch,
                    "examples_per_step": self.global_batch, "batch_size": args.batch_size, "processes": self.world,
                    "seed": args.seed}
        save_checkpoint(self.output_dir, done, self.model, None if done == self.total_steps else self.optimizer,
                        self.scheduler, args.save_total_limit, position, self.rank)

    # ------------------------------------------------------------------------------------------ output

    def write_outputs(self):
        """By rank 0 (a sharded model's trainable weights gathered to it first, by every process): the adapter or
        model and tokenizer, the merged model with --merge, then the model card (with the plots), which says the run
        completed."""
        args, output_dir = self.args, self.output_dir
        gathered = gather_trainable(self.model) if args.fsdp else None
        if self.rank != 0:
            return
        from pyprefopt import model_card

        with whole_parameters(self.model, gathered):
            save_outputs(output_dir, self.model, self.tokenizer, args.full)
        if args.merge:
            from pyprefopt.merge import merge_adapter

            merge_adapter(checkpoint_dir(self.base), output_dir, output_dir / "merged", overwrite=True)
        if not args.save_every:
            # Without checkpoints the directory holds only the reference cache, which nothing reads any more.
            shutil.rmtree(output_dir / CHECKPOINTS)
        all_records = read_metrics(self.metrics_path)
        summary = self._summary(all_records)
        # Last: a README.md in the output directory means the run completed.
        model_card.write(output_dir, args, summary, all_records)
        log(self.rank, eval_summary(summary["evaluations"]))
        speed = f", {summary['tokens_per_second']:.0f} tokens/s" if summary["tokens_per_second"] else ""
        log(self.rank, f"done: {output_dir} ({summary['wall_seconds']:.1f} s{speed} over "
            f"{self.total_steps - self.start_step} steps)")

    def _summary(self, all_records: list[dict]) -> dict:
        """What the model card reports of the run (pyprefopt.model_card)."""
        args, train_data, eval_data = self.args, self.train_data, self.eval_data
        last_train_record = next((r for r in reversed(all_records) if "loss" in r), {})
        return {
            "method": args.method, "base_model": self.base, "data": self.data_source, "steps": self.total_steps,
            "resumed_from_step": self.start_step or None,
            "examples_seen": self.total_steps * self.global_batch, "train_examples": len(train_data),
            "eval_examples": len(eval_data), "sequences_truncated": train_data.truncated + eval_data.truncated,
            "examples_dropped": train_data.dropped + eval_data.dropped,
            "wall_seconds": time.perf_counter() - self.started, "train_step_seconds": self.train_seconds,
            "reference_seconds": self.reference_seconds,
            "tokens_per_second": self.train_tokens / self.train_seconds if self.train_seconds else None,
            "peak_memory_mib": peak_memory_mib(self.device), "hardware": hardware_description(self.device, self.world),
            "processes": self.world, "compute_dtype": str(self.dtype).removeprefix("torch."),
            "final": {k: v for k, v in last_train_record.items() if not k.startswith("eval_")},
            "evaluations": [{"step": r["step"], **{k: v for k, v in r.items() if k.startswith("eval_")}}
                            for r in all_records if "eval_loss" in r],
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "trainable_parameters": sum(p.numel() for p in self.trainable.values()),
            "torch": torch.__version__,
        }


if __name__ == "__main__":
    sys.exit(main())
