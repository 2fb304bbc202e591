"""`FusedLinearPreferenceLoss` under bad input: a TypeError or ValueError naming the argument, what it got and what
it expects, raised at construction or before anything is computed, never a silently different loss.

BAD_INPUTS is a table: add a case with one entry (its name, a function making the bad call from a valid `Setup`,
the exception type and a text its message must contain).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from pyprefopt import FusedLinearPreferenceLoss, losses

BATCH, SEQ, WIDTH, VOCAB = 4, 9, 20, 77


@dataclass
class Setup:
    """A small valid batch: 3-token prompts, 2 tokens of padding in the last row."""

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def make(cls, trained):
        labels = torch.randint(0, VOCAB, (BATCH, SEQ))
        labels[:, :3] = -100
        labels[-1, -2:] = -100
        return cls(torch.randn(BATCH, SEQ, WIDTH, requires_grad=True),
                   (torch.randn(VOCAB, WIDTH) * 0.3).requires_grad_(trained), labels, torch.randn(VOCAB))

    def valid_inputs(self, method):
        """The method's optional inputs, all valid."""
        if method in ("dpo", "ipo"):
            return {"ref_logps": torch.randn(BATCH) - 30}
        if method == "kto":
            return {"ref_logps": torch.randn(BATCH) - 30, "desirable": torch.tensor([True, False, True, True]),
                    "kl_logps": torch.randn(BATCH) - 30, "ref_kl_logps": torch.randn(BATCH) - 30}
        if method == "orpo":
            # The chosen rows' prompts scored by the NLL term too, as TRL's ORPOTrainer scores them.
            return {"nll_labels": torch.cat([self.labels[:2].clamp(min=0), self.labels[2:]])}
        return {}

    def loss(self, method, hparams=None, **inputs):
        """The loss of the valid batch with `inputs` in place of the valid ones (None removes one)."""
        merged = {**self.valid_inputs(method), **inputs}
        merged = {name: value for name, value in merged.items() if value is not None}
        return FusedLinearPreferenceLoss(method, **(hparams or {}))(
            self.hidden, self.weight, self.labels, self.bias, **merged)


def _kto_with_kl(s, kl):
    return s.loss("kto", kl=kl, kl_logps=None, ref_kl_logps=None)


@dataclass
class Case:
    name: str
    call: object  # Setup -> the bad call
    error: type
    message: str


