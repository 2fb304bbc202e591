"""The training methods: their losses on per-sequence statistics, and `METHODS`, the one registry of what each
method is (see `Method`). Everything else that depends on the method (the loss module, the train CLI, data
loading, the model card, the benches) reads the registry.

Every loss takes per-sequence log-probs (summed over completion tokens, as TRL does) and returns
`(loss, metrics)`: `loss` a scalar to back-propagate, `metrics` a dict of detached 0-d tensors named
as TRL logs them (`rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies`,
`logps/chosen`, `logps/rejected`, plus `kl` for KTO, `nll_loss` for CPO and ORPO, `log_odds_ratio` and
`log_odds_chosen` for ORPO). Nothing here syncs with the device; call `.item()` on a metric when you log it.

Semantics follow TRL 1.16 (`DPOTrainer`, `CPOTrainer`, `KTOTrainer`, `ORPOTrainer`) exactly;
tests/test_trl_oracle.py checks losses, metrics and gradients against those trainers. One addition:
`dpo_loss(label_smoothing=e)` is conservative DPO, `(1-e) L(x) + e L(-x)`, which TRL 1.16 only offers as its
"sigmoid" and "robust" losses combined with weights `2(1-e)` and `-(1-2e)` (its "sigmoid" alone ignores
label_smoothing).
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


def _pair_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps):
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


def _smoothed_sigmoid_loss(logits, beta, label_smoothing):
    # Conservative DPO (Mitchell 2023; DPO paper Rafailov et al. 2023, Eq. 7 when label_smoothing = 0).
    return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - F.logsigmoid(-beta * logits) * label_smoothing


def sft_loss(logps, lengths):
    """Supervised fine-tuning: mean negative log-likelihood over all non-ignored tokens of the batch.

    `logps` [B] summed token log-probs, `lengths` [B] token counts.
    """
    num_tokens = lengths.sum()
    loss = -logps.sum() / num_tokens.clamp(min=1)
    return loss, {"nll_loss": loss.detach(), "num_tokens": num_tokens.detach()}


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1, label_smoothing=0.0):
    """DPO, sigmoid loss (Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7):

        L = -log sigma(beta * ((pi_c - ref_c) - (pi_r - ref_r)))

    with log-probs summed over completion tokens; `label_smoothing` > 0 gives conservative DPO.
    Rewards are `beta * (pi - ref)`.
    """
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    losses = _smoothed_sigmoid_loss(chosen_logratios - rejected_logratios, beta, label_smoothing)
    metrics = _pair_metrics(beta * chosen_logratios, beta * rejected_logratios, chosen_logps, rejected_logps)
    return losses.mean(), metrics


def ipo_loss(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths, rejected_lengths, beta=0.1
):
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", Eq. 17), with beta the regulariser tau:

        L = ((pi_c - ref_c)/|c| - (pi_r - ref_r)/|r| - 1/(2 beta))^2

    Log-ratios are normalised by completion token counts `|c|`, `|r|` (TRL's choice, confirmed by the
    IPO authors). Rewards are the unnormalised `beta * (pi - ref)`, as TRL logs them.
    """
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta = chosen_logratios / chosen_lengths.clamp(min=1) - rejected_logratios / rejected_lengths.clamp(min=1)
    losses = (delta - 1 / (2 * beta)) ** 2
    metrics = _pair_metrics(beta * chosen_logratios, beta * rejected_logratios, chosen_logps, rejected_logps)
    return losses.mean(), metrics


