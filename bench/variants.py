"""Benchmark variants of `fused_linear_logprobs` (the primitive) and `FusedLinearPreferenceLoss(method)`
for the five methods (SFT, DPO, IPO, CPO, KTO).

One place that builds every variant: `build(op, variant, shape, head, all_completion)` makes the inputs
and returns a `Step`, a zero-argument callable that runs one forward + backward (fp32, CPU). Both
`run_table.py` and the pytest-benchmark files use it, so they time exactly the same code.

Ops:
- "primitive": per-token log-probs of N tokens (every label valid), backward with a fixed random
  upstream gradient.
- "<method>-loss" (sft, dpo, ipo, cpo, kto; each method's inputs as its `pyprefopt.losses.METHODS` record
  says): B rows of length T, N = B*T tokens, the loss on summed
  completion log-probs (beta=0.1). By default the first quarter of each row's labels is -100 (the
  prompt); `all_completion=True` masks nothing.
  - sft: mean NLL over the non-ignored tokens of the batch.
  - dpo (sigmoid), ipo: chosen rows first, rejected second; fixed reference log-probs (the policy's own
    at these inputs plus N(0, 1) noise: a margin near 0, so the loss has a sizeable gradient).
  - cpo: chosen rows first; no reference; alpha=1 (the NLL term on the chosen rows).
  - kto: the first B/2 rows desirable, the rest undesirable; fixed reference log-probs (those of
    fixed reference hidden states, `ref_hidden` = hidden + 0.1 N(0, 1), through the same head: Liger
    takes the reference as hidden states only, so every variant sees the same reference); the KL
    reference point from fixed per-row KL log-probs (`kl_logps`, `ref_kl_logps`: synthetic, z0 =
    mean(kl_logps - ref_kl_logps) > 0), not projected by anyone.

Head modes: "frozen" (lm_head weight requires_grad=False, hidden requires grad: the LoRA case) and
"trained" (the weight requires grad too).

Variants:
- bare_gemms: the GEMMs the op needs and nothing else, on preallocated outputs (`out=`): frozen = 2
  (`Z = h @ W.T` [n,V], `dH = Z @ W` [n,H]), trained = 3 (plus `dW = Z.T @ h` [V,H]), with n the number
  of tokens pyprefopt projects (all N for the primitive, the non-ignored ones for the losses).
- naive: `pyprefopt.reference` (materialised logits, log_softmax, gather) + autograd.
- pyprefopt: `fused_linear_logprobs` / `FusedLinearPreferenceLoss(method)`.
- trl: `trl.trainer.utils._ChunkedLogProbFunction`, called as `add_fused_lm_head` calls it on a
  device without Triton (every position projected, labels clamped to >= 0, ignored ones zeroed after);
  for the losses its per-token log-probs are summed per row and fed to the same `pyprefopt.losses`
  function as pyprefopt's.
- liger (losses only; Liger has no bare log-prob primitive):
  - dpo: `liger_kernel.chunked_loss.LigerFusedLinearDPOLoss` (torch.compile'd chunks, one pair per
    chunk). It takes no precomputed reference log-probs (only a reference model's hidden states), so
    it runs reference-free (`use_ref_model=False`, i.e. reference log-probs = 0): the same GEMMs as the
    others; its check compares against the naive loss with zero reference log-probs.
  - cpo: `LigerFusedLinearCPOLoss(alpha=1, compute_nll_loss=True)`, one pair per chunk: the same loss.
  - kto: `LigerFusedLinearKTOLoss`, one row per chunk, `kl=` the same precomputed KL point. Reference-
    free KTO would saturate its sigmoid (summed log-probs near -T log V: zero gradients, a vacuous
    check), so it runs with `use_ref_model=True` on the reference hidden states and head: it computes
    the same reference log-probs itself, one more no-grad [N, V] GEMM per step than the others.
  - sft: `liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss` (mean over non-ignored tokens):
    Triton kernels, so it runs only where Triton has a driver for CPU tensors (`unavailable_reason`).
  - ipo: Liger has none (`LigerFusedLinearDPOLoss(loss_type="ipo")` raises NotImplementedError).
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass

import torch

import pyprefopt
from pyprefopt import cpu_linear, losses
from pyprefopt.reference import reference_logprobs, reference_preference_loss

LOSS_OPS = ("sft-loss", "dpo-loss", "ipo-loss", "cpo-loss", "kto-loss")
OPS = ("primitive", "dpo-loss", "sft-loss", "ipo-loss", "cpo-loss", "kto-loss")
# What `run_table.py` runs by default (at every shape); `--all-losses` adds EXTRA_LOSS_OPS at the shapes
# named in EXTRA_LOSS_SHAPES only, and bench_fused_linear_preference_loss.py runs them there only.
DEFAULT_OPS = ("primitive", "dpo-loss")
EXTRA_LOSS_OPS = ("sft-loss", "ipo-loss", "cpo-loss", "kto-loss")
EXTRA_LOSS_SHAPES = ("default",)
METHOD = {op: op[: -len("-loss")] for op in LOSS_OPS}
HEADS = ("frozen", "trained")
VARIANTS = ("bare_gemms", "naive", "pyprefopt", "trl", "liger")
# Which variants exist for which op (Liger has no bare log-prob primitive). A variant listed here may
# still be unavailable (Liger has no IPO loss; its SFT loss needs Triton): see `unavailable_reason`.
OP_VARIANTS = {"primitive": ("bare_gemms", "naive", "pyprefopt", "trl")}
OP_VARIANTS.update({op: VARIANTS for op in LOSS_OPS})
# Python package each peer variant needs.
PEER_PACKAGES = {"trl": "trl", "liger": "liger_kernel"}

IGNORE_INDEX = -100
BETA = 0.1
CPO_ALPHA = 1.0
# The loss hyper-parameters, as `FusedLinearPreferenceLoss(method, **HPARAMS[method])` takes them: those the train CLI
# sets (each record's `options`), beta = BETA and CPO's alpha = CPO_ALPHA, the others at their defaults.
HPARAMS = {
    method: {name: {"beta": BETA, "alpha": CPO_ALPHA}.get(name, default)
             for name, default in record.hyperparameters.items() if name in record.options}
    for method, record in ((method, losses.METHODS[method]) for method in METHOD.values())
}
# KTO's reference hidden states: the policy's plus this much N(0, 1) noise.
KTO_REF_HIDDEN_NOISE = 0.1
# Logit scale of the synthetic head: logits have about this standard deviation.
LOGIT_STD = 2.0


@dataclass(frozen=True)
class Shape:
    name: str
    n: int  # tokens
    h: int  # hidden size
    v: int  # vocabulary
    rows: int  # B, rows of the DPO batch (T = n // rows); unused by the primitive

    @property
    def seq_len(self) -> int:
        return self.n // self.rows

    def label(self) -> str:
        return f"N{self.n}-H{self.h}-V{self.v}"


FULL_SHAPES = (
    Shape("default", n=2048, h=1024, v=32000, rows=8),  # DPO: 4 pairs of 256 tokens
    Shape("qwen", n=512, h=1024, v=151936, rows=4),  # DPO: 2 pairs of 128 tokens, Qwen vocabulary
)
QUICK_SHAPES = (
    Shape("default", n=256, h=128, v=4096, rows=4),
    Shape("qwen", n=256, h=128, v=15193, rows=4),
)


# Full-size shapes that run only when named (`run_table.py --shapes qwen-1pair`): one DPO pair of 256 tokens
# at the Qwen vocabulary, 222 MiB of completion logits, over the trained head's 64 MiB budget in one chunk.
ON_REQUEST_SHAPES = (Shape("qwen-1pair", n=512, h=1024, v=151936, rows=2),)


def shapes(quick: bool) -> tuple[Shape, ...]:
    return QUICK_SHAPES if quick else FULL_SHAPES


def on_request_shapes(quick: bool) -> tuple[Shape, ...]:
    return () if quick else ON_REQUEST_SHAPES


def named_shapes(quick: bool) -> tuple[Shape, ...]:
    """Every shape `--shapes` may name: the default ones, then the on-request ones."""
    return shapes(quick) + on_request_shapes(quick)


def env_quick() -> bool:
    """Quick shapes unless PYPREFOPT_BENCH_QUICK is set to 0/false/no (CI sets it to 1)."""
    return os.environ.get("PYPREFOPT_BENCH_QUICK", "1").strip().lower() not in ("0", "false", "no", "off")


def op_shapes(op: str, quick: bool) -> tuple[Shape, ...]:
    """The shapes an op runs at: every one for the primitive and DPO, EXTRA_LOSS_SHAPES for the others."""
    if op in EXTRA_LOSS_OPS:
        return tuple(s for s in shapes(quick) if s.name in EXTRA_LOSS_SHAPES)
    return shapes(quick)


def quick_skip_reason(op: str, variant: str, shape: Shape, head: str | None = None) -> str | None:
    """Why a quick-mode case does not run, or None. Liger's torch.compile costs 7-20 s per new
    (loss, vocabulary, head mode) on a 2-core CPU, so quick mode compiles it for the first quick shape
    only, and for the losses beyond DPO with the frozen head only."""
    if variant != "liger":
        return None
    if shape.name != QUICK_SHAPES[0].name:
        return "skipped in quick mode: torch.compile costs 7-20 s a case; runs at full shapes"
    if op in EXTRA_LOSS_OPS and head == "trained":
        return "skipped in quick mode (frozen head only): torch.compile costs 7-20 s a case; runs at full shapes"
    return None


def peer_installed(variant: str) -> bool:
    package = PEER_PACKAGES.get(variant)
    return package is None or importlib.util.find_spec(package) is not None


def peer_modules(op: str, variant: str) -> tuple[str, ...]:
    """Modules the variant imports (to import before anything is timed, or forked)."""
    if variant == "trl":
        return ("trl.trainer.utils",)
    if variant == "liger":
        return ("liger_kernel.transformers",) if op == "sft-loss" else ("liger_kernel.chunked_loss",)
    return ()


def _triton_cpu_reason() -> str | None:
    """None if Triton has a driver that takes CPU tensors (triton-cpu), else why not."""
    try:
        from triton.runtime import driver

        backend = driver.active.get_current_target().backend
    except Exception as e:  # no triton, or no driver at all ("0 active drivers")
        return f"{type(e).__name__}: {e}"
    return None if backend == "cpu" else f"Triton's active driver is {backend!r}, not one for CPU tensors"


def unavailable_reason(op: str, variant: str) -> str | None:
    """Why an installed variant of an op cannot run here (a row saying so, not a silent drop), or None."""
    if variant != "liger":
        return None
    if op == "ipo-loss":
        return ("Liger has no IPO loss (liger_kernel.chunked_loss has DPO, CPO, KTO, ORPO, SimPO; "
                "LigerFusedLinearDPOLoss(loss_type='ipo') raises NotImplementedError)")
    if op == "sft-loss" and (why := _triton_cpu_reason()):
        return ("LigerFusedLinearCrossEntropyLoss is Triton kernels, which cannot run on CPU tensors here "
                f"(no Triton CPU driver: {why})")
    return None


# ----------------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Inputs:
    op: str
    shape: Shape
    head: str
    hidden: torch.Tensor  # [N, H] (primitive) or [B, T, H] (loss), requires grad
    weight: torch.Tensor  # [V, H], requires grad iff head == "trained"
    labels: torch.Tensor  # [N] or [B, T]
    grad_out: torch.Tensor | None  # [N] upstream gradient of the primitive's log-probs
    ref_logps: torch.Tensor | None  # [B] reference log-probs (dpo, ipo, kto)
    ref: str = "policy"  # how ref_logps were made: "policy" or "zero" (see make_inputs)
    ref_hidden: torch.Tensor | None = None  # [B, T, H] KTO's reference hidden states (ref_logps are theirs)
    desirable: torch.Tensor | None = None  # [B] bool, KTO
    kl_logps: torch.Tensor | None = None  # [B] KTO's KL log-probs under the policy (fixed)
    ref_kl_logps: torch.Tensor | None = None  # [B] and under the reference (fixed)

    @property
    def method(self) -> str | None:
        return METHOD.get(self.op)

    @property
    def projected_tokens(self) -> int:
        """Tokens pyprefopt projects: the non-ignored ones."""
        return int((self.labels != IGNORE_INDEX).sum())

    def loss_kwargs(self) -> dict:
        """What `FusedLinearPreferenceLoss` and `reference_preference_loss` take besides hidden, weight
        and labels: the reference log-probs and KTO's inputs, as the method needs them."""
        kw = {}
        record = losses.METHODS[self.method]
        if record.needs_reference:
            kw["ref_logps"] = self.ref_logps
        if record.kl_batch:
            kw.update(desirable=self.desirable, kl_logps=self.kl_logps, ref_kl_logps=self.ref_kl_logps)
        return kw


