"""The method registry (`pyprefopt.losses.METHODS`) is the one source of what a method is: every place that lists
methods or their facts reads it, and no module repeats them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from pyprefopt import data as D
from pyprefopt import losses, model_card, train

ROOT = Path(__file__).resolve().parent.parent
# A dict keyed by a method's name, or a sequence of three or more of them: a copy of registry facts.
NAMES = "|".join(losses.METHODS)
REPEATED = re.compile(rf'(^\s*|[{{,]\s*)"({NAMES})"\s*:|"({NAMES})",\s*"({NAMES})",\s*"({NAMES})"')


def test_every_cli_choice_data_format_and_card_name_comes_from_the_registry():
    assert _method_choices() == tuple(losses.METHODS)
    for name, record in losses.METHODS.items():
        assert D.default_data_dir(name) == D.PACKAGE_DATA / record.data_format
        assert (D.default_data_dir(name) / "train.jsonl").is_file()
        assert record.description
    assert not hasattr(model_card, "METHOD_NAMES") and not hasattr(D, "FORMATS")


def _method_choices():
    import argparse

    seen = {}
    original = argparse.ArgumentParser.add_argument

    def spy(self, *args, **kwargs):
        if args[:1] == ("--method",):
            seen["choices"] = kwargs["choices"]
        return original(self, *args, **kwargs)

    argparse.ArgumentParser.add_argument = spy
    try:
        train.parse_args(["--method", "sft"])
    finally:
        argparse.ArgumentParser.add_argument = original
    return tuple(seen["choices"])


@pytest.mark.parametrize("path", sorted([*ROOT.glob("pyprefopt/*.py"), *ROOT.glob("bench/*.py")]),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_repeats_the_method_list(path):
    """losses.py registers the methods; no other module keys a table by method name or lists the methods."""
    if path.name == "losses.py":
        return
    hits = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if REPEATED.search(line)]
    assert not hits, f"{path.name} repeats registry facts: {hits}"


def test_record_facts_follow_from_the_loss():
    """What a record says a method needs is what its loss takes; the CLI's defaults are the loss's."""
    for name, record in losses.METHODS.items():
        assert record.paired == (record.data_format == "preference"), name
        assert set(record.step_metrics) <= set(record.metrics)
        args = train.parse_args(["--method", name])
        assert train.loss_hparams(args) == {hp: record.hyperparameters[hp] for hp in record.options}, name
    assert losses.METHODS["kto"].kl_batch and losses.METHODS["kto"].desirable
    assert losses.METHODS["orpo"].nll_over_labels and not losses.METHODS["orpo"].needs_reference
    assert {m for m, r in losses.METHODS.items() if r.needs_reference} == {"dpo", "ipo", "kto"}


def test_a_bad_record_is_refused():
    def loss(chosen_logps, rejected_logps, old_logps, beta=0.1):
        return chosen_logps.sum(), {}

    with pytest.raises(ValueError, match="no statistics of its batches"):
        losses.Method("bad", loss, "bad", "preference", ())
    with pytest.raises(ValueError, match="not hyper-parameters"):
        losses.Method("bad", losses.dpo_loss, "bad", "preference", (), {"alpha": "cpo_alpha"})
    with pytest.raises(ValueError, match="data_format"):
        losses.Method("bad", losses.dpo_loss, "bad", "pairs", ())
    with pytest.raises(ValueError, match="unknown method 'grpo'"):
        losses.from_sequence_stats("grpo", torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="no NLL term"):
        losses.from_sequence_stats("dpo", torch.zeros(2), torch.ones(2), ref_logps=torch.zeros(2),
                                   nll_logps=torch.zeros(2))
