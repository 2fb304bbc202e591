"""TRL's own trainers as the oracle for pyprefopt's losses, metrics and gradients.

For each method a real TRL 1.16 trainer (`DPOTrainer`, `trl.experimental.cpo.CPOTrainer`, `KTOTrainer`,
`trl.experimental.orpo.ORPOTrainer`) is built
on a tiny Qwen3 model and an in-memory dataset, one collated batch is taken from the trainer's own dataloader, and
the trainer's own `compute_loss` gives the loss, the logged metrics and (after `backward`) the gradient of every
parameter. pyprefopt then computes the same loss from the same batch: the policy's last hidden states (after the
final norm, from `model.model`), labels aligned with them exactly as TRL aligns them (hidden state t scores token
t+1; prompt and padding positions are -100), `model.lm_head.weight`, and the reference model's hidden states (or the
reference log-probs TRL precomputed). Loss, every TRL-named metric, and the gradients must match.

DPOTrainer(loss_type="sigmoid") in TRL 1.16 ignores `label_smoothing`; pyprefopt's dpo(label_smoothing=e) is
conservative DPO, checked against TRL's sigmoid and robust losses combined, which is exactly that loss.

Nothing here downloads anything: the tokenizer is a WordLevel vocabulary built from the sentences below, and the
model is built from a `Qwen3Config`.
"""

from __future__ import annotations

import pytest
import torch
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from pyprefopt import FusedLinearPreferenceLoss
from tests.tiny_trl_setup import common_args as _common_args
from tests.tiny_trl_setup import model as _model
from tests.tiny_trl_setup import (  # noqa: F401 (pytest fixtures)
    policy_state,
    preference_dataset,
    qwen3_config,
    ref_state,
    tokenizer,
    unpaired_dataset,
)

# fp32 throughout. TRL sums its per-token log-probs from its own chunked LM head (DPO, KTO) or from the full
# logits (CPO); pyprefopt from its blocked kernels. Sequence log-probs are ~ -30..-70, so different summation
# orders differ by a few fp32 ulps of that (~1e-5 absolute at most); rtol 1e-5 covers them.
RTOL, ATOL = 1e-5, 1e-5
# Gradients: the same maths, but every entry is a sum over tokens (and, for the backbone, back through two layers)
# taken in a different order, so an entry's error scales with the size of the terms summed, not with the entry
# itself (an entry near 0 can be a sum of large terms that cancel). Hence an absolute tolerance relative to the
# largest entry of each tensor: the worst measured |ours - TRL| / max|TRL| over all cases is ~2e-6.
GRAD_RTOL, GRAD_ATOL_SCALE = 1e-5, 1e-5

PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)
KTO_METRICS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


# ---------------------------------------------------------------------------------------------- helpers


def _last_hidden(model, input_ids, attention_mask):
    """The backbone's last hidden state, after the final norm: what TRL's fused head (and `lm_head`) consumes."""
    return model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def _shifted(input_ids, completion_mask):
    """Labels aligned with hidden[:, :-1], as TRL builds them: hidden t scores token t+1, non-completion -> -100."""
    return input_ids[:, 1:].masked_fill(completion_mask[:, 1:] == 0, -100)


def _take_grads(model):
    grads = {}
    for name, p in model.named_parameters():
        grads[name] = None if p.grad is None else p.grad.detach().clone()
        p.grad = None
    return grads


def _assert_grads_close(ours, theirs, skip=()):
    checked = 0
    for name, g in theirs.items():
        if name in skip:
            continue
        assert g is not None, f"TRL produced no gradient for {name}"
        assert ours[name] is not None, f"pyprefopt produced no gradient for {name}"
        assert g.abs().max() > 0, f"TRL's gradient for {name} is all zeros"
        atol = GRAD_ATOL_SCALE * g.abs().max().item()
        torch.testing.assert_close(ours[name], g, rtol=GRAD_RTOL, atol=atol, msg=lambda m: f"{name}: {m}")
        checked += 1
    assert checked > 0


def _assert_metrics(ours, trl_metrics, names):
    for name in names:
        assert name in trl_metrics, f"TRL logged no {name!r}: {sorted(trl_metrics)}"
        assert name in ours, f"pyprefopt returned no {name!r}: {sorted(ours)}"
        got = ours[name]
        assert isinstance(got, torch.Tensor) and got.dim() == 0 and not got.requires_grad
        torch.testing.assert_close(
            got.double(), torch.tensor(trl_metrics[name], dtype=torch.float64), rtol=RTOL, atol=ATOL,
            msg=lambda m: f"metric {name}: {m}",
        )


