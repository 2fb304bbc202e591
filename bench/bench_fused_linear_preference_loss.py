"""pytest-benchmark: `pyprefopt.FusedLinearPreferenceLoss(method)` for the five methods (SFT, DPO, IPO,
CPO, KTO; forward + backward, fp32, CPU) against the bare GEMMs on the tokens it projects, the naive
materialised-logits reference, TRL's chunked log-probs + the same pyprefopt.losses maths, and
Liger-Kernel's chunked loss where it has one (see variants.py for each method's batch and Liger's
configuration).

The batch: B rows of T tokens (chosen rows first for DPO/IPO/CPO, the first half desirable for KTO),
the first quarter of every row's labels -100. DPO runs at every shape, the other losses at the default
one (as `run_table.py --all-losses`).

    python -m pytest bench/bench_fused_linear_preference_loss.py          # quick shapes (default, CI)
    python -m pytest bench/bench_fused_linear_preference_loss.py -k kto   # one method
    PYPREFOPT_BENCH_QUICK=0 python -m pytest bench -m heavy               # full shapes

pyprefopt, trl, liger: checked against the naive reference (fp32 allclose, loss and gradients) first.
Skipped with the reason: Liger's IPO (it has none) and SFT (Triton kernels, no CPU driver here); in
quick mode Liger (torch.compile, 7-20 s per loss, shape and head mode) runs on the first shape only,
and for the losses beyond DPO with the frozen head only.
"""

import pytest

from bench import variants as V
from bench.benchlib import loss_shape_params, run_variant


@pytest.mark.parametrize("head", V.HEADS)
@pytest.mark.parametrize("variant", V.VARIANTS)
@pytest.mark.parametrize(("op", "shape"), loss_shape_params())
def test_fused_linear_preference_loss(benchmark, op, shape, variant, head):
    run_variant(benchmark, op, variant, shape, head)
