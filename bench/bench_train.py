"""Train-step throughput and peak memory of `python -m pyprefopt.train` against TRL 1.16's trainers (each method's
`trl_trainer` in `pyprefopt.losses.METHODS`: SFTTrainer, DPOTrainer for dpo and ipo, CPOTrainer, KTOTrainer,
ORPOTrainer) on the same tiny Qwen3, data and hyper-parameters.

    python -m bench.bench_train                          # every method, the embedded data, the table
    python -m bench.bench_train --synthetic 256          # on a synthetic Arabic/Persian set of 256 rows per split
    python -m bench.bench_train --methods dpo --steps 10 --json bench/results/train.json
    python -m bench.bench_train --real-shapes /tmp/real --threads 2 --steps 2 --warmup 1   # the reference cards
    python -m bench.bench_train --rounds 3 ...    # every case 3 times, the trainers taking turns to go first
    PYPREFOPT_BENCH_QUICK=0 pytest bench/bench_train.py -m heavy   # the pytest version at full size

`--real-shapes DIR` runs the reference model cards' recipes (`REAL_CARDS`) on their base architectures at the
real configs (Qwen3-1.7B and Qwen2.5-1.5B at V=151936, Gemma-3n-E4B's text model at V=262400) with random
weights, built once into DIR, the tokenizer the default model's (its ids index the real vocabulary; every
logit of it is still computed), on synthetic rows (4 held out), each card's micro-batch as its README command trains:
Gemma-3n's card's 2 examples accumulating 4, 8 for the Qwen cards (which name none: the train CLI's default, and TRL's
`per_device_train_batch_size` default, the trainer the cards were made with); `--batch-size` sets one for all.

Each (method, trainer) case runs in a fresh interpreter with OMP_NUM_THREADS=--threads, so memory is a per-process
high-water mark and no case inherits another's allocator or thread pool. The cases run one after another, minutes
apart at real shapes, on a machine whose speed can drift meanwhile: `--rounds N` runs each pair N times, alternating
which trainer goes first, and the table gives each ratio as the median of the rounds' own ratios. A case imports
everything it will use, builds the model and data, reads its resident set, then trains `--warmup + --steps` optimizer
steps; reported:

- tokens/s: tokens of the trained sequences (prompt + completion, no padding, chosen and rejected rows both
  counted; the same count for both trainers) over the wall time of the `--steps` timed optimizer steps (forward,
  backward, optimizer). TRL's step time is taken between its own `on_step_begin` and `on_step_end` callbacks (its
  batch is fetched and collated just before), pyprefopt's is the `step_seconds` it logs (collation included).
- peak extra MiB: the process's peak resident set at the end minus its resident set before the model is loaded
  (after every import, with the cached base model built and the rows read): both include loading the model, the
  LoRA layers, tokenising the data and training; pyprefopt's also its reference pass and its evaluations (TRL
  computes its reference log-probs every step and evaluates nothing here).

A case the kernel's out-of-memory killer ends is reported as such (its trainer does not fit the machine at these
settings), and the run goes on.

Matched settings: LoRA r=16, alpha=32, every linear layer but the head, no dropout; AdamW, lr 1e-3, cosine with
10 % warmup, clipping at 1.0; batch --batch-size, no accumulation; max_length 512; beta 0.1; fp32; no gradient
checkpointing (TRL 1.16 defaults to it; `--gradient-checkpointing` turns it on for both). TRL's SFT runs
on the same prompt/completion split as pyprefopt's (completion-only loss on the last assistant turn).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench import variants as V
from bench.resident_memory import peak_rss_mib, reset_peak_rss, rss_mib
from pyprefopt.losses import METHODS
from tests.synthetic_data import write_data

ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("pyprefopt", "trl")
# A case's result when the kernel's out-of-memory killer ended its worker.
OUT_OF_MEMORY = "killed_for_memory"
BETA, MAX_LENGTH, WARMUP_RATIO = 0.1, 512, 0.1
# The settings both trainers get: the tiny default model's (`base` None) unless a card says otherwise.
DEFAULT_RECIPE = dict(base=None, lora_r=16, lora_alpha=32.0, lora_dropout=0.0, targets="all-linear",
                      load_in_4bit=False, optim="adamw", lr=1e-3, weight_decay=0.0, grad_accum=1, seed=0, dtype="fp32",
                      recompute_mlp=False)
# --synthetic's word counts (fewest, most) per prompt and answer: varied, so batches carry padding as real data does.
SYNTHETIC_WORDS = dict(prompt_words=(8, 40), answer_words=(10, 60))


def reset_peak_after_loading():
    """The high-water mark started afresh once the model is loaded. Loading a checkpoint maps its file while it copies
    the weights out (into another dtype, too): a transient of the loader, the same for both trainers, that would
    otherwise decide the peak of a training run at real size."""
    gc.collect()
    reset_peak_rss()


def _memory(baseline: float, load_peak: float) -> dict:
    return {"peak_extra_mib": max(load_peak, peak_rss_mib()) - baseline,
            "train_peak_extra_mib": peak_rss_mib() - baseline}


# ------------------------------------------------------------------------------------------------ workers


def _base_model_and_rows(method, data_dir, base=None):
    from pyprefopt import data as D
    from pyprefopt.default_model import default_model_path

    train_rows, _, _ = D.load_splits(str(data_dir / METHODS[method].data_format), method)
    rows = D.normalise_rows(train_rows, method, "train")
    return base or default_model_path(D.corpus(rows)), rows


def run_pyprefopt(method, data_dir, steps, warmup, batch_size, checkpointing, recipe):
    # Everything the run imports, imported before the baseline (TRL's worker likewise imports before its own).
    import matplotlib.pyplot  # noqa: F401
    import safetensors.torch  # noqa: F401
    import tqdm.auto  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler  # noqa: F401

    from pyprefopt import lora, model_card, train  # noqa: F401

    base, _ = _base_model_and_rows(method, data_dir, recipe["base"])  # builds the cached base beforehand
    baseline = rss_mib()
    load_model, load_peak = train.load_model, []

    def load_then_reset_peak(*args, **kwargs):
        loaded = load_model(*args, **kwargs)
        load_peak.append(peak_rss_mib())
        reset_peak_after_loading()
        return loaded

    train.load_model = load_then_reset_peak
    with tempfile.TemporaryDirectory() as out:
        argv = ["--method", method, "--model", str(base), "--data", str(data_dir / METHODS[method].data_format),
                "--output-dir", f"{out}/run", "--max-steps", str(warmup + steps), "--batch-size", str(batch_size),
                "--grad-accum", str(recipe["grad_accum"]), "--lr", str(recipe["lr"]), "--beta", str(BETA),
                "--max-length", str(MAX_LENGTH), "--warmup-ratio", str(WARMUP_RATIO),
                "--weight-decay", str(recipe["weight_decay"]), "--optim", recipe["optim"],
                "--seed", str(recipe["seed"]), "--dtype", recipe["dtype"],
                "--lora-r", str(recipe["lora_r"]), "--lora-alpha", str(recipe["lora_alpha"]),
                "--lora-dropout", str(recipe["lora_dropout"]), "--target-modules", recipe["targets"]]
        if recipe["load_in_4bit"]:
            argv.append("--load-in-4bit")
        if checkpointing:
            argv.append("--gradient-checkpointing")
        elif recipe["recompute_mlp"]:
            argv.append("--recompute-mlp")
        train.main(argv)
        records = [json.loads(line) for line in open(f"{out}/run/metrics.jsonl", encoding="utf-8")]
    timed = [r for r in records if "step_seconds" in r and r["step"] > warmup]
    return {"tokens": sum(r["num_tokens"] for r in timed), "seconds": sum(r["step_seconds"] for r in timed),
            "step_ms": [1e3 * r["step_seconds"] for r in timed], "final_loss": timed[-1]["loss"]} | _memory(
                baseline, load_peak[0])


def run_trl(method, data_dir, steps, warmup, batch_size, checkpointing, recipe):
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback

    from pyprefopt.train import loss_hparams, parse_args

    base, rows = _base_model_and_rows(method, data_dir, recipe["base"])
    baseline = rss_mib()
    # As pyprefopt's --dtype: bf16 loads the model in bf16 and autocasts (PEFT keeps the adapter in fp32).
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[recipe["dtype"]]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(base)
    quantization = None
    if recipe["load_in_4bit"]:
        from transformers import AutoConfig

        from pyprefopt.model_loading import layers_left_16bit

        # As pyprefopt's --load-in-4bit: NF4 computing in --dtype, and the same layers left 16-bit (bitsandbytes'
        # CPU kernel cannot run Gemma-3n's Linear(hidden, 4) router at all).
        kept, head = layers_left_16bit(AutoConfig.from_pretrained(base))
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          llm_int8_skip_modules=kept + head, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, quantization_config=quantization)
    targets = recipe["targets"] if recipe["targets"] == "all-linear" else recipe["targets"].split(",")
    peft_config = LoraConfig(r=recipe["lora_r"], lora_alpha=recipe["lora_alpha"], lora_dropout=recipe["lora_dropout"],
                             target_modules=targets, task_type="CAUSAL_LM")
    common = dict(per_device_train_batch_size=batch_size, gradient_accumulation_steps=recipe["grad_accum"],
                  learning_rate=recipe["lr"], lr_scheduler_type="cosine",
                  warmup_steps=round(WARMUP_RATIO * (warmup + steps)), max_steps=warmup + steps,
                  weight_decay=recipe["weight_decay"], optim="adamw_bnb_8bit" if recipe["optim"] == "adamw_8bit"
                  else "adamw_torch_fused", max_grad_norm=1.0, logging_steps=1, save_strategy="no", eval_strategy="no",
                  report_to="none", use_cpu=True, bf16=dtype == torch.bfloat16, gradient_checkpointing=checkpointing,
                  max_length=MAX_LENGTH, seed=recipe["seed"], dataloader_num_workers=0, disable_tqdm=True)
    with tempfile.TemporaryDirectory() as out:
        record = METHODS[method]
        trainer_cls, config_cls = record.trl_classes()
        # The hyper-parameters pyprefopt's run takes from its options, under the same names (TRL's config fields).
        ours = parse_args(["--method", method, "--beta", str(BETA)])
        options = {record.options[name]: value for name, value in loss_hparams(ours).items()}
        # TRL at its best settings here: reference log-probs computed once before training, as pyprefopt does
        # (`padding_free` is FlashAttention-only for SFT and disabled in TRL 1.16's DPO).
        if record.needs_reference:
            options["precompute_ref_log_probs"] = True
        args = config_cls(output_dir=out, **record.trl_config, **options, **common)
        trainer = trainer_cls(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                              peft_config=peft_config)
        tokens_per_batch, step_seconds = [], []
        collate = trainer.data_collator

        def counting_collator(examples):
            batch = collate(examples)
            # CPOTrainer's and ORPOTrainer's collators keep TRL's older layout: chosen and rejected rows (prompt
            # included) apart.
            masks = ["attention_mask"] if "attention_mask" in batch else ["chosen_attention_mask",
                                                                          "rejected_attention_mask"]
            tokens_per_batch.append(sum(int(batch[m].sum()) for m in masks))
            return batch

        class StepTimer(TrainerCallback):
            def on_step_begin(self, *a, **k):
                self.t0 = time.perf_counter()

            def on_step_end(self, *a, **k):
                step_seconds.append(time.perf_counter() - self.t0)

        trainer.data_collator = counting_collator
        trainer.add_callback(StepTimer())
        load_peak = peak_rss_mib()
        reset_peak_after_loading()
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # The collator runs once per micro-batch, in order (no worker processes; accelerate's loader collates one batch
    # ahead, which the run never uses): an optimizer step's tokens are those of its `grad_accum` micro-batches.
    accum = recipe["grad_accum"]
    if len(tokens_per_batch) < (warmup + steps) * accum:
        raise RuntimeError(f"TRL collated {len(tokens_per_batch)} micro-batches for {warmup + steps} steps of {accum}: "
                           "the token count per step cannot be read off them")
    step_tokens = [sum(tokens_per_batch[i * accum:(i + 1) * accum]) for i in range(warmup + steps)]
    timed_tokens = step_tokens[warmup:warmup + steps]
    timed = step_seconds[warmup:warmup + steps]
    return {"tokens": sum(timed_tokens), "seconds": sum(timed), "step_ms": [1e3 * s for s in timed],
            "final_loss": losses[-1]} | _memory(baseline, load_peak)


def worker(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=IMPLS, required=True)
    p.add_argument("--method", choices=tuple(METHODS), required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--recipe", type=json.loads, required=True)
    a = p.parse_args(argv)
    run = run_pyprefopt if a.impl == "pyprefopt" else run_trl
    result = run(a.method, a.data, a.steps, a.warmup, a.batch_size, a.gradient_checkpointing, a.recipe)
    result.update(impl=a.impl, method=a.method, tokens_per_second=result["tokens"] / result["seconds"])
    with open(a.out, "w", encoding="utf-8") as f:
        json.dump(result, f)


# ------------------------------------------------------------------------------------------ real shapes


def real_configs(pad_token_id, eos_token_id):
    """The reference cards' base architectures at their real sizes (the published configs' shapes)."""
    from transformers import Gemma3nTextConfig, Qwen2Config, Qwen3Config

    ids = dict(pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=None)
    return {
        "Qwen3-1.7B": Qwen3Config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                  num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                                  max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True, **ids),
        "Qwen2.5-1.5B": Qwen2Config(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                    num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768,
                                    rms_norm_eps=1e-6, tie_word_embeddings=True, **ids),
        # transformers' defaults are Gemma-3n-E4B's text model (V=262400, per-layer inputs, AltUp, LAuReL, soft-cap).
        "Gemma-3n-E4B": Gemma3nTextConfig(**ids),
    }


# (base, method, recipe): README's reference recipes. Qwen3-1.7B with IPO, CPO and KTO (LoRA on every linear layer);
# Qwen2.5-1.5B LoRA SFT (its MLPs recomputed in backward) then DPO (r=16, alpha=32, dropout 0.05, q_proj/v_proj);
# Gemma-3n-E4B QLoRA SFT (r=8, alpha=16, the MLP, 8-bit AdamW, lr 2e-5, weight decay 0.01, seed 3407, batch 2 x
# accumulation 4). The Qwen cards name no batch: their commands train at the CLI's default --batch-size, TRL's too.
QWEN_BATCH = 8
QWEN25_LORA = dict(lora_dropout=0.05, targets="q_proj,v_proj", batch_size=QWEN_BATCH)
REAL_CARDS = [
    ("Qwen3-1.7B", "ipo", dict(batch_size=QWEN_BATCH)), ("Qwen3-1.7B", "cpo", dict(batch_size=QWEN_BATCH)),
    ("Qwen3-1.7B", "kto", dict(batch_size=QWEN_BATCH)),
    ("Qwen2.5-1.5B", "sft", QWEN25_LORA | dict(recompute_mlp=True)), ("Qwen2.5-1.5B", "dpo", QWEN25_LORA),
    ("Gemma-3n-E4B", "sft", dict(load_in_4bit=True, lora_r=8, lora_alpha=16.0, targets="gate_proj,up_proj,down_proj",
                                 optim="adamw_8bit", lr=2e-5, weight_decay=0.01, batch_size=2, grad_accum=4,
                                 seed=3407)),
]


def build_real_model(name: str, directory: Path, tokenizer_dir: Path) -> Path:
    """`name`'s architecture with random weights and the tokenizer of `tokenizer_dir`, saved to directory/name
    once (fp32; Gemma-3n-E4B in bf16, whose 7.8 B parameters do not fit this machine's memory in fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = directory / name
    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = real_configs(tokenizer.pad_token_id, tokenizer.eos_token_id)[name]
    torch.manual_seed(0)
    dtype = torch.bfloat16 if name.startswith("Gemma") else torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    staging = directory / f".{name}.partial"
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    del model
    staging.rename(out)
    return out


def rounds_of_cases(rounds: int):
    """`(round, impl)` in the order the cases run: the two trainers alternate which goes first from round to round,
    so that a machine whose speed drifts over the minutes a case takes favours neither."""
    return [(r, impl) for r in range(rounds) for impl in (IMPLS if r % 2 == 0 else IMPLS[::-1])]


def run_real_shapes(directory: Path, data: Path, steps, warmup, batch_size, threads, cache, checkpointing,
                    dtype="fp32", cards=None, rounds=1, recompute_mlp=False):
    """REAL_CARDS (those named "MODEL:METHOD" in `cards`, when given) through both trainers, `rounds` times, each at
    its card's batch unless `batch_size` is given; `recompute_mlp` recomputes every card's MLPs (some cards' do)."""
    from pyprefopt import data as D
    from pyprefopt.default_model import default_model_path

    rows = D.normalise_rows(D.read_rows(data / "sft" / "train.jsonl"), "sft", "train")
    tokenizer_dir = default_model_path(D.corpus(rows))
    results = []
    for name, method, recipe in REAL_CARDS:
        if cards is not None and f"{name}:{method}" not in cards:
            continue
        base = build_real_model(name, directory, tokenizer_dir).resolve()
        settings = dict(recipe, base=str(base), dtype=dtype)
        card_batch = settings.pop("batch_size")
        batch = batch_size or card_batch
        settings["recompute_mlp"] = recompute_mlp or settings.get("recompute_mlp", False)
        for round_, impl in rounds_of_cases(rounds):
            result = run_case(impl, method, data, steps, warmup, batch, threads, cache, checkpointing, settings)
            result.update(model=name, round=round_, batch_size=batch)
            print(f"{name} {method} {impl}: {summary(result)}", file=sys.stderr, flush=True)
            results.append(result)
    return results


# --------------------------------------------------------------------------------------------- driver


def run_case(impl, method, data, steps, warmup, batch_size, threads, cache, checkpointing=False,
             recipe=None) -> dict:
    """One case in a fresh interpreter, `python -m bench.bench_train --worker` from the repository root (so the paths
    it is given are absolute); its result dict. `recipe`: DEFAULT_RECIPE's keys to override."""
    recipe = DEFAULT_RECIPE | (recipe or {})
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYPREFOPT_CACHE=str(Path(cache).resolve()),
               TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, "-m", "bench.bench_train", "--worker", "--impl", impl, "--method", method, "--data",
               str(Path(data).resolve()), "--steps", str(steps), "--warmup", str(warmup), "--batch-size",
               str(batch_size), "--out", out.name, "--recipe", json.dumps(recipe)] + (
                   ["--gradient-checkpointing"] if checkpointing else [])
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode == -signal.SIGKILL:
            # What the kernel's out-of-memory killer does to a trainer that does not fit the machine at these
            # settings: a result of the case, and the run goes on to the others.
            return {"impl": impl, "method": method, OUT_OF_MEMORY: True}
        if proc.returncode != 0:
            raise RuntimeError(f"{impl} {method} failed:\n{proc.stderr[-4000:]}")
        return json.load(open(out.name, encoding="utf-8"))


