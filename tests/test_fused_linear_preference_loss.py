import gc
import math
import sys
import weakref

import pytest
import torch

from pyprefopt import FusedLinearPreferenceLoss, fused_linear_logprobs, losses
from pyprefopt.reference import reference_logprobs, reference_preference_loss
from tests.tensor_asserts import assert_close_verbose

module = sys.modules["pyprefopt.fused_linear_preference_loss"]

CASES = [
    ("sft", {}),
    ("dpo", {"beta": 0.2}),
    ("dpo", {"beta": 0.1, "label_smoothing": 0.1}),
    ("ipo", {"beta": 0.3}),
    ("cpo", {"beta": 0.2, "alpha": 1.0}),
    ("cpo", {"beta": 2.0, "alpha": 0.0, "simpo_gamma": 0.5}),
    ("kto", {"beta": 0.1, "desirable_weight": 1.33, "undesirable_weight": 0.7}),
    ("orpo", {"beta": 0.2}),
]
CASE_IDS = [f"{m}-" + "-".join(f"{k}={v}" for k, v in h.items()) for m, h in CASES]


def make_batch(method, batch=4, seq=9, width=20, vocab=77, trained=False, lengths=None, transform=None):
    """`lengths`: each row's count of valid labels (a prompt before them, padding after); default: a
    3-token prompt in every row and 2 tokens of padding in the last. `transform`: the head's temperature,
    softcap and logit_scale, for the reference log-probs."""
    transform = transform or {}
    hidden = torch.randn(batch, seq, width, requires_grad=True)
    weight = (torch.randn(vocab, width) * 0.3).requires_grad_(trained)
    bias = torch.randn(vocab).requires_grad_(trained)
    labels = torch.randint(0, vocab, (batch, seq))
    if lengths is None:
        labels[:, :3] = -100  # prompts
        labels[-1, -2:] = -100  # padding
    else:
        for row, n in enumerate(lengths):
            prompt = (seq - n) // 2
            labels[row, :prompt] = -100
            labels[row, prompt + n :] = -100
    ours, theirs = {}, {}
    record = losses.METHODS[method]
    if record.needs_reference:
        ref_hidden = torch.randn(batch, seq, width)
        ours["ref_hidden"] = ref_hidden
        theirs["ref_logps"] = reference_logprobs(ref_hidden, weight, labels, bias, **transform).sum(-1).detach()
    if record.nll_over_labels:
        # TRL's ORPO: the NLL term scores the chosen rows' prompts too (the ignored positions before a completion).
        nll_labels = labels.clone()
        chosen = torch.arange(batch)[:, None] < batch // 2
        prompt = torch.arange(seq) < (labels != -100).int().argmax(-1, keepdim=True)
        nll_labels[chosen & prompt] = torch.randint(0, vocab, (int((chosen & prompt).sum()),))
        ours["nll_labels"] = theirs["nll_labels"] = nll_labels
    if record.kl_batch:
        desirable = torch.arange(batch) % 3 != 1
        kl_hidden, ref_kl = torch.randn(batch, seq, width), torch.randn(batch) - 20
        kl_labels = labels.roll(1, 0)
        ours.update(desirable=desirable, kl_hidden=kl_hidden, kl_labels=kl_labels, ref_kl_logps=ref_kl)
        theirs.update(desirable=desirable, ref_kl_logps=ref_kl,
                      kl_logps=reference_logprobs(kl_hidden, weight, kl_labels, bias, **transform).sum(-1).detach())
    return (hidden, weight, labels, bias), ours, theirs


def check(method, hparams, trained, batch=4, seq=9, upstream=1.0, lengths=None, width=20, transform=None):
    transform = transform or {}
    (hidden, weight, labels, bias), ours, theirs = make_batch(method, batch, seq, width, trained=trained,
                                                              lengths=lengths, transform=transform)
    loss, metrics = FusedLinearPreferenceLoss(method, **transform, **hparams)(hidden, weight, labels, bias, **ours)
    ref_loss, ref_metrics = reference_preference_loss(method, hidden, weight, labels, bias, **transform, **theirs,
                                                      **hparams)
    assert_close_verbose(loss, ref_loss, name="loss")
    assert metrics.keys() == ref_metrics.keys()
    for key in metrics:
        assert metrics[key].requires_grad is False
        assert_close_verbose(metrics[key], ref_metrics[key], name=key)
    params = [hidden, weight, bias] if trained else [hidden]
    for name, got, want in zip(("hidden", "weight", "bias"), torch.autograd.grad(upstream * loss, params),
                               torch.autograd.grad(upstream * ref_loss, params)):
        assert_close_verbose(got, want, name=f"grad {name}")


@pytest.mark.parametrize("trained", [False, True], ids=["frozen-head", "trained-head"])
@pytest.mark.parametrize("method,hparams", CASES, ids=CASE_IDS)
def test_matches_reference(method, hparams, trained, cpu_gemm):
    check(method, hparams, trained, upstream=2.5)


