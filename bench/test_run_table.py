"""run_table.py's bookkeeping: the interleaved rounds, the per-round ratios and the merge of the time
pass into the memory pass's rows (no subprocess, quick shapes)."""

import argparse

import pytest

from bench import run_table as R
from bench import variants as V


def _group(**kw):
    g = dict(kind="time", op="primitive", shape="default", head="frozen", all_completion=False, quick=True,
             warmup=1, rounds=3, variants=["bare_gemms", "naive", "pyprefopt"])
    g.update(kw)
    return g


def _memory_row(variant, **kw):
    row = dict(kind="memory", op="primitive", variant=variant, shape="default", head="frozen", status="ok",
               first_call_ms=9.0, peak_extra_mib=10.0, peak_is_upper_bound=False, median_ms=5.0, times_ms=[5.0],
               projected_tokens=256, shape_dims=dict(n=256, h=128, v=4096, rows=4, seq_len=64), note="")
    row.update(kw)
    return row


def test_run_group_rotates_and_times_every_variant():
    res = R.run_group(_group())
    assert res["status"] == "ok" and not res["errors"]
    assert res["round_order"] == [["bare_gemms", "naive", "pyprefopt"], ["naive", "pyprefopt", "bare_gemms"],
                                  ["pyprefopt", "bare_gemms", "naive"]]
    assert all(set(t) == {"bare_gemms", "naive", "pyprefopt"} for t in res["round_times_ms"])
    assert set(res["first_call_ms"]) == {"bare_gemms", "naive", "pyprefopt"}


def test_run_group_drops_a_failing_variant():
    res = R.run_group(_group(variants=["bare_gemms", "liger", "pyprefopt"], rounds=2))  # no liger primitive
    assert "liger" in res["errors"] and res["errors"]["liger"].startswith("build:")
    assert all(set(t) == {"bare_gemms", "pyprefopt"} for t in res["round_times_ms"])


def test_ratios_are_medians_of_per_round_ratios():
    # The CPU slows down 3x in the last round: per-round ratios stay 2, ratios of medians would not.
    rounds = [{"bare_gemms": 1.0, "pyprefopt": 2.0}, {"bare_gemms": 1.0, "pyprefopt": 2.0},
              {"bare_gemms": 3.0, "pyprefopt": 6.0}, {"pyprefopt": 1.0}]
    assert R._median_ratio(rounds, "pyprefopt", "bare_gemms") == 2.0
    assert R._median_ratio(rounds, "bare_gemms", "pyprefopt") == 0.5
    assert R._median_ratio(rounds, "naive", "bare_gemms") is None


def test_merge_and_render():
    group = dict(_group(variants=["bare_gemms", "pyprefopt", "trl"]), status="ok",
                 first_call_ms={"bare_gemms": 1.0}, errors={"trl": "round 1: RuntimeError: boom"},
                 round_times_ms=[{"bare_gemms": 1.0, "pyprefopt": 1.5, "trl": 4.0},
                                 {"bare_gemms": 2.0, "pyprefopt": 2.0}])
    rows = [_memory_row("bare_gemms"), _memory_row("pyprefopt", peak_extra_mib=32.5), _memory_row("trl"),
            dict(_memory_row("liger"), status="not installed", error="no liger")]
    R.merge_time(rows, [group])
    bare, ours, trl, liger = rows
    assert bare["median_ms"] == 1.5 and bare["x_bare"] == 1.0 and bare["isolated_median_ms"] == 5.0
    assert ours["round_times_ms"] == [1.5, 2.0] and ours["x_bare"] == 1.25 and ours["x_pyprefopt"] == 1.0
    assert trl["time_status"] == "error" and "median_ms" not in trl
    assert "time_status" not in liger
    args = argparse.Namespace(quick=True, warmup=1, rounds=2, steps=2, isolation="fork", all_completion=False)
    machine = {k: "x" for k in ("cpu", "logical_cpus", "affinity_cpus", "torch_threads", "torch", "python",
                                "pyprefopt", "git", "trl", "liger-kernel")}
    table = R.render_table(rows, machine, args).splitlines()
    header = next(line for line in table if line.startswith("| variant"))
    assert "| x bare | x pyprefopt |" in header
    width = header.count("|")
    body = [line for line in table if line.startswith("| ") and line is not header]
    assert len(body) == 4 and all(line.count("|") == width for line in body)
    assert "| 1.8 | 1.25 | 1.00 |" in body[1]  # median 1.75 ms, shown to 0.1 ms
    assert "| 32.5 | 22.5 |" in body[1]  # peak extra, and over bare_gemms' 10 MiB
    assert "| 10.0 |  |" in body[0]  # the floor has nothing to be over
    assert "time: round 1: RuntimeError: boom" in body[2]