def summary(result: dict) -> str:
    if result.get(OUT_OF_MEMORY):
        return "killed (SIGKILL: out of memory)"
    return f"{result['tokens_per_second']:.1f} tokens/s, peak extra {result['peak_extra_mib']:.0f} MiB"


def table(results: list[dict]) -> str:
    """Training: from the loaded model on (the weights included); with loading: the whole run's peak. Over several
    rounds (`round` in the results), each figure is the median over the rounds, and each ratio the median of the
    rounds' own ratios (ours and TRL's of one round ran next to each other). A trainer killed for memory in any
    round has no figures or ratios: the other's are its rounds' medians."""
    rounds = {}
    for r in results:
        rounds.setdefault((r.get("model", ""), r["method"]), {}).setdefault(r.get("round", 0), {})[r["impl"]] = r
    lines = ["| model | method | batch | rounds | pyprefopt tokens/s | TRL tokens/s | speed-up | "
             "training peak extra MiB (ours / TRL) | memory ratio | with loading MiB (ours / TRL) | "
             "median step ms (ours / TRL) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (model, method), by_round in rounds.items():
        pairs = [(r["pyprefopt"], r["trl"]) for r in by_round.values() if len(r) == len(IMPLS)]
        if not pairs:
            continue
        killed = [any(pair[i].get(OUT_OF_MEMORY) for pair in pairs) for i in (0, 1)]

        def median(i, key, fmt, pairs=pairs, killed=killed):
            return "out of memory" if killed[i] else format(statistics.median(pair[i][key] for pair in pairs), fmt)

        def both(key, fmt):
            return f"{median(0, key, fmt)} / {median(1, key, fmt)}"

        def median_ratio(key, pairs=pairs, killed=killed):
            if any(killed):
                return "-"
            return f"{statistics.median(ours[key] / theirs[key] for ours, theirs in pairs):.2f}x"

        step_ms = ["out of memory" if killed[i] else
                   f"{statistics.median(ms for pair in pairs for ms in pair[i]['step_ms']):.0f}" for i in (0, 1)]
        lines.append(
            f"| {model or 'tiny default'} | {method} | {pairs[0][0]['batch_size']} | {len(pairs)} | "
            f"{median(0, 'tokens_per_second', '.1f')} | {median(1, 'tokens_per_second', '.1f')} | "
            f"{median_ratio('tokens_per_second')} | {both('train_peak_extra_mib', '.0f')} | "
            f"{median_ratio('train_peak_extra_mib')} | {both('peak_extra_mib', '.0f')} | {step_ms[0]} / {step_ms[1]} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--methods", nargs="+", choices=tuple(METHODS), default=list(METHODS))
    p.add_argument("--data", type=Path, default=None, help="root with sft/, preference/, kto/ (default: the embedded)")
    p.add_argument("--synthetic", type=int, default=None, help="use a synthetic set of N rows per split instead")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=None, help="examples per micro-batch (default: 8; with "
                   "--real-shapes, each card's own)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every case")
    p.add_argument("--gradient-checkpointing", action="store_true", help="both trainers recompute activations "
                   "(TRL's default; off by default here, as in pyprefopt)")
    p.add_argument("--recompute-mlp", action="store_true",
                   help="pyprefopt with its --recompute-mlp (TRL has no such option; its nearest, gradient "
                   "checkpointing, recomputes whole layers)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="both trainers' compute dtype (pyprefopt's --dtype; TRL: the model loaded in it, autocast)")
    p.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    p.add_argument("--real-shapes", type=Path, default=None, metavar="DIR",
                   help="run the reference cards at their real shapes (random weights built into DIR once)")
    p.add_argument("--cards", nargs="+", default=None, metavar="MODEL:METHOD",
                   choices=[f"{name}:{method}" for name, method, _ in REAL_CARDS],
                   help="with --real-shapes: only these cards")
    p.add_argument("--rounds", type=int, default=1, help="run every case this many times, the trainers alternating "
                   "which goes first; the table gives medians and the median of the rounds' own ratios")
    a = p.parse_args(argv)
    if a.rounds < 1:
        p.error(f"--rounds must be at least 1, got {a.rounds}")
    if a.recompute_mlp and a.gradient_checkpointing:
        p.error("--recompute-mlp with --gradient-checkpointing: give one of them")
    if a.batch_size is None and not a.real_shapes:
        a.batch_size = 8
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = a.data
        if a.real_shapes and not (a.data or a.synthetic):
            # Enough rows for the timed steps; a small held-out split, whose evaluation is not timed.
            data = tmp / "data"
            largest_batch = a.batch_size or max(recipe["batch_size"] for _, _, recipe in REAL_CARDS)
            write_data(data, max(16, largest_batch * 4 * (a.steps + a.warmup)), 4, **SYNTHETIC_WORDS)
        elif a.synthetic:
            data = tmp / "data"
            write_data(data, a.synthetic, a.synthetic, **SYNTHETIC_WORDS)
        elif data is None:
            from pyprefopt.data import PACKAGE_DATA

            data = PACKAGE_DATA
        cache = Path(os.environ.get("PYPREFOPT_CACHE") or tmp / "cache")
        results = []
        if a.real_shapes:
            a.real_shapes.mkdir(parents=True, exist_ok=True)
            results = run_real_shapes(a.real_shapes, data, a.steps, a.warmup, a.batch_size, a.threads, cache,
                                      a.gradient_checkpointing, a.dtype, a.cards, a.rounds, a.recompute_mlp)
            a.methods = []
        for method in a.methods:
            for round_, impl in rounds_of_cases(a.rounds):
                result = run_case(impl, method, data, a.steps, a.warmup, a.batch_size, a.threads, cache,
                                  a.gradient_checkpointing, {"dtype": a.dtype, "recompute_mlp": a.recompute_mlp})
                result.update(round=round_, batch_size=a.batch_size)
                print(f"{method} {impl}: {summary(result)}", file=sys.stderr, flush=True)
                results.append(result)
    print(table(results))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"settings": vars(a) | {"data": str(data), "json": str(a.json)},
                                      "results": results}, indent=1, default=str))


