"""Training data: loading, validation, chat templates, tokenisation and collation for SFT, preference
(DPO/IPO/CPO) and KTO rows, with TRL's semantics.

Row formats (TRL's, conversational or standard):
- sft: `{"messages": [...]}` (the last message, an assistant turn, is the completion; the rest the prompt),
  `{"prompt": ..., "completion": ...}`, or `{"text": "..."}` (every token is a target);
- preference: `{"prompt": ..., "chosen": ..., "rejected": ...}`;
- kto: `{"prompt": ..., "completion": ..., "label": bool}`;
where `...` is either a list of `{"role", "content"}` messages or a string.

Tokenisation follows TRL 1.16's `DPOTrainer`: a conversational prompt is rendered with the generation
prompt, prompt+completion with the full template, and the completion starts where the two token lists
diverge; a string completion gets the EOS token appended when it lacks it. Sequences longer than
`max_length` are cut at the end (TRL's "keep_start"), and examples whose prompt alone fills `max_length`
are dropped, as TRL does; both are counted in `TokenizedData.truncated` / `.dropped`. Prompt tokens carry
no loss.

Batches hand the model `input_ids` without each row's last token (its hidden state would score nothing)
and `labels` aligned with them: `labels[t]` is the token at t+1 where that token is a completion token, else
-100, which is what `FusedLinearPreferenceLoss` takes.

KTO's KL reference point uses mismatched prompt/completion pairs built exactly as TRL 1.16's `KTOTrainer`
builds them (`add_kl_completion_ids` in trl/trainer/kto_trainer.py): after over-long prompts are dropped, the
examples are cut, in dataset order, into consecutive chunks of `kl_chunk` (the last may be shorter), and the
completions rotate by one within each chunk, (x1, y1) ... (xn, yn) -> (x1, yn), (x2, y1), ..., (xn, y{n-1}).
TRL's chunk is `per_device_train_batch_size`; the training loop passes the global micro-batch, `--batch-size`
times the number of processes. In one process the two are the same. Under data parallelism the loop
all-reduces the KL point over the global micro-batch, so N processes already compute what one process does
with the same global micro-batch; chunking by the global micro-batch keeps the KL pairs identical too. A chunk
of one pairs an example with its own completion (TRL does the same for a short last chunk of one), so the
loop refuses KTO with a global micro-batch of one, as TRL refuses a batch size of one. The pairs are fixed
per data set: they do not depend on the shuffled order, and resuming requires the same batch size and
(through the global batch) the same number of processes, so each pair's reference log-prob is computed once
and cached. Unlike TRL, which requires sequential sampling for KTO, the loop shuffles the examples, so a
micro-batch's KL completions are generally not its own completions.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from pyprefopt.losses import METHODS

IGNORE_INDEX = -100
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
PACKAGE_DATA = Path(__file__).resolve().parent / "data"
# Share of the training rows held out for evaluation when the data has no test split.
HELD_OUT_FRACTION = 0.1


class DataError(ValueError):
    """Bad training data: the message names the file (or dataset), the row and the problem."""


class Row(dict):
    """A data row that remembers where it came from (`file:line` for JSON lines), so an error about it names that
    place whatever split or shuffle it went through."""

    def __init__(self, fields: dict, where: str):
        super().__init__(fields)
        self.where = where


def _where(row: dict, source: str, number: int) -> str:
    return row.where if isinstance(row, Row) else f"{source}: row {number}"


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {data[e.start:e.start + 1]!r} at offset {e.start}); "
                        "save the file as UTF-8") from e


# ------------------------------------------------------------------------------------------------ loading


def default_data_dir(method: str) -> Path:
    """The embedded data set of a method: `pyprefopt/data/{sft,preference,kto}/`."""
    return PACKAGE_DATA / METHODS[method].data_format


def _read_jsonl(path: Path, text: str) -> list[dict]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: a row must be a JSON object, got {type(row).__name__}")
        rows.append(Row(row, f"{path}:{number}"))
    return rows


def read_rows(path: str | Path) -> list[dict]:
    """The rows of one local .jsonl, .json (a list of objects, or JSON lines) or .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if path.suffix == ".jsonl":
        rows = _read_jsonl(path, _decode(path))
    elif path.suffix == ".json":
        text = _decode(path)
        if text.lstrip().startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
            if not all(isinstance(item, dict) for item in items):
                raise DataError(f"{path}: a .json file must hold a list of JSON objects")
            rows = [Row(item, f"{path}: item {number}") for number, item in enumerate(items, 1)]
        else:
            rows = _read_jsonl(path, text)
    elif path.suffix == ".parquet":
        import datasets

        rows = [Row(item, f"{path}: row {number}")
                for number, item in enumerate(datasets.Dataset.from_parquet(str(path)).to_list(), 1)]
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; expected one of {DATA_SUFFIXES}")
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _split_file(directory: Path, split: str) -> Path | None:
    found = [directory / f"{split}{suffix}" for suffix in DATA_SUFFIXES if (directory / f"{split}{suffix}").is_file()]
    if len(found) > 1:
        raise DataError(f"{directory}: more than one {split} file: {[p.name for p in found]}")
    return found[0] if found else None