@pytest.mark.parametrize("method,hparams", CASES, ids=CASE_IDS)
def test_trained_head_in_many_chunks(method, hparams, monkeypatch):
    """A pair (or two single rows) per chunk: the one-pass gradients stay exact across chunk boundaries."""
    monkeypatch.setattr(module, "TRAINED_HEAD_CHUNK_BYTES", 4 * 77 * 18)
    assert len(module._group_chunks(method, torch.zeros(6, 9), -100, 77)) == 3
    check(method, hparams, trained=True, batch=6)


# Partial keep: a budget of 10 tokens of logits. Valid tokens per row; pairs are (i, i + 4).
PARTIAL_BUDGET = 10
PARTIAL_LENGTHS = {
    # pair tokens: 10 (at the budget), 41 (over), 7 + 3 (two pairs in one chunk)
    "paired": [5, 24, 3, 2, 5, 17, 4, 1],
    # row tokens: 10 (at), 24 (over), 3 + 7 (one chunk), 11 (over by one), 0
    "single": [10, 24, 3, 7, 11, 0],
}
PARTIAL_CHUNK_TOKENS = {"paired": [10, 41, 10], "single": [10, 24, 10, 11, 0]}


def _partial_lengths(method):
    return PARTIAL_LENGTHS["paired" if losses.METHODS[method].paired else "single"]


@pytest.mark.parametrize("method,hparams", CASES, ids=CASE_IDS)
def test_trained_head_partial_keep(method, hparams, monkeypatch, cpu_gemm):
    """Groups over the chunk budget keep the logits of their last tiles and recompute the rest from the stored
    log-sum-exp; gradients stay exact with groups at, over and under the budget, and rows of uneven lengths."""
    monkeypatch.setattr(module, "TRAINED_HEAD_CHUNK_BYTES", 4 * 77 * PARTIAL_BUDGET)
    lengths = _partial_lengths(method)
    labels = (torch.arange(24) < torch.tensor(lengths)[:, None]).long() - 1  # valid: 0, ignored: -1
    chunks = module._group_chunks(method, labels, -1, 77)
    kind = "paired" if losses.METHODS[method].paired else "single"
    assert [sum(lengths[i] for i in c.tolist()) for c in chunks] == PARTIAL_CHUNK_TOKENS[kind]
    check(method, hparams, trained=True, batch=len(lengths), seq=24, upstream=2.5, lengths=lengths)


@pytest.mark.parametrize("long_group_first", [False, True], ids=["long-group-second", "long-group-first"])
@pytest.mark.parametrize("method,hparams", [CASES[1], CASES[6]], ids=[CASE_IDS[1], CASE_IDS[6]])
def test_trained_head_partial_keep_across_token_blocks(method, hparams, long_group_first, monkeypatch):
    """An over-budget group longer than a token block: tiles of several blocks, kept ones among the last blocks.
    As the first chunk, its tiles also write the weight gradient's rows (no zero-fill): the kept tiles of later
    blocks run before the recomputed ones of the first block, and each row is written once, then added to."""
    monkeypatch.setattr(module, "TRAINED_HEAD_CHUNK_BYTES", 4 * 77 * PARTIAL_BUDGET)
    monkeypatch.setattr(sys.modules["pyprefopt.fused_linear_logprobs"], "CPU_TOKEN_BLOCK", 8)
    assert module._walk_tiles(41, 77)[0] == 7  # 41 tokens in 6 blocks
    lengths = list(_partial_lengths(method))
    if long_group_first:  # the 41-token pair (rows 1 and 5) or the 24-token row (row 1) to the front
        swap = [(0, 1), (4, 5)] if losses.METHODS[method].paired else [(0, 1)]
        for i, j in swap:
            lengths[i], lengths[j] = lengths[j], lengths[i]
    check(method, hparams, trained=True, batch=len(lengths), seq=24, upstream=2.5, lengths=lengths)


