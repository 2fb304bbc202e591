"""pytest-benchmark: `pyprefopt.FusedLinearPreferenceLoss("dpo")` (forward + backward, fp32, CPU) against
the bare GEMMs on the tokens it projects, the naive materialised-logits reference, TRL's chunked
log-probs + the same DPO maths, and Liger-Kernel's chunked DPO loss.

The batch: B rows of T tokens, chosen rows first, the first quarter of every row's labels -100.

    python -m pytest bench/bench_fused_linear_preference_loss.py          # quick shapes (default, CI)
    PYPREFOPT_BENCH_QUICK=0 python -m pytest bench -m heavy               # full shapes

pyprefopt, trl, liger: checked against the naive reference (fp32 allclose, loss and gradients) first.
In quick mode Liger (torch.compile, 7-20 s per shape and head mode) runs on the first shape only.
"""

import pytest
from benchlib import run_variant, shape_params

import variants as V


@pytest.mark.parametrize("head", V.HEADS)
@pytest.mark.parametrize("variant", V.OP_VARIANTS["dpo-loss"])
@pytest.mark.parametrize("shape", shape_params())
def test_fused_linear_preference_loss(benchmark, shape, variant, head):
    run_variant(benchmark, "dpo-loss", variant, shape, head)