def load_splits(data: str | None, method: str, eval_data: str | None = None, seed: int = 0):
    """`(train_rows, eval_rows, description)` of `--data`: None (the embedded set), a directory holding
    `train.*` and optionally `test.*`, a file, or a `datasets` name (its "train" and "test" splits).

    Without a test split, HELD_OUT_FRACTION of the training rows (a seeded choice) is held out."""
    if data is None:
        directory = default_data_dir(method)
        if _split_file(directory, "train") is None:
            raise DataError(f"the embedded {METHODS[method].data_format} data set is missing: no "
                            f"{directory}/train.jsonl (pass --data)")
        data = str(directory)
    path = Path(data)
    if path.is_dir():
        train_file = _split_file(path, "train")
        if train_file is None:
            raise DataError(f"{path}: no train file (expected train.jsonl, train.json or train.parquet)")
        train = read_rows(train_file)
        test_file = _split_file(path, "test")
        test = read_rows(test_file) if test_file is not None else None
    elif path.exists() or path.suffix in DATA_SUFFIXES:
        train, test = read_rows(path), None
    else:
        import datasets

        try:
            loaded = datasets.load_dataset(data)
        except (OSError, ConnectionError, ValueError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise DataError(f"--data {data}: no such file or directory here, and not a data set the hub could "
                            f"give ({reason}); name a local .jsonl/.json/.parquet file or a directory") from e
        if "train" not in loaded:
            raise DataError(f"dataset {data!r} has no 'train' split (it has {sorted(loaded)})")
        train, test = ([Row(item, f"dataset {data!r} [{split}]: row {number}")
                        for number, item in enumerate(loaded[split].to_list(), 1)] if split in loaded else None
                       for split in ("train", "test"))
    if eval_data is not None:
        test = read_rows(eval_data)
    if test is None:
        if len(train) < 2:
            raise DataError(f"{data}: {len(train)} row(s) and no test split: nothing to hold out for evaluation")
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        held = max(1, round(HELD_OUT_FRACTION * len(train)))
        test = [train[i] for i in sorted(order[:held])]
        train = [train[i] for i in sorted(order[held:])]
        data = f"{data} ({held} rows held out for evaluation)"
    return train, test, data


# ------------------------------------------------------------------------------------------ validation


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    )


def _check_field(row: dict, name: str, where: str, conversational: bool | None):
    if name not in row or row[name] is None:
        raise DataError(f"{where}: missing {name!r} (the row has {sorted(row)})")
    value = row[name]
    if conversational is None:
        conversational = isinstance(value, list)
    if conversational and not _is_messages(value):
        raise DataError(f"{where}: {name!r} must be a list of {{'role', 'content'}} messages like the prompt")
    if not conversational and not isinstance(value, str):
        raise DataError(f"{where}: {name!r} must be a string like the prompt, got {type(value).__name__}")
    if not value:
        raise DataError(f"{where}: {name!r} is empty")
    return conversational


def normalise_rows(rows: list[dict], method: str, source: str) -> list[dict]:
    """Rows checked and put in one shape per format: `{"prompt", "completion"}` (sft), `{"prompt", "chosen",
    "rejected"}` (preference) or `{"prompt", "completion", "label"}` (kto); a prompt or completion is a
    message list or a string. Raises DataError naming the first bad row."""
    if not rows:
        raise DataError(f"{source}: no rows")
    fmt = METHODS[method].data_format
    out = []
    for number, row in enumerate(rows, 1):
        where = _where(row, source, number)
        if fmt == "sft":
            if "messages" in row:
                messages = row["messages"]
                if not _is_messages(messages) or not messages:
                    raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} messages")
                if messages[-1]["role"] != "assistant":
                    raise DataError(f"{where}: has no completion: the last message is from "
                                    f"{messages[-1]['role']!r}, not 'assistant'")
                out.append({"prompt": messages[:-1], "completion": messages[-1:]})
            elif "text" in row:
                if not isinstance(row["text"], str) or not row["text"]:
                    raise DataError(f"{where}: 'text' must be a non-empty string")
                out.append({"prompt": "", "completion": row["text"]})
            elif "prompt" in row or "completion" in row:
                conversational = _check_field(row, "prompt", where, None)
                _check_field(row, "completion", where, conversational)
                out.append({"prompt": row["prompt"], "completion": row["completion"]})
            else:
                raise DataError(f"{where}: sft rows need 'messages', 'text' or 'prompt'+'completion' "
                                f"(the row has {sorted(row)})")
        elif fmt == "preference":
            conversational = _check_field(row, "prompt", where, None)
            _check_field(row, "chosen", where, conversational)
            _check_field(row, "rejected", where, conversational)
            out.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]})
        else:
            conversational = _check_field(row, "prompt", where, None)
            _check_field(row, "completion", where, conversational)
            if "label" not in row:
                raise DataError(f"{where}: missing 'label' (the row has {sorted(row)})")
            if not isinstance(row["label"], bool):
                raise DataError(f"{where}: 'label' must be true or false, got {row['label']!r}")
            out.append({"prompt": row["prompt"], "completion": row["completion"], "label": row["label"]})
        out[-1] = Row(out[-1], where)
    if fmt == "kto":
        labels = {row["label"] for row in out}
        if len(labels) < 2:
            raise DataError(f"{source}: every KTO row is {'desirable' if True in labels else 'undesirable'} "
                            "(label true/false); KTO needs both classes")
    return out