# Logits the over-budget groups drop and recompute: such a group is walked in tiles of narrowed vocabulary
# width so that 4 fit in the budget, and the last 4 keep their logits. One of at most H = 20 tokens goes first
# and keeps all its logits in the weight gradient instead.
PARTIAL_DROPPED_LOGITS = {
    "dpo": 41 * 64,  # 41-token pair: 4-wide tiles, 20 of them; kept 4 + 4 + 4 + 1 of the 77 columns
    "kto": 24 * 48,  # 24-token row: 8-wide, kept 8 + 8 + 8 + 5; the 11-token row goes first, kept whole
}


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_partial_keep_recomputes_only_the_dropped_logits(method, monkeypatch):
    """Over-budget groups run the partial-keep path, not the recompute fallback: the logits GEMM computes every
    valid token's logits once plus the dropped ones once more, its buffer stays within the budget (but for the
    tiles of the one group kept in the weight gradient's own storage), and fused_linear_logprobs' recomputing
    backward never runs."""
    monkeypatch.setattr(module, "TRAINED_HEAD_CHUNK_BYTES", 4 * 77 * PARTIAL_BUDGET)
    projected, buffer_bytes, in_gradient = [], [], []

    def counting_logits_tile(h, weight, bias, v0, tile, buffer, weight_scratch=None):
        z, w = logits_tile(h, weight, bias, v0, tile, buffer, weight_scratch)
        projected.append(z.numel())
        if buffer.untyped_storage().nbytes() == 4 * weight.numel():
            in_gradient.append(h.shape[0])
        else:
            buffer_bytes.append(buffer.untyped_storage().nbytes())
        return z, w

    def no_recompute(*args):
        raise AssertionError("the recompute path ran")

    logits_tile = module.logits_tile
    monkeypatch.setattr(module, "logits_tile", counting_logits_tile)
    monkeypatch.setattr(sys.modules["pyprefopt.fused_linear_logprobs"], "cpu_backward", no_recompute)
    lengths = _partial_lengths(method)
    (hidden, weight, labels, bias), ours, _ = make_batch(method, len(lengths), 24, trained=True, lengths=lengths)
    loss, _ = FusedLinearPreferenceLoss(method)(hidden, weight, labels, bias, **ours)
    loss.backward()
    assert weight.grad is not None and bias.grad is not None
    assert sum(projected) == sum(lengths) * 77 + PARTIAL_DROPPED_LOGITS[method]
    assert max(buffer_bytes) <= 4 * 77 * PARTIAL_BUDGET
    # KTO's 11-token row (at most H = 20 tokens, over the budget) in 17-wide tiles; DPO's 41-token pair is over H.
    assert in_gradient == ([11] * 5 if method == "kto" else [])


# A group over the budget of 10 tokens and at most H = 32 tokens: kept whole in the weight gradient, as the first
# chunk, or moved to the front as the one that would recompute the most.
FIRST_IN_GRADIENT_LENGTHS = {
    "paired": [12, 3, 2, 4, 11, 5, 1, 2],  # pairs: 23 (over), 8, 3 + 6
    "paired-later": [3, 2, 12, 4, 5, 1, 11, 2],  # pairs: 8, 3, 23 (over), 6
    "single": [23, 4, 5, 11, 0, 2],  # rows: 23 (over), 4 + 5, 11 (over: partial keep), 0 + 2
    "single-later": [4, 5, 11, 23, 0, 2],  # rows: 4 + 5, 11 (over: partial keep), 23 (over: kept), 0 + 2
}


@pytest.mark.parametrize("later", [False, True], ids=["first", "later"])
@pytest.mark.parametrize("method,hparams", [CASES[1], CASES[3], CASES[6]], ids=[CASE_IDS[1], CASE_IDS[3], CASE_IDS[6]])
def test_first_chunk_over_budget_keeps_its_logits_in_the_weight_gradient(method, hparams, later, monkeypatch,
                                                                         cpu_gemm):
    """The chunk over the budget (one token block, at most H tokens) that would recompute the most goes first and
    keeps every tile's logits in the rows of the weight gradient that tile's gradient goes to: no logits
    recomputed for it, exact gradients."""
    monkeypatch.setattr(module, "TRAINED_HEAD_CHUNK_BYTES", 4 * 77 * PARTIAL_BUDGET)
    projected = []
    logits_tile = module.logits_tile

    def counting_logits_tile(h, weight, bias, v0, tile, buffer, weight_scratch=None):
        z, w = logits_tile(h, weight, bias, v0, tile, buffer, weight_scratch)
        projected.append(z.numel())
        return z, w

    monkeypatch.setattr(module, "logits_tile", counting_logits_tile)
    kind = "paired" if losses.METHODS[method].paired else "single"
    lengths = FIRST_IN_GRADIENT_LENGTHS[kind + ("-later" if later else "")]
    check(method, hparams, trained=True, batch=len(lengths), seq=24, upstream=2.5, lengths=lengths, width=32)
    # Every valid token's logits once, plus the 11-token row's dropped ones (17-wide tiles, 3 of 5 kept).
    assert sum(projected) == sum(lengths) * 77 + (11 * 17 if method == "kto" else 0)


@pytest.mark.parametrize("method,hparams", [CASES[0], CASES[1], CASES[6]], ids=[CASE_IDS[0], CASE_IDS[1], CASE_IDS[6]])
def test_batch_of_at_most_h_tokens_is_one_chunk_kept_in_the_weight_gradient(method, hparams, monkeypatch, cpu_gemm):
    """A batch over the budget with at most H projected tokens is walked as one chunk (every logits GEMM has all
    its tokens as rows), kept whole in the weight gradient: no logits recomputed, exact gradients."""
    monkeypatch.setattr(module, "TRAINED_HEAD_CHUNK_BYTES", 4 * 77 * PARTIAL_BUDGET)
    rows_per_gemm = []
    logits_tile = module.logits_tile

    def counting_logits_tile(h, weight, bias, v0, tile, buffer, weight_scratch=None):
        rows_per_gemm.append(h.shape[0])
        return logits_tile(h, weight, bias, v0, tile, buffer, weight_scratch)

    monkeypatch.setattr(module, "logits_tile", counting_logits_tile)
    lengths = FIRST_IN_GRADIENT_LENGTHS["paired" if losses.METHODS[method].paired else "single"]
    check(method, hparams, trained=True, batch=len(lengths), seq=24, upstream=2.5, lengths=lengths, width=64)
    assert set(rows_per_gemm) == {sum(lengths)}  # 40 (paired) or 45 tokens <= H = 64: one chunk


