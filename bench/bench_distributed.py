"""Beyond one process, measured: per-process peak memory and step time with 1 and 2 CPU processes (gloo) at a real
vocabulary (V=151936, Qwen's), and the same head on paper for 8 GPUs.

    python -m bench.bench_distributed --json /tmp/distributed.json          # all three tables
    python -m bench.bench_distributed --only head                            # the vocabulary-parallel head alone

1. `python -m pyprefopt.train` on a small Qwen3-architecture model with Qwen3's vocabulary and tied head (so the
   embedding/head, 151936 x 512, is most of the weights): one process; two processes data parallel (DDP, a full
   copy each); two processes `--fsdp` (FSDP2: weights, gradients and optimizer state sharded). Full fine-tuning
   and LoRA, DPO, the same global batch in every case, each run torchrun in a fresh process tree. Per process,
   the largest over its processes of two high-water resident sets: "setup", from the start through loading the
   model and sharding it (without --fsdp every process loads the whole checkpoint; with it every process builds the
   model on the meta device and the first alone reads the checkpoint, a block of rows at a time, sending the other its
   shards; each process's setup peak is listed),
   and "training",
   from then through the reference pass, the steps and the evaluations, up to the final gather of the outputs
   (Linux's clear_refs resets the mark between them); step time is the median of the run's `step_seconds`.
2. `fused_linear_logprobs` forward + backward with a trained head: the whole [V, H] head in one process, against
   each of two processes holding a [V/2, H] shard (`process_group=`): peak RSS growth over the call, and time.
3. On paper, 8 GPUs: what the vocabulary-parallel head moves per step (one all-reduce of [N] label logits and
   one all-gather of [N] fp64 log-sum-exps forward; one all-reduce of the [N, H] fp32 hidden gradient backward),
   against its GEMM time at an H100's peak bf16 rate.

Every process runs one thread (OMP_NUM_THREADS=1), so one and two processes get the same compute per process;
on a shared 2-core machine the times are noisy, the memory is not.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.resident_memory import peak_rss_mib, reset_peak_rss

ROOT = Path(__file__).resolve().parent.parent
VOCAB = 151936
# H100 SXM5: dense bf16 tensor-core peak, and NVLink 4's 900 GB/s counted per direction.
H100_BF16_FLOPS = 989.4e12
H100_NVLINK_BYTES_PER_S = 450e9


def _torchrun(nproc: int, args: list[str], env: dict):
    """`torchrun -m bench.bench_distributed args` with `nproc` processes, in a fresh process tree, from the repository
    root (the paths in `args` are absolute)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "bench.bench_distributed", *args]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")


# ----------------------------------------------------------------------------------------- 1. the train CLI


def build_model(directory: Path, data: Path) -> Path:
    """A Qwen3-architecture model with Qwen3's vocabulary and a tied head, 4 layers of width 512, random weights."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from pyprefopt import data as D
    from pyprefopt.default_model import build_tokenizer

    out = directory / "qwen3-v151936"
    if (out / "config.json").is_file():
        return out
    import torch

    rows = D.normalise_rows(D.read_rows(data / "preference" / "train.jsonl"), "dpo", "train")
    tokenizer = build_tokenizer(D.corpus(rows))
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    staging = directory / ".qwen3-v151936.partial"
    AutoModelForCausalLM.from_config(config).save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(out)
    return out


TRAIN_CASES = [  # (label, processes, extra CLI options)
    ("1 process", 1, []),
    ("2 processes, DDP", 2, []),
    ("2 processes, --fsdp", 2, ["--fsdp"]),
]


def train_worker(out: str, argv: list[str]):
    """One process of a torchrun'd `python -m pyprefopt.train argv`, writing its setup and training peaks."""
    import gc

    from pyprefopt import train

    peaks = {}

    def wrap(name, before=None, after=None):
        original = getattr(train, name)

        def wrapped(*args, **kwargs):
            if before:
                before()
            result = original(*args, **kwargs)
            if after:
                after()
            return result

        setattr(train, name, wrapped)

    def end_of_setup():
        peaks["setup_mib"] = peak_rss_mib()
        gc.collect()
        # The whole checkpoint a process loaded before sharding, freed, would stay resident in malloc's arenas and
        # count as the training's: handed back to the system first.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        reset_peak_rss()

    def end_of_training():
        peaks.setdefault("training_mib", peak_rss_mib())

    wrap("data_parallel", after=end_of_setup)  # the model loaded, and sharded with --fsdp
    for name in ("gather_trainable", "whole_parameters"):  # the outputs' gather (by every process, or rank 0)
        wrap(name, before=end_of_training)
    code = train.main(argv)
    end_of_training()
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{out}.{rank}").write_text(json.dumps(peaks))
    sys.exit(code)


