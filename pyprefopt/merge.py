"""Merge a PEFT LoRA adapter into its base model and write a standalone 16-bit checkpoint.

    python -m pyprefopt.merge --base BASE --adapter ADAPTER --out OUT [--dtype bf16|fp16|fp32]

BASE is a local transformers checkpoint directory (safetensors, single file or sharded), 16-bit or
bitsandbytes 4-bit NF4; ADAPTER a PEFT LoRA adapter directory. OUT loads with
`AutoModelForCausalLM.from_pretrained(OUT)` without PEFT or bitsandbytes.

How it stays exact, bounded and safe:
- Each target weight becomes `W + scale * B @ A` (`scale = lora_alpha / r`, or `/ sqrt(r)` with rsLoRA;
  Hu et al. 2021, eq. 3), computed in fp32 and rounded once to the output dtype; NF4 weights are decoded
  bit for bit like bitsandbytes in the same pass (`pyprefopt.nf4`).
- Streaming: one tensor is read, merged and written at a time through reused buffers, so peak memory
  is about the largest tensor's input plus output, whatever the model's size.
- Everything is checked before the first byte is written (every file's header, the adapter's config,
  keys, shapes and finiteness, the quantisation states); the model is written into a temporary
  directory beside OUT and renamed into place only when complete, so OUT never holds a half model.
- Inputs are untrusted (an adapter is often downloaded): nothing is read outside the BASE and ADAPTER
  directories, OUT may neither be nor hold them, and the adapter's regexes run under a time
  budget. A bad input is one `error: ...` line and exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pyprefopt import nf4
from pyprefopt.files import MOVED_ASIDE_PREFIX, STAGING_PREFIX, replace_dir, staging_dir
from pyprefopt.peft_format import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    check_config,
    names_module,
    split_lora_key,
)
from pyprefopt.safetensors_io import (
    INDEX_FILE,
    SafetensorsFormatError,
    StreamingWriter,
    TensorEntry,
    checkpoint_weight_files,
    read_headers,
    read_tensor,
)

OUT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The tensors bitsandbytes stores beside a 4-bit weight `W.weight` (QuantState.as_dict(packed=True)).
NF4_COMPANIONS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
QUANT_STATE_MARK = ".quant_state.bitsandbytes__"
TOKENIZER_FILE = re.compile(
    r"(tokenizer.*|special_tokens_map\.json|added_tokens\.json|vocab\..*|merges\.txt|chat_template\..*|.*\.model)$"
)
# fp32 bytes of a 16-bit weight merged per step: the scratch stays small next to the tensor itself.
MERGE_BLOCK_BYTES = 2**20
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9
# Seconds one regex from an adapter's config may take over all the adapter's module names: real patterns
# take microseconds, a catastrophic one (`(a+)+$`) would take years.
PATTERN_BUDGET_S = 1.0


class MergeError(ValueError):
    """A bad input, named; raised before anything is written."""


# ----------------------------------------------------------------------------------------------------
# Reading the base checkpoint


@dataclass
class BaseTensor:
    """One output tensor of the base: a plain tensor, or an NF4 weight and its companions."""

    name: str
    entry: TensorEntry  # the plain tensor, or the packed NF4 codes
    shape: tuple[int, ...]
    dtype: torch.dtype  # of the plain tensor, or the dtype the NF4 weight was quantised from
    nf4_parts: dict[str, TensorEntry] = field(default_factory=dict)  # companions by full name

    @property
    def is_nf4(self) -> bool:
        return bool(self.nf4_parts)


def _within(path: Path, directory: Path) -> Path:
    """`path`, a file the user's `directory` names, refused when it or a symlink on the way resolves outside
    `directory`: a hostile adapter or index must not make the merge read (and copy out) other files. A hub
    cache snapshot (`.../snapshots/REV/`) links its files to the repository's `blobs/`, which counts as inside."""
    resolved, root = path.resolve(), directory.resolve()
    allowed = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    if not any(resolved.is_relative_to(a) for a in allowed):
        raise MergeError(f"{path} leads outside {directory} (to {resolved}); only files inside the directories "
                         "given on the command line are read: copy the file into it or remove the link")
    return path