@pytest.mark.parametrize("width", [20, 64], ids=["partial-keep", "kept-in-gradient"])
@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_partial_keep_temperature_and_ignore_index(method, width, monkeypatch):
    """Recomputed logits, and logits kept in the weight gradient (at H = 64 the whole batch of 55 / 61 tokens),
    take the temperature and the bias as the kept ones do; another ignore_index is honoured."""
    monkeypatch.setattr(module, "TRAINED_HEAD_CHUNK_BYTES", 4 * 77 * PARTIAL_BUDGET)
    lengths = _partial_lengths(method)
    (hidden, weight, labels, bias), _, _ = make_batch(method, len(lengths), 24, width, trained=True, lengths=lengths)
    labels[labels == -100] = 5000  # out of the vocabulary: only ignore_index keeps it out of a matmul
    ours = {"ref_logps": torch.randn(len(lengths)) - 40} if method == "dpo" else {}
    loss, metrics = FusedLinearPreferenceLoss(method, ignore_index=5000, temperature=0.7)(
        hidden, weight, labels, bias, **ours)
    token_logps = reference_logprobs(hidden, weight, labels, bias, ignore_index=5000, temperature=0.7)
    ref_loss, ref_metrics = losses.from_sequence_stats(method, token_logps.sum(-1), (labels != 5000).sum(-1), **ours)
    assert_close_verbose(loss, ref_loss, name="loss")
    for key in ref_metrics:
        assert_close_verbose(metrics[key], ref_metrics[key], name=key)
    params = [hidden, weight, bias]
    for name, got, want in zip(("hidden", "weight", "bias"), torch.autograd.grad(loss, params),
                               torch.autograd.grad(ref_loss, params)):
        assert_close_verbose(got, want, name=f"grad {name}")


def test_reference_inputs_are_interchangeable():
    """ref_logps per sequence, per token, or from reference hidden states give one loss."""
    (hidden, weight, labels, bias), ours, _ = make_batch("dpo")
    loss_fn = FusedLinearPreferenceLoss("dpo", beta=0.1)
    per_token = reference_logprobs(ours["ref_hidden"], weight, labels, bias)
    from_hidden, _ = loss_fn(hidden, weight, labels, bias, ref_hidden=ours["ref_hidden"])
    from_tokens, _ = loss_fn(hidden, weight, labels, bias, ref_logps=per_token)
    from_sums, _ = loss_fn(hidden, weight, labels, bias, ref_logps=per_token.sum(-1))
    assert_close_verbose(from_hidden, from_tokens)
    assert_close_verbose(from_hidden, from_sums)


@pytest.mark.parametrize("trained", [False, True], ids=["frozen-head", "trained-head"])
@pytest.mark.parametrize("method", ["dpo", "ipo", "kto"])
def test_per_token_reference_counts_only_completion_tokens(method, trained):
    """Per-token reference log-probs count the positions the policy's count (labels != ignore_index), as TRL masks
    both with one completion mask: garbage at prompt and padding positions changes nothing, and the loss is that of
    the per-sequence sums. KTO's mismatched pairs are masked by kl_labels alike."""
    (hidden, weight, labels, bias), ours, _ = make_batch(method, trained=trained)
    per_token = reference_logprobs(ours.pop("ref_hidden"), weight, labels, bias).detach()
    garbage = per_token + torch.randn(labels.shape).masked_fill(labels != -100, 0) * 50
    assert not torch.equal(garbage, per_token)
    inputs = {"clean": {"ref_logps": per_token}, "garbage": {"ref_logps": garbage},
              "sums": {"ref_logps": per_token.sum(-1)}}
    if method == "kto":
        kl_labels = ours.pop("kl_labels")
        kl_per_token = reference_logprobs(ours.pop("kl_hidden"), weight, kl_labels, bias).detach()
        kl_garbage = kl_per_token + torch.randn(kl_labels.shape).masked_fill(kl_labels != -100, 0) * 50
        ours["ref_kl_logps"] = kl_per_token.sum(-1) - 1  # KL point 1, not clamped to 0: the garbage would show
        inputs["clean"].update(kl_logps=kl_per_token, kl_labels=kl_labels)
        inputs["garbage"].update(kl_logps=kl_garbage, kl_labels=kl_labels)
        inputs["sums"].update(kl_logps=kl_per_token.sum(-1))
    loss_fn = FusedLinearPreferenceLoss(method)
    results = {name: loss_fn(hidden, weight, labels, bias, **ours, **given) for name, given in inputs.items()}
    for name in ("garbage", "sums"):
        assert_close_verbose(results[name][0], results["clean"][0], name=f"{name} loss")
        for key, value in results["clean"][1].items():
            assert_close_verbose(results[name][1][key], value, name=f"{name} {key}")


