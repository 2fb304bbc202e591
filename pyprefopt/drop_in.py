"""pyprefopt inside other trainers: TRL's DPO/IPO, CPO, ORPO, KTO, SFT, GRPO and RLOO trainers, and transformers'
`Trainer`.

TRL (`patch_trl`): TRL 1.16's DPOTrainer, KTOTrainer, SFTTrainer, GRPOTrainer and RLOOTrainer score sequences
through a fused LM head that `trl.trainer.utils.add_fused_lm_head` puts on the model
(`model(..., labels=..., fused_lm_head=True)` returns per-token log-probs instead of logits; GRPO and RLOO ask
for the entropy too, at the sampling temperature); its CPOTrainer and ORPOTrainer materialise the `[B, T, V]`
logits. `patch_trl()` swaps in pyprefopt's head (`add_fused_lm_head` below, the same contract over
`fused_linear_logprobs`) and CPO and ORPO forwards without logits. TRL keeps everything else: its batches,
generation (the model's own forward), losses (sigmoid, ipo, dapo, grpo, ...), metric names, PEFT reference
handling (adapter disabled) and `precompute_ref_log_probs`. Call it before building the trainer:

    import pyprefopt.drop_in
    pyprefopt.drop_in.patch_trl()
    trainer = DPOTrainer(model=model, args=DPOConfig(...), ...)

transformers `Trainer` (`FusedLMHeadTrainer`): causal-LM (SFT) training whose loss comes from the fused
head; `FusedLMHeadTrainer(model=..., ...)` in place of `Trainer(model=..., ...)`.

Supported: the TRL releases setup.py's `peers` extra admits and transformers >= 5.0 (tested: TRL 1.16.0,
transformers 5.25); other versions fail with a clear error. Under autocast (TRL's configs turn bf16 on by default)
the head projects in autocast's dtype, as TRL's does, but keeps the logits in fp32 where TRL rounds them. The
model's own logit transform is applied as its forward applies it (`head_logit_transform`: Gemma 2/3/3n's
soft-capping, Cohere's, Granite's, Falcon-H1's... logit scales), and MoE models their router load-balancing loss,
as from their own forward. The head's `entropy` output is differentiable (GRPO's `entropy_coef` and adaptive
entropy bonus). Not supported (a clear error, never a silent difference): encoder-decoder models.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import types
from dataclasses import dataclass

import torch
import transformers
from packaging.requirements import Requirement
from packaging.version import Version
from transformers.utils import ModelOutput

from pyprefopt.fused_linear_logprobs import STATISTICS, fused_linear_logprobs
from pyprefopt.head_config import check_fused_head_support, head_logit_transform, head_operands

TRANSFORMERS_MIN = Version("5.0")
HEAD_OUTPUTS = ("log_probs", *STATISTICS)
# The TRL trainer modules whose fused head patch_trl replaces.
TRL_HEAD_MODULES = ("trl.trainer.dpo_trainer", "trl.trainer.kto_trainer", "trl.trainer.sft_trainer",
                    "trl.trainer.grpo_trainer", "trl.trainer.rloo_trainer")

def _check_transformers():
    if Version(transformers.__version__) < TRANSFORMERS_MIN:
        raise RuntimeError(
            f"pyprefopt.drop_in needs transformers >= {TRANSFORMERS_MIN}, found {transformers.__version__}")


def supported_trl_versions():
    """The TRL releases patch_trl supports: those the `peers` extra in setup.py admits, the one place they are
    written. patch_trl replaces functions inside TRL's trainer modules, which change from release to release."""
    for line in importlib.metadata.requires("pyprefopt") or ():
        requirement = Requirement(line)
        if requirement.name == "trl":
            return requirement.specifier
    raise RuntimeError("pyprefopt's installed metadata names no TRL requirement: reinstall pyprefopt")


def _check_trl():
    import trl

    supported = supported_trl_versions()
    if not supported.contains(trl.__version__, prereleases=True):
        raise RuntimeError(f"pyprefopt.drop_in.patch_trl supports TRL {supported}; found {trl.__version__}")
    _check_transformers()