def corpus(rows: list[dict]) -> list[str]:
    """Every string in normalised rows: the text the default tokenizer learns its merges from."""
    texts = []
    for row in rows:
        for key in ("prompt", "completion", "chosen", "rejected"):
            value = row.get(key)
            if isinstance(value, str) and value:
                texts.append(value)
            elif isinstance(value, list):
                texts.extend(m["content"] for m in value)
    return texts


# ---------------------------------------------------------------------------------------- tokenisation


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _prompt_and_completions(tokenizer, prompt, completions: list, where: str) -> tuple[list[int], list[list[int]]]:
    """TRL's split of prompt+completion token lists into the shared prompt and each completion."""
    if isinstance(prompt, list):
        prompt_ids = _encode(tokenizer, tokenizer.apply_chat_template(prompt, tokenize=False,
                                                                      add_generation_prompt=True))
        full = [_encode(tokenizer, tokenizer.apply_chat_template(prompt + c, tokenize=False)) for c in completions]
    else:
        eos = tokenizer.eos_token
        prompt_ids = _encode(tokenizer, prompt) if prompt else []
        full = [_encode(tokenizer, prompt + (c if c.endswith(eos) else c + eos)) for c in completions]
    prompt_len = min(_common_prefix_length(prompt_ids, ids) for ids in full)
    completion_ids = [ids[prompt_len:] for ids in full]
    if any(not ids for ids in completion_ids):
        raise DataError(f"{where}: a completion renders to no tokens")
    return prompt_ids[:prompt_len], completion_ids


@dataclass
class TokenizedData:
    """One split, tokenised: per example the prompt ids and its completions' ids (sft: [completion];
    preference: [chosen, rejected]; kto: [completion, mismatched KL completion]), KTO labels, and what
    max_length did to it."""

    method: str
    prompts: list[list[int]]
    completions: list[list[list[int]]]
    labels: list[bool] | None
    max_length: int
    truncated: int = 0  # sequences cut at max_length
    dropped: int = 0  # examples whose prompt alone fills max_length
    sequences: int = 0

    def __len__(self):
        return len(self.prompts)

    @property
    def rows_per_example(self) -> int:
        """Reference log-probs cached per example: 1 (sft needs none), 2 (chosen, rejected / completion, KL)."""
        return len(self.completions[0]) if self.completions else 0


def kl_completion_sources(n: int, kl_chunk: int) -> list[int]:
    """For each of `n` examples, the example whose completion its KL sequence takes: TRL 1.16's rotation by
    one within consecutive chunks of `kl_chunk` examples (see the module docstring)."""
    if kl_chunk < 1:
        raise ValueError(f"kl_chunk must be at least 1, got {kl_chunk}")
    sources = []
    for start in range(0, n, kl_chunk):
        chunk = list(range(start, min(start + kl_chunk, n)))
        sources += chunk[-1:] + chunk[:-1]
    return sources


