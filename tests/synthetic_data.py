"""Synthetic Arabic/Persian training data for `python -m pyprefopt.train`, shared by tests/test_train.py and
bench/bench_train.py."""

from __future__ import annotations

import json
import random
from pathlib import Path

ARABIC = "كتاب مدرسة قلم بيت شمس قمر ماء خبز سماء بحر جبل نهر طريق مدينة سؤال جواب".split()
PERSIAN = "کتاب خانه آب نان دریا کوه راه شهر".split()
GOOD, BAD = "جواب جيد: ", "جواب سيء: "


def write_data(root: Path, n_train: int, n_test: int, seed: int = 0, prompt_words=(6, 6), answer_words=(6, 6)):
    """sft/, preference/ and kto/ under `root`, each with train.jsonl (`n_train` rows) and test.jsonl (`n_test`
    rows) in TRL's conversational formats. A sentence is Arabic (one in five Persian) words, `prompt_words` /
    `answer_words` = (fewest, most) words, the count drawn per sentence. A good answer starts with GOOD and a bad
    one with BAD, followed by words drawn alike, so the preference is learnable (with the default fixed counts the
    two are the same length, so length alone tells nothing); KTO rows alternate desirable (good answer) and
    undesirable (bad answer), starting with a desirable one."""
    rng = random.Random(seed)

    def sentence(lo, hi):
        words = PERSIAN if rng.random() < 0.2 else ARABIC
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    for kind in ("sft", "preference", "kto"):
        (root / kind).mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), ("test", n_test)):
            with open(root / kind / f"{split}.jsonl", "w", encoding="utf-8") as f:
                for i in range(n):
                    prompt = [{"role": "user", "content": sentence(*prompt_words)}]
                    good = [{"role": "assistant", "content": GOOD + sentence(*answer_words)}]
                    bad = [{"role": "assistant", "content": BAD + sentence(*answer_words)}]
                    if kind == "sft":
                        row = {"messages": prompt + good}
                    elif kind == "preference":
                        row = {"prompt": prompt, "chosen": good, "rejected": bad}
                    else:
                        row = {"prompt": prompt, "completion": good if i % 2 == 0 else bad, "label": i % 2 == 0}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
