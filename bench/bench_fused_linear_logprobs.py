"""pytest-benchmark: `pyprefopt.fused_linear_logprobs` (forward + backward, fp32, CPU) against the bare
GEMMs it needs, the naive materialised-logits reference and TRL's chunked log-prob function.

    python -m pytest bench/bench_fused_linear_logprobs.py                 # quick shapes (default, CI)
    PYPREFOPT_BENCH_QUICK=0 python -m pytest bench -m heavy               # full shapes

pyprefopt, trl: checked against the naive reference (fp32 allclose, log-probs and gradients) first.
"""

import pytest

from bench import variants as V
from bench.benchlib import run_variant, shape_params


@pytest.mark.parametrize("head", V.HEADS)
@pytest.mark.parametrize("variant", V.OP_VARIANTS["primitive"])
@pytest.mark.parametrize("shape", shape_params())
def test_fused_linear_logprobs(benchmark, shape, variant, head):
    run_variant(benchmark, "primitive", variant, shape, head)