def _load_json(path: Path, what: str):
    if not path.is_file():
        raise MergeError(f"{what}: {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MergeError(f"{what}: {path} is not valid JSON ({err})") from None


def _load_json_object(path: Path, what: str) -> dict:
    loaded = _load_json(path, what)
    if not isinstance(loaded, dict):
        raise MergeError(f"{what}: {path} holds a JSON {type(loaded).__name__}, not an object; "
                         "it is not the file this merge expects, re-save it with transformers/PEFT")
    return loaded


def _base_weight_files(base: Path) -> list[Path]:
    """The base's safetensors files (`checkpoint_weight_files`); its index and every file it names must lie inside
    the base (`_within`)."""
    _within(base / INDEX_FILE, base)
    return [_within(path, base) for path in checkpoint_weight_files(base)]


def _check_quantization(config: dict, path: Path):
    quant = config.get("quantization_config")
    if quant is None:
        return
    if not isinstance(quant, dict):
        raise MergeError(f"{path}: quantization_config must be an object, got {quant!r}; re-save the base with "
                         "transformers")
    method = quant.get("quant_method")
    if method != "bitsandbytes":
        raise MergeError(f"unsupported quantization method {method!r}: only bitsandbytes 4-bit NF4 bases merge")
    if quant.get("load_in_8bit"):
        raise MergeError("unsupported quantization: bitsandbytes 8-bit (LLM.int8); only 4-bit NF4 bases merge")
    quant_type = quant.get("bnb_4bit_quant_type", "nf4")
    if quant_type != "nf4":
        raise MergeError(f"unsupported 4-bit quant type {quant_type!r}: only 'nf4' merges")


def _nf4_state(entry: TensorEntry) -> dict:
    try:
        return json.loads(bytes(read_tensor(entry).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MergeError(f"{entry.path}: quant state {entry.name!r} is not valid JSON ({err})") from None


def read_base_tensors(entries: dict[str, TensorEntry]) -> dict[str, BaseTensor]:
    """Group NF4 weights with their companions; check each quantisation state. In file order."""
    states = {name: e for name, e in entries.items() if QUANT_STATE_MARK in name}
    companions = {f"{w}{suffix}" for w in (n.split(QUANT_STATE_MARK)[0] for n in states) for suffix in NF4_COMPANIONS}
    tensors = {}
    for name, entry in entries.items():
        if name in states or name in companions:
            continue
        state_names = [s for s in states if s.startswith(f"{name}{QUANT_STATE_MARK}")]
        if not state_names:
            tensors[name] = BaseTensor(name, entry, entry.shape, entry.dtype)
            continue
        quant_type = state_names[0].rsplit("__", 1)[1]
        if quant_type != "nf4":
            raise MergeError(f"{name}: unsupported 4-bit quant type {quant_type!r}: only 'nf4' merges")
        state = _nf4_state(entries[state_names[0]])
        parts = {state_names[0]: entries[state_names[0]]}
        for suffix in NF4_COMPANIONS:
            if f"{name}{suffix}" in entries:
                parts[f"{name}{suffix}"] = entries[f"{name}{suffix}"]
        for required in (".absmax", ".quant_map"):
            if f"{name}{required}" not in parts:
                raise MergeError(f"{name}: NF4 weight without its {name}{required} tensor")
        try:
            shape = tuple(int(s) for s in state["shape"])
            dtype = getattr(torch, state["dtype"])
            blocksize = int(state["blocksize"])
        except (KeyError, TypeError, ValueError, AttributeError):
            raise MergeError(f"{name}: malformed quant state {state!r}") from None
        if not isinstance(dtype, torch.dtype) or blocksize <= 0 or any(s < 0 for s in shape):
            raise MergeError(f"{name}: malformed quant state {state!r}")
        n_blocks = -(-math.prod(shape) // blocksize)
        if parts[f"{name}.absmax"].shape != (n_blocks,) or entry.nbytes != -(-math.prod(shape) // 2):
            raise MergeError(
                f"{name}: NF4 data does not fit shape {list(shape)} with blocksize {blocksize} "
                f"({entry.nbytes} packed bytes, absmax {list(parts[f'{name}.absmax'].shape)})"
            )
        tensors[name] = BaseTensor(name, entry, shape, dtype, parts)
    return tensors


# ----------------------------------------------------------------------------------------------------
# Reading the adapter


@dataclass
class LoraPair:
    """One target module's LoRA factors, with PEFT's scaling."""

    module: str
    lora_A: TensorEntry | None = None  # [r, in_features]
    lora_B: TensorEntry | None = None  # [out_features, r]
    lora_B_bias: TensorEntry | None = None  # [out_features], PEFT's lora_bias=True
    scale: float = 0.0


@dataclass
class Adapter:
    config: dict
    pairs: dict[str, LoraPair]  # by target weight name, e.g. "model.layers.0.self_attn.q_proj.weight"
    replacements: dict[str, TensorEntry]  # base tensors the adapter replaces (modules_to_save, trained biases)
    bias_deltas: dict[str, LoraPair]  # by target bias name, for lora_B.bias


# Untrusted regexes. Python's backtracking `re` takes exponential time on patterns such as `(a+)+$` and
# polynomial time of any degree on `.*.*.*...!`, so no syntactic check makes them safe, and a match cannot be
# stopped from another thread. The patterns therefore run in a child interpreter, each exactly as PEFT runs
# it, under a SIGALRM budget (`re` polls for signals while it backtracks); the parent kills the child should
# the alarm not fire.
_PATTERN_MATCHER = r"""
import json, re, signal, sys

class OverBudget(Exception):
    pass

def over_budget(signum, frame):
    raise OverBudget

signal.signal(signal.SIGALRM, over_budget)
job = json.load(sys.stdin)
matches = []
for number, (regex, whole_name) in enumerate(job["regexes"]):
    try:
        compiled = re.compile(regex)
        signal.setitimer(signal.ITIMER_REAL, job["budget"])
        match = compiled.fullmatch if whole_name else compiled.match
        matches.append([match(name) is not None for name in job["names"]])
        signal.setitimer(signal.ITIMER_REAL, 0)
    except re.error as err:
        print(json.dumps({"invalid": number, "why": err.msg}))
        sys.exit()
    except OverBudget:
        print(json.dumps({"over_budget": number}))
        sys.exit()
print(json.dumps({"matches": matches}))
"""


@dataclass
class _Pattern:
    field: str  # how the config names it, e.g. "rank_pattern key 'v_proj'"
    regex: str  # as PEFT compiles it
    whole_name: bool  # PEFT's `re.fullmatch(regex, name)`, else its `re.match(regex, name)`


def _run_patterns(patterns: list[_Pattern], names: list[str], config_path: Path) -> list[list[bool]]:
    """Whether each pattern matches each name, PEFT's way, each pattern within PATTERN_BUDGET_S."""
    if not patterns:
        return []
    job = {"regexes": [(p.regex, p.whole_name) for p in patterns], "names": names, "budget": PATTERN_BUDGET_S}
    # The backstop allows for the child's start on a loaded machine; the alarm ends a slow pattern far sooner.
    backstop_s = 30 + PATTERN_BUDGET_S * len(patterns)
    try:
        done = subprocess.run([sys.executable, "-I", "-S", "-c", _PATTERN_MATCHER], input=json.dumps(job),
                              capture_output=True, text=True, timeout=backstop_s)
    except subprocess.TimeoutExpired:
        raise MergeError(f"{config_path}: its regular expressions did not finish matching in {backstop_s:.0f} s; "
                         "replace them by plain module names") from None
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise MergeError(f"matching the regular expressions of {config_path} failed in a child Python "
                         f"(exit status {done.returncode}): {' '.join(done.stderr.split())[-300:]}") from None
    if "invalid" in answer:
        pattern = patterns[answer["invalid"]]
        raise MergeError(f"{config_path}: {pattern.field} is not a valid regular expression ({answer['why']}); "
                         "fix or remove it")
    if "over_budget" in answer:
        pattern = patterns[answer["over_budget"]]
        raise MergeError(f"{config_path}: {pattern.field} takes over {PATTERN_BUDGET_S:g} s to match the adapter's "
                         f"{len(names)} module names (a regex like (a+)+ or .*.*.*.* backtracks for ages); "
                         "the adapter is broken or hostile: write its patterns as plain module names")
    return answer["matches"]


@dataclass
class ModuleSettings:
    """What an adapter's config says of one module: whether it targets it, and its rank and alpha."""

    targeted: bool
    r: int | float
    lora_alpha: int | float


def module_settings(config: dict, modules: list[str], config_path: Path) -> dict[str, ModuleSettings]:
    r"""PEFT's reading of `config` for each module name: `check_target_module_exists` (a list names module-name
    suffixes, a string is a regex over the full name) and `get_pattern_key` (the first rank_pattern /
    alpha_pattern key `k` with `(.*\.)?(k)$` matching the name), its regexes run under a budget."""
    target_modules = config.get("target_modules")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    patterns = [_Pattern(f"{field} key {key!r}", rf"(.*\.)?({key})$", False)
                for field, keys in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)) for key in keys]
    regex_target = isinstance(target_modules, str) and target_modules != "all-linear"
    if regex_target:
        patterns.append(_Pattern(f"target_modules {target_modules!r}", target_modules, True))
    matches = _run_patterns(patterns, modules, config_path)
    rank_matches = matches[: len(rank_pattern)]
    alpha_matches = matches[len(rank_pattern) : len(patterns) - regex_target]
    settings = {}
    for i, module in enumerate(modules):
        if target_modules is None or target_modules == "all-linear":
            targeted = True
        elif regex_target:
            targeted = matches[-1][i]
        else:
            targeted = names_module(module, target_modules)
        r = next((rank_pattern[k] for k, m in zip(rank_pattern, rank_matches) if m[i]), config["r"])
        alpha = next((alpha_pattern[k] for k, m in zip(alpha_pattern, alpha_matches) if m[i]), config["lora_alpha"])
        settings[module] = ModuleSettings(targeted, r, alpha)
    return settings


def read_adapter(adapter_dir: Path) -> Adapter:
    config_path = _within(adapter_dir / ADAPTER_CONFIG, adapter_dir)
    config = _load_json_object(config_path, "adapter config")
    check_config(config, config_path, MergeError)
    if config.get("use_dora"):
        raise MergeError("DoRA adapters (use_dora=True) are not supported: their merge needs the weight norms")
    weights = adapter_dir / ADAPTER_WEIGHTS
    if weights.is_file():
        _within(weights, adapter_dir)
    else:
        hint = (" (only adapter_model.bin: re-save with safe_serialization=True)"
                if (adapter_dir / "adapter_model.bin").is_file() else "")
        raise MergeError(f"adapter: {weights} does not exist{hint}")
    entries = read_headers([weights])
    pairs, replacements = {}, {}
    for name, entry in entries.items():
        if not name.startswith(PEFT_PREFIX):
            raise MergeError(f"adapter key {name!r} lacks PEFT's {PEFT_PREFIX!r} prefix: not a PEFT adapter file")
        key = name[len(PEFT_PREFIX):]
        module_part = split_lora_key(key)
        if module_part is None:
            if ".lora_" in key:
                raise MergeError(f"adapter key {name!r}: only LoRA linear layers merge (embedding/DoRA parts do not)")
            replacements[key] = entry
            continue
        module, part = module_part
        pair = pairs.setdefault(module, LoraPair(module))
        setattr(pair, {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_B.bias": "lora_B_bias"}[part], entry)
    for module, pair in pairs.items():
        if pair.lora_A is None or pair.lora_B is None:
            raise MergeError(f"adapter: {module} has {'lora_B' if pair.lora_A is None else 'lora_A'} but not the other")
        if len(pair.lora_A.shape) != 2:
            raise MergeError(f"adapter: {module}.lora_A is {list(pair.lora_A.shape)}, not a [r, in_features] matrix")
    settings = module_settings(config, list(pairs), config_path)
    targets = {}
    for module, pair in pairs.items():
        if not settings[module].targeted:
            raise MergeError(f"adapter has weights for {module}, which its target_modules "
                             f"{config.get('target_modules')!r} does not name")
        r = pair.lora_A.shape[0]
        if r != settings[module].r:
            raise MergeError(f"adapter: {module} has rank {r} but its config says r={settings[module].r}")
        pair.scale = nf4.lora_scale(settings[module].lora_alpha, r, bool(config.get("use_rslora")))
        targets[f"{module}.weight"] = pair
    bias_deltas = {f"{p.module}.bias": p for p in pairs.values() if p.lora_B_bias is not None}
    return Adapter(config, targets, replacements, bias_deltas)


# ----------------------------------------------------------------------------------------------------
# Planning: every check before the first byte is written


def _check_against_base(adapter: Adapter, base: dict[str, BaseTensor]):
    fan_in_fan_out = bool(adapter.config.get("fan_in_fan_out"))
    for target, pair in adapter.pairs.items():
        if target not in base:
            raise MergeError(
                f"adapter targets {pair.module}, which the base checkpoint does not have "
                f"(an adapter for another architecture?)"
            )
        weight = base[target]
        r, in_features = pair.lora_A.shape if len(pair.lora_A.shape) == 2 else (None, None)
        out_features = pair.lora_B.shape[0] if len(pair.lora_B.shape) == 2 else None
        expected = (in_features, out_features) if fan_in_fan_out else (out_features, in_features)
        if r is None or pair.lora_B.shape != (out_features, r) or weight.shape != expected:
            raise MergeError(
                f"{pair.module}: lora_A {list(pair.lora_A.shape)} and lora_B {list(pair.lora_B.shape)} do not fit "
                f"the base weight {list(weight.shape)}" + (" (fan_in_fan_out)" if fan_in_fan_out else "")
            )
    for bias_name, pair in adapter.bias_deltas.items():
        if bias_name not in base:
            raise MergeError(f"{pair.module}: lora_B.bias given (lora_bias=True) but the base layer has no bias")
        if base[bias_name].shape != pair.lora_B_bias.shape:
            raise MergeError(f"{pair.module}: lora_B.bias {list(pair.lora_B_bias.shape)} does not fit the base bias "
                             f"{list(base[bias_name].shape)}")
    for name, entry in adapter.replacements.items():
        if name not in base:
            raise MergeError(f"adapter replaces {name}, which the base checkpoint does not have")
        if base[name].shape != entry.shape:
            raise MergeError(f"adapter's {name} {list(entry.shape)} does not fit the base's {list(base[name].shape)}")
        if name in adapter.bias_deltas:
            raise MergeError(f"adapter both replaces {name} and adds lora_B.bias to it")


def _check_adapter_values(adapter: Adapter):
    """Non-finite adapter weights would poison the merged model silently: read each once (it is small)."""
    entries = [e for p in adapter.pairs.values() for e in (p.lora_A, p.lora_B, p.lora_B_bias) if e is not None]
    for entry in entries + list(adapter.replacements.values()):
        tensor = read_tensor(entry)
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise MergeError(f"adapter tensor {entry.name} holds NaN or inf")


def _output_dtype(tensor: BaseTensor, dtype: torch.dtype) -> torch.dtype:
    return dtype if tensor.dtype.is_floating_point else tensor.dtype


def _shards(layout, max_shard_bytes: int):
    shards, current, size = [], [], 0
    for item in layout:
        nbytes = math.prod(item[2]) * item[1].itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(item)
        size += nbytes
    shards.append(current)
    return shards


# ----------------------------------------------------------------------------------------------------
# Merging


class _Buffers:
    """Grow-only scratch buffers: one for the tensor read, one for the tensor written."""

    def __init__(self):
        self._bufs = {}

    def get(self, key: str, nbytes: int) -> torch.Tensor:
        if key not in self._bufs or self._bufs[key].numel() < nbytes:
            self._bufs.pop(key, None)  # freed before its successor is allocated
            self._bufs[key] = torch.empty(nbytes, dtype=torch.uint8)
        return self._bufs[key]

    def out(self, shape, dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        return self.get("out", nbytes)[:nbytes].view(dtype).view(shape)


def _lora_factors(pair: LoraPair, fan_in_fan_out: bool):
    """fp32 (A, B) such that the delta to the stored weight is `scale * B @ A`."""
    lora_A = read_tensor(pair.lora_A).float()
    lora_B = read_tensor(pair.lora_B).float()
    # A Conv1D-style weight is stored [in, out]: its delta is (B @ A)^T = A^T @ B^T.
    return (lora_B.T.contiguous(), lora_A.T.contiguous()) if fan_in_fan_out else (lora_A, lora_B)


def _merge_dense(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, out: torch.Tensor):
    """out = round(W + scale * B @ A), in fp32 per block of rows (no full-size fp32 temporary)."""
    block = max(1, MERGE_BLOCK_BYTES // (4 * weight.shape[1]))
    for r0 in range(0, weight.shape[0], block):
        rows = slice(r0, r0 + block)
        out[rows].copy_(torch.addmm(weight[rows].float(), lora_B[rows], lora_A, alpha=scale))
    return out


def _produce(tensor: BaseTensor, adapter: Adapter, out_dtype: torch.dtype, buffers: _Buffers) -> torch.Tensor:
    """The merged tensor, in a reused buffer (valid until the next call)."""
    out = buffers.out(tensor.shape, out_dtype)
    name = tensor.name
    if name in adapter.replacements:
        return out.copy_(read_tensor(adapter.replacements[name]))
    pair = adapter.pairs.get(name)
    factors = None if pair is None else _lora_factors(pair, bool(adapter.config.get("fan_in_fan_out")))
    if tensor.is_nf4:
        parts = {n: read_tensor(e) for n, e in tensor.nf4_parts.items()}
        parts[name] = read_tensor(tensor.entry, buffers.get("in", tensor.entry.nbytes))
        weight = nf4.NF4Weight.from_safetensors_state(parts, name)
        if factors is None:
            return nf4.dequantize_nf4(weight, out_dtype, out=out)
        return nf4.dequant_merge_nf4(weight, factors[0], factors[1], pair.scale, out_dtype, out=out)
    source = read_tensor(tensor.entry, buffers.get("in", tensor.entry.nbytes))
    if factors is not None:
        return _merge_dense(source, factors[0], factors[1], pair.scale, out)
    if name in adapter.bias_deltas:
        delta = adapter.bias_deltas[name]
        lora_bias = read_tensor(delta.lora_B_bias).float()
        return out.copy_(source.float().add_(lora_bias, alpha=delta.scale))
    if source.dtype == out_dtype:
        return source
    return out.copy_(source)


def _all_finite(tensor: torch.Tensor, chunk: int = 2**18) -> bool:
    """isfinite in chunks: on a whole 16-bit tensor it would allocate an fp32 copy plus a bool mask."""
    if not tensor.is_floating_point():
        return True
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _output_config(config: dict, dtype: torch.dtype) -> dict:
    config = {k: v for k, v in config.items() if k != "quantization_config"}
    dtype_name = str(dtype).removeprefix("torch.")
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    return config


def _side_files(base: Path, adapter_dir: Path) -> dict[str, Path]:
    """By output name: everything of the base but its weights and config (tokenizer, generation config, ...),
    then the adapter's tokenizer files over the base's: the adapter was trained with those."""
    skip = re.compile(r".*\.(safetensors|bin|pt|pth)$|.*\.index\.json$|config\.json$")
    side = {}
    for directory, wanted in ((base, lambda name: not skip.fullmatch(name)), (adapter_dir, TOKENIZER_FILE.fullmatch)):
        for path in sorted(directory.iterdir()):
            if path.is_file() and wanted(path.name):
                side[path.name] = _within(path, directory)
    return side


def _check_out(out: Path, inputs: dict[str, Path], overwrite: bool):
    """--overwrite deletes OUT: it must not be or hold an input (after following symlinks). Inside an input is
    allowed: only OUT itself is written or deleted there (train --merge writes <run>/merged beside the adapter)."""
    if out.name in ("", ".", ".."):
        raise MergeError(f"--out {out} must name the directory to create, e.g. --out ./merged")
    if out.exists() and not overwrite:
        raise MergeError(f"{out} exists; pass --overwrite to replace it")
    resolved = out.resolve()
    for label, path in inputs.items():
        if path.resolve().is_relative_to(resolved):
            raise MergeError(f"--out {out} must not be or contain the {label} directory {path}: --overwrite would "
                             "delete it; choose another --out")


def _staging_name(out: Path) -> re.Pattern:
    """Our staging directories for `out`: the prefix given to mkdtemp, then its 8 random characters, so that
    no other name (another OUT's staging among them) matches."""
    return re.compile(rf"{re.escape(_staging_prefix(out))}[a-z0-9_]{{8}}")


def _staging_prefix(out: Path) -> str:
    return f"{STAGING_PREFIX}merge-{out.name}-"


def _moved_aside_prefix(out: Path) -> str:
    return f"{MOVED_ASIDE_PREFIX}merge-{out.name}-"


def _remove_stale_staging(out: Path):
    """What a merge into `out` killed mid-write left beside it: its staging directories, and the old model
    --overwrite moved aside once `out` holds the new one (until then it is the only copy: kept)."""
    if not out.parent.is_dir():
        return
    staging = _staging_name(out)
    moved_aside = re.compile(rf"{re.escape(_moved_aside_prefix(out))}[a-z0-9_]{{8}}")
    for path in out.parent.iterdir():
        stale = staging.fullmatch(path.name) or (moved_aside.fullmatch(path.name) and out.exists())
        if stale and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)


def _replace_dir(tmp: Path, out: Path, overwrite: bool):
    if out.exists() and not overwrite:
        raise MergeError(f"{out} exists; pass --overwrite to replace it")
    replace_dir(tmp, out, f"merge-{out.name}")


def merge_adapter(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Merge the LoRA adapter at `adapter` into the model at `base`; write a standalone model to `out`.
    `progress`: a progress bar on a terminal's stderr.

    Raises MergeError, before anything is written, on any bad input; OSError if writing fails (then nothing
    is left at `out`, or its old content when `overwrite`). Returns `out`.
    """
    base, adapter_dir, out = Path(base), Path(adapter), Path(out)
    if dtype not in OUT_DTYPES.values():
        raise MergeError(f"dtype must be one of {list(OUT_DTYPES.values())}, got {dtype}")
    for label, path in (("base", base), ("adapter", adapter_dir)):
        if not path.is_dir():
            raise MergeError(f"--{label} {path} is not a directory" + ("" if path.exists() else " (it does not exist)"))
    _check_out(out, {"base": base, "adapter": adapter_dir}, overwrite)
    try:
        config = _load_json_object(_within(base / "config.json", base), "base config")
        _check_quantization(config, base / "config.json")
        base_tensors = read_base_tensors(read_headers(_base_weight_files(base)))
        quantized = any(t.is_nf4 for t in base_tensors.values())
        if quantized and "quantization_config" not in config:
            raise MergeError(f"{base} stores 4-bit weights but its config.json has no quantization_config")
        lora = read_adapter(adapter_dir)
        _check_against_base(lora, base_tensors)
        _check_adapter_values(lora)
        side_files = _side_files(base, adapter_dir)
    except SafetensorsFormatError as err:
        raise MergeError(str(err)) from None
    except OSError as err:
        raise MergeError(f"cannot read {err.filename}: {err.strerror}; check that it exists and is readable") from None

    layout = [(t.name, _output_dtype(t, dtype), t.shape) for t in base_tensors.values()]
    shards = _shards(layout, max_shard_bytes)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    total = sum(math.prod(shape) * dt.itemsize for _, dt, shape in layout)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    tmp = staging_dir(out.parent, f"merge-{out.name}")
    try:
        buffers = _Buffers()
        with tqdm(total=total, unit="B", unit_scale=True, desc="merge", disable=None if progress else True) as bar:
            for shard_name, shard in zip(names, shards):
                writer = StreamingWriter(tmp / shard_name, shard)
                for name, out_dtype, _ in shard:
                    merged = _produce(base_tensors[name], lora, out_dtype, buffers)
                    if not _all_finite(merged):
                        raise MergeError(f"merged {name} holds NaN or inf (overflow in {out_dtype}?)")
                    writer.write(name, merged)
                    bar.update(merged.numel() * merged.element_size())
                writer.close()
        if len(shards) > 1:
            weight_map = {name: shard_name for shard_name, shard in zip(names, shards) for name, _, _ in shard}
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(_output_config(config, dtype), indent=2) + "\n")
        for name, path in side_files.items():
            shutil.copy2(path, tmp / name)
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MiB)")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(number * powers[unit])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyprefopt.merge", description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="base model directory (16-bit or bitsandbytes 4-bit NF4)")
    parser.add_argument("--adapter", required=True, help="PEFT LoRA adapter directory")
    parser.add_argument("--out", required=True, help="output model directory (written atomically)")
    parser.add_argument("--dtype", choices=sorted(OUT_DTYPES), default="bf16", help="output dtype (default bf16)")
    parser.add_argument("--max-shard-size", type=_parse_size, default=DEFAULT_MAX_SHARD_BYTES,
                        help="largest output shard, e.g. 5GB (the default) or 500MiB")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    try:
        out = merge_adapter(args.base, args.adapter, args.out, OUT_DTYPES[args.dtype], args.overwrite,
                            args.max_shard_size)
    except (MergeError, SafetensorsFormatError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # Reading errors became MergeError: this is writing --out, and the staging directory is gone again.
        hint = {errno.ENOSPC: "free some space there or choose another --out",
                errno.EDQUOT: "free some of your quota or choose another --out",
                errno.EROFS: "choose a writable --out",
                errno.EACCES: "check its permissions or choose another --out"}.get(err.errno, "choose another --out")
        print(f"error: cannot write --out {args.out}: {err.strerror}: {err.filename}; {hint}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
