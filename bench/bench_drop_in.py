"""TRL's DPOTrainer with and without `pyprefopt.drop_in.patch_trl()`: train-step time and peak memory on CPU
as the vocabulary grows (fp32, a 2-layer Qwen3 of hidden 512, 4 pairs of 256 tokens, 192 completion tokens).

    pytest bench/bench_drop_in.py                                   # quick: a small vocabulary (CI)
    python -m bench.bench_drop_in --table [--quick] [--json FILE]   # the table: 32000, 64000, 151936

Each (variant, vocabulary) runs in its own process: one warm-up `training_step` (forward + backward through
the trainer, no optimizer step), then ROUNDS timed ones; peak extra memory is the resident set's high-water mark
(VmHWM) after them minus the RSS before the first step. With and without pyprefopt alternate per vocabulary, so
drift hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import pytest

from bench.resident_memory import peak_rss_mib, rss_mib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = os.environ.get("PYPREFOPT_BENCH_QUICK", "1").strip().lower() not in ("0", "false", "no", "off")
FULL_VOCABS = (32000, 64000, 151936)
QUICK_VOCABS = (4096,)
HIDDEN, LAYERS, PAIRS, PROMPT_TOKENS, COMPLETION_TOKENS = 512, 2, 4, 64, 192
QUICK_SIZES = dict(hidden=64, pairs=2, prompt_tokens=8, completion_tokens=24)
VARIANTS = ("trl", "pyprefopt")


def build_trainer(vocab, variant, output_dir, hidden=HIDDEN, pairs=PAIRS, prompt_tokens=PROMPT_TOKENS,
                  completion_tokens=COMPLETION_TOKENS):
    """A DPOTrainer on random "words" (one token each) of a WordLevel vocabulary of `vocab` entries."""
    import torch
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM
    from trl import DPOConfig, DPOTrainer

    from pyprefopt import drop_in

    if variant == "pyprefopt":
        drop_in.patch_trl()
    words = [f"w{i}" for i in range(vocab - 3)]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(["<pad>", "<eos>", "<unk>", *words])},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                        unk_token="<unk>")
    g = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=g).tolist())

    # One completion token fewer: the trainer appends EOS.
    dataset = Dataset.from_dict({
        "prompt": [text(prompt_tokens) for _ in range(pairs)],
        "chosen": [" " + text(completion_tokens - 1) for _ in range(pairs)],
        "rejected": [" " + text(completion_tokens - 1) for _ in range(pairs)],
    })
    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=LAYERS,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8,
                         max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                         bos_token_id=None)
    torch.manual_seed(0)
    model, ref_model = Qwen3ForCausalLM(config), Qwen3ForCausalLM(config)
    args = DPOConfig(output_dir=output_dir, report_to="none", per_device_train_batch_size=pairs, use_cpu=True,
                     bf16=False, disable_tqdm=True, max_length=prompt_tokens + completion_tokens + 8, beta=0.1)
    return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer)


def measure(vocab, variant, rounds, sizes):
    """In this process: seconds per training_step (median), peak extra MiB, the loss."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(vocab, variant, tmp, **sizes)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.current_gradient_accumulation_steps = 1  # set by train(), which this bypasses
        tokens = int(batch["input_ids"].numel()) if "input_ids" in batch else None
        before = rss_mib()
        loss = trainer.training_step(trainer.model, batch)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            trainer.training_step(trainer.model, batch)
            times.append(time.perf_counter() - start)
        # The high-water mark, not ru_maxrss: an exec'd process's ru_maxrss counts the peak of the one that spawned it.
        peak = peak_rss_mib() - before
    return {"vocab": vocab, "variant": variant, "seconds": statistics.median(times), "peak_extra_mib": peak,
            "loss": float(loss), "tokens": tokens}


def measure_in_subprocess(vocab, variant, rounds, quick):
    code = (f"import json; import bench.bench_drop_in as b; print(json.dumps(b.measure({vocab}, {variant!r}, "
            f"{rounds}, {QUICK_SIZES if quick else {}!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.heavy
@pytest.mark.parametrize("vocab", QUICK_VOCABS if QUICK else FULL_VOCABS)
def test_dpo_trainer_step_with_and_without_pyprefopt(vocab):
    """Same loss with and without pyprefopt; pyprefopt's peak extra memory is not larger."""
    pytest.importorskip("trl")
    rounds = 2 if QUICK else 3
    trl_run = measure_in_subprocess(vocab, "trl", rounds, QUICK)
    ours = measure_in_subprocess(vocab, "pyprefopt", rounds, QUICK)
    assert abs(ours["loss"] - trl_run["loss"]) <= 1e-5 * max(1.0, abs(trl_run["loss"]))
    if not QUICK:
        assert ours["peak_extra_mib"] < trl_run["peak_extra_mib"]


def table(quick, json_path):
    vocabs = QUICK_VOCABS if quick else FULL_VOCABS
    rows = []
    for vocab in vocabs:
        runs = {v: measure_in_subprocess(vocab, v, 2 if quick else 3, quick) for v in VARIANTS}
        rows.append(runs)
    print("| vocab | TRL step ms | pyprefopt step ms | time ratio | TRL peak extra MiB | pyprefopt peak extra MiB "
          "| memory saved MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for runs in rows:
        t, p = runs["trl"], runs["pyprefopt"]
        print(f"| {t['vocab']} | {t['seconds'] * 1e3:.0f} | {p['seconds'] * 1e3:.0f} "
              f"| {p['seconds'] / t['seconds']:.2f} "
              f"| {t['peak_extra_mib']:.0f} | {p['peak_extra_mib']:.0f} "
              f"| {t['peak_extra_mib'] - p['peak_extra_mib']:.0f} "
              f"| {p['peak_extra_mib'] / t['peak_extra_mib']:.2f} |")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table", action="store_true", required=True)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    cli = parser.parse_args()
    table(cli.quick, cli.json)
