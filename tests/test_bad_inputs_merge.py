"""`python -m pyprefopt.merge` under bad and hostile input: one `error: ...` line naming the file or flag and the
fix, exit status 2, no traceback, nothing created at --out and nothing of the user's touched.

BAD_INPUTS is a table: add a case with one entry (its name, what it does to a valid base and adapter copied into
a fresh directory, the text the error must contain).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen3ForCausalLM

from tests.test_merge import TARGETS, copy_dir, run_cli, save_tokenizer, tiny_config


@pytest.fixture(scope="module")
def valid_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("valid")
    torch.manual_seed(0)
    Qwen3ForCausalLM(tiny_config()).to(torch.bfloat16).save_pretrained(root / "base")
    save_tokenizer(root / "base")
    torch.manual_seed(1)
    get_peft_model(Qwen3ForCausalLM(tiny_config()),
                   LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)).save_pretrained(root / "adapter")
    return root


@dataclass
class Workspace:
    """A case's directory: copies of the valid base and adapter to spoil, and tmpfs mounts it may ask for."""

    tmp: Path
    base: Path
    adapter: Path
    mounts: list[Path] = field(default_factory=list)

    def edit_json(self, path: Path, edit) -> list[str]:
        """The JSON file at `path` passed through `edit`; no extra command-line arguments."""
        path.write_text(json.dumps(edit(json.loads(path.read_text()))))
        return []

    def tmpfs(self, name: str, options: str) -> Path:
        mount = self.tmp / name
        mount.mkdir()
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)], capture_output=True)
        if made.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
        self.mounts.append(mount)
        return mount


def _adapter_config(ws, **fields):
    return ws.edit_json(ws.adapter / "adapter_config.json", lambda config: {**config, **fields})


def _weights_elsewhere(ws):
    """A sharded base whose index sends the reader to a file outside the base directory."""
    elsewhere = copy_dir(ws.base, ws.tmp / "elsewhere")
    (ws.base / "model.safetensors").unlink()
    with open(elsewhere / "model.safetensors", "rb") as f:
        names = json.loads(f.read(int.from_bytes(f.read(8), "little"))).keys() - {"__metadata__"}
    (ws.base / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {name: "../elsewhere/model.safetensors" for name in names}}))
    return []


def _symlink(link: Path, target: Path):
    link.unlink(missing_ok=True)
    link.symlink_to(target)
    return []


def _truncate(path: Path, keep: int):
    path.write_bytes(path.read_bytes()[:keep])
    return []