def _trl_step(trainer, batch, metrics_of):
    """TRL's loss on `batch`, its logged metrics (last value of each) and the gradients of all parameters."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in metrics_of(trainer).items() if len(v)}
    return loss.detach(), metrics, _take_grads(model)


def _check_against_trl(trainer, trl_loss, trl_metrics, trl_grads, metric_names, ours_fn):
    """`ours_fn(weight)` runs the policy backbone with grad and returns pyprefopt's (loss, metrics).

    Two passes: a trained head (the one-pass CPU path; every parameter's gradient must match TRL's) and a frozen
    head (`weight.detach()`, the `fused_linear_logprobs` path; the backbone's gradients must match TRL's).
    """
    model = trainer.model
    model.zero_grad(set_to_none=True)
    weight = model.lm_head.weight
    assert weight.requires_grad

    loss, metrics = ours_fn(weight)
    torch.testing.assert_close(loss.detach(), trl_loss, rtol=RTOL, atol=ATOL)
    _assert_metrics(metrics, trl_metrics, metric_names)
    loss.backward()
    _assert_grads_close(_take_grads(model), trl_grads)

    loss, metrics = ours_fn(weight.detach())
    torch.testing.assert_close(loss.detach(), trl_loss, rtol=RTOL, atol=ATOL)
    _assert_metrics(metrics, trl_metrics, metric_names)
    loss.backward()
    grads = _take_grads(model)
    assert grads["lm_head.weight"] is None
    _assert_grads_close(grads, trl_grads, skip=("lm_head.weight",))


def _logged_metrics(trainer):
    return trainer._metrics["train" if trainer.model.training else "eval"]


# ---------------------------------------------------------------------------------------------- DPO / IPO

EPS = 0.1  # label smoothing where a case uses it

DPO_CASES = {
    # name: (DPOConfig kwargs, pyprefopt method, pyprefopt hyper-parameters)
    "dpo_sigmoid": (dict(loss_type=["sigmoid"], beta=0.1), "dpo", dict(beta=0.1)),
    "dpo_sigmoid_beta_0.5": (dict(loss_type=["sigmoid"], beta=0.5), "dpo", dict(beta=0.5)),
    # Conservative DPO. TRL 1.16's `sigmoid` ignores `label_smoothing` (see the tests below); its `robust` loss uses
    # it: robust = ((1-e) L(x) - e L(-x)) / (1-2e) with L(x) = -logsigmoid(x), x = beta * margin. Hence
    #     2(1-e) * sigmoid - (1-2e) * robust = (1-e) L(x) + e L(-x),
    # which is cDPO, i.e. pyprefopt's dpo(label_smoothing=e): TRL's own code, combined by its own `loss_weights`.
    "cdpo_via_sigmoid_and_robust": (
        dict(
            loss_type=["sigmoid", "robust"],
            loss_weights=[2 * (1 - EPS), -(1 - 2 * EPS)],
            label_smoothing=EPS,
            beta=0.1,
        ),
        "dpo",
        dict(beta=0.1, label_smoothing=EPS),
    ),
    # TRL 1.16 DPOTrainer(loss_type="sigmoid") documents label_smoothing for robust/exo only and ignores it: its
    # sigmoid loss is plain DPO, which pyprefopt gives with label_smoothing=0.
    "dpo_sigmoid_trl_ignores_label_smoothing": (
        dict(loss_type=["sigmoid"], label_smoothing=EPS, beta=0.1),
        "dpo",
        dict(beta=0.1),
    ),
    "ipo": (dict(loss_type=["ipo"], beta=0.1), "ipo", dict(beta=0.1)),
    "ipo_beta_0.5": (dict(loss_type=["ipo"], beta=0.5), "ipo", dict(beta=0.5)),
}


def _dpo_trainer(tmp_path, config, policy_state, ref_state, tokenizer, dataset, **dpo_kwargs):
    args = DPOConfig(**_common_args(tmp_path, batch_size=4), **dpo_kwargs)
    trainer = DPOTrainer(
        model=_model(config, policy_state),
        ref_model=_model(config, ref_state),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, batch


def _run_dpo_case(trainer, batch, method, hparams, use_precomputed_ref):
    trl_loss, trl_metrics, trl_grads = _trl_step(trainer, batch, _logged_metrics)

    input_ids, attention_mask, completion_mask = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    labels = _shifted(input_ids, completion_mask)
    assert (labels != -100).sum(-1).min() > 0  # every row has completion tokens
    ref_kwargs = {}
    if use_precomputed_ref:
        ref_kwargs["ref_logps"] = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
    else:
        ref = trainer.ref_model
        with torch.no_grad():
            ref_kwargs["ref_hidden"] = _last_hidden(ref, input_ids, attention_mask)[:, :-1]
        ref_kwargs["ref_weight"] = ref.lm_head.weight
    loss_fn = FusedLinearPreferenceLoss(method, **hparams)

    def ours(weight):
        hidden = _last_hidden(trainer.model, input_ids, attention_mask)[:, :-1]
        return loss_fn(hidden, weight, labels, **ref_kwargs)

    _check_against_trl(trainer, trl_loss, trl_metrics, trl_grads, PAIR_METRICS, ours)
    return trl_metrics


@pytest.mark.parametrize("case", list(DPO_CASES))
def test_dpo_trainer(case, tmp_path, qwen3_config, policy_state, ref_state, tokenizer, preference_dataset):
    trl_kwargs, method, hparams = DPO_CASES[case]
    trainer, batch = _dpo_trainer(
        tmp_path, qwen3_config, policy_state, ref_state, tokenizer, preference_dataset, **trl_kwargs
    )
    assert trainer.ref_model is not None and not trainer.precompute_ref_logps
    trl_metrics = _run_dpo_case(trainer, batch, method, hparams, use_precomputed_ref=False)
    # The batch is informative: rewards are far from 0 and the pairs are not all ranked the same way.
    assert abs(trl_metrics["rewards/margins"]) > 1e-2
    assert 0 < trl_metrics["rewards/accuracies"] < 1


def test_dpo_trainer_precomputed_ref_logps(tmp_path, qwen3_config, policy_state, ref_state, tokenizer,
                                           preference_dataset):
    """`precompute_ref_log_probs=True`: TRL puts the reference log-probs in the batch; pyprefopt takes `ref_logps`."""
    trainer, batch = _dpo_trainer(
        tmp_path, qwen3_config, policy_state, ref_state, tokenizer, preference_dataset,
        loss_type=["sigmoid"], beta=0.1, precompute_ref_log_probs=True,
    )
    assert "ref_chosen_logps" in batch and "ref_rejected_logps" in batch
    _run_dpo_case(trainer, batch, "dpo", dict(beta=0.1), use_precomputed_ref=True)


# ---------------------------------------------------------------------------------------------- CPO / SimPO

CPO_CASES = {
    # name: (CPOConfig kwargs, pyprefopt hyper-parameters, compare nll_loss)
    "cpo_sigmoid": (dict(loss_type="sigmoid", beta=0.1, cpo_alpha=1.0), dict(beta=0.1, alpha=1.0), True),
    "cpo_sigmoid_label_smoothing": (
        dict(loss_type="sigmoid", beta=0.1, cpo_alpha=0.5, label_smoothing=EPS),
        dict(beta=0.1, alpha=0.5, label_smoothing=EPS),
        True,
    ),
    # CPO-SimPO: SimPO's length-averaged, margin-shifted loss plus the chosen NLL.
    "cpo_simpo": (
        dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=1.0),
        dict(beta=2.0, simpo_gamma=0.5, alpha=1.0),
        True,
    ),
    # Pure SimPO (TRL: loss_type="simpo", cpo_alpha=0): no NLL term, logged as 0.0 by both.
    "simpo": (
        dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.0),
        dict(beta=2.0, simpo_gamma=0.5, alpha=0.0),
        False,
    ),
}


def _cpo_trainer(tmp_path, config, policy_state, tokenizer, dataset, **cpo_kwargs):
    args = CPOConfig(**_common_args(tmp_path, batch_size=4), max_length=64, **cpo_kwargs)
    trainer = CPOTrainer(
        model=_model(config, policy_state), args=args, train_dataset=dataset, processing_class=tokenizer
    )
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer, batch


def _run_cpo_case(trainer, batch, hparams, metric_names):
    trl_loss, trl_metrics, trl_grads = _trl_step(trainer, batch, lambda t: t._stored_metrics["train"])

    # TRL's own concatenation (chosen rows first, then rejected; input ids padded with the pad id, labels with -100).
    concat = CPOTrainer.concatenated_inputs(batch, padding_value=trainer.pad_token_id)
    input_ids = concat["concatenated_input_ids"]
    attention_mask = concat["concatenated_attention_mask"]
    labels = concat["concatenated_labels"][:, 1:]  # TRL shifts: logits[:, :-1] score labels[:, 1:]
    assert (labels != -100).sum(-1).min() > 0
    loss_fn = FusedLinearPreferenceLoss("cpo", **hparams)

    def ours(weight):
        hidden = _last_hidden(trainer.model, input_ids, attention_mask)[:, :-1]
        return loss_fn(hidden, weight, labels)

    _check_against_trl(trainer, trl_loss, trl_metrics, trl_grads, metric_names, ours)
    return trl_metrics


@pytest.mark.parametrize("case", list(CPO_CASES))
def test_cpo_trainer(case, tmp_path, qwen3_config, policy_state, tokenizer, preference_dataset):
    trl_kwargs, hparams, check_nll = CPO_CASES[case]
    trainer, batch = _cpo_trainer(tmp_path, qwen3_config, policy_state, tokenizer, preference_dataset, **trl_kwargs)
    names = PAIR_METRICS + (("nll_loss",) if check_nll else ())
    trl_metrics = _run_cpo_case(trainer, batch, hparams, names)
    assert abs(trl_metrics["rewards/margins"]) > 1e-2
    assert 0 < trl_metrics["rewards/accuracies"] < 1
    if check_nll:
        assert trl_metrics["nll_loss"] > 1.0


def test_simpo_logs_no_nll(tmp_path, qwen3_config, policy_state, tokenizer, preference_dataset):
    trl_kwargs, hparams, _ = CPO_CASES["simpo"]
    trainer, batch = _cpo_trainer(tmp_path, qwen3_config, policy_state, tokenizer, preference_dataset, **trl_kwargs)
    assert _run_cpo_case(trainer, batch, hparams, PAIR_METRICS + ("nll_loss",))["nll_loss"] == 0.0


# ---------------------------------------------------------------------------------------------- KTO

KTO_HPARAMS = dict(beta=0.1, desirable_weight=1.0, undesirable_weight=1.5)


KTO_CASES = {
    # name: (precompute_ref_log_probs, swap the policy and reference weights, KL estimate expected > 0, rows)
    # With the seed-0 policy and seed-1 reference the batch's KL estimate is negative, so TRL clamps it to 0; swapping
    # the two models negates it (same KL completions), so the other cases exercise a positive z0 as well.
    "ref_model_kl_clamped": (False, False, False, "all"),
    "ref_model_kl_positive": (False, True, True, "all"),
    "precomputed_ref_logps_kl_positive": (True, True, True, "all"),
    # A batch of desirable rows only: TRL logs no rewards/rejected, logps/rejected or rewards/margins, nor may we.
    "only_desirable_rows": (False, True, True, "desirable"),
}


@pytest.mark.parametrize("case", list(KTO_CASES))
def test_kto_trainer(case, tmp_path, qwen3_config, policy_state, ref_state, tokenizer, unpaired_dataset):
    precompute, swap, kl_positive, rows = KTO_CASES[case]
    if swap:
        policy_state, ref_state = ref_state, policy_state
    dataset = unpaired_dataset if rows == "all" else unpaired_dataset.filter(lambda row: row["label"])
    args = KTOConfig(
        **_common_args(tmp_path, batch_size=len(dataset)),
        train_sampling_strategy="sequential",  # KTO's KL completions are rotated within each batch in data order
        precompute_ref_log_probs=precompute,
        **KTO_HPARAMS,
    )
    trainer = KTOTrainer(
        model=_model(qwen3_config, policy_state),
        ref_model=_model(qwen3_config, ref_state),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert "KL_input_ids" in batch and trainer.calculate_KL
    assert batch["input_ids"].shape[0] == len(dataset)
    # TRL's KL completions: the batch's own completions rotated by one row, so each prompt gets another's answer.
    assert not torch.equal(batch["KL_input_ids"], batch["input_ids"])
    trl_loss, trl_metrics, trl_grads = _trl_step(trainer, batch, _logged_metrics)
    if kl_positive:
        assert trl_metrics["kl"] > 1e-3
    else:
        assert trl_metrics["kl"] == 0.0

    desirable = batch["label"].bool()
    if rows == "all":
        assert desirable.any() and not desirable.all()
        assert abs(trl_metrics["rewards/margins"]) > 1e-2
        metric_names = KTO_METRICS
    else:
        assert desirable.all()
        metric_names = ("kl", "rewards/chosen", "logps/chosen")
    assert set(trl_metrics) & set(KTO_METRICS) == set(metric_names)

    labels = _shifted(batch["input_ids"], batch["completion_mask"])
    kl_labels = _shifted(batch["KL_input_ids"], batch["KL_completion_mask"])
    extra = {}
    if precompute:
        extra["ref_logps"] = batch["ref_logps"]
        extra["ref_kl_logps"] = batch["ref_KL_logps"]
    else:
        ref = trainer.ref_model
        with torch.no_grad():
            extra["ref_hidden"] = _last_hidden(ref, batch["input_ids"], batch["attention_mask"])[:, :-1]
            extra["ref_kl_hidden"] = _last_hidden(ref, batch["KL_input_ids"], batch["KL_attention_mask"])[:, :-1]
        extra["ref_weight"] = ref.lm_head.weight
    loss_fn = FusedLinearPreferenceLoss("kto", **KTO_HPARAMS)

    def ours(weight):
        model = trainer.model
        with torch.no_grad():
            kl_hidden = _last_hidden(model, batch["KL_input_ids"], batch["KL_attention_mask"])[:, :-1]
        hidden = _last_hidden(model, batch["input_ids"], batch["attention_mask"])[:, :-1]
        loss, metrics = loss_fn(
            hidden, weight, labels, desirable=desirable, kl_hidden=kl_hidden, kl_labels=kl_labels, **extra
        )
        assert set(metrics) & set(KTO_METRICS) == set(metric_names)  # the same metrics as TRL, no more
        return loss, metrics

    _check_against_trl(trainer, trl_loss, trl_metrics, trl_grads, metric_names, ours)


# ---------------------------------------------------------------------------------------------- ORPO

ORPO_METRICS = PAIR_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen")


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_trainer(beta, tmp_path, qwen3_config, policy_state, tokenizer, preference_dataset):
    """ORPO's odds-ratio term on the completions' length-averaged log-probs, and its NLL over every non-padding token
    of the chosen rows, prompt included (TRL's choice): pyprefopt takes those tokens as `nll_labels`."""
    args = ORPOConfig(**_common_args(tmp_path, batch_size=4), max_length=64, beta=beta)
    trainer = ORPOTrainer(model=_model(qwen3_config, policy_state), args=args, train_dataset=preference_dataset,
                          processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss, trl_metrics, trl_grads = _trl_step(trainer, batch, lambda t: t._stored_metrics["train"])
    assert abs(trl_metrics["rewards/margins"]) > 1e-2 and 0 < trl_metrics["rewards/accuracies"] < 1
    assert trl_metrics["nll_loss"] > 1.0

    concat = ORPOTrainer.concatenated_inputs(batch, padding_value=trainer.padding_value)
    input_ids, attention_mask = concat["concatenated_input_ids"], concat["concatenated_attention_mask"]
    labels = concat["concatenated_labels"][:, 1:]
    assert (labels != -100).sum(-1).min() > 0
    chosen = torch.arange(len(labels))[:, None] < len(labels) // 2
    every_token = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    nll_labels = torch.where(chosen, every_token, labels)
    assert (nll_labels != -100).sum() > (labels != -100).sum()  # the chosen prompts count
    loss_fn = FusedLinearPreferenceLoss("orpo", beta=beta)

    def ours(weight):
        hidden = _last_hidden(trainer.model, input_ids, attention_mask)[:, :-1]
        return loss_fn(hidden, weight, labels, nll_labels=nll_labels)

    _check_against_trl(trainer, trl_loss, trl_metrics, trl_grads, ORPO_METRICS, ours)