@torch.no_grad()
def _sequence_logps_lowmem(hidden, weight, labels, token_block=512, vocab_block=2048):
    """Summed log-probs per row, in small tiles: building the inputs must not raise the process's peak
    RSS above what the timed steps reach (ru_maxrss is a high-water mark)."""
    rows, seq_len, width = hidden.shape
    flat_h = hidden.reshape(-1, width)
    flat_y = labels.reshape(-1)
    logp = torch.zeros(flat_y.shape[0])
    for t0 in range(0, flat_h.shape[0], token_block):
        h = flat_h[t0 : t0 + token_block]
        lse = torch.full((h.shape[0],), -math.inf)
        for v0 in range(0, weight.shape[0], vocab_block):
            lse = torch.logaddexp(lse, torch.logsumexp(h @ weight[v0 : v0 + vocab_block].T, dim=1))
        y = flat_y[t0 : t0 + token_block]
        valid = y != IGNORE_INDEX
        label_logit = (h * weight[y.clamp(min=0)]).sum(-1)
        logp[t0 : t0 + token_block] = torch.where(valid, label_logit - lse, torch.zeros(()))
    return logp.view(rows, seq_len).sum(-1)


def make_inputs(op, shape, head, all_completion=False, ref="policy", seed=0) -> Inputs:
    """Deterministic inputs: the same (op, shape, head, all_completion, ref, seed) gives the same tensors.

    ref (dpo, ipo, kto): "policy" = fixed reference log-probs (dpo/ipo: the policy's own at these
    inputs plus N(0, 1) noise, a margin near 0 so the loss has a sizeable gradient; kto: those of
    the reference hidden states `ref_hidden`); "zero" = reference-free. Ignored by sft and cpo.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if ref not in ("policy", "zero"):
        raise ValueError(f"ref must be 'policy' or 'zero', got {ref!r}")
    g = torch.Generator().manual_seed(seed)
    lead = (shape.n,) if op == "primitive" else (shape.rows, shape.seq_len)
    hidden = torch.randn(*lead, shape.h, generator=g)
    # In place: `randn(...) * s` would double the peak while building.
    weight = torch.randn(shape.v, shape.h, generator=g).mul_(LOGIT_STD / math.sqrt(shape.h))
    labels = torch.randint(0, shape.v, lead, generator=g)
    x = Inputs(op, shape, head, hidden, weight, labels, grad_out=None, ref_logps=None, ref=ref)
    if op == "primitive":
        x.grad_out = torch.randn(shape.n, generator=g)
    else:
        if not all_completion:
            labels[:, : shape.seq_len // 4] = IGNORE_INDEX
        # Drawn for every loss, so the tensors above stay those of every other loss op.
        noise = torch.randn(shape.rows, generator=g)
        record = losses.METHODS[x.method]
        if record.kl_batch:
            x.ref_hidden = torch.randn(hidden.shape, generator=g).mul_(KTO_REF_HIDDEN_NOISE).add_(hidden)
            x.desirable = torch.arange(shape.rows) < shape.rows // 2
            # Mismatched-pair log-probs, synthetic: the reference's rolled by one row, the policy's above
            # them by |N(0, 1)|, so z0 = mean(kl_logps - ref_kl_logps) > 0 is not clamped.
            ref_seq_logps = _sequence_logps_lowmem(x.ref_hidden, weight, labels)
            x.ref_kl_logps = ref_seq_logps.roll(1)
            x.kl_logps = x.ref_kl_logps + torch.randn(shape.rows, generator=g).abs()
            if ref == "policy":
                x.ref_logps = ref_seq_logps
        elif record.needs_reference and ref == "policy":
            x.ref_logps = _sequence_logps_lowmem(hidden, weight, labels) + noise
        if record.needs_reference and ref == "zero":
            x.ref_logps = torch.zeros(shape.rows)
    hidden.requires_grad_(True)
    weight.requires_grad_(head == "trained")
    return x


# ----------------------------------------------------------------------------------------------------
# Steps


class Step:
    """Zero-argument callable: one forward + backward. `result()` returns the last step's output and
    gradients (for correctness checks); `projected_tokens` is how many tokens the variant projects
    through the head; `note` says anything the table should carry."""

    def __init__(self, variant, inputs, fn, projected_tokens, note=""):
        self.variant = variant
        self.inputs = inputs
        self._fn = fn
        self.projected_tokens = projected_tokens
        self.note = note
        self._out = None

    def __call__(self):
        # Fresh gradients every step, as `optimizer.zero_grad(set_to_none=True)` leaves them.
        if self.inputs is not None:
            self.inputs.hidden.grad = None
            self.inputs.weight.grad = None
        self._out = self._fn()

    def result(self) -> dict[str, torch.Tensor]:
        if self.inputs is None:
            raise TypeError(f"{self.variant} computes no log-probs to check")
        if self._out is None:
            self()
        res = {"out": self._out.detach()}
        res["grad_hidden"] = self.inputs.hidden.grad
        if self.inputs.weight.requires_grad:
            res["grad_weight"] = self.inputs.weight.grad
        return res


def _bare_gemms(op, shape, head, all_completion):
    from pyprefopt.fused_linear_logprobs import tile_sizes

    inputs = make_inputs(op, shape, head, all_completion)
    n = inputs.projected_tokens
    g = torch.Generator().manual_seed(1)
    h = torch.randn(n, shape.h, generator=g)
    w = inputs.weight.detach()
    # Preallocated and touched now, so no step pays page faults on fresh gradient outputs.
    dh = torch.zeros(n, shape.h)
    dw = torch.zeros(shape.v, shape.h) if head == "trained" else None
    del inputs
    # The op's token blocks and vocabulary tiles (a logits tile is at most CPU_TILE_BYTES, which the allocator
    # reuses), through pyprefopt.cpu_linear like the op: oneDNN for large fp32 products (torch.mm's MKL runs
    # at half speed on AMD CPUs; one big [N, V] GEMM pays for a 100+ MiB output or, with oneDNN, its copy).
    block, tile = tile_sizes(n, shape.v)

    @torch.no_grad()
    def fn():
        for t0 in range(0, n, block):
            hb = h[t0 : t0 + block]
            for v0 in range(0, shape.v, tile):
                wt = w[v0 : v0 + tile]
                z = cpu_linear.linear(hb, wt)
                cpu_linear.addmm_(dh[t0 : t0 + block], z, wt.T)
                if dw is not None:
                    cpu_linear.addmm_(dw[v0 : v0 + tile], z.T, hb.T)
        return dh

    gemms = "2 GEMMs" if dw is None else "3 GEMMs"
    return Step("bare_gemms", None, fn, n, note=f"{gemms} in the op's tiles (pyprefopt.cpu_linear) on the {n} "
                                                f"tokens pyprefopt projects")


def _naive(op, shape, head, all_completion, ref="policy"):
    x = make_inputs(op, shape, head, all_completion, ref=ref)
    if op == "primitive":

        def fn():
            out = reference_logprobs(x.hidden, x.weight, x.labels, ignore_index=IGNORE_INDEX)
            out.backward(x.grad_out)
            return out

    else:
        kwargs = dict(x.loss_kwargs(), **HPARAMS[x.method])

        def fn():
            loss, _ = reference_preference_loss(
                x.method, x.hidden, x.weight, x.labels, ignore_index=IGNORE_INDEX, **kwargs
            )
            loss.backward()
            return loss

    return Step("naive", x, fn, x.labels.numel(), note="materialised [N, V] logits")


def _pyprefopt(op, shape, head, all_completion):
    x = make_inputs(op, shape, head, all_completion)
    if op == "primitive":

        def fn():
            out = pyprefopt.fused_linear_logprobs(x.hidden, x.weight, x.labels, ignore_index=IGNORE_INDEX)
            out.backward(x.grad_out)
            return out

    else:
        module = pyprefopt.FusedLinearPreferenceLoss(x.method, ignore_index=IGNORE_INDEX, **HPARAMS[x.method])
        kwargs = x.loss_kwargs()

        def fn():
            loss, _ = module(x.hidden, x.weight, x.labels, **kwargs)
            loss.backward()
            return loss

    return Step("pyprefopt", x, fn, x.projected_tokens)


def _loss_of_sequence_logps(x: Inputs, lengths: torch.Tensor):
    """`seq_logps [B] -> loss`: x's method through `pyprefopt.losses.from_sequence_stats`, as
    `FusedLinearPreferenceLoss` calls it (trl's variant feeds it TRL's log-probs)."""
    kwargs = x.loss_kwargs()
    return lambda seq: losses.from_sequence_stats(x.method, seq, lengths, **kwargs, **HPARAMS[x.method])[0]


def _trl(op, shape, head, all_completion):
    # `trl.trainer.utils` is what TRL's trainers use, and the function's backward imports it anyway:
    # import it here so that the (slow) import is not charged to the first call.
    from trl.trainer import utils as trl_utils

    chunked = trl_utils._ChunkedLogProbFunction
    chunk_size = trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    x = make_inputs(op, shape, head, all_completion)

    def token_logps(hidden, labels):
        # add_fused_lm_head on a device without Triton: every position, labels clamped, zeroed after.
        mask = labels != IGNORE_INDEX
        logps = chunked.apply(
            hidden.reshape(-1, hidden.shape[-1]),
            x.weight,
            None,
            labels.clamp(min=0).reshape(-1),
            1.0,  # temperature
            chunk_size,
            None,  # final_logit_softcapping
            1.0,  # logit_scale
            ("log_probs",),
        )[0]
        return logps.view(mask.shape).masked_fill(~mask, 0)

    note = f"chunk_size={chunk_size}, all positions projected"
    if op == "primitive":

        def fn():
            out = token_logps(x.hidden, x.labels)
            out.backward(x.grad_out)
            return out

    else:
        loss_of = _loss_of_sequence_logps(x, (x.labels != IGNORE_INDEX).sum(-1))
        note += f"; + pyprefopt.losses.{x.method}_loss"

        def fn():
            loss = loss_of(token_logps(x.hidden, x.labels).sum(-1))
            loss.backward()
            return loss

    return Step("trl", x, fn, x.labels.numel(), note=note)


def _liger(op, shape, head, all_completion):
    if op == "primitive":
        raise ValueError("the liger variant exists for the loss ops only")
    if reason := unavailable_reason(op, "liger"):
        raise ValueError(reason)
    if op == "dpo-loss":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        x = make_inputs(op, shape, head, all_completion, ref="zero")
        loss_fn = LigerFusedLinearDPOLoss(
            ignore_index=IGNORE_INDEX,
            beta=BETA,
            compute_nll_loss=False,
            compiled=True,
            use_ref_model=False,
            average_log_prob=False,
            chunk_size=1,
            loss_type="sigmoid",
        )

        def forward():
            return loss_fn(x.weight, x.hidden, x.labels)[0]

        note = "torch.compile, 1 pair/chunk, reference-free"
    elif op == "cpo-loss":
        from liger_kernel.chunked_loss import LigerFusedLinearCPOLoss

        x = make_inputs(op, shape, head, all_completion)
        loss_fn = LigerFusedLinearCPOLoss(
            ignore_index=IGNORE_INDEX,
            beta=BETA,
            alpha=CPO_ALPHA,
            label_smoothing=0.0,
            compute_nll_loss=True,
            compiled=True,
            average_log_prob=False,
            chunk_size=1,
        )

        def forward():
            return loss_fn(x.weight, x.hidden, x.labels)[0]

        note = f"torch.compile, 1 pair/chunk, alpha={CPO_ALPHA:g} (NLL on chosen)"
    elif op == "kto-loss":
        from liger_kernel.chunked_loss import LigerFusedLinearKTOLoss

        x = make_inputs(op, shape, head, all_completion)
        loss_fn = LigerFusedLinearKTOLoss(
            ignore_index=IGNORE_INDEX,
            beta=BETA,
            compiled=True,
            use_ref_model=True,
            average_log_prob=False,
            chunk_size=1,
        )
        kl = losses.kto_kl(x.kl_logps, x.ref_kl_logps)
        ref_weight = x.weight.detach()  # the same storage: the reference head is the frozen policy head

        def forward():
            # Note the argument order: KTO takes the input first, DPO and CPO the weight first.
            return loss_fn(x.hidden, x.weight, x.labels, preference_labels=x.desirable,
                           ref_input=x.ref_hidden, ref_weight=ref_weight, kl=kl)[0]

        note = ("torch.compile, 1 row/chunk, same precomputed kl; takes no reference log-probs: computes "
                "them from the reference hidden states (use_ref_model=True), +1 no-grad GEMM over N tokens")
    elif op == "sft-loss":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        x = make_inputs(op, shape, head, all_completion)
        loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="mean")

        def forward():
            return loss_fn(x.weight, x.hidden.view(-1, shape.h), x.labels.view(-1))

        note = "fused linear cross-entropy (Triton), mean over non-ignored tokens"
    else:
        raise ValueError(f"no liger variant for {op!r}")

    def fn():
        loss = forward()
        loss.backward()
        return loss

    return Step("liger", x, fn, x.labels.numel(), note=note)


_BUILDERS = {
    "bare_gemms": _bare_gemms,
    "naive": _naive,
    "pyprefopt": _pyprefopt,
    "trl": _trl,
    "liger": _liger,
}


def build(op: str, variant: str, shape: Shape, head: str, all_completion: bool = False) -> Step:
    """Inputs for (op, shape, head) and the variant's zero-argument forward+backward `Step`."""
    if variant not in OP_VARIANTS.get(op, ()):
        raise ValueError(f"no variant {variant!r} for op {op!r}; expected one of {OP_VARIANTS.get(op)}")
    return _BUILDERS[variant](op, shape, head, all_completion)


