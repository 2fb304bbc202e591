"""`torchrun --nproc_per_node 2 -m pyprefopt.train --fsdp`: two processes sharding the model (FSDP2, gloo on CPU)
train what one process does with the same global batch, for a paired method (dpo) and an unpaired one (kto), LoRA,
QLoRA (its 4-bit base left whole on each process) and --full, and continuing an --adapter; the sharded checkpoint two
processes wrote resumes in one process and ends where the uninterrupted run did; only the first process reads the
checkpoint (but a 4-bit base), a block of rows at a time (its setup's peak memory stays near the second's), or whole
where transformers converts the checkpoint as it loads it, and an error loading it is every process's; what --fsdp
cannot do, and a resume that would compute other steps, are refused.

Each case runs torchrun once (3 steps, checkpoints at steps 2 and 3), shared by its three tests. The --full cases train
a tiny Qwen3 whose head is tied to its embeddings (one parameter under two names, in the FSDP root's group), the LoRA
cases the embedded default. The processes split the global batch of 4 differently from the one process (dpo: 1 example x
2 micro-batches each, kto: 2 each, its global micro-batch kept), and evaluate in batches of 3, which leaves one
process a batch short (sequence_logps_all fills it up)."""

from __future__ import annotations

import json
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

from pyprefopt import checkpoint, model_loading, train
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
# Its --train-worker runs the train CLI under torchrun and writes each process's peak resident memory.
BENCH_DISTRIBUTED = ("-m", "bench.bench_distributed")
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


def two_fsdp_processes_error(data_dir, out, *extra) -> str:
    """The `error:` line of two --fsdp processes of an sft run with `extra` options that fails: the same from
    each."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "pyprefopt.train", "--method", "sft", "--data", method_data("sft", data_dir), "--output-dir", str(out),
           "--fsdp", "--max-steps", "1", "--batch-size", "2", *extra]
    result = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    # Both processes write their line to the one stderr pipe, where the two writes can land on one line.
    errors = re.findall(r"error: .*?(?=error: |$)", result.stderr, flags=re.M)
    assert result.returncode != 0 and len(errors) == 2, result.stderr[-4000:]
    assert errors[0] == errors[1]
    return errors[0]


def test_what_the_first_fsdp_process_fails_to_load_is_every_process_error(sft_adapter, data_dir, tmp_path):
    """An adapter whose weights do not fit: the first process fails loading them, the second (which never reads them)
    reports the same error line instead of waiting for weights that will not come."""
    adapter = tmp_path / "adapter"
    shutil.copytree(sft_adapter, adapter)
    weights = adapter / "adapter_model.safetensors"
    save_file({key: torch.zeros(tensor.shape[0] + 1, *tensor.shape[1:]) for key, tensor in load_file(weights).items()},
              weights)
    assert "does not fit --model" in two_fsdp_processes_error(data_dir, tmp_path / "run", "--adapter", str(adapter))


def test_a_checkpoint_unlike_its_config_is_every_fsdp_process_error(tied_qwen3, data_dir, tmp_path):
    """The first process finds a weight of another shape in the checkpoint than the model its config describes, before
    any process waits for its rows."""
    model = tmp_path / "model"
    shutil.copytree(tied_qwen3, model)
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    config["intermediate_size"] += 1
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    error = two_fsdp_processes_error(data_dir, tmp_path / "run", "--model", str(model))
    # The first such weight in the checkpoint's file order: one of a layer's three MLP weights.
    shapes = {"gate_proj": ("[128, 64]", "[129, 64]"), "up_proj": ("[128, 64]", "[129, 64]"),
              "down_proj": ("[64, 128]", "[64, 129]")}
    weight = re.search(r"its checkpoint's model\.layers\.\d+\.mlp\.(\w+)\.weight", error)
    assert weight and weight.group(1) in shapes, error
    stored, built = shapes[weight.group(1)]
    name = weight.group(0).removeprefix("its checkpoint's ")
    assert f"--model {model}: its checkpoint's {name} is {stored}, where the model its config.json describes has " \
           f"{name} {built}" in error


@pytest.fixture(scope="module")
def deep_qwen3(data_dir, tmp_path_factory):
    """A Qwen3 of 12 layers whose weights, 80 MiB of them, dwarf what else its processes hold, its largest weight
    2 MiB."""
    from transformers import Qwen3Config

    def make_config(vocab_size, **ids):
        return Qwen3Config(vocab_size=vocab_size, hidden_size=256, intermediate_size=2048, num_hidden_layers=12,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                           bos_token_id=None, **ids)

    return save_tiny_model(tmp_path_factory.mktemp("deep-qwen3"), data_dir, make_config)


def test_the_first_fsdp_process_never_holds_the_whole_checkpoint(deep_qwen3, data_dir, tmp_path):
    """The first process's peak resident memory over setup (bench.bench_distributed's measure: from the start
    until the model is sharded and filled) stays within half the weights of the second's, which reads nothing and
    receives its shards: the first reads and sends a block of rows at a time (and holds the LoRA factors whole),
    where loading the whole model before sharding it put its peak more than the whole weights higher."""
    peaks = tmp_path / "peaks"
    torchrun("sft", data_dir, tmp_path / "run", "--model", str(deep_qwen3), "--fsdp", "--max-steps", "1",
             "--batch-size", "2", "--max-length", "64", worker=(*BENCH_DISTRIBUTED, "--train-worker", str(peaks)))
    first, second = (json.loads(Path(f"{peaks}.{rank}").read_text())["setup_mib"] for rank in range(2))
    weights_mib = (deep_qwen3 / "model.safetensors").stat().st_size / 2**20
    assert weights_mib > 64 and first - second < weights_mib / 2, (first, second, weights_mib)


def test_a_checkpoint_transformers_converts_as_it_loads_is_loaded_whole_by_the_first_fsdp_process(data_dir, tmp_path):
    """A mixture of experts' checkpoint keeps a tensor an expert, which transformers fuses into one as it loads them:
    not every weight can be read under its name, so the first process loads the whole model and hands out its
    weights, and two processes train what one does."""
    from transformers import AutoConfig, Qwen3MoeConfig

    def tiny_moe(vocab_size, **ids):
        return Qwen3MoeConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              num_experts=4, num_experts_per_tok=2, bos_token_id=None, **ids)

    moe = save_tiny_model(tmp_path / "moe", data_dir, tiny_moe)
    args = train.parse_args(["--method", "sft", "--model", str(moe), "--fsdp"])
    config = AutoConfig.from_pretrained(moe)
    skeleton = model_loading._skeleton(args, config, str(moe), torch.device("cpu"))
    _, not_streamed = model_loading._stored_tensors(skeleton, str(moe), config, multimodal=False)
    assert "model.layers.0.mlp.experts.gate_up_proj" in not_streamed
    options = [*COMMON, "--model", str(moe)]
    one = run("sft", data_dir, tmp_path / "one", *options, "--batch-size", "4")
    two = torchrun("sft", data_dir, tmp_path / "two", *options, *TWO_PROCESS_SPLIT["dpo"], "--fsdp")
    assert_same_training(tmp_path / "two", tmp_path / "one", two, one, LR)


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
