"""`torchrun --nproc_per_node 2 -m pyprefopt.train --fsdp`: two processes sharding the model (FSDP2, gloo on CPU)
train what one process does with the same global batch, for a paired method (dpo) and an unpaired one (kto), LoRA,
QLoRA (its 4-bit base left whole on each process) and --full, and continuing an --adapter; the sharded checkpoint two
processes wrote resumes in one process and ends where the uninterrupted run did; only the first process reads the
checkpoint (but a 4-bit base), and an error loading it is every process's; what --fsdp cannot do, and a resume that
would compute other steps, are refused.

Each case runs torchrun once (3 steps, checkpoints at steps 2 and 3), shared by its three tests. The --full cases train
a tiny Qwen3 whose head is tied to its embeddings (one parameter under two names, in the FSDP root's group), the LoRA
cases the embedded default. The processes split the global batch of 4 differently from the one process (dpo: 1 example x
2 micro-batches each, kto: 2 each, its global micro-batch kept), and evaluate in batches of 3, which leaves one
process a batch short (sequence_logps_all fills it up)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from pyprefopt import checkpoint, train
from pyprefopt.errors import RunError
from tests.test_train import (  # noqa: F401
    assert_same_training,
    data_dir,
    method_data,
    one_thread_and_private_cache,
    run,
    subprocess_env,
    torchrun,
)
from tests.tiny_models import qwen_config, save_tiny_model

READ_GUARD = ("-m", "tests.checkpoint_read_guard")
LR = 1e-2
COMMON = ["--max-steps", "3", "--lr", str(LR), "--eval-batch-size", "3", "--eval-every", "2"]
# --batch-size and --grad-accum of the two processes; one process takes --batch-size 4.
TWO_PROCESS_SPLIT = {"dpo": ["--batch-size", "1", "--grad-accum", "2"], "kto": ["--batch-size", "2"]}
CASES = {"dpo-lora": ("dpo", "lora"), "dpo-full": ("dpo", "full"), "kto-lora": ("kto", "lora"),
         "kto-full": ("kto", "full"), "dpo-qlora": ("dpo", "qlora")}


@dataclass
class Case:
    method: str
    options: list  # the options of every run of the case but the batch split and --fsdp
    one: Path  # one process, without --fsdp
    two: Path  # two processes with --fsdp, checkpoints at steps 2 and 3
    one_records: list
    two_records: list
    reads: list  # per process of the two, its reads of the checkpoint's weights (tests/checkpoint_read_guard.py)


@pytest.fixture(scope="module")
def tied_qwen3(data_dir, tmp_path_factory):
    from transformers import Qwen3Config

    return save_tiny_model(tmp_path_factory.mktemp("tied-qwen3"), data_dir, qwen_config(Qwen3Config))


@pytest.fixture(scope="module", params=list(CASES))
def case(request, data_dir, tied_qwen3, tmp_path_factory):
    method, training = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    options = {"lora": COMMON, "full": [*COMMON, "--model", str(tied_qwen3), "--full"],
               "qlora": [*COMMON, "--load-in-4bit"]}[training]
    # First: it also builds the default model into the cache the torchrun processes read.
    one_records = run(method, data_dir, root / "one", *options, "--batch-size", "4")
    counts = root / "reads"
    # The second process may not read the checkpoint, but a 4-bit base each process loads itself.
    reads = "count" if training == "qlora" else "fail"
    two_records = torchrun(method, data_dir, root / "two", *options, *TWO_PROCESS_SPLIT[method], "--fsdp",
                           "--save-every", "2", worker=(*READ_GUARD, str(counts), reads))
    reads = [int(Path(f"{counts}.{rank}").read_text()) for rank in range(2)]
    return Case(method, options, root / "one", root / "two", one_records, two_records, reads)


def test_two_processes_with_fsdp_train_what_one_process_does(case):
    assert_same_training(case.two, case.one, case.two_records, case.one_records, LR)
    sharded = case.two / "checkpoints" / "step-00000002" / checkpoint.SHARDED_STATE
    assert sorted(p.name for p in sharded.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_only_the_first_fsdp_process_reads_the_checkpoint(case):
    """The second process builds the model on the meta device and receives its shards: a read of the weights there
    would have failed the run (tests/checkpoint_read_guard.py), and it attempted none, while the first did read them.
    A 4-bit base, left whole on every process, is read by each."""
    if "--load-in-4bit" in case.options:
        assert case.reads[0] > 0 and case.reads[1] > 0
    else:
        assert case.reads[0] > 0 and case.reads[1] == 0


@pytest.fixture(scope="module")
def sft_adapter(data_dir, tmp_path_factory):
    """A one-step SFT LoRA run of the embedded default model (built for the SFT data), for --adapter."""
    out = tmp_path_factory.mktemp("sft") / "run"
    run("sft", data_dir, out, "--max-steps", "1", "--lora-r", "4", "--target-modules", "q_proj,v_proj")
    return out


def test_two_fsdp_processes_continue_an_adapter_as_one_process_does(sft_adapter, data_dir, tmp_path):
    """The second process builds the adapter's layers from its config alone; the first reads their weights."""
    options = [*COMMON, "--adapter", str(sft_adapter)]
    one = run("sft", data_dir, tmp_path / "one", *options, "--batch-size", "4")
    counts = tmp_path / "reads"
    two = torchrun("sft", data_dir, tmp_path / "two", *options, *TWO_PROCESS_SPLIT["dpo"], "--fsdp",
                   worker=(*READ_GUARD, str(counts), "fail"))
    assert_same_training(tmp_path / "two", tmp_path / "one", two, one, LR)
    assert int(Path(f"{counts}.1").read_text()) == 0