def _spoil_header(path: Path, edit):
    """The safetensors file at `path` with its JSON header passed through `edit`."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.dumps(edit(json.loads(data[8 : 8 + length]))).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + data[8 + length :])
    return []


def _offsets_as_text(header):
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [str(n) for n in header[name]["data_offsets"]]
    return header


def _unreadable(path: Path):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their permissions")
    path.chmod(0)
    return []


def _out_under_a_file(ws):
    (ws.tmp / "file").write_text("x")
    return ["--out", str(ws.tmp / "file" / "merged")]


HOSTILE_REGEX = "([a-z_.0-9]+)+!"
# No nested repetition, yet polynomial of degree 13 in the module name's length.
SLOW_REGEX = ".*" * 13 + "!"

BAD_INPUTS = [
    # --out may not be or hold an input: --overwrite would delete the inputs.
    ("out is the parent of the inputs", lambda ws: ["--out", str(ws.tmp), "--overwrite"],
     "must not be or contain the base directory"),
    ("out a symlink to the adapter", lambda ws: _symlink(ws.tmp / "merged", ws.adapter) + ["--overwrite"],
     "must not be or contain the adapter directory"),
    ("out a symlink to a parent of the base",
     lambda ws: _symlink(ws.tmp / "link", ws.tmp) + ["--out", str(ws.tmp / "link"), "--overwrite"],
     "must not be or contain the base directory"),
    # Regexes from the adapter's config are untrusted.
    ("exponential rank_pattern", lambda ws: _adapter_config(ws, rank_pattern={HOSTILE_REGEX: 8}),
     f"rank_pattern key '{HOSTILE_REGEX}' takes over"),
    ("exponential target_modules", lambda ws: _adapter_config(ws, target_modules=HOSTILE_REGEX),
     f"target_modules '{HOSTILE_REGEX}' takes over"),
    ("polynomial alpha_pattern", lambda ws: _adapter_config(ws, alpha_pattern={SLOW_REGEX: 8}),
     "alpha_pattern key '.*.*"),
    ("invalid rank_pattern regex", lambda ws: _adapter_config(ws, rank_pattern={"[": 8}),
     "adapter_config.json: rank_pattern key '[' is not a valid regular expression (unterminated character set)"),
    # Nothing outside the directories named on the command line is read.
    ("adapter vocab.txt links to /etc/passwd", lambda ws: _symlink(ws.adapter / "vocab.txt", Path("/etc/passwd")),
     "vocab.txt leads outside"),
    ("adapter config links outside",
     lambda ws: _symlink(ws.adapter / "adapter_config.json",
                         copy_dir(ws.adapter, ws.tmp / "other") / "adapter_config.json"),
     "adapter_config.json leads outside"),
    ("base tokenizer links outside",
     lambda ws: _symlink(ws.base / "tokenizer.json", copy_dir(ws.base, ws.tmp / "other") / "tokenizer.json"),
     "tokenizer.json leads outside"),
    ("index weight_map leaves the base", _weights_elsewhere, "elsewhere/model.safetensors leads outside"),
    # A malformed adapter config.
    ("target_modules a number", lambda ws: _adapter_config(ws, target_modules=5),
     "adapter_config.json: target_modules must be a list of module names or one regular expression, got 5"),
    ("adapter config a JSON list",
     lambda ws: ws.edit_json(ws.adapter / "adapter_config.json", lambda config: [config]),
     "adapter_config.json holds a JSON list, not an object"),
    ("adapter config not JSON", lambda ws: _truncate(ws.adapter / "adapter_config.json", 30), "is not valid JSON"),
    ("adapter config without r",
     lambda ws: ws.edit_json(ws.adapter / "adapter_config.json", lambda c: {k: v for k, v in c.items() if k != "r"}),
     "adapter_config.json: required field 'r' is missing"),
    ("lora_alpha a string", lambda ws: _adapter_config(ws, lora_alpha="16"), "lora_alpha must be a positive number"),
    ("rank_pattern a list", lambda ws: _adapter_config(ws, rank_pattern=["q_proj"]), "rank_pattern must be an object"),
    ("use_rslora a string", lambda ws: _adapter_config(ws, use_rslora="yes"), "use_rslora must be true or false"),
    # A malformed base or adapter checkpoint.
    ("base config a JSON list", lambda ws: ws.edit_json(ws.base / "config.json", lambda c: [c]),
     "config.json holds a JSON list"),
    ("quantization_config a string", lambda ws: ws.edit_json(ws.base / "config.json",
                                                             lambda c: {**c, "quantization_config": "nf4"}),
     "quantization_config must be an object"),
    ("weight_map value a number",
     lambda ws: _weights_elsewhere(ws) + ws.edit_json(ws.base / "model.safetensors.index.json",
                                                      lambda i: {**i, "weight_map": {"x": 5}}),
     "weight_map['x'] must be a file name"),
    ("truncated adapter weights",
     lambda ws: _truncate(ws.adapter / "adapter_model.safetensors",
                          (ws.adapter / "adapter_model.safetensors").stat().st_size - 64),
     "past the end of the file"),
    ("base header cut short", lambda ws: _truncate(ws.base / "model.safetensors", 100), "does not fit"),
    ("base tensor offsets not numbers", lambda ws: _spoil_header(ws.base / "model.safetensors", _offsets_as_text),
     "malformed header entry"),
    ("missing base directory", lambda ws: ["--base", str(ws.tmp / "nowhere")], "does not exist"),
    ("base a file", lambda ws: ["--base", str(ws.base / "config.json")], "is not a directory"),
    ("unreadable base config", lambda ws: _unreadable(ws.base / "config.json"), "Permission denied"),
    # An output location that cannot take the model.
    ("read-only out", lambda ws: ["--out", str(ws.tmpfs("ro", "ro,size=1m") / "merged")], "Read-only file system"),
    ("full out", lambda ws: ["--out", str(ws.tmpfs("small", "size=64k") / "merged")], "No space left on device"),
    ("out under a file", _out_under_a_file, "choose another --out"),
]


def _tree(root: Path) -> dict[str, object]:
    """Every entry under `root` with its content (a link: its target, unfollowed)."""
    tree = {}
    for directory, dirs, names in os.walk(root):
        for name in dirs + names:
            path = Path(directory, name)
            key = str(path.relative_to(root))
            if path.is_symlink():
                tree[key] = ("link", os.readlink(path))
            elif path.is_dir():
                tree[key] = "dir"
            else:
                tree[key] = path.read_bytes()
    return tree


@pytest.fixture
def workspace(valid_inputs, tmp_path):
    ws = Workspace(tmp_path, copy_dir(valid_inputs / "base", tmp_path / "base"),
                   copy_dir(valid_inputs / "adapter", tmp_path / "adapter"))
    yield ws
    for mount in ws.mounts:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize(("spoil", "expected"), [case[1:] for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_error_line_and_nothing_written(spoil, expected, workspace):
    extra = spoil(workspace)
    before = _tree(workspace.tmp)
    result = run_cli("--base", workspace.base, "--adapter", workspace.adapter, "--out", workspace.tmp / "merged",
                     *extra, timeout=120)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], result.stderr
    assert _tree(workspace.tmp) == before, "a refused merge wrote, changed or deleted files"