def _planned(argv):
    args = R.parse_args(argv)
    cases, fixed = R.plan_cases(args)
    return args, cases, fixed


def test_default_plan_is_primitive_and_dpo_at_every_shape():
    _, cases, fixed = _planned([])
    assert {c["op"] for c in cases + fixed} == {"primitive", "dpo-loss"}
    assert {(c["op"], c["shape"]) for c in cases} == {(op, s.name) for op in V.DEFAULT_OPS for s in V.FULL_SHAPES}


def test_on_request_shape_runs_only_when_named():
    _, cases, _ = _planned(["--shapes", "qwen-1pair", "--heads", "trained"])
    assert {c["shape"] for c in cases} == {"qwen-1pair"}
    assert R._shape_by_name("qwen-1pair", False).rows == 2
    _, cases, _ = _planned(["--shapes", "qwen", "qwen-1pair"])
    assert {c["shape"] for c in cases} == {"qwen", "qwen-1pair"}
    for argv in (["--quick", "--shapes", "qwen-1pair"], ["--shapes", "qwen2"]):
        with pytest.raises(SystemExit):
            R.parse_args(argv)


def test_all_losses_adds_the_other_losses_at_the_default_shape_only():
    _, base, _ = _planned([])
    args, cases, fixed = _planned(["--all-losses"])
    assert args.extra_ops == list(V.EXTRA_LOSS_OPS)
    # The default run's cases are untouched.
    assert [c for c in cases if c["op"] in V.DEFAULT_OPS] == base
    extra = [c for c in cases + fixed if c["op"] in V.EXTRA_LOSS_OPS]
    assert {c["op"] for c in extra} == set(V.EXTRA_LOSS_OPS)
    assert {c["shape"] for c in extra} == set(V.EXTRA_LOSS_SHAPES)
    for op in V.EXTRA_LOSS_OPS:  # every variant is a row: run, or a fixed row saying why not
        assert {(c["variant"], c["head"]) for c in extra if c["op"] == op} == {
            (v, h) for v in V.VARIANTS for h in V.HEADS}
    if V.peer_installed("liger"):
        ipo = [r for r in fixed if r["op"] == "ipo-loss" and r["variant"] == "liger"]
        assert len(ipo) == 2 and all(r["status"] == "n/a" and "Liger has no IPO loss" in r["error"] for r in ipo)
    # Named in --ops: every shape.
    _, cases, _ = _planned(["--ops", "kto-loss", "--variants", "naive"])
    assert {c["shape"] for c in cases} == {s.name for s in V.FULL_SHAPES}


def test_quick_all_losses_restricts_liger():
    _, cases, fixed = _planned(["--quick", "--all-losses"])
    liger = {(c["op"], c["shape"], c["head"]) for c in cases if c["variant"] == "liger"}
    assert all(shape == V.QUICK_SHAPES[0].name for _, shape, _ in liger)
    assert all(head == "frozen" for op, _, head in liger if op in V.EXTRA_LOSS_OPS)
    assert all(r["status"] in ("skipped", "n/a", "not installed") for r in fixed)
