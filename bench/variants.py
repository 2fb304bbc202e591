"""Benchmark variants of `fused_linear_logprobs` (the primitive) and `FusedLinearPreferenceLoss("dpo")`.

One place that builds every variant: `build(op, variant, shape, head, all_completion)` makes the inputs
and returns a `Step`, a zero-argument callable that runs one forward + backward (fp32, CPU). Both
`run_table.py` and the pytest-benchmark files use it, so they time exactly the same code.

Ops:
- "primitive": per-token log-probs of N tokens (every label valid), backward with a fixed random
  upstream gradient.
- "dpo-loss": B rows of length T (chosen rows first, rejected second), N = B*T tokens, DPO sigmoid loss
  (beta=0.1) on summed completion log-probs against fixed reference log-probs. By default the first
  quarter of each row's labels is -100 (the prompt); `all_completion=True` masks nothing.

Head modes: "frozen" (lm_head weight requires_grad=False, hidden requires grad: the LoRA case) and
"trained" (the weight requires grad too).

Variants:
- bare_gemms: the GEMMs the op needs and nothing else, on preallocated outputs (`out=`): frozen = 2
  (`Z = h @ W.T` [n,V], `dH = Z @ W` [n,H]), trained = 3 (plus `dW = Z.T @ h` [V,H]), with n the number
  of tokens pyprefopt projects (all N for the primitive, the non-ignored ones for the loss).
- naive: `pyprefopt.reference` (materialised logits, log_softmax, gather) + autograd.
- pyprefopt: `fused_linear_logprobs` / `FusedLinearPreferenceLoss("dpo")`.
- trl: `trl.trainer.utils._ChunkedLogProbFunction`, called as `add_fused_lm_head` calls it on a
  device without Triton (every position projected, labels clamped to >= 0, ignored ones zeroed after);
  for the loss its per-token log-probs are summed per row and fed to `pyprefopt.losses.dpo_loss`.
- liger: `liger_kernel.chunked_loss.LigerFusedLinearDPOLoss` (torch.compile'd chunks, one pair per
  chunk), loss op only. Liger takes no precomputed reference log-probs (only a reference model's
  hidden states), so it runs reference-free (`use_ref_model=False`, i.e. reference log-probs = 0):
  the same GEMMs as the others; its correctness check compares against the naive loss with zero
  reference log-probs.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass

import torch

import pyprefopt
from pyprefopt import losses
from pyprefopt.reference import reference_logprobs, reference_preference_loss

OPS = ("primitive", "dpo-loss")
HEADS = ("frozen", "trained")
VARIANTS = ("bare_gemms", "naive", "pyprefopt", "trl", "liger")
# Which variants exist for which op (Liger has no bare log-prob primitive).
OP_VARIANTS = {
    "primitive": ("bare_gemms", "naive", "pyprefopt", "trl"),
    "dpo-loss": ("bare_gemms", "naive", "pyprefopt", "trl", "liger"),
}
# Python package each peer variant needs.
PEER_PACKAGES = {"trl": "trl", "liger": "liger_kernel"}

IGNORE_INDEX = -100
BETA = 0.1
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


def shapes(quick: bool) -> tuple[Shape, ...]:
    return QUICK_SHAPES if quick else FULL_SHAPES


def env_quick() -> bool:
    """Quick shapes unless PYPREFOPT_BENCH_QUICK is set to 0/false/no (CI sets it to 1)."""
    return os.environ.get("PYPREFOPT_BENCH_QUICK", "1").strip().lower() not in ("0", "false", "no", "off")


def quick_skip_reason(op: str, variant: str, shape: Shape) -> str | None:
    """Why a quick-mode case does not run, or None. Liger's torch.compile costs 7-20 s per new
    (vocabulary, head mode) on a 2-core CPU, so quick mode compiles it for the first quick shape only."""
    if variant == "liger" and shape.name != QUICK_SHAPES[0].name:
        return "skipped in quick mode: torch.compile costs 7-20 s a case; runs at full shapes"
    return None


def peer_installed(variant: str) -> bool:
    package = PEER_PACKAGES.get(variant)
    return package is None or importlib.util.find_spec(package) is not None


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
    ref_logps: torch.Tensor | None  # [B] reference log-probs of the DPO batch

    @property
    def projected_tokens(self) -> int:
        """Tokens pyprefopt projects: the non-ignored ones."""
        return int((self.labels != IGNORE_INDEX).sum())


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
    """Deterministic inputs: the same (op, shape, head, all_completion, seed) gives the same tensors.

    ref (loss only): "policy" = the policy's own log-probs at these inputs plus N(0, 1) noise (a DPO
    margin near 0, so the loss has a sizeable gradient); "zero" = reference-free.
    """
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    g = torch.Generator().manual_seed(seed)
    lead = (shape.n,) if op == "primitive" else (shape.rows, shape.seq_len)
    hidden = torch.randn(*lead, shape.h, generator=g)
    # In place: `randn(...) * s` would double the peak while building.
    weight = torch.randn(shape.v, shape.h, generator=g).mul_(LOGIT_STD / math.sqrt(shape.h))
    labels = torch.randint(0, shape.v, lead, generator=g)
    grad_out = ref_logps = None
    if op == "primitive":
        grad_out = torch.randn(shape.n, generator=g)
    else:
        if not all_completion:
            labels[:, : shape.seq_len // 4] = IGNORE_INDEX
        noise = torch.randn(shape.rows, generator=g)
        if ref == "policy":
            ref_logps = _sequence_logps_lowmem(hidden, weight, labels) + noise
        elif ref == "zero":
            ref_logps = torch.zeros(shape.rows)
        else:
            raise ValueError(f"ref must be 'policy' or 'zero', got {ref!r}")
    hidden.requires_grad_(True)
    weight.requires_grad_(head == "trained")
    return Inputs(op, shape, head, hidden, weight, labels, grad_out, ref_logps)


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
    inputs = make_inputs(op, shape, head, all_completion)
    n = inputs.projected_tokens
    g = torch.Generator().manual_seed(1)
    h = torch.randn(n, shape.h, generator=g)
    w = inputs.weight.detach()
    # Preallocated and touched now, so no step pays page faults on fresh outputs.
    z = torch.zeros(n, shape.v)
    dh = torch.zeros(n, shape.h)
    dw = torch.zeros(shape.v, shape.h) if head == "trained" else None
    del inputs

    @torch.no_grad()
    def fn():
        torch.mm(h, w.T, out=z)
        torch.mm(z, w, out=dh)
        if dw is not None:
            torch.mm(z.T, h, out=dw)
        return dh

    gemms = "2 GEMMs" if dw is None else "3 GEMMs"
    return Step("bare_gemms", None, fn, n, note=f"{gemms} on the {n} tokens pyprefopt projects")


def _naive(op, shape, head, all_completion, ref="policy"):
    x = make_inputs(op, shape, head, all_completion, ref=ref)
    if op == "primitive":

        def fn():
            out = reference_logprobs(x.hidden, x.weight, x.labels, ignore_index=IGNORE_INDEX)
            out.backward(x.grad_out)
            return out

    else:

        def fn():
            loss, _ = reference_preference_loss(
                "dpo", x.hidden, x.weight, x.labels, ignore_index=IGNORE_INDEX, ref_logps=x.ref_logps, beta=BETA
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
        module = pyprefopt.FusedLinearPreferenceLoss("dpo", ignore_index=IGNORE_INDEX, beta=BETA)

        def fn():
            loss, _ = module(x.hidden, x.weight, x.labels, ref_logps=x.ref_logps)
            loss.backward()
            return loss

    return Step("pyprefopt", x, fn, x.projected_tokens)


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

    if op == "primitive":

        def fn():
            out = token_logps(x.hidden, x.labels)
            out.backward(x.grad_out)
            return out

    else:

        def fn():
            seq = token_logps(x.hidden, x.labels).sum(-1)
            chosen, rejected = seq.chunk(2)
            ref_chosen, ref_rejected = x.ref_logps.chunk(2)
            loss, _ = losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=BETA)
            loss.backward()
            return loss

    return Step("trl", x, fn, x.labels.numel(), note=f"chunk_size={chunk_size}, all positions projected")


def _liger(op, shape, head, all_completion):
    if op != "dpo-loss":
        raise ValueError("the liger variant exists for the dpo-loss op only")
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

    def fn():
        loss, _ = loss_fn(x.weight, x.hidden, x.labels)
        loss.backward()
        return loss

    return Step("liger", x, fn, x.labels.numel(), note="torch.compile, 1 pair/chunk, reference-free")


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
    """The naive reference on the same inputs as `step` (zero reference log-probs for liger)."""
    x = step.inputs
    ref = "zero" if step.variant == "liger" else "policy"
    return _naive(x.op, x.shape, x.head, all_completion, ref=ref).result()


# (rtol, atol as a fraction of the reference's largest entry) per op. The loss gets 5x more: its
# sequence log-probs are sums of hundreds of ~-10 terms whose fp32 rounding depends on the order
# (~1e-3 absolute at T=256), and DPO's (pi - ref) differences near 0 amplify that in the loss and
# its gradients. A broken kernel is off by far more than either.
TOLERANCES = {"primitive": (1e-4, 1e-5), "dpo-loss": (5e-4, 5e-5)}


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