def test_kto_desirable_and_kl_forms_give_one_loss():
    """`desirable` as a bool tensor, 0/1 integers or a list of bools, and `kl` as a 0-d tensor, a one-element tensor
    or a number: one loss, bit for bit."""
    (hidden, weight, labels, bias), ours, _ = make_batch("kto")
    desirable = ours.pop("desirable")
    for name in ("kl_hidden", "kl_labels", "ref_kl_logps"):
        ours.pop(name)
    loss_fn = FusedLinearPreferenceLoss("kto", beta=0.1)
    want, _ = loss_fn(hidden, weight, labels, bias, desirable=desirable, kl=torch.tensor(0.25), **ours)
    for form in (desirable.long(), desirable.tolist()):
        for kl in (torch.tensor([0.25]), 0.25):
            got, _ = loss_fn(hidden, weight, labels, bias, desirable=form, kl=kl, **ours)
            assert torch.equal(got, want)


@pytest.mark.parametrize("kwargs", [{"method": "dpo", "label_smoothing": 0.5}, {"method": "cpo", "label_smoothing": 0},
                                    {"method": "cpo", "simpo_gamma": None}, {"method": "sft", "ignore_index": -1},
                                    {"method": "kto", "beta": 2, "desirable_weight": 0.0}])
def test_hyperparameters_at_their_bounds_are_accepted(kwargs):
    FusedLinearPreferenceLoss(**kwargs)


def test_dpo_by_hand():
    loss, m = losses.dpo_loss(torch.tensor([-10.0]), torch.tensor([-14.0]), torch.tensor([-11.0]),
                              torch.tensor([-12.0]), beta=0.5)
    # margin = (-10 + 11) - (-14 + 12) = 3
    assert math.isclose(loss.item(), math.log1p(math.exp(-1.5)), rel_tol=1e-6)
    assert m["rewards/chosen"].item() == 0.5 and m["rewards/rejected"].item() == -1.0
    assert m["rewards/margins"].item() == 1.5 and m["rewards/accuracies"].item() == 1.0


def test_ipo_by_hand():
    loss, _ = losses.ipo_loss(torch.tensor([-10.0]), torch.tensor([-14.0]), torch.tensor([-11.0]),
                              torch.tensor([-12.0]), torch.tensor([2]), torch.tensor([4]), beta=0.25)
    # (1/2 - (-2)/4 - 1/(2*0.25))^2 = (1 - 2)^2
    assert math.isclose(loss.item(), 1.0, rel_tol=1e-6)


def test_kto_class_weights_are_honoured():
    logps, ref = torch.tensor([-5.0, -7.0, -6.0]), torch.tensor([-6.0, -6.0, -6.0])
    desirable = torch.tensor([True, False, True])
    kl = torch.tensor(0.25)
    base, _ = losses.kto_loss(logps, ref, desirable, kl, beta=0.1)
    heavy, _ = losses.kto_loss(logps, ref, desirable, kl, beta=0.1, desirable_weight=2.0, undesirable_weight=0.5)
    sig = torch.sigmoid
    want = (2 * (1 - sig(torch.tensor(0.1 * (1 - 0.25)))) + 0.5 * (1 - sig(torch.tensor(0.1 * (0.25 + 1))))
            + 2 * (1 - sig(torch.tensor(0.1 * (0 - 0.25))))) / 3
    assert math.isclose(heavy.item(), want.item(), rel_tol=1e-6)
    assert not math.isclose(heavy.item(), base.item())


def test_kto_kl_is_detached_and_clamped():
    kl_logps = torch.tensor([-9.0, -8.0], requires_grad=True)
    assert losses.kto_kl(kl_logps, torch.tensor([-1.0, -1.0])).item() == 0.0
    kl = losses.kto_kl(kl_logps, torch.tensor([-10.0, -10.0]))
    assert kl.item() == 1.5 and not kl.requires_grad


def test_cpo_matches_trl_cpo_loss():
    """TRL's own CPOTrainer.cpo_loss as the oracle for the preference term and rewards."""
    from types import SimpleNamespace

    from trl.experimental.cpo import cpo_trainer as trl_cpo

    chosen, rejected = torch.tensor([-10.0, -20.0, -3.0]), torch.tensor([-12.0, -15.0, -9.0])
    lengths = torch.tensor([4, 5, 2])
    for loss_type, gamma in (("sigmoid", None), ("simpo", 0.7)):
        trainer = SimpleNamespace(alpha=0.0, beta=0.3, label_smoothing=0.05, loss_type=loss_type,
                                  simpo_gamma=gamma or 0.0, accelerator=SimpleNamespace(device="cpu"))
        c, r = (chosen / lengths, rejected / lengths) if gamma else (chosen, rejected)
        trl_losses, trl_chosen_rewards, trl_rejected_rewards = trl_cpo.CPOTrainer.cpo_loss(trainer, c, r)
        loss, m = losses.cpo_loss(chosen, rejected, lengths, lengths, beta=0.3, alpha=0.0, label_smoothing=0.05,
                                  simpo_gamma=gamma)
        assert_close_verbose(loss, trl_losses.mean(), name=f"{loss_type} loss")
        assert_close_verbose(m["rewards/chosen"], trl_chosen_rewards.mean(), name="rewards/chosen")
        assert_close_verbose(m["rewards/rejected"], trl_rejected_rewards.mean(), name="rewards/rejected")