def cpo_loss(
    chosen_logps,
    rejected_logps,
    chosen_lengths,
    rejected_lengths,
    beta=0.1,
    alpha=1.0,
    label_smoothing=0.0,
    simpo_gamma=None,
):
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization", Eq. 3 plus the NLL term of Eq. 6):

        L = -log sigma(beta * (pi_c - pi_r)) + alpha * NLL(chosen)

    No reference model. NLL is the mean over chosen completion tokens. With `simpo_gamma` set this is
    SimPO (Meng et al. 2024, Eq. 6): length-averaged log-probs and a margin `gamma / beta` inside the
    sigmoid (`alpha=0` for pure SimPO, as in TRL's CPOTrainer with `loss_type="simpo"`).
    Rewards are `beta * pi` (averaged log-probs under SimPO, as TRL logs them).
    """
    # As TRL: with alpha = 0 the NLL term is neither computed nor logged (nll_loss = 0).
    nll = -chosen_logps.sum() / chosen_lengths.sum().clamp(min=1) if alpha else chosen_logps.new_zeros(())
    if simpo_gamma is not None:
        chosen_logps = chosen_logps / chosen_lengths.clamp(min=1)
        rejected_logps = rejected_logps / rejected_lengths.clamp(min=1)
        logits = chosen_logps - rejected_logps - simpo_gamma / beta
    else:
        logits = chosen_logps - rejected_logps
    losses = _smoothed_sigmoid_loss(logits, beta, label_smoothing)
    loss = losses.mean() + alpha * nll
    metrics = _pair_metrics(beta * chosen_logps, beta * rejected_logps, chosen_logps, rejected_logps)
    metrics["nll_loss"] = nll.detach()
    return loss, metrics


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0 without cancellation (Maechler 2012): log1p(-exp(x)) below -ln 2, log(-expm1(x))
    above, where 1 - exp(x) loses digits."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, chosen_nll_logps, chosen_nll_lengths,
              beta=0.1):
    """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", Eq. 6), with beta
    the paper's lambda:

        L = NLL(chosen) + beta * L_OR,    L_OR = -log sigma(log(odds(c) / odds(r)))    (Eq. 7)

    where odds(y) = P(y) / (1 - P(y)) (Eq. 4) of the length-averaged log-prob log P(y) = pi_y / |y|. No reference
    model. NLL is the mean over the tokens that `chosen_nll_logps` sums and `chosen_nll_lengths` counts: the chosen
    completions' own, or, as TRL's ORPOTrainer takes it, every non-padding token of the chosen rows, prompt included.
    Rewards are `beta * log P(y)` and logps/* the averaged log-probs, as TRL logs them; `log_odds_ratio` is the mean
    of log sigma(log odds ratio) and `log_odds_chosen` the mean log odds ratio (TRL's names).
    """
    nll = -chosen_nll_logps.sum() / chosen_nll_lengths.sum().clamp(min=1)
    chosen_logps = chosen_logps / chosen_lengths.clamp(min=1)
    rejected_logps = rejected_logps / rejected_lengths.clamp(min=1)
    # log odds(c) - log odds(r), with log odds(y) = log P(y) - log(1 - P(y)) (Eq. 4).
    log_odds = (chosen_logps - rejected_logps) - (_log1mexp(chosen_logps) - _log1mexp(rejected_logps))
    log_sigmoid_odds = F.logsigmoid(log_odds)
    loss = nll - beta * log_sigmoid_odds.mean()
    metrics = _pair_metrics(beta * chosen_logps, beta * rejected_logps, chosen_logps, rejected_logps)
    metrics.update(nll_loss=nll.detach(), log_odds_ratio=log_sigmoid_odds.detach().mean(),
                   log_odds_chosen=log_odds.detach().mean())
    return loss, metrics


def desirable_mask(desirable, rows, device):
    """KTO's `desirable` as a [rows] bool tensor on `device`: given as a bool tensor, a tensor of 0/1 integers or a
    sequence of Python bools."""
    if isinstance(desirable, (list, tuple)):
        not_bools = sorted({type(v).__name__ for v in desirable if not isinstance(v, bool)})
        if not_bools:
            raise TypeError(f"desirable must be a [batch] bool tensor or a sequence of bools, got a "
                            f"{type(desirable).__name__} holding {', '.join(not_bools)}")
        desirable = torch.tensor(desirable, dtype=torch.bool, device=device)
    if not isinstance(desirable, torch.Tensor):
        raise TypeError(
            f"desirable must be a [batch] bool tensor or a sequence of bools, got {type(desirable).__name__}"
        )
    if desirable.shape != (rows,):
        raise ValueError(f"desirable has shape {tuple(desirable.shape)}, expected ({rows},): one flag per row")
    if desirable.device != device:
        raise ValueError(f"desirable must be on the log-probs' device {device}, got {desirable.device}")
    if desirable.dtype == torch.bool:
        return desirable
    if desirable.is_floating_point() or desirable.is_complex():
        raise TypeError(f"desirable must be a bool tensor (or 0/1 integers), got {desirable.dtype}")
    # Any non-zero integer would read as desirable: only 0 and 1 say which class a row is.
    others = desirable[(desirable != 0) & (desirable != 1)]
    if others.numel():
        raise ValueError(f"desirable must hold only 0/1 (or bools), got {others[0].item()}")
    return desirable.bool()


def kl_point(kl, device):
    """KTO's given reference point z0 as a 0-d tensor: a real number, or a one-element floating-point tensor."""
    if isinstance(kl, numbers.Real) and not isinstance(kl, bool):
        return torch.tensor(float(kl), device=device)
    if not isinstance(kl, torch.Tensor) or not kl.is_floating_point():
        raise TypeError(f"kl must be a number or a one-element floating-point tensor (the batch's KL estimate), got "
                        f"{kl.dtype if isinstance(kl, torch.Tensor) else type(kl).__name__}")
    # One estimate for the whole batch (Ethayarajh et al. 2024, Eq. 7): a [batch] tensor would broadcast row-wise.
    if kl.numel() != 1:
        raise ValueError(f"kl must be a single value (the batch's KL estimate), got shape {tuple(kl.shape)}")
    return kl.reshape(())


def kto_kl(kl_logps, ref_kl_logps):
    """KTO's reference point z0 (Ethayarajh et al. 2024, Eq. 7): the batch estimate of
    KL(pi || ref) from mismatched prompt/completion pairs, detached and clamped at 0."""
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(logps, ref_logps, desirable, kl, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 7):

        desirable:   w_D * (1 - sigma(beta * (r - z0)))
        undesirable: w_U * (1 - sigma(beta * (z0 - r)))

    with `r = pi - ref` (summed log-probs) and `z0 = kl` from `kto_kl`. The loss is the mean over all
    rows; `desirable_weight` and `undesirable_weight` are honoured. `desirable` as `desirable_mask` takes it, `kl` as
    `kl_point` does.
    """
    desirable = desirable_mask(desirable, logps.shape[0], logps.device)
    logratios = logps - ref_logps
    kl = kl_point(kl, logps.device).detach()
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl))),
        undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios))),
    )
    rewards = beta * logratios.detach()
    metrics = {"kl": kl}
    # Mean over the rows of each class, as TRL logs them; a class absent from the batch gets no entry.
    for name, rows in (("chosen", desirable), ("rejected", ~desirable)):
        if bool(rows.any()):
            metrics[f"rewards/{name}"] = rewards[rows].mean()
            metrics[f"logps/{name}"] = logps.detach()[rows].mean()
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return losses.mean(), metrics


# ---------------------------------------------------------------------------------------------- the registry

DATA_FORMATS = ("sft", "preference", "kto")
GRANULARITIES = ("sequence", "token")
# The per-sequence statistics a sequence-level loss may take (its parameters without a default), by batch layout.
# Paired batches (chosen rows, then rejected rows) are split into chosen_* and rejected_* halves. `*_nll_*` are
# over the tokens of the loss module's `nll_labels` (default: the completions), which a method's NLL term scores.
UNPAIRED_STATISTICS = ("logps", "lengths", "ref_logps", "desirable", "kl")
PAIRED_STATISTICS = ("chosen_logps", "rejected_logps", "chosen_lengths", "rejected_lengths", "ref_chosen_logps",
                     "ref_rejected_logps", "chosen_nll_logps", "chosen_nll_lengths")
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "rewards/accuracies",
                "rewards/margins")


@dataclass(frozen=True)
class Method:
    """One training method, all the package knows about it: a record of `METHODS`, which the loss module, the train
    CLI, data loading, the model card and the benches read, so that adding a method is adding a record (and its loss).

    name: `--method` and `FusedLinearPreferenceLoss(method)`.
    loss: its loss function. Its parameters without a default are the statistics it takes (`inputs`: names from
        UNPAIRED_STATISTICS or PAIRED_STATISTICS), those with one its hyper-parameters (`hyperparameters`). What the
        method needs follows from them: `paired`, `needs_reference`, `desirable`, `kl_batch`, `nll_over_labels`.
    description: how the model card names it.
    data_format: the rows it trains on (pyprefopt.data; the embedded set of that name is the default): "sft" (prompt,
        completion), "preference" (prompt, chosen, rejected) or "kto" (prompt, completion, desirable label).
    metrics: what it logs, TRL's names, in a fixed order (the train loop all-reduces them in it).
    options: for each hyper-parameter the train CLI sets, the option's `dest` (named as TRL's config field).
    trl_trainer: the TRL 1.16 trainer whose semantics it follows, `module.Class` (its config class is the same name with
        "Config" for "Trainer"), and `trl_config` the config fields that select this loss in it.
    mean_over: what the loss is a mean over, the unit the train loop weighs micro-batches by: "tokens" (an NLL over the
        batch's target tokens, evaluated as a perplexity) or "examples" (pairs, or rows).
    token_mean_term: a term of the loss is a mean over the micro-batch's tokens (the NLL of CPO and ORPO) rather than a
        mean of per-example terms, so another micro-batch size computes another step.
    granularity: "sequence": the loss takes per-sequence statistics (log-probs summed over each row's scored tokens).
        "token" is the slot for per-token losses (GRPO-style: a per-token importance ratio against the sampling
        policy's log-probs, times the sequence's advantage, clipped; Shao et al. 2024, Eq. 3), whose loss would take
        the per-token log-probs [B, T] and completion mask with their per-token inputs. The loss module's one-pass
        trained-head path already differentiates the loss w.r.t. per-token log-probs, so such a method needs its
        statistics and a dispatch beside from_sequence_stats; none is registered yet, and from_sequence_stats refuses
        one.
    """

    name: str
    loss: Callable
    description: str
    data_format: str
    metrics: tuple[str, ...]
    options: dict[str, str] = field(default_factory=dict)
    trl_trainer: str = ""
    trl_config: dict = field(default_factory=dict)
    mean_over: str = "examples"
    token_mean_term: bool = False
    granularity: str = "sequence"

    def __post_init__(self):
        if self.data_format not in DATA_FORMATS:
            raise ValueError(f"{self.name}: data_format must be one of {DATA_FORMATS}, got {self.data_format!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"{self.name}: granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.mean_over not in ("tokens", "examples"):
            raise ValueError(f"{self.name}: mean_over must be 'tokens' or 'examples', got {self.mean_over!r}")
        if self.granularity == "sequence":
            known = PAIRED_STATISTICS if self.paired else UNPAIRED_STATISTICS
            unknown = [name for name in self.inputs if name not in known]
            if unknown:
                raise ValueError(f"{self.name}: {self.loss.__name__} takes {unknown}, which are no statistics of "
                                 f"its batches ({known})")
        unset = set(self.options) - set(self.hyperparameters)
        if unset:
            raise ValueError(f"{self.name}: options name {sorted(unset)}, not hyper-parameters of {self.loss.__name__}")

    @property
    def inputs(self) -> tuple[str, ...]:
        """The statistics the loss takes: its parameters without a default, in order."""
        params = inspect.signature(self.loss).parameters.values()
        return tuple(p.name for p in params if p.default is inspect.Parameter.empty)

    @property
    def hyperparameters(self) -> dict:
        """The loss's hyper-parameters and their defaults."""
        params = inspect.signature(self.loss).parameters.values()
        return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}

    @property
    def paired(self) -> bool:
        """Batches hold the chosen rows first and the rejected rows second."""
        return "chosen_logps" in self.inputs

    @property
    def needs_reference(self) -> bool:
        """Its loss takes the reference model's log-probs."""
        return bool({"ref_logps", "ref_chosen_logps"} & set(self.inputs))

    @property
    def desirable(self) -> bool:
        """Rows are labelled desirable or undesirable (KTO): its `/chosen` and `/rejected` metrics are means over each
        class's rows, absent where the class is, and `rewards/margins` their difference."""
        return "desirable" in self.inputs

    @property
    def kl_batch(self) -> bool:
        """Its reference point is a KL estimate over mismatched prompt/completion pairs (KTO's z0): batches carry those
        rows, scored under no grad, and the estimate is taken over a global micro-batch."""
        return "kl" in self.inputs

    @property
    def nll_over_labels(self) -> bool:
        """Its NLL term scores tokens of its own (`nll_labels`): TRL's ORPO takes the chosen rows' prompts too."""
        return "chosen_nll_logps" in self.inputs

    @property
    def step_metrics(self) -> tuple[str, ...]:
        """The metrics a train step averages over its micro-batches: all of them but the reward margin of a method
        with desirable rows, which is the difference of the averaged class means."""
        return tuple(name for name in self.metrics if not (self.desirable and name == "rewards/margins"))

    def trl_classes(self):
        """`(trainer class, config class)` of `trl_trainer`, imported."""
        import importlib

        module_name, trainer_name = self.trl_trainer.rsplit(".", 1)
        module = importlib.import_module(module_name)
        return getattr(module, trainer_name), getattr(module, trainer_name.replace("Trainer", "Config"))


METHODS = {method.name: method for method in (
    Method("sft", sft_loss, "supervised fine-tuning (SFT)", "sft", ("nll_loss",), trl_trainer="trl.SFTTrainer",
           mean_over="tokens"),
    Method("dpo", dpo_loss, "Direct Preference Optimization (DPO; Rafailov et al. 2023)", "preference", PAIR_METRICS,
           {"beta": "beta"}, "trl.DPOTrainer", {"loss_type": ["sigmoid"]}),
    Method("ipo", ipo_loss, "Identity Preference Optimization (IPO; Azar et al. 2023)", "preference", PAIR_METRICS,
           {"beta": "beta"}, "trl.DPOTrainer", {"loss_type": ["ipo"]}),
    Method("cpo", cpo_loss, "Contrastive Preference Optimization (CPO; Xu et al. 2024)", "preference",
           PAIR_METRICS + ("nll_loss",), {"beta": "beta", "alpha": "cpo_alpha"}, "trl.experimental.cpo.CPOTrainer",
           token_mean_term=True),
    Method("kto", kto_loss, "Kahneman-Tversky Optimization (KTO; Ethayarajh et al. 2024)", "kto",
           ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "kl", "rewards/margins"),
           {"beta": "beta", "desirable_weight": "desirable_weight", "undesirable_weight": "undesirable_weight"},
           "trl.KTOTrainer"),
    Method("orpo", orpo_loss, "Odds Ratio Preference Optimization (ORPO; Hong et al. 2024)", "preference",
           PAIR_METRICS + ("nll_loss", "log_odds_ratio", "log_odds_chosen"), {"beta": "beta"},
           "trl.experimental.orpo.ORPOTrainer", token_mean_term=True),
)}


def method_record(method) -> Method:
    """The registry's record of `method` (a name); a clear error for any other."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {tuple(METHODS)}")
    return METHODS[method]


def _check_ref_logps(name, ref_logps, logps):
    if ref_logps is None:
        raise ValueError(f"{name} needs reference log-probs (ref_logps, or ref_hidden with ref_weight)")
    if not isinstance(ref_logps, torch.Tensor) or not ref_logps.is_floating_point():
        raise TypeError(f"ref_logps must be a floating-point tensor [batch], got "
                        f"{ref_logps.dtype if isinstance(ref_logps, torch.Tensor) else type(ref_logps).__name__}")
    if ref_logps.shape != logps.shape:
        raise ValueError(f"ref_logps has shape {tuple(ref_logps.shape)}, expected {tuple(logps.shape)}")


def _kl_point(kl, kl_logps, ref_kl_logps):
    if kl is not None:
        return kl
    if kl_logps is None or ref_kl_logps is None:
        raise ValueError("kto needs its KL reference point: pass `kl`, or the mismatched-pair log-probs "
                         "(kl_hidden/kl_labels or kl_logps, and their reference)")
    # One log-prob per mismatched pair on each side: other shapes would broadcast into a wrong mean.
    if kl_logps.dim() != 1 or ref_kl_logps.shape != kl_logps.shape:
        raise ValueError(f"kl_logps {tuple(kl_logps.shape)} and ref_kl_logps {tuple(ref_kl_logps.shape)} "
                         "must both be [kl_batch], one log-prob per mismatched pair")
    return kto_kl(kl_logps, ref_kl_logps)


def from_sequence_stats(
    method,
    logps,
    lengths,
    ref_logps=None,
    desirable=None,
    kl=None,
    kl_logps=None,
    ref_kl_logps=None,
    nll_logps=None,
    nll_lengths=None,
    **hparams,
):
    """`method`'s loss over a batch of per-sequence stats: `logps` [B] summed log-probs, `lengths` [B] token counts,
    and what the method's record says it takes (`Method.inputs`).

    Paired methods take TRL's concatenated batch: chosen rows first, rejected rows second. A reference method takes
    `ref_logps` [B]; KTO `desirable` [B] and either `kl` or (`kl_logps`, `ref_kl_logps`); ORPO optionally the log-probs
    and lengths of the tokens its NLL term scores (`nll_logps`, `nll_lengths` [B], default `logps` and `lengths`).
    """
    record = method_record(method)
    if record.granularity != "sequence":
        raise ValueError(f"{method} is a per-{record.granularity} loss: it takes no per-sequence statistics")
    if logps.shape[0] == 0:
        raise ValueError("empty batch: no sequences")
    if (nll_logps is not None or nll_lengths is not None) and not record.nll_over_labels:
        raise ValueError(f"{method} has no NLL term over tokens of its own: it takes no nll_logps or nll_lengths")
    stats = {"logps": logps, "lengths": lengths}
    if record.needs_reference:
        _check_ref_logps(method, ref_logps, logps)
        stats["ref_logps"] = ref_logps
    if record.desirable:
        if desirable is None:
            raise ValueError(f"{method} needs `desirable`, a [batch] bool tensor marking desirable rows")
        stats["desirable"] = desirable
    if record.kl_batch:
        stats["kl"] = _kl_point(kl, kl_logps, ref_kl_logps)
    if record.paired:
        if logps.shape[0] % 2:
            raise ValueError(f"{method} needs chosen rows then rejected rows: got an odd batch of {logps.shape[0]} "
                             "rows")
        stats["nll_logps"] = logps if nll_logps is None else nll_logps
        stats["nll_lengths"] = lengths if nll_lengths is None else nll_lengths
        halves = {}
        for name, values in stats.items():
            # logps -> chosen_logps and rejected_logps, ref_logps -> ref_chosen_logps and ref_rejected_logps
            ref, base = ("ref_", name[4:]) if name.startswith("ref_") else ("", name)
            halves[f"{ref}chosen_{base}"], halves[f"{ref}rejected_{base}"] = values.chunk(2)
        stats = halves
    return record.loss(*(stats[name] for name in record.inputs), **hparams)
