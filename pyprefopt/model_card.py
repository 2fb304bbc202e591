"""The run's README.md model card and its PNG plots, every figure taken from what the run measured.

`write(output_dir, args, summary, records)` is called by pyprefopt.train at the end of a run: `summary` holds
the run's totals (steps, examples, wall time, tokens/s, hardware, final and evaluation metrics), `records`
the lines of metrics.jsonl. Plots need matplotlib; without it the card says that no plot was drawn and why.
"""

from __future__ import annotations

from pathlib import Path

from pyprefopt.files import atomic_write, atomic_write_text
from pyprefopt.losses import METHODS

# The run's options on the card; the method's own (its record's `options`) come after "optim".
RUN_OPTIONS = ("method", "max_steps", "epochs", "batch_size", "grad_accum", "lr", "lr_scheduler", "warmup_ratio",
               "warmup_steps", "weight_decay", "max_grad_norm", "optim", "max_length", "seed", "lora_r", "lora_alpha",
               "lora_dropout", "target_modules", "adapter", "load_in_4bit", "full", "fsdp", "gradient_checkpointing",
               "recompute_mlp")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plot(output_dir: Path, method: str, records: list[dict]) -> list[str]:
    """loss.png and rewards.png (perplexity.png for a token-mean NLL such as sft) from metrics.jsonl records; the file
    names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = METHODS[method]
    perplexity = record.mean_over == "tokens"
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    figures = []

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in steps], [r["loss"] for r in steps], label="train loss")
    ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{method}: loss")
    ax.legend()
    figures.append(("loss.png", fig))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    if perplexity:
        ax.plot([r["step"] for r in evals], [r["eval_perplexity"] for r in evals], "o-", label="eval perplexity")
        ax.set_ylabel("perplexity")
        name = "perplexity.png"
    else:
        margins = [r for r in steps if "rewards/margins" in r]
        ax.plot([r["step"] for r in margins], [r["rewards/margins"] for r in margins], label="train reward margin")
        ax.plot([r["step"] for r in evals], [r["eval_rewards/margins"] for r in evals], "o-",
                label="eval reward margin")
        if "rewards/accuracies" in record.metrics:
            acc = ax.twinx()
            acc.plot([r["step"] for r in evals], [r["eval_rewards/accuracies"] for r in evals], "s--", color="C2",
                     label="eval reward accuracy")
            acc.set_ylabel("accuracy")
            acc.set_ylim(0, 1)
            acc.legend(loc="lower right")
        ax.set_ylabel("reward margin")
        name = "rewards.png"
    ax.set_xlabel("step")
    ax.set_title(f"{method}: {'held-out perplexity' if perplexity else 'rewards'}")
    ax.legend(loc="upper left")
    figures.append((name, fig))

    for file_name, fig in figures:
        fig.tight_layout()
        atomic_write(output_dir / file_name, lambda tmp, fig=fig: fig.savefig(tmp, dpi=100, format="png"))
        plt.close(fig)
    return [file_name for file_name, _ in figures]


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render(args, summary: dict, plots: list[str], plot_note: str | None) -> str:
    """The README.md text."""
    method = summary["method"]
    adapter = not args.full
    kind = "full fine-tune" if args.full else ("QLoRA adapter (NF4 base)" if args.load_in_4bit else "LoRA adapter")
    tags = ["pyprefopt", method, "full" if args.full else ("qlora" if args.load_in_4bit else "lora")]
    front = ["---", f"base_model: {summary['base_model']}", f"library_name: {'peft' if adapter else 'transformers'}",
             "tags:"] + [f"- {t}" for t in tags] + ["---", ""]
    tok_s = summary["tokens_per_second"]
    train_rows = [
        ["optimizer steps", summary["steps"]],
        ["resumed from step", summary["resumed_from_step"] or "-"],
        ["examples seen", summary["examples_seen"]],
        ["training examples / held-out examples", f"{summary['train_examples']} / {summary['eval_examples']}"],
        ["sequences cut at max_length / examples dropped", f"{summary['sequences_truncated']} / "
                                                            f"{summary['examples_dropped']}"],
        ["wall time (s; data, model, reference pass, steps, evaluations, outputs)", summary["wall_seconds"]],
        ["time in train steps (s)", summary["train_step_seconds"]],
        ["reference log-prob pass (s)", summary["reference_seconds"]],
        ["train-step throughput (sequence tokens/s)", tok_s if tok_s is not None else "-"],
        ["peak memory (MiB; GPU: allocated, CPU: the process's resident set)", summary["peak_memory_mib"]],
        ["hardware", summary["hardware"]],
        ["compute dtype (trained weights and optimizer state: fp32)", summary["compute_dtype"]],
        ["parameters / trainable", f"{summary['parameters']:,} / {summary['trainable_parameters']:,}"],
        ["torch", summary["torch"]],
    ]
    final = summary["final"]
    final_rows = [[k, v] for k, v in final.items() if k not in ("step", "epoch")]
    evals = summary["evaluations"]
    eval_keys = sorted({k for e in evals for k in e if k != "step"})
    eval_table = _table(["step"] + eval_keys, [[e["step"]] + [e.get(k, "-") for k in eval_keys] for e in evals])
    options = list(RUN_OPTIONS)
    options[options.index("optim") + 1:options.index("optim") + 1] = METHODS[method].options.values()
    hyper = [[name, getattr(args, name)] for name in options]
    if adapter:
        usage = (
            "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({summary['base_model']!r})\n"
            f"model = PeftModel.from_pretrained(base, {str(args.output_dir)!r})\n"
            f"tokenizer = AutoTokenizer.from_pretrained({str(args.output_dir)!r})\n```"
        )
    else:
        usage = (f"```python\nfrom transformers import AutoModelForCausalLM\n\n"
                 f"model = AutoModelForCausalLM.from_pretrained({str(args.output_dir)!r})\n```")
    plot_lines = [f"![{p}]({p})" for p in plots] if plots else [plot_note]
    body = [
        f"# {method.upper()} {kind} of `{summary['base_model']}`",
        "",
        f"Trained with `python -m pyprefopt.train` by {METHODS[method].description} on `{summary['data']}`. "
        "Every figure on this card was measured in this run; the per-step log is `metrics.jsonl`.",
        "",
        "## Training",
        "",
        _table(["", "measured"], train_rows),
        "",
        "Throughput counts the tokens of the trained sequences (prompt + completion, no padding; chosen and "
        "rejected rows both count) over the time spent in optimizer steps.",
        "",
        f"## Last step (step {final.get('step', '-')})",
        "",
        _table(["metric", "value"], final_rows),
        "",
        "## Held-out evaluation",
        "",
        eval_table,
        "",
        "## Plots",
        "",
        *plot_lines,
        "",
        "## Hyper-parameters",
        "",
        _table(["option", "value"], hyper),
        "",
        "## Usage",
        "",
        usage,
        "",
    ]
    return "\n".join(front + body)


def write(output_dir: Path, args, summary: dict, records: list[dict]):
    """Plots (when matplotlib is installed), then README.md; each file written atomically."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        plots, note = [], "No plots: matplotlib is not installed (`pip install matplotlib`, then rerun)."
    else:
        plots, note = plot(output_dir, summary["method"], records), None
    text = render(args, summary, plots, note)
    atomic_write_text(output_dir / "README.md", text)