def test_what_the_first_fsdp_process_fails_to_load_is_every_process_error(sft_adapter, data_dir, tmp_path):
    """An adapter whose weights do not fit: the first process fails loading them, the second (which never reads them)
    reports the same error line instead of waiting for weights that will not come."""
    adapter = tmp_path / "adapter"
    shutil.copytree(sft_adapter, adapter)
    weights = adapter / "adapter_model.safetensors"
    save_file({key: torch.zeros(tensor.shape[0] + 1, *tensor.shape[1:]) for key, tensor in load_file(weights).items()},
              weights)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "pyprefopt.train", "--method", "sft", "--data", method_data("sft", data_dir), "--output-dir",
           str(tmp_path / "run"), "--adapter", str(adapter), "--fsdp", "--max-steps", "1", "--batch-size", "2"]
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    # Both processes write their line to the one stderr pipe, where the two writes can land on one line.
    errors = re.findall(r"error: .*?(?=error: |$)", result.stderr, flags=re.M)
    assert result.returncode != 0 and len(errors) == 2, result.stderr[-4000:]
    assert errors[0] == errors[1] and "does not fit --model" in errors[0]


def test_a_checkpoint_of_two_fsdp_processes_resumes_in_one(case, data_dir, tmp_path, capsys):
    """Step 3 in one process from the step-2 checkpoint (resharded from two): the uninterrupted run's metrics and
    weights."""
    resumed = tmp_path / "resumed"
    shutil.copytree(case.two, resumed)
    for path in [resumed / "README.md", *resumed.glob("*.safetensors")]:
        path.unlink()
    shutil.rmtree(resumed / "checkpoints" / "step-00000003")
    capsys.readouterr()
    got = run(case.method, data_dir, resumed, *case.options, "--batch-size", "4", "--fsdp", "--save-every", "2",
              "--resume")
    assert f"resuming from {resumed / 'checkpoints' / 'step-00000002'} (step 2 of 3)" in capsys.readouterr().err
    assert_same_training(resumed, case.two, got, case.two_records, LR)


def test_what_fsdp_cannot_step_with_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--method", "dpo", "--fsdp", "--optim", "adamw_8bit"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: --fsdp cannot ") and "8-bit AdamW takes plain tensors" in err[0]


def test_a_resume_may_split_the_global_batch_otherwise_where_the_steps_stay_the_same():
    """2 processes x --batch-size 2 wrote the checkpoint; 1 process resumes it."""
    written = {"examples_per_step": 4, "batch_size": 2, "processes": 2}

    def check(method, batch_size, grad_accum):
        args = SimpleNamespace(method=method, batch_size=batch_size, grad_accum=grad_accum)
        checkpoint.check_batch_split(Path("step-00000002"), written, args, world=1)

    for method in ("sft", "dpo", "ipo"):
        check(method, 1, 4)
    check("kto", 4, 1)
    check("cpo", 2, 2)
    with pytest.raises(RunError, match="4 examples per step, this run takes 8"):
        check("dpo", 4, 2)
    with pytest.raises(RunError, match=r"global micro-batch of 4 .* resume with --batch-size x processes = 4"):
        check("kto", 2, 2)
    with pytest.raises(RunError, match="cpo's NLL term .* resume with --batch-size 2"):
        check("cpo", 4, 1)