BAD_INPUTS = [
    # ORPO's NLL tokens: where labels scores a token, nll_labels must name the same one (a shifted or other tensor).
    Case("nll_labels naming other tokens", lambda s: s.loss("orpo", nll_labels=(s.labels + 1) % VOCAB),
         ValueError, "nll_labels and labels name different tokens at row 0, position 3"),
    Case("nll_labels of another shape", lambda s: s.loss("orpo", nll_labels=s.labels[:, 1:]),
         ValueError, "nll_labels has shape (4, 8), expected (4, 9)"),
    Case("nll_labels of floats", lambda s: s.loss("orpo", nll_labels=s.labels.float()),
         TypeError, "nll_labels must be an integer tensor"),
    Case("nll_labels for dpo", lambda s: s.loss("dpo", nll_labels=s.labels),
         ValueError, "dpo does not use ['nll_labels']"),
    # Per-token reference log-probs are [B, T] exactly as labels; other shapes were summed into a different loss.
    Case("ref_logps per token too long", lambda s: s.loss("dpo", ref_logps=torch.randn(BATCH, SEQ + 3)),
         ValueError, "ref_logps has shape (4, 12), expected (4,) per sequence or (4, 9) per token"),
    Case("ref_logps per token too short", lambda s: s.loss("ipo", ref_logps=torch.randn(BATCH, 1)),
         ValueError, "ref_logps has shape (4, 1), expected (4,)"),
    Case("ref_logps of three dimensions", lambda s: s.loss("kto", ref_logps=torch.randn(BATCH, SEQ, 1)),
         ValueError, "ref_logps has shape (4, 9, 1), expected (4,) per sequence or (4, 9) per token"),
    Case("ref_logps of integers", lambda s: s.loss("dpo", ref_logps=torch.zeros(BATCH, dtype=torch.long)),
         TypeError, "ref_logps must be a floating-point tensor, got a torch.int64 tensor"),
    Case("ref_logps as a list", lambda s: s.loss("dpo", ref_logps=[-30.0] * BATCH),
         TypeError, "ref_logps must be a floating-point tensor, got a list"),
    Case("ref_logps on another device", lambda s: s.loss("dpo", ref_logps=torch.zeros(BATCH, device="meta")),
         ValueError, "ref_logps must be on hidden's device cpu, got meta"),
    # Two sources for one quantity: one of them was silently ignored.
    Case("ref_logps and ref_hidden", lambda s: s.loss("dpo", ref_hidden=torch.randn(BATCH, SEQ, WIDTH)),
         ValueError, "give ref_logps or ref_hidden, not both"),
    Case("kl_logps and kl_hidden",
         lambda s: s.loss("kto", kl_hidden=torch.randn(BATCH, SEQ, WIDTH), kl_labels=s.labels),
         ValueError, "give kl_logps or kl_hidden, not both"),
    Case("ref_weight with nothing to project", lambda s: s.loss("dpo", ref_weight=s.weight.detach().clone()),
         ValueError, "['ref_weight'] project ref_hidden or ref_kl_hidden, and neither is given"),
    # Reference hidden states and head: errors name them, not the policy's hidden and weight.
    Case("ref_hidden of another length",
         lambda s: s.loss("dpo", ref_logps=None, ref_hidden=torch.randn(BATCH, SEQ + 1, WIDTH)),
         ValueError, "ref_hidden must be [batch, seq_len, hidden] with [batch, seq_len] = (4, 9)"),
    Case("ref_hidden of another dtype",
         lambda s: s.loss("dpo", ref_logps=None, ref_hidden=torch.randn(BATCH, SEQ, WIDTH, dtype=torch.float64)),
         TypeError, "ref_hidden (torch.float64) and weight (torch.float32) must share a dtype"),
    Case("ref_weight of another hidden size",
         lambda s: s.loss("dpo", ref_logps=None, ref_hidden=torch.randn(BATCH, SEQ, WIDTH),
                          ref_weight=torch.randn(VOCAB, WIDTH + 1)),
         ValueError, "ref_hidden's hidden size (20) must equal ref_weight's (21)"),
    Case("ref_weight of one dimension",
         lambda s: s.loss("dpo", ref_logps=None, ref_hidden=torch.randn(BATCH, SEQ, WIDTH),
                          ref_weight=torch.randn(VOCAB)),
         ValueError, "ref_weight must be [vocab, hidden], got shape (77,)"),
    Case("ref_weight of integers",
         lambda s: s.loss("dpo", ref_logps=None, ref_hidden=torch.randn(BATCH, SEQ, WIDTH),
                          ref_weight=torch.zeros(VOCAB, WIDTH, dtype=torch.long)),
         TypeError, "ref_weight must be a floating-point tensor, got a torch.int64 tensor of shape (77, 20)"),
    Case("ref_bias of another vocabulary",
         lambda s: s.loss("dpo", ref_logps=None, ref_hidden=torch.randn(BATCH, SEQ, WIDTH),
                          ref_bias=torch.randn(VOCAB + 1)),
         ValueError, "ref_bias must be [vocab]=(77,) as weight, got a torch.float32 tensor of shape (78,)"),
    # KTO's mismatched pairs: shapes pair with kl_labels, and kl_logps with ref_kl_logps.
    Case("kl_logps per token too long",
         lambda s: s.loss("kto", kl_logps=torch.randn(BATCH, SEQ + 2), kl_labels=s.labels),
         ValueError, "kl_logps has shape (4, 11), expected (4,) per sequence or (4, 9) per token (the shape of "
                     "kl_labels)"),
    Case("ref_kl_logps per token without kl_labels", lambda s: s.loss("kto", ref_kl_logps=torch.randn(BATCH, SEQ)),
         ValueError, "ref_kl_logps has shape (4, 9), expected [batch] per sequence (per token [batch, seq_len] needs "
                     "kl_labels)"),
    Case("ref_kl_logps of one row", lambda s: s.loss("kto", ref_kl_logps=torch.randn(1)),
         ValueError, "kl_logps (4,) and ref_kl_logps (1,) must both be [kl_batch]"),
    Case("ref_kl_hidden without kl_labels",
         lambda s: s.loss("kto", ref_kl_logps=None, ref_kl_hidden=torch.randn(BATCH, SEQ, WIDTH)),
         ValueError, "ref_kl_hidden needs kl_labels"),
    Case("kl_hidden of another length",
         lambda s: s.loss("kto", kl_logps=None, kl_hidden=torch.randn(BATCH, SEQ + 1, WIDTH), kl_labels=s.labels),
         ValueError, "kl_hidden must be [batch, seq_len, hidden] with [batch, seq_len] = (4, 9) (the shape of "
                     "kl_labels)"),
    Case("kl_labels of floats",
         lambda s: s.loss("kto", kl_logps=torch.randn(BATCH, SEQ), kl_labels=s.labels.float()),
         TypeError, "kl_labels must be an integer tensor [batch, seq_len], got a torch.float32 tensor"),
    # KTO's given reference point: one value for the batch.
    Case("kl per row", lambda s: _kto_with_kl(s, torch.rand(BATCH)),
         ValueError, "kl must be a single value (the batch's KL estimate), got shape (4,)"),
    Case("kl of integers", lambda s: _kto_with_kl(s, torch.tensor(0)),
         TypeError, "kl must be a number or a one-element floating-point tensor (the batch's KL estimate), got "
                    "torch.int64"),
    # KTO's desirable: one flag per row, bools or 0/1.
    Case("desirable as a float", lambda s: s.loss("kto", desirable=0.5),
         TypeError, "desirable must be a [batch] bool tensor or a sequence of bools, got float"),
    Case("desirable as a list of floats", lambda s: s.loss("kto", desirable=[1.0, 0.0, 1.0, 1.0]),
         TypeError, "desirable must be a [batch] bool tensor or a sequence of bools, got a list holding float"),
    Case("desirable of floats", lambda s: s.loss("kto", desirable=torch.tensor([1.0, 0.0, 0.5, 1.0])),
         TypeError, "desirable must be a bool tensor (or 0/1 integers), got torch.float32"),
    Case("desirable of integers other than 0/1", lambda s: s.loss("kto", desirable=torch.tensor([2, 0, 1, 1])),
         ValueError, "desirable must hold only 0/1 (or bools), got 2"),
    Case("desirable too short", lambda s: s.loss("kto", desirable=[True, False, True]),
         ValueError, "desirable has shape (3,), expected (4,)"),
    Case("labels as a list", lambda s: FusedLinearPreferenceLoss("sft")(s.hidden, s.weight, s.labels.tolist()),
         TypeError, "labels must be an integer tensor [batch, seq_len], got a list"),
    # Construction: hyper-parameters out of range or of the wrong kind.
    Case("label_smoothing over one half", lambda s: FusedLinearPreferenceLoss("dpo", label_smoothing=0.7),
         ValueError, "label_smoothing must lie in [0, 0.5], got 0.7"),
    Case("label_smoothing below 0", lambda s: FusedLinearPreferenceLoss("cpo", label_smoothing=-0.1),
         ValueError, "label_smoothing must lie in [0, 0.5], got -0.1"),
    Case("beta as a string", lambda s: FusedLinearPreferenceLoss("dpo", beta="0.1"),
         TypeError, "beta must be a real number, got '0.1'"),
    Case("beta infinite", lambda s: FusedLinearPreferenceLoss("ipo", beta=float("inf")),
         ValueError, "beta must be finite, got inf"),
    Case("alpha as None", lambda s: FusedLinearPreferenceLoss("cpo", alpha=None),
         TypeError, "alpha must be a real number, got None"),
    Case("desirable_weight not a number", lambda s: FusedLinearPreferenceLoss("kto", desirable_weight=[1.0]),
         TypeError, "desirable_weight must be a real number, got [1.0]"),
    Case("temperature 0", lambda s: FusedLinearPreferenceLoss("sft", temperature=0),
         ValueError, "temperature must be > 0, got 0"),
    Case("ignore_index None", lambda s: FusedLinearPreferenceLoss("sft", ignore_index=None),
         TypeError, "ignore_index must be an integer label value, got None"),
]


@pytest.mark.parametrize("trained", [False, True], ids=["frozen-head", "trained-head"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[case.name for case in BAD_INPUTS])
def test_bad_input_is_a_clear_error(case, trained):
    setup = Setup.make(trained)
    with pytest.raises(case.error) as raised:
        case.call(setup)
    assert case.message in str(raised.value)


def test_valid_setup_runs():
    """Every method takes the table's valid setup (so each case fails for its own bad input alone)."""
    setup = Setup.make(trained=False)
    for method in losses.METHODS:
        loss, _ = setup.loss(method)
        assert torch.isfinite(loss)
