"""`python -m pyprefopt.train` under bad input and faults: one `error: ...` line naming the option or file and the
fix, exit status 2, nothing half-written and nothing of the user's touched; a stop or a full disk loses no step.

BAD_INPUTS is a table: add a case with one entry (its name, what it does to a small valid run, the text the
error must contain).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from pyprefopt import model_loading, train
from tests.cli_fixtures import assert_refused_before_writing, data_dir, one_thread_and_private_cache  # noqa: F401
from tests.tiny_models import gemma3n_config, save_tiny_model


def _rows(data_dir, kind="preference"):
    return [json.loads(line) for line in (data_dir / kind / "train.jsonl").read_text(encoding="utf-8").splitlines()]


def _not_a_run(tmp, data_dir):
    out = tmp / "notes"
    out.mkdir()
    (out / "README.md").write_text("notes\n")
    (out / "metrics.jsonl").write_text('{"mine": 1}\n')
    return ["--output-dir", str(out), "--resume"]


def _non_utf8(tmp, data_dir):
    path = tmp / "latin1.jsonl"
    path.write_bytes(json.dumps(_rows(data_dir)[0]).encode() + b"\n" + '{"prompt": "caf\u00e9"}'.encode("latin-1"))
    return ["--data", str(path)]


def _bad_row_after_the_held_out_split(tmp, data_dir):
    rows = _rows(data_dir)
    del rows[19]["chosen"]
    path = tmp / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return ["--data", str(path)]


def _output_dir_is_a_file(tmp, data_dir):
    (tmp / "file").write_text("x")
    return ["--output-dir", str(tmp / "file")]


BAD_INPUTS = [
    ("negative beta", lambda tmp, d: ["--beta", "-1"], "--beta must be a finite number > 0"),
    ("nan learning rate", lambda tmp, d: ["--lr", "nan"], "--lr must be a finite number > 0"),
    ("max length 1", lambda tmp, d: ["--max-length", "1"], "--max-length must be at least 2"),
    ("lora dropout 1", lambda tmp, d: ["--lora-dropout", "1"], "--lora-dropout must be in [0, 1)"),
    ("two ways to recompute", lambda tmp, d: ["--recompute-mlp", "--gradient-checkpointing"],
     "--recompute-mlp with --gradient-checkpointing"),
    ("zero lora alpha", lambda tmp, d: ["--lora-alpha", "0"], "--lora-alpha must be a finite number > 0"),
    ("negative weight decay", lambda tmp, d: ["--weight-decay", "-0.1"], "--weight-decay must be"),
    ("resume into a directory that is not a run", _not_a_run, "is not a pyprefopt run"),
    ("output dir is a file", _output_dir_is_a_file, "is a file, not a directory"),
    ("missing model directory", lambda tmp, d: ["--model", str(tmp / "no" / "model")], "no such directory"),
    ("missing data file", lambda tmp, d: ["--data", str(tmp / "missing.jsonl")], "missing.jsonl: no such file"),
    ("data not UTF-8", _non_utf8, "latin1.jsonl:2: not UTF-8 text"),
    ("bad row named by its file line", _bad_row_after_the_held_out_split, "train.jsonl:20: missing 'chosen'"),
]


@pytest.mark.parametrize(("setup", "expected"), [case[1:] for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_error_line_and_nothing_written(setup, expected, data_dir, tmp_path, capsys):
    argv = ["--method", "dpo", "--data", str(data_dir / "preference"), "--output-dir", str(tmp_path / "run"),
            "--max-steps", "1", "--batch-size", "4", *setup(tmp_path, data_dir)]
    assert_refused_before_writing(argv, tmp_path, capsys, expected)


def test_a_hub_model_with_the_hub_offline_is_one_error_line(data_dir, tmp_path):
    result = subprocess.run(_cli(data_dir, tmp_path / "run", "--model", "Qwen/Qwen3-1.7B", "--max-steps", "1"),
                            env=dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf")),
                            capture_output=True, text=True, timeout=300)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1, result.stderr
    assert err[0].startswith("error: --model Qwen/Qwen3-1.7B: cannot load its tokenizer") and "hub id" in err[0]
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ faults


def _cli(data_dir, out, *extra):
    return [sys.executable, "-m", "pyprefopt.train", "--method", "dpo", "--data", str(data_dir / "preference"),
            "--output-dir", str(out), "--batch-size", "4", *extra]


def _wait_for_step(out, step, proc, timeout=300):
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and any(json.loads(line).get("step", 0) >= step and "loss" in json.loads(line)
                                        for line in metrics.read_text(encoding="utf-8").splitlines())):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.01)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_saves_the_step_and_resume_finishes_the_run(sig, data_dir, tmp_path):
    """Ctrl-C (or a scheduler's SIGTERM) without --save-every: the loop stops after the step in progress, saves
    a checkpoint, says how to continue, and --resume ends the run."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(_cli(data_dir, out, "--max-steps", "60"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(out, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert len(saved) == 1 and f"stopped at step {int(saved[0].name[5:])} of 60" in err, err
    assert not (out / "adapter_model.safetensors").exists()
    resumed = subprocess.run(_cli(data_dir, out, "--max-steps", str(int(saved[0].name[5:]) + 2), "--resume"),
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 2 and "--max-steps was 60" in resumed.stderr, resumed.stderr
    resumed = subprocess.run(_cli(data_dir, out, "--max-steps", "60", "--resume"), env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {saved[0]}" in resumed.stderr
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 4 MiB file system (tmpfs) at tmp_path/fs."""
    mount = tmp_path / "fs"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    yield mount
    # Lazy: tensors safetensors loaded from files there may still map them until they are collected.
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_a_full_disk_at_the_final_save_loses_nothing(data_dir, small_filesystem, capsys):
    """The final step's weights are checkpointed before the outputs are written: when the disk fills while
    writing them, the error says so, and --resume after freeing space writes them without training again."""
    out = small_filesystem / "run"
    filler = small_filesystem / "filler"
    # Room for the run's small files and its final checkpoint (about the adapter's size), not for the outputs too.
    filler.write_bytes(b"\0" * (4 * 2**20 - 2_300_000))
    argv = ["--method", "dpo", "--data", str(data_dir / "preference"), "--output-dir", str(out), "--max-steps", "2",
            "--batch-size", "4"]
    capsys.readouterr()
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "No space left on device" in err[-1] and "--resume" in err[-1], err
    assert [p.name for p in (out / "checkpoints").glob("step-*")] == ["step-00000002"]
    assert not list(out.glob(".pyprefopt-tmp-*")) and not (out / "adapter_model.safetensors").exists()
    filler.unlink()
    assert train.main([*argv, "--resume"]) == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "README.md").is_file()
    assert "resuming from" in capsys.readouterr().err


def test_an_unwritable_output_dir_fails_before_the_reference_pass(data_dir, tmp_path, capsys):
    target = tmp_path / "ro"
    target.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)], capture_output=True)
    if made.returncode != 0:
        if os.geteuid() == 0:
            pytest.skip(f"cannot mount a read-only tmpfs here: {made.stderr.decode().strip()}")
        target.chmod(0o555)
    try:
        capsys.readouterr()
        status = train.main(["--method", "dpo", "--data", str(data_dir / "preference"), "--output-dir",
                             str(target / "run"), "--max-steps", "1", "--batch-size", "4"])
        err = capsys.readouterr().err.strip().splitlines()
    finally:
        if made.returncode == 0:
            subprocess.run(["umount", "--lazy", str(target)], check=True)
    assert status == 2 and len(err) == 1 and "cannot write there" in err[0] and "writable" in err[0], err


def test_a_damaged_checkpoint_falls_back_to_the_previous_one(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--method", "dpo", "--data", str(data_dir / "preference"), "--output-dir", str(out), "--max-steps", "4",
            "--batch-size", "4", "--save-every", "1", "--save-total-limit", "3"]
    assert train.main(argv) == 0
    # Keep the run resumable: drop the outputs and the final checkpoint, truncate the newest full one.
    for name in ("README.md", "adapter_model.safetensors"):
        (out / name).unlink()
    steps = sorted((out / "checkpoints").glob("step-*"))
    assert [p.name for p in steps] == ["step-00000002", "step-00000003", "step-00000004"]
    shutil.rmtree(steps[-1])
    weights = steps[-2] / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    capsys.readouterr()
    assert train.main([*argv, "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"skipping checkpoint step-00000003: {weights} is damaged" in err, err
    assert f"resuming from {steps[0]}" in err


def test_stale_staging_is_removed_and_outputs_get_the_umask(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--method", "dpo", "--data", str(data_dir / "preference"), "--output-dir", str(out), "--max-steps", "2",
            "--batch-size", "4", "--save-every", "1"]
    old = os.umask(0o002)
    try:
        assert train.main(argv) == 0
        (out / ".pyprefopt-tmp-output-x").mkdir()
        (out / "checkpoints" / ".pyprefopt-tmp-step-y").mkdir()
        (out / "README.md").unlink()
        assert train.main([*argv, "--resume"]) == 0
    finally:
        os.umask(old)
    assert not list(out.rglob(".pyprefopt-tmp-*"))
    for path in [out, *out.rglob("*")]:
        assert path.stat().st_mode & 0o777 == (0o775 if path.is_dir() else 0o664), path


# ------------------------------------------------------------------------------------------- architectures


def test_qlora_keeps_linear_layers_4bit_cannot_serve_in_16bit(data_dir, tmp_path, capsys):
    """bitsandbytes' CPU 4-bit kernel cannot run a Linear whose outputs are not a multiple of 32 (Gemma-3n's AltUp
    router is Linear(hidden, 4)): such layers, and ones too small to gain from 4 bits, stay 16-bit, said once.
    Here a Qwen3 whose MLP is 72 wide, its MLP not a LoRA target, so bitsandbytes' own forward would run it."""
    from transformers import Qwen3Config

    kept, head = model_loading.layers_left_16bit(gemma3n_config(512))
    assert "model.layers.0.altup.modality_router" in kept and head == ["lm_head"] and "lm_head" not in kept

    def odd_mlp_qwen3(vocab_size, **ids):
        return Qwen3Config(vocab_size=vocab_size, hidden_size=256, intermediate_size=72, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64, bos_token_id=None, **ids)

    model_dir = save_tiny_model(tmp_path / "qwen3", data_dir, odd_mlp_qwen3)
    out = tmp_path / "run"
    capsys.readouterr()
    assert train.main(["--method", "sft", "--model", str(model_dir), "--data", str(data_dir / "sft"),
                       "--output-dir", str(out), "--max-steps", "2", "--batch-size", "4", "--load-in-4bit",
                       "--target-modules", "q_proj,v_proj"]) == 0
    err = capsys.readouterr().err
    assert "--load-in-4bit: " in err and "model.layers.0.mlp.gate_proj" in err, err
    assert "model.layers.0.self_attn.q_proj" not in err.split("--load-in-4bit: ")[1].splitlines()[0]
    assert (out / "adapter_model.safetensors").is_file()


def test_a_soft_capped_gemma3n_trains_on_the_models_own_loss(data_dir, tmp_path, capsys):
    """Gemma-3n soft-caps its logits (`final_logit_softcapping`): the CLI's loss is the model's own, gradients
    included, with the head weight scaled so that the cap bends the logits hard; and the CLI trains it."""
    from transformers import AutoModelForCausalLM

    from pyprefopt import FusedLinearPreferenceLoss
    from pyprefopt.head_config import head_logit_transform

    model_dir = save_tiny_model(tmp_path / "gemma3n", data_dir, gemma3n_config)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    decoder, head = train.decoder_and_head(model)
    with torch.no_grad():
        head.weight.mul_(40.0)
    input_ids = torch.randint(2, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    labels = input_ids.masked_fill(torch.arange(12) < 5, -100)
    own = model(input_ids=input_ids, labels=labels)
    assert own.logits.abs().max() > 0.8 * model.config.final_logit_softcapping  # far into the cap's bend
    hidden = decoder(input_ids=input_ids).last_hidden_state[:, :-1]
    loss, _ = FusedLinearPreferenceLoss("sft", **head_logit_transform(model.config))(hidden, head.weight, labels[:, 1:])
    torch.testing.assert_close(loss, own.loss, rtol=1e-6, atol=1e-6)
    weight = dict(model.named_parameters())["model.layers.1.mlp.down_proj.weight"]
    torch.testing.assert_close(torch.autograd.grad(loss, weight)[0], torch.autograd.grad(own.loss, weight)[0],
                               rtol=1e-4, atol=1e-7)

    # QLoRA too: the AltUp router (Linear(hidden, 4)) stays 16-bit, the rest is NF4.
    capsys.readouterr()
    assert train.main(["--method", "sft", "--model", str(model_dir), "--data", str(data_dir / "sft"),
                       "--output-dir", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4",
                       "--load-in-4bit"]) == 0
    assert "altup.modality_router" in capsys.readouterr().err
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()

def test_an_moe_model_with_router_losses_is_refused_before_anything_is_written(data_dir, tmp_path, capsys):
    """The CLI's loss does not add a mixture of experts' router load-balancing loss: refused, not silently dropped."""
    from transformers import Qwen3MoeConfig

    def tiny_moe(vocab_size, **ids):
        return Qwen3MoeConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              num_experts=2, num_experts_per_tok=1, output_router_logits=True, bos_token_id=None,
                              **ids)

    model_dir = save_tiny_model(tmp_path / "moe", data_dir, tiny_moe)
    capsys.readouterr()
    assert train.main(["--method", "sft", "--model", str(model_dir), "--data", str(data_dir / "sft"),
                       "--output-dir", str(tmp_path / "run"), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output_router_logits" in err[0], err
    assert not (tmp_path / "run").exists()


def test_recompute_mlp_on_a_model_without_such_mlps_is_refused(data_dir, tmp_path, capsys):
    """--recompute-mlp on a model none of whose MLPs pyprefopt recomputes (a mixture of experts) would change
    nothing: one clear error before anything is written, not a silent no-op."""
    from transformers import Qwen3MoeConfig

    def tiny_moe(vocab_size, **ids):
        return Qwen3MoeConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              num_experts=2, num_experts_per_tok=1, bos_token_id=None, **ids)

    model_dir = save_tiny_model(tmp_path / "moe", data_dir, tiny_moe)
    assert_refused_before_writing(["--method", "sft", "--model", str(model_dir), "--data", str(data_dir / "sft"),
                                   "--output-dir", str(tmp_path / "run"), "--max-steps", "1", "--recompute-mlp"],
                                  tmp_path, capsys, "none of --model")