# ---------------------------------------------------------------------------------------------- pytest


@pytest.mark.heavy
def test_train_step_faster_and_smaller_than_trl(tmp_path):
    """DPO (quick) or every method (PYPREFOPT_BENCH_QUICK=0): pyprefopt's train steps against TRL's trainer."""
    pytest.importorskip("trl")
    quick = V.env_quick()
    rows = 32 if quick else 256
    write_data(tmp_path / "data", rows, rows, **SYNTHETIC_WORDS)
    methods = ("dpo",) if quick else METHODS
    steps, warmup = (4, 1) if quick else (20, 3)
    for method in methods:
        ours, theirs = (run_case(impl, method, tmp_path / "data", steps, warmup, 4, 1, tmp_path / "cache")
                        for impl in IMPLS)
        for result in (ours, theirs):
            assert math.isfinite(result["final_loss"]) and result["tokens_per_second"] > 0, result
        if quick:
            # 4 steps of a 32-row set: imports and allocator noise dominate both figures; the comparison
            # is meaningful at full size only.
            continue
        assert ours["tokens_per_second"] > theirs["tokens_per_second"], (method, ours, theirs)
        assert ours["peak_extra_mib"] < theirs["peak_extra_mib"], (method, ours, theirs)


def test_both_trainers_count_every_accumulated_micro_batchs_tokens(tmp_path):
    """With gradient accumulation an optimizer step takes several micro-batches: both workers count all of them (rows
    of one length, so the two counts over the same number of examples agree)."""
    pytest.importorskip("trl")
    write_data(tmp_path / "data", 24, 8)
    results = [run_case(impl, "sft", tmp_path / "data", 2, 1, 2, 1, tmp_path / "cache", recipe={"grad_accum": 3})
               for impl in IMPLS]
    ours, theirs = (r["tokens"] for r in results)
    assert 0.8 * ours <= theirs <= 1.25 * ours, results


