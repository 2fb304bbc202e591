"""`torchrun --nproc_per_node 2 -m pyprefopt.train --fsdp`: two processes sharding the model (FSDP2, gloo on CPU)
train what one process does with the same global batch, for a paired method (dpo) and an unpaired one (kto), LoRA
and --full; the sharded checkpoint two processes wrote resumes in one process and ends where the uninterrupted run
did; what --fsdp cannot do, and a resume that would compute other steps, are refused.

Each case runs torchrun once (3 steps, checkpoints at steps 2 and 3), shared by its two tests. The --full cases train a
tiny Qwen3 whose head is tied to its embeddings (one parameter under two names, in the FSDP root's group), the LoRA
cases the embedded default. The processes split the global batch of 4 differently from the one process (dpo: 1 example x
2 micro-batches each, kto: 2 each, its global micro-batch kept), and evaluate in batches of 3, which leaves one
process a batch short (sequence_logps_all fills it up)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from pyprefopt import checkpoint, train
from pyprefopt.errors import RunError

from test_train import assert_same_training, data_dir, one_thread_and_private_cache, run, torchrun  # noqa: F401
from tiny_models import qwen_config, save_tiny_model

LR = 1e-2
COMMON = ["--max-steps", "3", "--lr", str(LR), "--eval-batch-size", "3", "--eval-every", "2"]
# --batch-size and --grad-accum of the two processes; one process takes --batch-size 4.
TWO_PROCESS_SPLIT = {"dpo": ["--batch-size", "1", "--grad-accum", "2"], "kto": ["--batch-size", "2"]}
CASES = {"dpo-lora": ("dpo", False), "dpo-full": ("dpo", True), "kto-lora": ("kto", False), "kto-full": ("kto", True)}


@dataclass
class Case:
    method: str
    options: list  # the options of every run of the case but the batch split and --fsdp
    one: Path  # one process, without --fsdp
    two: Path  # two processes with --fsdp, checkpoints at steps 2 and 3
    one_records: list
    two_records: list


@pytest.fixture(scope="module")
def tied_qwen3(data_dir, tmp_path_factory):
    from transformers import Qwen3Config

    return save_tiny_model(tmp_path_factory.mktemp("tied-qwen3"), data_dir, qwen_config(Qwen3Config))


@pytest.fixture(scope="module", params=list(CASES))
def case(request, data_dir, tied_qwen3, tmp_path_factory):
    method, full = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    options = [*COMMON, "--model", str(tied_qwen3), "--full"] if full else COMMON
    # First: it also builds the default model into the cache the torchrun processes read.
    one_records = run(method, data_dir, root / "one", *options, "--batch-size", "4")
    two_records = torchrun(method, data_dir, root / "two", *options, *TWO_PROCESS_SPLIT[method], "--fsdp",
                           "--save-every", "2")
    return Case(method, options, root / "one", root / "two", one_records, two_records)


def test_two_processes_with_fsdp_train_what_one_process_does(case):
    assert_same_training(case.two, case.one, case.two_records, case.one_records, LR)
    sharded = case.two / "checkpoints" / "step-00000002" / checkpoint.SHARDED_STATE
    assert sorted(p.name for p in sharded.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


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


@pytest.mark.parametrize("option, reason", [(["--load-in-4bit"], "quantisation state of bitsandbytes' 4-bit weights"),
                                            (["--optim", "adamw_8bit"], "8-bit AdamW takes plain tensors")])
def test_what_fsdp_cannot_shard_or_step_is_refused(option, reason, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--method", "dpo", "--fsdp", *option])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: --fsdp cannot ") and reason in err[0]


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