def train_case(model: Path, data: Path, nproc: int, extra: list[str], full: bool, steps: int, global_batch: int):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory() as out:
        argv = ["--method", "dpo", "--model", str(model.resolve()), "--data", str(data / "preference"),
                "--output-dir", f"{out}/run", "--max-steps", str(steps), "--batch-size", str(global_batch // nproc),
                "--max-length", "256", "--seed", "0"] + extra + (["--full"] if full else [])
        _torchrun(nproc, ["--train-worker", f"{out}/peaks", *argv], env)
        peaks = [json.loads(Path(f"{out}/peaks.{rank}").read_text()) for rank in range(nproc)]
        records = [json.loads(line) for line in open(f"{out}/run/metrics.jsonl", encoding="utf-8")]
    step_s = [r["step_seconds"] for r in records if "step_seconds" in r][1:]  # the first step warms up
    return {"setup_peak_mib": max(p["setup_mib"] for p in peaks),
            "setup_peak_mib_per_process": [p["setup_mib"] for p in peaks],
            "training_peak_mib": max(p["training_mib"] for p in peaks),
            "median_step_s": statistics.median(step_s), "final_loss": [r["loss"] for r in records if "loss" in r][-1]}


# ------------------------------------------------------------------------------- 2. the vocabulary-parallel head


def head_worker(tokens: int, hidden_size: int, out: str):
    """One process of torchrun: forward + backward of the fused head, trained, over this process's vocabulary
    rows (all of them alone); writes its peak RSS growth and time."""
    import torch
    import torch.distributed as dist

    from pyprefopt import fused_linear_logprobs

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    labels = torch.randint(0, VOCAB, (tokens,))
    rows = torch.arange(VOCAB).tensor_split(world)[rank]  # contiguous, in rank order
    weight = (torch.randn(len(rows), hidden_size) / hidden_size**0.5).requires_grad_()
    group = dist.group.WORLD if world > 1 else None
    times = []
    baseline = peak_rss_mib()
    for _ in range(3):
        dist.barrier()
        t0 = time.perf_counter()
        fused_linear_logprobs(hidden, weight, labels, process_group=group).sum().backward()
        times.append(time.perf_counter() - t0)
        hidden.grad = weight.grad = None
    result = {"rank": rank, "weight_mib": weight.numel() * 4 / 2**20, "peak_growth_mib": peak_rss_mib() - baseline,
              "median_s": statistics.median(times[1:])}
    Path(f"{out}.{rank}").write_text(json.dumps(result))
    dist.destroy_process_group()


def head_case(nproc: int, tokens: int, hidden_size: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/head"
        _torchrun(nproc, ["--head-worker", str(tokens), str(hidden_size), out], env)
        ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(nproc)]
    return {"weight_mib": max(r["weight_mib"] for r in ranks),
            "peak_growth_mib": max(r["peak_growth_mib"] for r in ranks),
            "median_s": max(r["median_s"] for r in ranks)}


# ------------------------------------------------------------------------------------------- 3. on paper


def on_paper(tokens: int, hidden_size: int, vocab: int, world: int = 8, trained_head: bool = True) -> dict:
    """Bytes each GPU sends per step for the vocabulary-parallel head's collectives (ring algorithms), and the
    head's GEMM time per GPU at peak bf16 rate: logits forward, logits again + hidden gradient backward, and the
    weight gradient when the head is trained."""
    ring = (world - 1) / world
    sent = {
        "label logits all-reduce (fp32 [N])": 2 * ring * 4 * tokens,
        "log-sum-exp all-gather (fp64 [N])": (world - 1) * 8 * tokens,
        "hidden gradient all-reduce (fp32 [N, H])": 2 * ring * 4 * tokens * hidden_size,
    }
    gemms = 4 if trained_head else 3
    flops = gemms * 2 * tokens * hidden_size * vocab / world
    gemm_s = flops / H100_BF16_FLOPS
    comm_s = sum(sent.values()) / H100_NVLINK_BYTES_PER_S
    return {"tokens": tokens, "hidden": hidden_size, "world": world, "sent_bytes": sent,
            "sent_mib": sum(sent.values()) / 2**20, "gemm_ms": 1e3 * gemm_s, "comm_ms": 1e3 * comm_s,
            "comm_over_gemm": comm_s / gemm_s}


# ----------------------------------------------------------------------------------------------- driver


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("train", "head", "paper"), default=None)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per train run (the first is not timed)")
    p.add_argument("--global-batch", type=int, default=4, help="examples per optimizer step, over all processes")
    p.add_argument("--tokens", type=int, default=2048, help="tokens of the head case")
    p.add_argument("--hidden", type=int, default=512, help="hidden size of the head case")
    p.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "pyprefopt-bench-distributed")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    from pyprefopt.data import PACKAGE_DATA

    results = {}
    if a.only in (None, "train"):
        a.dir.mkdir(parents=True, exist_ok=True)
        model = build_model(a.dir, PACKAGE_DATA)
        lines = ["| fine-tuning | processes | setup peak RSS per process MiB | setup peak RSS by process MiB | "
                 "training peak RSS per process MiB | median step s | final loss |",
                 "|---|---|---:|---:|---:|---:|---:|"]
        for full in (True, False):
            for label, nproc, extra in TRAIN_CASES:
                r = train_case(model, PACKAGE_DATA, nproc, extra, full, a.steps, a.global_batch)
                results[f"train {'full' if full else 'lora'} {label}"] = r
                by_process = " / ".join(f"{mib:.0f}" for mib in r["setup_peak_mib_per_process"])
                lines.append(f"| {'full' if full else 'LoRA'} | {label} | {r['setup_peak_mib']:.0f} | {by_process} | "
                             f"{r['training_peak_mib']:.0f} | {r['median_step_s']:.2f} | {r['final_loss']:.4f} |")
                print(lines[-1], file=sys.stderr, flush=True)
        print("\n".join(lines))
    if a.only in (None, "head"):
        lines = [f"| head [V={VOCAB}, H={a.hidden}], N={a.tokens}, fp32, trained | weight per process MiB | "
                 "peak RSS growth per process MiB | median fwd+bwd s |", "|---|---:|---:|---:|"]
        for nproc in (1, 2):
            r = head_case(nproc, a.tokens, a.hidden)
            results[f"head {nproc}"] = r
            lines.append(f"| {nproc} process{'es' if nproc > 1 else ''} | {r['weight_mib']:.0f} | "
                         f"{r['peak_growth_mib']:.0f} | {r['median_s']:.2f} |")
        print("\n".join(lines))
    if a.only in (None, "paper"):
        # Both the hidden gradient's bytes and the GEMMs grow as N x H: their ratio depends on the vocabulary slice
        # per GPU alone, so one N and H stand for all.
        tokens, hidden_size = 16384, 2048
        lines = [f"| 8 x H100, N={tokens}, H={hidden_size} | sent per GPU MiB | comm ms (NVLink 450 GB/s) | "
                 "head GEMMs ms (989 TFLOPS) | comm / GEMMs |", "|---|---:|---:|---:|---:|"]
        for vocab in (VOCAB, 262144):
            for trained in (True, False):
                r = on_paper(tokens, hidden_size, vocab, trained_head=trained)
                results[f"paper V{vocab} {'trained' if trained else 'frozen'}"] = r
                lines.append(f"| V={vocab}, {'trained' if trained else 'frozen'} head | {r['sent_mib']:.0f} | "
                             f"{r['comm_ms']:.2f} | {r['gemm_ms']:.2f} | {r['comm_over_gemm']:.2f} |")
        print("\n".join(lines))
    if a.json:
        a.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--head-worker"]:
        head_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    elif sys.argv[1:2] == ["--train-worker"]:
        train_worker(sys.argv[2], sys.argv[3:])
    else:
        main()