def test_the_table_takes_each_ratio_as_the_median_of_its_rounds():
    """Over rounds, a ratio is the median of each round's own (side by side) ratio, not a ratio of medians; the
    trainers alternate which runs first."""
    def result(impl, round_, speed, peak):
        return dict(impl=impl, method="dpo", round=round_, batch_size=4, tokens_per_second=speed,
                    train_peak_extra_mib=peak, peak_extra_mib=peak + 1, step_ms=[1000.0 / speed])

    # Round by round: 3.0x, 1.5x and 2.0x the speed (median 2.0x), where the medians' ratio would be 40 / 10 = 4.0x.
    results = [result("pyprefopt", 0, 30, 100), result("trl", 0, 10, 200), result("trl", 1, 80, 250),
               result("pyprefopt", 1, 120, 100), result("pyprefopt", 2, 40, 100), result("trl", 2, 20, 100)]
    row = table(results).splitlines()[2]
    assert row.startswith("| tiny default | dpo | 4 | 3 | 40.0 | 20.0 | 2.00x | 100 / 200 | 0.50x | 101 / 201 |"), row
    assert rounds_of_cases(3) == [(0, "pyprefopt"), (0, "trl"), (1, "trl"), (1, "pyprefopt"), (2, "pyprefopt"),
                                  (2, "trl")]