@dataclass
class FusedCausalLMOutput(ModelOutput):
    """What `model(..., labels=labels, fused_lm_head=True)` returns: TRL's `FusedCausalLMOutput` fields.

    loss: summed NLL of the non-ignored next tokens over their count (or `num_items_in_batch`).
    log_probs [B, T-1] (or [B, T] with `shift_labels`): log-prob of each next-token label, 0 where ignored.
    entropy, log_sum_sq_probs, mean_logits, is_top1: per-token statistics when requested (else None).
    label_mask: labels != -100. aux_loss: an MoE model's router load-balancing loss (added to `loss` with the
    config's `router_aux_loss_coef`), None otherwise.
    """

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def _run_head(lm_head, compute, *inputs):
    """`compute(weight, bias, *inputs)` with the head's parameters as the fused op needs them.

    Under FSDP2 a head sharded in an FSDP group of its own holds only its shard until its own forward runs, and its
    gradient reaches the shards only through that forward's hooks (gathering the shard by hand with `full_tensor()`
    takes each process's gradient for all of them: its backward assumes every process computed the same one). So
    `compute` runs as an FSDP forward method of the head (`register_fsdp_forward_method`): unsharded for it,
    resharded after, unsharded again for backward, the gradient reduce-scattered and averaged like any FSDP
    module's. A head in the root's group is unsharded already, since the fused head runs inside the model's
    forward. Under DeepSpeed ZeRO-3 the head's parameters are partitioned too; `compute` runs as the head's forward
    (`_run_as_zero3_forward`). A head sharded along the vocabulary by tensor parallelism (a `Shard(0)` DTensor over
    processes that share the batch) reaches `fused_linear_logprobs` as it is, which computes over the shards."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if isinstance(lm_head, FSDPModule):
        if not hasattr(lm_head, "pyprefopt_fused_head"):
            lm_head.pyprefopt_fused_head = types.MethodType(
                lambda self, run, *args: run(self.weight, self.bias, *args), lm_head)
            register_fsdp_forward_method(lm_head, "pyprefopt_fused_head")
        return lm_head.pyprefopt_fused_head(compute, *inputs)
    # A module DeepSpeed ZeRO-3 hooks carries its `ds_id`. Asked of the module, not its weight: reading the weight
    # here, while the model's forward runs, would make DeepSpeed gather it for the whole forward (see below).
    if hasattr(lm_head, "ds_id"):
        return _run_as_zero3_forward(lm_head, compute, *inputs)
    return compute(lm_head.weight, lm_head.bias, *inputs)


def _run_as_zero3_forward(lm_head, compute, *inputs):
    """`compute(weight, bias, *inputs)` as the forward of a head whose parameters DeepSpeed ZeRO-3 partitions.

    Outside its module's forward such a parameter is an empty placeholder (`ds_status` NOT_AVAILABLE). DeepSpeed's
    hooks on every module gather the module's parameters before its forward and release them after; on the forward's
    outputs they gather them again before the module's backward, and on its inputs release them after it, while each
    parameter's own gradient hook reduce-scatters its gradient into the partitions. So `compute` runs as the head's
    forward, through the module's `__call__`: the full weight exists only while the head computes, as for the
    model's own `lm_head(hidden)`, and its gradient reaches the partitions as any module's does.
    `deepspeed.zero.GatheredParameters` would give the forward a full weight, but the backward needs it again after
    the context has released it. Read directly while the model's forward runs, the weight is gathered by DeepSpeed's
    fallback for parameters used outside their module, which makes it an external parameter of the calling module:
    gathered for that module's whole forward and backward, the backbone's included."""
    with _forward_replaced(lm_head, lambda *args: compute(lm_head.weight, lm_head.bias, *args)):
        return lm_head(*inputs)


@contextlib.contextmanager
def _forward_replaced(module, forward):
    """`module.forward` is `forward` inside the block, so that `module(...)` runs it with every hook that wraps the
    module's call; after it, the module's own again (an instance attribute where one was set, such as accelerate's
    autocast wrapper, otherwise its class's)."""
    own_forward = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if own_forward is None:
            del module.forward
        else:
            module.forward = own_forward


def _load_balancing_loss(text_config, router_logits, attention_mask):
    """The MoE router's load-balancing loss (Switch Transformer, Fedus et al. 2021, Eq. 4), as the model's own forward
    adds it: transformers' function, which every MoE family shares."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(router_logits, text_config.num_experts, text_config.num_experts_per_tok,
                                    attention_mask)


def _fused_logprobs(hidden, weight, labels, bias, cast_lm_head_to_fp32=False, **kwargs):
    """`fused_linear_logprobs` outside autocast on the operands the head projects (`head_operands`): in autocast's
    dtype under autocast, as for TRL's head and the model's own lm_head Linear (TRL's configs turn bf16 autocast on by
    default, CPUs with bf16 included), in fp32 with `cast_lm_head_to_fp32`, otherwise in the head weight's dtype.
    The logits stay in fp32 where TRL rounds them to the operands' dtype."""
    hidden, weight, bias = head_operands(hidden.to(weight.device), weight, bias,
                                         torch.float32 if cast_lm_head_to_fp32 else None)
    with torch.autocast(hidden.device.type, enabled=False):
        return fused_linear_logprobs(hidden, weight, labels.to(weight.device), bias, **kwargs)


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """Patch `model` so `model(..., labels=labels, fused_lm_head=True)` returns a `FusedCausalLMOutput` of
    per-token log-probs computed by `fused_linear_logprobs`, never the `[B, T, V]` logits; without
    `fused_lm_head=True` the forward is the original one (generation is unchanged). The signature and
    behaviour are those of `trl.trainer.utils.add_fused_lm_head` (1.16); add it before wrapping with PEFT.

    labels [B, T] are shifted inside (position t scores labels[t + 1]); pre-shifted `shift_labels` are
    scored as given. `outputs`: "log_probs" plus any of "entropy", "log_sum_sq_probs", "mean_logits",
    "is_top1", computed in the same pass.
    """
    _check_transformers()
    check_fused_head_support(model.config, "add_fused_lm_head", router_losses=True)
    transform = head_logit_transform(model.config)
    text_config = model.config.get_text_config()
    unknown = set(outputs) - set(HEAD_OUTPUTS)
    if unknown:
        raise ValueError(f"outputs must be among {HEAD_OUTPUTS}, got {sorted(unknown)}")
    statistics = tuple(name for name in STATISTICS if name in outputs)
    original_forward = model.forward

    # The original signature, kept: `generate` validates its model kwargs against it.
    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            extra = {"labels": labels, "shift_labels": shift_labels, "num_items_in_batch": num_items_in_batch}
            return original_forward(*args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        kwargs["use_cache"] = False
        # MoE models: the router logits for the load-balancing loss, as the model's own forward asks for them.
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        # Looked up per call: PEFT and FSDP replace the backbone and the head after patching.
        backbone = self.base_model(*args, **kwargs)
        hidden = backbone.last_hidden_state
        if shift_labels is None:
            hidden, labels = hidden[:, :-1], labels[:, 1:]
        else:
            labels = shift_labels

        def head(weight, bias, hidden, labels):
            return _fused_logprobs(hidden, weight, labels, bias, cast_lm_head_to_fp32, temperature=temperature,
                                   statistics=statistics, **transform)

        result = _run_head(self.get_output_embeddings(), head, hidden, labels)
        log_probs, stats = result if statistics else (result, {})
        labels = labels.to(log_probs.device)
        mask = labels != -100
        loss = -log_probs.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
        aux_loss = None
        if kwargs.get("output_router_logits"):
            aux_loss = _load_balancing_loss(text_config, backbone.router_logits, kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux_loss
        return FusedCausalLMOutput(loss=loss, log_probs=log_probs, label_mask=mask, aux_loss=aux_loss, **stats)

    model.forward = types.MethodType(forward, model)


def _concatenated_inputs(trainer, batch, trainer_name, padding_value):
    """TRL's CPO and ORPO concatenated batch: the chosen rows, then the rejected ones."""
    if trainer.is_encoder_decoder:
        raise NotImplementedError(f"pyprefopt's {trainer_name} forward supports decoder-only models")
    return trainer.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=padding_value,
                                       device=trainer.accelerator.device)


def _fused_forward(trainer, model, trainer_name, concatenated, labels, mean_over_last):
    """What TRL's CPO and ORPO forwards share: the concatenated batch run through `model(...)`, whatever wraps it (DDP,
    FSDP2, a DeepSpeed engine, PEFT), with the head's outputs from the fused op in place of the logits. Returns the
    per-token log-probs of `labels` [B, T-1] (labels[:, t] scored at position t) and the per-position means over the
    vocabulary of the logits: [B, T] with `mean_over_last`, else [B, T-1].

    For the call, the causal LM's own forward is replaced by one that computes these, so the wrapper's forward runs
    as for TRL's `model(...)`: DDP prepares its gradient reduction, FSDP2 unshards and reshards, DeepSpeed ZeRO-3
    gathers and releases each module's parameters; calling the backbone and the head on their own would skip that."""
    from accelerate.utils import is_peft_model  # noqa: PLC0415 (a TRL dependency)

    # The wrapper's attributes are not the model's (a DeepSpeed engine's `config` is its own dict).
    unwrapped = trainer.accelerator.unwrap_model(model)
    causal_lm = unwrapped.get_base_model() if is_peft_model(unwrapped) else unwrapped
    check_fused_head_support(causal_lm.config, trainer_name)
    transform = head_logit_transform(causal_lm.config)
    mean_end = None if mean_over_last else -1

    def head(weight, bias, hidden, labels):
        per_token = _fused_logprobs(hidden[:, :-1], weight, labels, bias, **transform)
        return per_token, _mean_logits(weight, bias, hidden[:, :mean_end], transform)

    # PeftModel's forward passes its other arguments (inputs_embeds, output_attentions, ...), all None here.
    def forward(input_ids, attention_mask, labels, **_):
        # accelerate's mixed precision is an autocast around the prepared model's forward, which this one takes the
        # place of when no PEFT model stands between them.
        with trainer.accelerator.autocast():
            hidden = causal_lm.base_model(input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            log_probs, mean_logits = _run_head(causal_lm.get_output_embeddings(), head, hidden, labels)
        return FusedCausalLMOutput(log_probs=log_probs, mean_logits=mean_logits)

    with _forward_replaced(causal_lm, forward):
        outputs = model(input_ids=concatenated["concatenated_input_ids"],
                        attention_mask=concatenated["concatenated_attention_mask"], labels=labels)
    return outputs.log_probs, outputs.mean_logits


@torch.no_grad()
def _mean_logits(weight, bias, hidden, transform):
    """The mean over the vocabulary of the logits at each position: what TRL's CPO and ORPO trainers log the mean of
    (as logits/chosen and logits/rejected), without the logits."""
    if transform["softcap"] is None:
        # Linear in the logits: mean_v z_v = (h . mean_v W_v + mean_v b_v) * scale.
        mean = hidden @ weight.mean(0) + (0.0 if bias is None else bias.mean())
        return mean * transform["logit_scale"]
    # A capped mean is not: one more pass over the vocabulary, at every position as TRL's mean takes it.
    every_position = torch.zeros(hidden.shape[:-1], dtype=torch.long, device=hidden.device)
    return _fused_logprobs(hidden, weight, every_position, bias, statistics=("mean_logits",),
                           **transform)[1]["mean_logits"]


def _cpo_concatenated_forward(self, model, batch):
    """`CPOTrainer.concatenated_forward` without the `[B, T, V]` logits: the same five outputs, where the
    two "logits" are the per-position means over the vocabulary (TRL only logs their mean, which is the
    same number: the mean over (B, T, V) of the logits)."""
    concatenated = _concatenated_inputs(self, batch, "CPOTrainer", self.pad_token_id)
    len_chosen = batch["chosen_labels"].shape[0]
    labels = concatenated["concatenated_labels"][:, 1:]
    per_token, mean_logits = _fused_forward(self, model, "CPOTrainer", concatenated, labels, mean_over_last=True)
    mask = labels != -100
    all_logps = per_token.sum(-1)
    if self.loss_type in ("ipo", "simpo"):
        all_logps = all_logps / mask.sum(-1)
    if self.cpo_alpha == 0:
        nll_loss = torch.tensor(0.0, device=self.accelerator.device)
    else:
        # TRL: mean cross-entropy over the chosen rows' scored tokens.
        nll_loss = -per_token[:len_chosen].sum() / mask[:len_chosen].sum()
    return all_logps[:len_chosen], all_logps[len_chosen:], mean_logits[:len_chosen], mean_logits[len_chosen:], nll_loss


def _orpo_concatenated_forward(self, model, batch):
    """`ORPOTrainer.concatenated_forward` without the `[B, T, V]` logits: the completions' length-averaged
    log-probs, the chosen rows' NLL over every non-padding token (prompt included, as TRL takes it), and as the two
    "logits" the per-position means over the vocabulary at the positions TRL's logits keep (all but the last)."""
    concatenated = _concatenated_inputs(self, batch, "ORPOTrainer", self.padding_value)
    len_chosen = batch["chosen_labels"].shape[0]
    labels = concatenated["concatenated_labels"][:, 1:]
    attention_mask = concatenated["concatenated_attention_mask"][:, 1:]
    every_token = concatenated["concatenated_input_ids"][:, 1:].masked_fill(attention_mask == 0, -100)
    # The rejected rows' prompts are not scored: no term takes them.
    scored = torch.cat([every_token[:len_chosen], labels[len_chosen:]])
    per_token, mean_logits = _fused_forward(self, model, "ORPOTrainer", concatenated, scored, mean_over_last=False)
    completion = labels != -100
    all_logps = torch.where(completion, per_token, 0.0).sum(-1) / completion.sum(-1)
    nll_loss = -per_token[:len_chosen].sum() / (scored[:len_chosen] != -100).sum()
    return all_logps[:len_chosen], all_logps[len_chosen:], mean_logits[:len_chosen], mean_logits[len_chosen:], nll_loss


def patch_trl():
    """Make TRL trainers built from now on use pyprefopt: DPOTrainer (every loss_type), KTOTrainer, SFTTrainer,
    GRPOTrainer and RLOOTrainer (GRPO's entropy bonus included) through `add_fused_lm_head`,
    `trl.experimental.cpo.CPOTrainer` and `trl.experimental.orpo.ORPOTrainer` through forwards without logits.
    Returns a function that undoes the patch."""
    _check_trl()
    from trl.experimental.cpo import CPOTrainer  # noqa: PLC0415
    from trl.experimental.orpo import ORPOTrainer  # noqa: PLC0415

    undo = []
    for name in TRL_HEAD_MODULES:
        module = importlib.import_module(name)
        undo.append((module, "add_fused_lm_head", module.add_fused_lm_head))
        module.add_fused_lm_head = add_fused_lm_head
    for trainer, forward in ((CPOTrainer, _cpo_concatenated_forward), (ORPOTrainer, _orpo_concatenated_forward)):
        undo.append((trainer, "concatenated_forward", trainer.concatenated_forward))
        trainer.concatenated_forward = forward

    def unpatch():
        for owner, attr, original in reversed(undo):
            setattr(owner, attr, original)

    return unpatch


class FusedLMHeadTrainer(transformers.Trainer):
    """`transformers.Trainer` for causal-LM (SFT) training with the loss from pyprefopt's fused head:
    the mean NLL of the non-ignored next tokens (over `num_items_in_batch` under gradient accumulation,
    as the model's own loss), without the `[B, T, V]` logits."""

    def __init__(self, model=None, *args, **kwargs):
        if model is None:
            raise ValueError("FusedLMHeadTrainer needs a model (model_init is not supported)")
        add_fused_lm_head(model.get_base_model() if hasattr(model, "get_base_model") else model)
        super().__init__(model, *args, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "labels" not in inputs:
            raise ValueError("FusedLMHeadTrainer needs `labels` in every batch (use a causal-LM collator)")
        outputs = model(**inputs, fused_lm_head=True, num_items_in_batch=num_items_in_batch)
        return (outputs.loss, outputs) if return_outputs else outputs.loss
