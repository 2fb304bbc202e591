"""The five losses on per-sequence statistics: one place for the maths.

Every function takes per-sequence log-probs (summed over completion tokens, as TRL does) and returns
`(loss, metrics)`: `loss` a scalar to back-propagate, `metrics` a dict of detached 0-d tensors named
as TRL logs them (`rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies`,
`logps/chosen`, `logps/rejected`, plus `kl` for KTO and `nll_loss` for CPO). Nothing here syncs with
the device; call `.item()` on a metric when you log it.

Semantics follow TRL 1.16 (`DPOTrainer`, `CPOTrainer`, `KTOTrainer`) exactly; tests/test_trl_oracle.py
checks losses, metrics and gradients against those trainers. One addition: `dpo_loss(label_smoothing=e)`
is conservative DPO, `(1-e) L(x) + e L(-x)`, which TRL 1.16 only offers as its "sigmoid" and "robust"
losses combined with weights `2(1-e)` and `-(1-2e)` (its "sigmoid" alone ignores label_smoothing).
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F

METHODS = ("sft", "dpo", "ipo", "cpo", "kto")
PAIRED_METHODS = ("dpo", "ipo", "cpo")
REFERENCE_METHODS = ("dpo", "ipo", "kto")


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


def from_sequence_stats(
    method,
    logps,
    lengths,
    ref_logps=None,
    desirable=None,
    kl=None,
    kl_logps=None,
    ref_kl_logps=None,
    **hparams,
):
    """Dispatch on `method` over a batch of per-sequence stats.

    Paired methods take TRL's concatenated batch: chosen rows first, rejected rows second.
    KTO takes `desirable` [B] and either `kl` or (`kl_logps`, `ref_kl_logps`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if logps.shape[0] == 0:
        raise ValueError("empty batch: no sequences")
    if method in REFERENCE_METHODS:
        if ref_logps is None:
            raise ValueError(f"{method} needs reference log-probs (ref_logps, or ref_hidden with ref_weight)")
        if not isinstance(ref_logps, torch.Tensor) or not ref_logps.is_floating_point():
            raise TypeError(f"ref_logps must be a floating-point tensor [batch], got "
                            f"{ref_logps.dtype if isinstance(ref_logps, torch.Tensor) else type(ref_logps).__name__}")
        if ref_logps.shape != logps.shape:
            raise ValueError(f"ref_logps has shape {tuple(ref_logps.shape)}, expected {tuple(logps.shape)}")
    if method == "sft":
        return sft_loss(logps, lengths, **hparams)
    if method == "kto":
        if desirable is None:
            raise ValueError("kto needs `desirable`, a [batch] bool tensor marking desirable rows")
        if kl is None:
            if kl_logps is None or ref_kl_logps is None:
                raise ValueError(
                    "kto needs its KL reference point: pass `kl`, or the mismatched-pair log-probs "
                    "(kl_hidden/kl_labels or kl_logps, and their reference)"
                )
            # One log-prob per mismatched pair on each side: other shapes would broadcast into a wrong mean.
            if kl_logps.dim() != 1 or ref_kl_logps.shape != kl_logps.shape:
                raise ValueError(f"kl_logps {tuple(kl_logps.shape)} and ref_kl_logps {tuple(ref_kl_logps.shape)} "
                                 "must both be [kl_batch], one log-prob per mismatched pair")
            kl = kto_kl(kl_logps, ref_kl_logps)
        return kto_loss(logps, ref_logps, desirable, kl, **hparams)
    if logps.shape[0] % 2:
        raise ValueError(f"{method} needs chosen rows then rejected rows: got an odd batch of {logps.shape[0]} rows")
    chosen, rejected = logps.chunk(2)
    chosen_len, rejected_len = lengths.chunk(2)
    if method == "cpo":
        return cpo_loss(chosen, rejected, chosen_len, rejected_len, **hparams)
    ref_chosen, ref_rejected = ref_logps.chunk(2)
    if method == "dpo":
        return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, **hparams)
    return ipo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_len, rejected_len, **hparams)