def tokenize(rows: list[dict], method: str, tokenizer, max_length: int, source: str,
             kl_chunk: int | None = None) -> TokenizedData:
    """Tokenise normalised rows (see `normalise_rows`) as TRL does; see the module docstring. KTO needs
    `kl_chunk`, the number of examples within which its KL completions rotate (the global micro-batch)."""
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    fmt = METHODS[method].data_format
    if fmt == "kto" and kl_chunk is None:
        raise ValueError("KTO's KL pairs need kl_chunk (the global micro-batch)")
    prompts, completions, labels = [], [], [] if fmt == "kto" else None
    dropped = 0
    for number, row in enumerate(rows, 1):
        where = _where(row, source, number)
        if fmt == "preference":
            prompt_ids, ids = _prompt_and_completions(tokenizer, row["prompt"], [row["chosen"], row["rejected"]], where)
        else:
            prompt_ids, ids = _prompt_and_completions(tokenizer, row["prompt"], [row["completion"]], where)
        if len(prompt_ids) >= max_length:
            dropped += 1
            continue
        prompts.append(prompt_ids)
        completions.append(ids)
        if labels is not None:
            labels.append(row["label"])
    if not prompts:
        raise DataError(f"{source}: every example's prompt fills max_length={max_length}: nothing left to train on")
    if fmt == "kto":
        # Example i's KL sequence: its own prompt with the completion of the example before it in its chunk of
        # kl_chunk examples, the chunk's first taking its last's (TRL's rotation; see the module docstring).
        sources = kl_completion_sources(len(completions), kl_chunk)
        completions = [ids + [completions[j][0]] for ids, j in zip(completions, sources)]
        if len(set(labels)) < 2:
            raise DataError(f"{source}: after dropping over-long prompts only one KTO class is left")
    truncated = sum(len(p) + len(c) > max_length for p, cs in zip(prompts, completions) for c in cs)
    sequences = sum(len(cs) for cs in completions)
    return TokenizedData(method, prompts, completions, labels, max_length, truncated, dropped, sequences)


# ------------------------------------------------------------------------------------------- collation


def rows_to_tensors(prompts, completions, max_length, pad_id, score_prompt=False):
    """input_ids [R, T] (each sequence cut at max_length, minus its last token), aligned labels [R, T] of the
    completion tokens (`score_prompt`: of every token but the first, the prompt's included) and each row's input
    length [R] (its sequence's tokens, after the cut, minus one)."""
    sequences, starts = [], []
    for prompt, completion in zip(prompts, completions):
        sequences.append((prompt + completion)[:max_length])
        starts.append(len(prompt))
    width = max(len(s) for s in sequences) - 1
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
    for i, (seq, start) in enumerate(zip(sequences, starts)):
        n = len(seq) - 1
        input_ids[i, :n] = torch.tensor(seq[:-1])
        # Position t scores token t+1: completion tokens sit at positions start-1 .. n-1.
        first = 0 if score_prompt else max(start - 1, 0)
        labels[i, first:n] = torch.tensor(seq[first + 1:])
    return input_ids, labels, torch.tensor([len(s) - 1 for s in sequences])


def collate(data: TokenizedData, indices: list[int], pad_id: int) -> dict:
    """The batch of examples `indices`: `input_ids`, `labels`, `input_lengths`, `index` [B], `num_tokens`
    (sequence tokens of the trained rows), `items` (what the loss averages over, `Method.mean_over`: target tokens,
    or pairs or rows); paired methods put the B chosen rows first and the B rejected rows second; kto adds
    `desirable` [B] and the KL rows as `kl_input_ids`, `kl_labels`, `kl_input_lengths`; a method whose NLL term
    scores tokens of its own (ORPO) `nll_labels`: the chosen rows' every token, prompt included (TRL's ORPOTrainer),
    the rejected rows' completions (which its NLL term does not score)."""
    prompts = [data.prompts[i] for i in indices]
    batch = {"index": torch.tensor(indices, dtype=torch.long)}
    record = METHODS[data.method]
    fmt = record.data_format
    if fmt == "preference":
        rows_prompts = prompts + prompts
        rows_completions = [data.completions[i][0] for i in indices] + [data.completions[i][1] for i in indices]
    else:
        rows_prompts = prompts
        rows_completions = [data.completions[i][0] for i in indices]
    batch["input_ids"], batch["labels"], batch["input_lengths"] = rows_to_tensors(
        rows_prompts, rows_completions, data.max_length, pad_id)
    batch["num_tokens"] = int(batch["input_lengths"].sum()) + len(rows_prompts)
    if record.nll_over_labels:
        _, chosen_labels, _ = rows_to_tensors(prompts, [data.completions[i][0] for i in indices], data.max_length,
                                              pad_id, score_prompt=True)
        batch["nll_labels"] = batch["labels"].clone()
        batch["nll_labels"][: len(indices), : chosen_labels.shape[1]] = chosen_labels
    if fmt == "kto":
        batch["desirable"] = torch.tensor([data.labels[i] for i in indices], dtype=torch.bool)
        batch["kl_input_ids"], batch["kl_labels"], batch["kl_input_lengths"] = rows_to_tensors(
            prompts, [data.completions[i][1] for i in indices], data.max_length, pad_id)
    batch["items"] = int((batch["labels"] != IGNORE_INDEX).sum()) if record.mean_over == "tokens" else len(indices)
    return batch