def _dpo_batch():
    (hidden, weight, labels, bias), ours, _ = make_batch("dpo")
    return hidden, weight, labels, bias, ours


@pytest.mark.parametrize(
    "method,call,message",
    [
        ("dpo", lambda f, h, w, y, b, o: f(h[:3], w, y[:3], b, ref_logps=torch.zeros(3)), "odd batch"),
        ("dpo", lambda f, h, w, y, b, o: f(h, w, y, b), "reference log-probs"),
        ("dpo", lambda f, h, w, y, b, o: f(h, w, y, b, ref_logps=torch.zeros(3)), "ref_logps has shape"),
        ("kto", lambda f, h, w, y, b, o: f(h, w, y, b, **o), "desirable"),
        ("kto", lambda f, h, w, y, b, o: f(h, w, y, b, desirable=torch.ones(4, dtype=torch.bool), **o),
         "KL reference point"),
        ("sft", lambda f, h, w, y, b, o: f(h[0], w, y[0], b), r"\[batch, seq_len\]"),
        ("sft", lambda f, h, w, y, b, o: f(h[:0], w, y[:0], b), "empty batch"),
        ("sft", lambda f, h, w, y, b, o: f(h, w, y.clone().fill_(500), b), "out of range"),
        ("sft", lambda f, h, w, y, b, o: f(h, w, y, b, **o), r"does not use \['ref_hidden'\]"),
        ("cpo", lambda f, h, w, y, b, o: f(h, w, y, b, ref_logps=torch.zeros(4)), "does not use"),
        ("dpo", lambda f, h, w, y, b, o: f(h, w, y, b, desirable=torch.ones(4, dtype=torch.bool), **o),
         "does not use"),
        ("kto", lambda f, h, w, y, b, o: f(h, w, y, b, desirable=torch.ones(4, dtype=torch.bool), kl=torch.tensor(0.1),
                                           kl_logps=torch.zeros(4), ref_kl_logps=torch.zeros(4), **o), "not both"),
    ],
)
@pytest.mark.parametrize("trained", [False, True], ids=["frozen-head", "trained-head"])
def test_bad_input_gets_a_clear_error(method, call, message, trained):
    hidden, weight, labels, bias, ours = _dpo_batch()
    weight.requires_grad_(trained)
    with pytest.raises((ValueError, TypeError), match=message):
        call(FusedLinearPreferenceLoss(method), hidden, weight, labels, bias, ours)