# ----------------------------------------------------------------------------------------------------
# Correctness


def naive_result_for(step: Step, all_completion: bool = False) -> dict[str, torch.Tensor]:
    """The naive reference on the same inputs as `step` (the same reference mode: zero reference
    log-probs for liger's DPO)."""
    x = step.inputs
    return _naive(x.op, x.shape, x.head, all_completion, ref=x.ref).result()


# (rtol, atol as a fraction of the reference's largest entry) per op. The losses get 5x more: their
# sequence log-probs are sums of hundreds of ~-10 terms whose fp32 rounding depends on the order
# (~1e-3 absolute at T=256), and differences near 0 (DPO's (pi - ref) margins, KTO's pi - ref - z0)
# amplify that in the loss and its gradients. A broken kernel is off by far more than either.
TOLERANCES = {"primitive": (1e-4, 1e-5)}
TOLERANCES.update({op: (5e-4, 5e-5) for op in LOSS_OPS})


def assert_matches_naive(step: Step, all_completion: bool = False):
    """One forward+backward of `step` against the naive reference on the same inputs (fp32).

    Tensors are compared with an absolute tolerance scaled by their largest entry, since a sum over
    thousands of fp32 terms carries an error relative to its magnitude, not to each entry's.
    """
    rtol, atol_scale = TOLERANCES[step.inputs.op]
    got = step.result()
    want = naive_result_for(step, all_completion)
    assert got.keys() == want.keys(), (sorted(got), sorted(want))
    for name, ref in want.items():
        val = got[name]
        assert val is not None and ref is not None, f"{step.variant}: {name} is missing"
        atol = atol_scale * float(ref.abs().max()) + 1e-12
        torch.testing.assert_close(
            val.float(), ref.float(), rtol=rtol, atol=atol, msg=lambda m, n=name: f"{step.variant} {n}: {m}"
        )
