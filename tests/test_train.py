"""`python -m pyprefopt.train`: every method trains, a SIGKILLed run resumes to the same adapter, two data-parallel
processes compute what one does, bad data fails clearly, and the adapter loads in PEFT.

The runs use small Arabic/Persian data sets (`data_dir`, written by tests/synthetic_data.py) and the embedded tiny
Qwen3, built into a per-session cache. Torch runs one thread in these tests (and their subprocesses): on a small
shared CPU, OpenMP threads spinning against other processes make tiny ops hundreds of times slower, and one thread
also keeps the in-process and subprocess runs numerically identical.

`test_eval_metrics_move_the_right_way` is marked heavy, as the benchmarks are: CI runs it at its quick size
(PYPREFOPT_BENCH_QUICK unset or 1); PYPREFOPT_BENCH_QUICK=0 trains longer on more data.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pyprefopt import data as D
from pyprefopt import losses, train
from pyprefopt.checkpoint import checkpoints_newest_first
from pyprefopt.packed_attention import use_packed_attention
from tests.synthetic_data import write_data

ROOT = Path(__file__).resolve().parent.parent
QUICK = os.environ.get("PYPREFOPT_BENCH_QUICK", "1").strip().lower() not in ("0", "false", "no", "off")
PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected")
STEP_METRICS = ("grad_norm", "learning_rate", "tokens_per_second", "peak_memory_mib")


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_private_cache(tmp_path_factory):
    threads = torch.get_num_threads()
    cache = os.environ.get("PYPREFOPT_CACHE")
    torch.set_num_threads(1)
    os.environ["PYPREFOPT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    torch.set_num_threads(threads)
    if cache is None:
        del os.environ["PYPREFOPT_CACHE"]
    else:
        os.environ["PYPREFOPT_CACHE"] = cache


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_data(root, n_train=32, n_test=8)
    return root


def subprocess_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def method_data(method, data_dir):
    """The synthetic data set of the method's format (`Method.data_format`)."""
    return str(data_dir / losses.METHODS[method].data_format)


def run(method, data_dir, out, *extra):
    argv = ["--method", method, "--data", method_data(method, data_dir), "--output-dir", str(out), *extra]
    assert train.main(argv) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def torchrun(method, data_dir, out, *extra, env=None, worker=("-m", "pyprefopt.train")):
    """`torchrun --nproc_per_node 2 -m pyprefopt.train` (2 gloo CPU processes), or another `worker` taking the train
    CLI's arguments (`-m tests.NAME ...`: torchrun runs from the repository root); the metrics records."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *worker,
           "--method", method, "--data", method_data(method, data_dir), "--output-dir", str(out),
           *extra]
    result = subprocess.run(cmd, env=env or subprocess_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def adapter(out):
    return load_file(out / "adapter_model.safetensors")


def trained_weights(out):
    """The run's trained tensors: its adapter, or with --full the whole model."""
    return adapter(out) if (out / "adapter_model.safetensors").exists() else load_file(out / "model.safetensors")


# ------------------------------------------------------------------------------------------- training

EMBEDDED_DATA = all((D.default_data_dir(m) / "train.jsonl").is_file() for m in losses.METHODS)


