"""What the pytest-benchmark files (bench_*.py) share: shapes, rounds and the check-then-time runner.
The variants themselves live in variants.py (shared with run_table.py)."""

from __future__ import annotations

import pytest

from bench import variants as V

QUICK = V.env_quick()
ROUNDS = 3 if QUICK else 5
# Checked against the naive reference before they are timed (bare GEMMs compute no log-probs; naive
# is the reference).
CHECKED = ("pyprefopt", "trl", "liger")


def shape_params():
    """The benchmark shapes, all marked heavy: full size with PYPREFOPT_BENCH_QUICK=0, else the quick
    stand-ins (the default, and what CI runs with PYPREFOPT_BENCH_QUICK=1)."""
    return [pytest.param(s, id=f"{s.name}-{s.label()}", marks=pytest.mark.heavy) for s in V.shapes(QUICK)]


def loss_shape_params():
    """(op, shape) for every loss op at its shapes (`V.op_shapes`: DPO at every shape, the other
    losses at the default one, as `run_table.py --all-losses`), all marked heavy."""
    return [pytest.param(op, s, id=f"{op}-{s.name}-{s.label()}", marks=pytest.mark.heavy)
            for op in V.LOSS_OPS for s in V.op_shapes(op, QUICK)]


def run_variant(benchmark, op, variant, shape, head, all_completion=False):
    """Build the case, check it once against the naive reference (fp32 allclose of the output and
    every gradient), then time its forward+backward with pytest-benchmark."""
    if variant in V.PEER_PACKAGES:
        pytest.importorskip(V.PEER_PACKAGES[variant])
    if reason := V.unavailable_reason(op, variant):
        pytest.skip(reason)
    if QUICK and (reason := V.quick_skip_reason(op, variant, shape, head)):
        pytest.skip(reason)
    step = V.build(op, variant, shape, head, all_completion)
    if variant in CHECKED:
        V.assert_matches_naive(step, all_completion)
    benchmark.group = f"{op} {shape.name} {shape.label()} {head}" + (" all-completion" if all_completion else "")
    benchmark.extra_info.update(
        op=op,
        variant=variant,
        head=head,
        shape=shape.name,
        n=shape.n,
        h=shape.h,
        v=shape.v,
        rows=shape.rows if op != "primitive" else None,
        seq_len=shape.seq_len if op != "primitive" else None,
        all_completion=all_completion,
        projected_tokens=step.projected_tokens,
        quick=QUICK,
        note=step.note,
    )
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    return step