def test_a_trainer_killed_for_memory_is_a_row_not_an_aborted_run(monkeypatch):
    """A worker the kernel's out-of-memory killer ends (SIGKILL) is that case's result; the table gives the other
    trainer's figures beside "out of memory" and no ratio. Any other failure still stops the run."""
    def killed_worker(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, -signal.SIGKILL, "", "")

    monkeypatch.setattr(subprocess, "run", killed_worker)
    theirs = run_case("trl", "cpo", ROOT, 2, 1, 8, 1, ROOT / "no-cache") | {"round": 0, "batch_size": 8}
    assert summary(theirs) == "killed (SIGKILL: out of memory)"
    ours = dict(impl="pyprefopt", method="cpo", round=0, batch_size=8, tokens_per_second=90.0,
                train_peak_extra_mib=5000.0, peak_extra_mib=9000.0, step_ms=[1000.0, 1200.0])
    row = table([ours, theirs]).splitlines()[2]
    assert row == ("| tiny default | cpo | 8 | 1 | 90.0 | out of memory | - | 5000 / out of memory | - | "
                   "9000 / out of memory | 1100 / out of memory |"), row
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kwargs: subprocess.CompletedProcess(cmd, 1, "", "boom"))
    with pytest.raises(RuntimeError, match="trl cpo failed:\nboom"):
        run_case("trl", "cpo", ROOT, 2, 1, 8, 1, ROOT / "no-cache")