@pytest.mark.skipif(not EMBEDDED_DATA, reason="the embedded data (pyprefopt/data/*/train.jsonl) has not landed yet")
@pytest.mark.parametrize("method", list(losses.METHODS))
def test_embedded_default_trains(method, tmp_path):
    """What a newcomer runs: no --model, no --data."""
    out = tmp_path / "run"
    assert train.main(["--method", method, "--output-dir", str(out), "--max-steps", "2"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert (out / "README.md").is_file() and (out / "adapter_model.safetensors").is_file()



@pytest.mark.parametrize("method", list(losses.METHODS))
def test_each_method_trains_and_writes_its_outputs(method, data_dir, tmp_path):
    out = tmp_path / "run"
    records = run(method, data_dir, out, "--max-steps", "3", "--batch-size", "4", "--eval-every", "2")
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    expected = {"sft": ("loss", "nll_loss"), "cpo": PAIR_METRICS + ("nll_loss",),
                "kto": ("loss", "kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"),
                "orpo": PAIR_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen")}
    for record in steps:
        for name in expected.get(method, PAIR_METRICS) + STEP_METRICS:
            assert name in record and torch.isfinite(torch.tensor(record[name])), (name, record)
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 3]
    held_out = ("loss", "perplexity") if method == "sft" else expected.get(method, PAIR_METRICS)
    for record in evals:
        for name in held_out:
            assert torch.isfinite(torch.tensor(record[f"eval_{name}"])), (name, record)
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()
    card = (out / "README.md").read_text(encoding="utf-8")
    # The card's figures are the run's: its step count and the last step's logged loss.
    assert "| optimizer steps | 3 |" in card
    assert f"| loss | {steps[-1]['loss']:.4g} |" in card
    tensors = adapter(out)
    assert tensors and all(torch.isfinite(t).all() for t in tensors.values())
    assert any(k.endswith("lora_B.weight") and t.abs().max() > 0 for k, t in tensors.items())


def test_adapter_loads_in_peft_and_matches_our_model(data_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pyprefopt.lora import load_lora_adapter

    out = tmp_path / "run"
    run("dpo", data_dir, out, "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2")
    config = json.loads((out / "adapter_config.json").read_text())
    base_path = config["base_model_name_or_path"]
    assert Path(base_path).is_dir()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), str(out)).eval()
    ours = load_lora_adapter(AutoModelForCausalLM.from_pretrained(base_path), out).eval()
    plain = AutoModelForCausalLM.from_pretrained(base_path).eval()
    ids = torch.randint(0, plain.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, base_logits = peft_model(ids).logits, ours(ids).logits, plain(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (want - base_logits).abs().max() > 1e-4


def test_merge_and_qlora(data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    records = run("sft", data_dir, out, "--max-steps", "2", "--batch-size", "4", "--load-in-4bit", "--merge")
    assert torch.isfinite(torch.tensor(records[-1]["loss"]))
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    assert merged.config.vocab_size > 0


def test_full_finetune_from_a_local_checkpoint_on_parquet_data(data_dir, tmp_path):
    """--model PATH (a local transformers checkpoint, here a copy of the default base), --data as .parquet,
    --full: every weight trains and the run writes a standalone model that transformers loads."""
    import datasets
    from transformers import AutoModelForCausalLM

    from pyprefopt.default_model import default_model_path

    rows = D.read_rows(data_dir / "preference" / "train.jsonl")
    parquet = tmp_path / "pairs" / "train.parquet"
    parquet.parent.mkdir()
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    base = tmp_path / "base"
    shutil.copytree(default_model_path(D.corpus(D.normalise_rows(rows, "dpo", "test"))), base)
    out = tmp_path / "run"
    argv = ["--method", "dpo", "--model", str(base), "--data", str(parquet), "--output-dir", str(out), "--full",
            "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2"]
    assert train.main(argv) == 0
    assert not (out / "adapter_model.safetensors").exists()
    trained = AutoModelForCausalLM.from_pretrained(out).state_dict()
    original = AutoModelForCausalLM.from_pretrained(base).state_dict()
    changed = [name for name, t in original.items() if not torch.equal(t, trained[name])]
    # Full fine-tuning: the embeddings, attention, MLP and norm weights all moved, not only some adapter.
    for part in ("embed_tokens", "q_proj", "down_proj", "norm"):
        assert any(part in name for name in changed), part


# -------------------------------------------------------------------------------------------- resume


def test_resume_after_sigkill_ends_with_the_same_adapter(data_dir, tmp_path):
    args = ["--max-steps", "12", "--batch-size", "4", "--save-every", "4"]
    straight = tmp_path / "straight"
    want = run("kto", data_dir, straight, *args)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "pyprefopt.train", "--method", "kto", "--data", str(data_dir / "kto"),
           "--output-dir", str(killed), *args]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first_checkpoint = killed / "checkpoints" / "step-00000004"
    deadline = time.monotonic() + 300
    while not first_checkpoint.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (killed / "README.md").exists(), "the run finished before it was killed: nothing was resumed"

    got = run("kto", data_dir, killed, *args, "--resume")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    assert [r.get("loss") for r in got] == [r.get("loss") for r in want]
    want_tensors, got_tensors = adapter(straight), adapter(killed)
    assert want_tensors.keys() == got_tensors.keys()
    for key in want_tensors:
        assert torch.equal(got_tensors[key], want_tensors[key]), key


def test_resume_with_8bit_adamw_ends_with_the_same_adapter(data_dir, tmp_path):
    """bitsandbytes' 8-bit AdamW state (shared quantisation maps, nested dicts) round-trips through a checkpoint."""
    args = ["--max-steps", "4", "--batch-size", "4", "--optim", "adamw_8bit"]
    straight = tmp_path / "straight"
    run("dpo", data_dir, straight, *args)
    resumed = tmp_path / "resumed"
    run("dpo", data_dir, resumed, *args, "--save-every", "2")
    for name in ("README.md", "adapter_model.safetensors"):
        (resumed / name).unlink()
    run("dpo", data_dir, resumed, *args, "--save-every", "2", "--resume")
    want, got = adapter(straight), adapter(resumed)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def refusal(argv, capsys) -> str:
    """The one `error: ...` line of a run train.main refuses with exit status 2."""
    capsys.readouterr()
    assert train.main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_resume_refuses_changed_options(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    run("dpo", data_dir, out, "--max-steps", "2", "--batch-size", "4", "--save-every", "1")
    assert "--lr was 0.001, now 0.01" in refusal(
        ["--method", "dpo", "--data", str(data_dir / "preference"), "--output-dir", str(out),
         "--max-steps", "2", "--batch-size", "4", "--save-every", "1", "--resume", "--lr", "1e-2"], capsys)
    assert "not empty" in refusal(["--method", "dpo", "--data", str(data_dir / "preference"), "--output-dir",
                                   str(out)], capsys)


def test_a_run_from_before_the_newer_options_resumes(data_dir, tmp_path, capsys):
    """A run whose run_args.json predates --fsdp, --adapter and --warmup-steps, and whose checkpoints do not record
    the batch split, resumes where it stopped; its batch split must stay (it predates resuming with another)."""
    out = tmp_path / "run"
    common = ["--max-steps", "3", "--batch-size", "4", "--save-every", "1"]
    run("dpo", data_dir, out, *common)
    args_file = out / "run_args.json"
    saved = json.loads(args_file.read_text(encoding="utf-8"))
    for newer in ("fsdp", "adapter", "warmup_steps"):
        saved.pop(newer)
    args_file.write_text(json.dumps(saved), encoding="utf-8")
    checkpoints = checkpoints_newest_first(out)[::-1]
    for checkpoint in checkpoints:
        state = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
        for newer in ("batch_size", "processes"):
            state["data_position"].pop(newer)
        (checkpoint / "state.json").write_text(json.dumps(state), encoding="utf-8")
    shutil.rmtree(checkpoints[-1])  # resume from an earlier step than the last
    assert "--batch-size was 4, now 2" in refusal(
        ["--method", "dpo", "--data", str(data_dir / "preference"), "--output-dir", str(out), "--resume",
         "--max-steps", "3", "--batch-size", "2", "--grad-accum", "2", "--save-every", "1"], capsys)
    capsys.readouterr()
    assert train.main(["--method", "dpo", "--data", str(data_dir / "preference"), "--output-dir", str(out),
                       "--resume", *common]) == 0
    assert f"resuming from {checkpoints[-2]}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- processes


def assert_same_training(got_dir, want_dir, got, want, lr):
    """Logged metrics agree closely. Trained weights (adapters, or --full models) agree up to Adam: its step
    lr * m / sqrt(v) is lr * sign(g) at first and follows the sign of any gradient entry near 0, so summation-order
    noise in such an entry can move it by up to lr per step (the only bound there is); such entries must stay rare."""
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        for name in ("loss", "kl", "nll_loss", "rewards/chosen", "eval_loss"):
            if name in b:
                assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-5), (name, a["step"])
    want_tensors, got_tensors = trained_weights(want_dir), trained_weights(got_dir)
    assert want_tensors.keys() == got_tensors.keys()
    for key in want_tensors:
        diff = (got_tensors[key] - want_tensors[key]).abs()
        assert diff.max() <= lr * len([r for r in want if "loss" in r]), key
        assert (diff > 1e-5).float().mean() < 1e-2, key


def test_two_processes_match_one_with_the_same_global_batch(data_dir, tmp_path):
    """kto under DDP: batches sharded, the KL point and the metrics all-reduced, gradients all-reduced by DDP once
    per accumulation window. (tests/test_train_distributed.py: the same under --fsdp.)"""
    common = ["--max-steps", "3", "--lr", "1e-2", "--grad-accum", "2"]
    one = tmp_path / "one"
    want = run("kto", data_dir, one, *common, "--batch-size", "4")
    two = tmp_path / "two"
    got = torchrun("kto", data_dir, two, *common, "--batch-size", "2")
    assert_same_training(two, one, got, want, 1e-2)


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_gradient_accumulation_matches_one_big_batch(method, data_dir, tmp_path):
    """sft's loss is a mean over the global batch's target tokens, dpo's over its pairs, however it is split."""
    common = ["--max-steps", "3", "--lr", "1e-2"]
    want = run(method, data_dir, tmp_path / "one", *common, "--batch-size", "4")
    got = run(method, data_dir, tmp_path / "accum", *common, "--batch-size", "2", "--grad-accum", "2")
    assert_same_training(tmp_path / "accum", tmp_path / "one", got, want, 1e-2)


# What a record measures of the machine rather than of the training.
VARYING = {"step_seconds", "tokens_per_second", "peak_memory_mib"}


def test_recomputed_mlps_train_as_the_kept_ones(data_dir, tmp_path):
    """--recompute-mlp changes what backward keeps, not what it computes: the same metrics and adapter bit for bit,
    LoRA dropout included (the recomputation draws the forward's masks again); a --resume may turn it on."""
    common = ["--max-steps", "3", "--lr", "1e-2", "--batch-size", "4", "--lora-dropout", "0.1"]
    want = run("dpo", data_dir, tmp_path / "kept", *common)
    got = run("dpo", data_dir, tmp_path / "recomputed", *common, "--recompute-mlp")
    assert [{k: v for k, v in r.items() if k not in VARYING} for r in got] == [
        {k: v for k, v in r.items() if k not in VARYING} for r in want]
    kept, recomputed = adapter(tmp_path / "kept"), adapter(tmp_path / "recomputed")
    assert kept.keys() == recomputed.keys() and all(torch.equal(kept[k], recomputed[k]) for k in kept)
    resumed = tmp_path / "resumed"
    run("dpo", data_dir, resumed, *common, "--save-every", "1")
    shutil.rmtree(checkpoints_newest_first(resumed)[0])
    run("dpo", data_dir, resumed, *common, "--save-every", "1", "--resume", "--recompute-mlp")
    assert all(torch.equal(kept[k], adapter(resumed)[k]) for k in kept)


def test_help_documents_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--output-dir", "--max-steps", "--epochs", "--batch-size", "--grad-accum", "--lr", "--beta",
                   "--max-length", "--seed", "--eval-every", "--save-every", "--lora-r", "--lora-alpha",
                   "--target-modules", "--load-in-4bit", "--full", "--resume", "--merge", "--warmup-ratio",
                   "--warmup-steps", "--adapter", "--fsdp"):
        assert option in text, option
    assert "(default: 0.001)" in text and "(default: 512)" in text and "default: runs/<method>-<UTC time>" in text
    # Options whose default gives way to another option say so (the words as one line: argparse wraps the help).
    words = " ".join(text.split())
    assert "default: 0.1 unless --warmup-steps" in words and "default: 16, or the --adapter's" in words
    assert "the base with the adapter disabled, as in TRL with a PEFT model" in words  # --adapter's reference model


# ------------------------------------------------------------------------------------------ bad data


def _write(path: Path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_bad_data_errors_name_the_problem(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(D.DataError, match="empty.jsonl: the file is empty"):
        D.read_rows(empty)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": \n')
    with pytest.raises(D.DataError, match="broken.jsonl:2: not valid JSON"):
        D.read_rows(broken)
    with pytest.raises(D.DataError, match="row 2: missing 'rejected'"):
        D.normalise_rows([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}], "dpo", "x")
    with pytest.raises(D.DataError, match="row 1: has no completion: the last message is from 'user'"):
        D.normalise_rows([{"messages": [{"role": "user", "content": "سلام"}]}], "sft", "x")
    with pytest.raises(D.DataError, match="row 1: 'completion' is empty"):
        D.normalise_rows([{"prompt": "a", "completion": "", "label": True}], "kto", "x")
    with pytest.raises(D.DataError, match="row 1: 'chosen' must be a list of"):
        D.normalise_rows([{"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"}], "dpo", "x")
    with pytest.raises(D.DataError, match="every KTO row is desirable"):
        D.normalise_rows([{"prompt": "a", "completion": "b", "label": True}] * 3, "kto", "x")
    with pytest.raises(D.DataError, match="'label' must be true or false"):
        D.normalise_rows([{"prompt": "a", "completion": "b", "label": "yes"}], "kto", "x")


def test_bad_data_stops_the_cli_before_anything_is_written(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    _write(data / "train.jsonl", [{"prompt": "a", "completion": "b", "label": True}] * 4)
    out = tmp_path / "run"
    assert "every KTO row is desirable" in refusal(["--method", "kto", "--data", str(data), "--output-dir", str(out)],
                                                   capsys)
    assert not out.exists()


def test_truncation_is_counted_and_prompts_masked(data_dir):
    from pyprefopt.default_model import build_tokenizer

    rows = D.normalise_rows(D.read_rows(data_dir / "preference" / "train.jsonl"), "dpo", "train")
    tokenizer = build_tokenizer(D.corpus(rows))
    full = D.tokenize(rows, "dpo", tokenizer, 4096, "train")
    assert full.truncated == 0 and full.dropped == 0
    longest = max(len(p) + len(c) for p, cs in zip(full.prompts, full.completions) for c in cs)
    cut = D.tokenize(rows, "dpo", tokenizer, longest - 1, "train")
    assert cut.truncated >= 1 and len(cut) == len(full)
    batch = D.collate(full, [0, 1], tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape and batch["input_ids"].shape[0] == 4
    # Row 0 is example 0's chosen sequence: labels score exactly its completion tokens, shifted by one.
    prompt, chosen = full.prompts[0], full.completions[0][0]
    labels = batch["labels"][0]
    assert (labels[: len(prompt) - 1] == D.IGNORE_INDEX).all()
    assert labels[len(prompt) - 1: len(prompt) - 1 + len(chosen)].tolist() == chosen
    assert (labels[len(prompt) - 1 + len(chosen):] == D.IGNORE_INDEX).all()
    with pytest.raises(D.DataError, match="every example's prompt fills max_length=2"):
        D.tokenize(rows, "dpo", tokenizer, 2, "train")


@pytest.mark.parametrize("sliding_window, checkpointing", [(None, False), (3, True)])
def test_packed_rows_give_the_padded_batch_states_and_gradients(sliding_window, checkpointing):
    """On CPU last_hidden runs a batch's real tokens packed into one row (pyprefopt.packed_attention): every real
    token's state and every LoRA gradient are those of the padded batch under transformers' own SDPA masks,
    sliding windows and recomputation (gradient checkpointing) included."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from pyprefopt.lora import inject_lora

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                         use_sliding_window=sliding_window is not None, sliding_window=sliding_window,
                         max_window_layers=1, attn_implementation="sdpa")
    model = Qwen3ForCausalLM(config)
    inject_lora(model, "all-linear", r=4, lora_alpha=8)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)  # B = 0 would leave the adapters out of the states
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    lengths = torch.tensor([5, 1, 9, 7])
    input_ids = torch.randint(1, 64, (4, 9)).masked_fill(torch.arange(9) >= lengths[:, None], 0)
    real = torch.arange(9) < lengths[:, None]
    probe = torch.randn(int(real.sum()), 32)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def states_and_grads(hidden):
        (hidden[real] * probe).sum().backward()
        grads = [p.grad.clone() for p in trainable]
        model.zero_grad(set_to_none=True)
        return hidden[real].detach(), grads

    want = states_and_grads(model.model(input_ids=input_ids, attention_mask=real.long()).last_hidden_state)
    assert use_packed_attention(model)
    got = states_and_grads(train.last_hidden(model.model, input_ids, lengths, torch.device("cpu")))
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    # The model computes what it did outside the packed forwards (transformers' masks, padding included).
    again = states_and_grads(model.model(input_ids=input_ids, attention_mask=real.long()).last_hidden_state)
    torch.testing.assert_close(again[0], want[0], rtol=0, atol=0)


def test_kto_kl_pairs_are_trls(tmp_path, capsys):
    """KTO's mismatched KL pairs are TRL 1.16's: TRL's own `KTOTrainer._prepare_dataset` (tokenise, drop over-long
    prompts, then `add_kl_completion_ids`: a `Dataset.map(batched=True, batch_size=per_device_train_batch_size)`
    rotating completions by one per chunk; trl/trainer/kto_trainer.py, near line 1141) runs on a stand-in trainer
    and must give our prompts, completions and KL completions, with a chunk that does not divide the data set."""
    from types import SimpleNamespace

    from datasets import Dataset
    from trl import KTOTrainer

    from pyprefopt.default_model import build_tokenizer

    words = "كتاب مدرسة قلم بيت شمس قمر ماء خبز".split()
    rows = []
    for i in range(12):
        prompt_words = 40 if i == 5 else 2 + i % 3  # row 5's prompt alone fills max_length: both drop it
        rows.append({"prompt": [{"role": "user", "content": " ".join(words[(i + k) % 8] for k in range(prompt_words))}],
                     "completion": [{"role": "assistant",
                                     "content": " ".join(words[(3 * i + k) % 8] for k in range(1 + i % 4))}],
                     "label": i % 3 != 0})
    rows = D.normalise_rows(rows, "kto", "x")
    tokenizer = build_tokenizer(D.corpus(rows))
    max_length, chunk = 30, 4
    ours = D.tokenize(rows, "kto", tokenizer, max_length, "x", kl_chunk=chunk)
    assert ours.dropped == 1 and len(ours) == 11 and len(ours) % chunk != 0
    # Chunks [0..3], [4..7], [8..10] of the 11 kept examples, each rotated by one.
    assert D.kl_completion_sources(11, chunk) == [3, 0, 1, 2, 7, 4, 5, 6, 10, 8, 9]
    trainer = SimpleNamespace(_tokenizer=tokenizer, calculate_KL=True, desirable_weight=1.0, undesirable_weight=1.0)
    args = SimpleNamespace(dataset_num_proc=None, max_length=max_length, per_device_train_batch_size=chunk)
    # "eval" takes the same path as "train" but for a desirable/undesirable balance warning.
    theirs = KTOTrainer._prepare_dataset(trainer, Dataset.from_list(rows), tokenizer, args, "eval")
    assert theirs["prompt_ids"] == ours.prompts
    assert theirs["completion_ids"] == [c[0] for c in ours.completions]
    assert theirs["KL_completion_ids"] == [c[1] for c in ours.completions]
    # A global micro-batch of one would pair every example with its own completion: refused, as TRL refuses it.
    data = tmp_path / "data"
    data.mkdir()
    _write(data / "train.jsonl", [{"prompt": "a", "completion": "b", "label": i % 2 == 0} for i in range(4)])
    out = tmp_path / "run"
    assert re.search("global micro-batch .* of at least 2", refusal(
        ["--method", "kto", "--data", str(data), "--output-dir", str(out), "--batch-size", "1"], capsys))
    assert not out.exists()


def test_standard_string_formats_are_accepted(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write(data / "train.jsonl", [{"prompt": f"سؤال {i} :", "chosen": " نعم", "rejected": " لا"} for i in range(8)])
    _write(data / "test.jsonl", [{"prompt": "سؤال :", "chosen": " نعم", "rejected": " لا"}] * 2)
    out = tmp_path / "run"
    assert train.main(["--method", "cpo", "--data", str(data), "--output-dir", str(out), "--max-steps", "2",
                       "--batch-size", "4"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert len(train_records) == 2


# ------------------------------------------------------------------------------------ longer, marked heavy


@pytest.mark.heavy
@pytest.mark.parametrize("method", list(losses.METHODS))
def test_eval_metrics_move_the_right_way(method, tmp_path):
    data = tmp_path / "data"
    write_data(data, n_train=48 if QUICK else 400, n_test=16 if QUICK else 64, seed=1)
    epochs = "2" if QUICK else "3"
    records = run(method, data, tmp_path / "run", "--epochs", epochs, "--batch-size", "4", "--lr", "3e-3")
    evals = [r for r in records if "eval_loss" in r]
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and last["step"] > 0
    if method == "sft":
        assert last["eval_perplexity"] < 0.8 * first["eval_perplexity"]
        return
    assert last["eval_rewards/margins"] > first["eval_rewards/margins"]
    if method != "kto":
        assert last["eval_rewards/accuracies"] >= 0.9


def test_two_processes_build_the_default_model_into_an_empty_cache(data_dir, tmp_path):
    """transformers saves a checkpoint from the first process only: the first builds the cached default model, the
    second waits and reads it (it once renamed its own tokenizer-only copy into the cache)."""
    env = dict(subprocess_env(), PYPREFOPT_CACHE=str(tmp_path / "cache"))
    records = torchrun("sft", data_dir, tmp_path / "run", "--max-steps", "1", "--batch-size", "2", env=env)
    assert any("loss" in r for r in records)
    (model_dir,) = (tmp_path / "cache" / "default-model").iterdir()
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()