@pytest.mark.parametrize(
    "kwargs,message",
    [({"method": "grpo"}, "unknown method"), ({"method": "dpo", "alpha": 1.0}, "hyper-parameters"),
     ({"method": "kto", "beta": 0.0}, "beta must be > 0")],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        FusedLinearPreferenceLoss(**kwargs)


def test_trained_head_backward_twice_is_a_clear_error():
    (hidden, weight, labels, bias), ours, _ = make_batch("dpo", trained=True)
    loss, _ = FusedLinearPreferenceLoss("dpo")(hidden, weight, labels, bias, **ours)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through it once"):
        loss.backward()


@pytest.mark.parametrize("entry", ["primitive", "dpo-loss"])
def test_trained_head_reuses_a_free_weight_gradient_and_never_a_held_one(entry):
    """The weight gradient's storage is handed out again only when nobody else holds it, and all of it is
    overwritten (no stale rows): gradient accumulation, a caller's reference and an all-ignored batch stay
    correct, through the primitive's recomputing backward and the loss module's one-pass path alike."""
    (hidden, weight, labels, bias), ours, theirs = make_batch("dpo", trained=True)
    if entry == "primitive":
        upstream = torch.randn(labels.shape)

        def loss_of(fn, **kwargs):
            return (fn(hidden, weight, labels, bias) * upstream).sum()  # noqa: F821 (closure over `weight`, deleted at the end on purpose)

        want_loss = loss_of(reference_logprobs)
    else:
        module_under_test = FusedLinearPreferenceLoss("dpo", beta=0.2)
        want_loss, _ = reference_preference_loss("dpo", hidden, weight, labels, bias, **theirs, beta=0.2)
    (want,) = torch.autograd.grad(want_loss, [weight])
    registry = sys.modules["pyprefopt.fused_linear_logprobs"]._WEIGHT_GRAD_STORAGE

    def step():
        if entry == "primitive":
            loss_of(fused_linear_logprobs).backward()
        else:
            module_under_test(hidden, weight, labels, bias, **ours)[0].backward()  # noqa: F821 (closure over `weight`, deleted at the end on purpose)
        return weight.grad  # noqa: F821 (closure over `weight`, deleted at the end on purpose)

    first = step()
    assert_close_verbose(first, want, name="grad weight")
    first_ptr = first.data_ptr()
    # Accumulation: the held gradient is added to, so this step's own gradient needs fresh storage.
    assert_close_verbose(step(), 2 * want, name="accumulated grad weight")
    assert weight.grad.data_ptr() == first_ptr
    second_ptr = registry[weight].data_ptr()
    assert second_ptr != first_ptr
    # Free again (zero_grad sets it to None): reused, every row rewritten.
    weight.grad = None
    assert step().data_ptr() == second_ptr
    assert_close_verbose(weight.grad, want, name="grad weight in reused storage")
    # A caller still holds it: a fresh tensor, and the held one is left alone.
    kept, kept_copy = weight.grad, weight.grad.clone()
    weight.grad = None
    assert step().data_ptr() != kept.data_ptr()
    assert torch.equal(kept, kept_copy)
    # Nothing to score: the reused storage comes back as zeros, not as the last step's gradient.
    last_ptr = weight.grad.data_ptr()
    del kept
    weight.grad = None
    labels.fill_(-100)
    assert step().data_ptr() == last_ptr
    assert torch.equal(weight.grad, torch.zeros_like(want))
    # The storage goes with the weight.
    weight_alive = weakref.ref(weight)
    del weight, want_loss
    gc.collect()
    assert weight_alive() is None
    assert all(storage.data_ptr() != last_ptr for storage in registry.values())


def test_only_fp32_weight_gradients_are_kept():
    """A bf16 head's gradient is a bf16 copy of the fp32 buffer: that buffer is not kept between steps."""
    (hidden, weight, labels, _), _, _ = make_batch("sft", trained=True)
    weight = weight.detach().bfloat16().requires_grad_()
    registry = sys.modules["pyprefopt.fused_linear_logprobs"]._WEIGHT_GRAD_STORAGE
    fused_linear_logprobs(hidden.detach().bfloat16(), weight, labels).sum().backward()
    FusedLinearPreferenceLoss("sft")(hidden.detach().bfloat16(), weight, labels)[0].backward()
    assert weight.grad.dtype == torch.bfloat16 and weight not in registry


# bf16 batches over a vocabulary of 600 in tiles of at most 256, with a budget of 10 tokens: pairs of 10 (at the
# budget), 41 (over it and over H = 32: kept and recomputed tiles over several token blocks) and 7 + 3 tokens; or
# pairs of 23 (over the budget, at most H: its logits kept in the weight gradient), 8 and 3 + 6 tokens.
BF16_TILINGS = {"partial-keep": PARTIAL_LENGTHS["paired"], "in-gradient": FIRST_IN_GRADIENT_LENGTHS["paired"]}


def head_shaped_fp32_tensors(run, weight):
    """The ops that make fp32 tensors of the head's shape while `run()` runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    made = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == weight.shape:
                    made.append(str(func))
            return out

    with Watch():
        run()
    return made


@pytest.mark.parametrize("tiling", [None, *BF16_TILINGS])
@pytest.mark.parametrize("trained", [False, True], ids=["frozen-head", "trained-head"])
def test_bf16_within_twice_torch_error(trained, tiling, monkeypatch):
    """bf16 inputs: loss and gradients within 2x the error of PyTorch's bf16 materialised logits, in one tile or in
    many. Over many, the head is upcast to fp32 a tile at a time: the only fp32 tensor of its shape is a trained
    head's gradient."""
    from tests.tensor_asserts import assert_within_torch_error

    if tiling is None:
        (hidden, weight, labels, _), _, _ = make_batch("dpo", seq=12, trained=trained)
    else:
        monkeypatch.setattr(module, "TRAINED_HEAD_CHUNK_BYTES", 4 * 600 * PARTIAL_BUDGET)
        monkeypatch.setattr(sys.modules["pyprefopt.fused_linear_logprobs"], "CPU_TOKEN_BLOCK", 8)
        monkeypatch.setattr(sys.modules["pyprefopt.fused_linear_logprobs"], "CPU_TILE_BYTES", 4096)
        lengths = BF16_TILINGS[tiling]
        (hidden, weight, labels, _), _, _ = make_batch("dpo", len(lengths), 24, 32, 600, trained=trained,
                                                       lengths=lengths)
    ref_logps = torch.randn(labels.shape[0]) - 30
    params = [hidden.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_(trained)]
    truth_params = [p.detach().double().requires_grad_(p.requires_grad) for p in params]
    wanted = params if trained else params[:1]

    def seq_logps(h, w, dtype):
        return reference_logprobs(h, w, labels, dtype=dtype).sum(-1)

    loss = None

    def forward():
        nonlocal loss
        loss, _ = FusedLinearPreferenceLoss("dpo", beta=0.1)(*params, labels, ref_logps=ref_logps)

    made = head_shaped_fp32_tensors(forward, params[1])
    if tiling is not None:
        assert made == (["aten.empty.memory_format"] if trained else [])
    same_dtype, _ = losses.from_sequence_stats("dpo", seq_logps(*params, torch.bfloat16), (labels != -100).sum(-1),
                                               ref_logps=ref_logps, beta=0.1)
    truth, _ = losses.from_sequence_stats("dpo", seq_logps(*truth_params, torch.float64), (labels != -100).sum(-1),
                                          ref_logps=ref_logps.double(), beta=0.1)
    assert_within_torch_error(loss, truth, same_dtype, name="loss")
    got = torch.autograd.grad(loss, wanted)
    torch_grads = torch.autograd.grad(same_dtype, wanted)
    true_grads = torch.autograd.grad(truth, truth_params if trained else truth_params[:1])
    for name, g, t, tg in zip(("hidden", "weight"), got, torch_grads, true_grads):
        assert g.dtype == torch.bfloat16
        assert_within_torch_error(g, tg, t, name=f"grad {name}")


def test_trained_head_tiles_run_in_bf16_operand_precision(monkeypatch):
    """The one-pass trained-head loss, which walks the tiles itself (neither `cpu_forward` nor `cpu_backward`),
    multiplies a bf16 model's tiles in bf16 operand precision: every logits tile and every tile's gradient GEMMs."""
    blocked = sys.modules["pyprefopt.fused_linear_logprobs"]
    before = torch.backends.mkldnn.matmul.fp32_precision
    precisions = []

    def in_precision(tile_function):
        def run(*args, **kwargs):
            precisions.append((tile_function.__name__, torch.backends.mkldnn.matmul.fp32_precision))
            return tile_function(*args, **kwargs)
        return run

    def not_called(*args, **kwargs):
        raise AssertionError("the one-pass loss ran the blocked fused_linear_logprobs path")

    for name in ("logits_tile", "tile_backward"):
        monkeypatch.setattr(module, name, in_precision(getattr(module, name)))
    monkeypatch.setattr(blocked, "cpu_forward", not_called)
    monkeypatch.setattr(blocked, "cpu_backward", not_called)
    (hidden, weight, labels, bias), _, _ = make_batch("sft", trained=True)
    params = [t.detach().bfloat16().requires_grad_() for t in (hidden, weight, bias)]
    FusedLinearPreferenceLoss("sft")(params[0], params[1], labels, params[2])[0].backward()
    assert {name for name, _ in precisions} == {"logits_tile", "tile_backward"}
    assert {precision for _, precision in precisions} == {"bf16"}
    assert torch.backends.mkldnn.matmul.fp32_precision == before


# Model heads' own logit transforms. make_batch's logits have a standard deviation of about 1.3: a scale of 8 takes
# them into a cap of 20, and a temperature of 0.25 then spreads them over +-80, where exp(logit - max) underflows.
TRANSFORMS = {
    "capped": dict(softcap=20.0, logit_scale=8.0),
    "capped-underflow": dict(softcap=20.0, logit_scale=8.0, temperature=0.25),
    "scaled": dict(logit_scale=0.125),
}


@pytest.mark.parametrize("transform", TRANSFORMS.values(), ids=TRANSFORMS.keys())
@pytest.mark.parametrize("path", ["frozen-head", "one-chunk", "many-chunks", "partial-keep", "kept-in-gradient"])
@pytest.mark.parametrize("method,hparams", [CASES[0], CASES[1], CASES[6]], ids=[CASE_IDS[0], CASE_IDS[1], CASE_IDS[6]])
def test_logit_transforms_on_every_path(method, hparams, path, transform, monkeypatch):
    """Soft-capped and scaled heads: the loss, its metrics and gradients match the materialised reference on the
    frozen-head path and on every form of the trained head's one pass (kept, partly kept and recomputed tiles,
    tiles kept in the weight gradient)."""
    kind = "paired" if losses.METHODS[method].paired else "single"
    if path == "frozen-head":
        check(method, hparams, trained=False, upstream=2.5, transform=transform)
    elif path == "one-chunk":
        check(method, hparams, trained=True, upstream=2.5, transform=transform)
    elif path == "many-chunks":
        monkeypatch.setattr(module, "TRAINED_HEAD_CHUNK_BYTES", 4 * 77 * 18)
        check(method, hparams, trained=True, batch=6, transform=transform)
    elif path == "partial-keep":
        monkeypatch.setattr(module, "TRAINED_HEAD_CHUNK_BYTES", 4 * 77 * PARTIAL_BUDGET)
        lengths = _partial_lengths(method)
        check(method, hparams, trained=True, batch=len(lengths), seq=24, lengths=lengths, transform=transform)
    else:
        monkeypatch.setattr(module, "TRAINED_HEAD_CHUNK_BYTES", 4 * 77 * PARTIAL_BUDGET)
        lengths = FIRST_IN_GRADIENT_LENGTHS[kind]
        check(method, hparams, trained=True, batch=len(lengths), seq=24, lengths=lengths, width=64,
              transform=transform)