# What README's reference recipes set that decides a step's time and memory; the rest (learning rate, schedule, beta)
# both trainers get from DEFAULT_RECIPE alike.
COST_SETTINGS = ("batch_size", "grad_accum", "load_in_4bit", "optim", "recompute_mlp", "lora_r", "lora_alpha",
                 "lora_dropout", "target_modules")


def test_each_real_shape_card_costs_what_its_readme_command_does():
    """REAL_CARDS, whose rows README's summary reports, run each card as README's "Reference recipes" command does
    in every setting that changes a step's cost: its micro-batch (the CLI's default where the command names none),
    accumulation, 4-bit base, optimizer, recomputation and LoRA (a command continuing an adapter, its LoRA)."""
    from pyprefopt.train import parse_args
    from tests.test_reference_recipes import command_arguments, readme_recipes

    checked, lora = set(), {}
    for commands in readme_recipes().values():
        for command in commands:
            args = parse_args(command_arguments(command))
            if args.adapter is None:
                lora = {k: getattr(args, k) for k in ("lora_r", "lora_alpha", "lora_dropout", "target_modules")}
            wanted = {k: getattr(args, k) for k in COST_SETTINGS} | lora
            model = args.model.rsplit("/", 1)[-1].lower()
            ((card, card_recipe),) = [((name, method), r) for name, method, r in REAL_CARDS
                                      if model.startswith(name.lower()) and method == args.method]
            recipe = DEFAULT_RECIPE | card_recipe
            recipe["target_modules"] = recipe.pop("targets")
            assert {k: recipe[k] for k in COST_SETTINGS} == wanted, (command, card)
            checked.add(card)
    assert checked == {(name, method) for name, method, _ in REAL_CARDS}


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2:])
    else:
        main()
