"""Time and memory table of `fused_linear_logprobs` and `FusedLinearPreferenceLoss(method)` vs their peers.

    python -m bench.run_table                      # primitive + DPO at both full shapes, fresh interpreters
    python -m bench.run_table --all-losses         # + SFT, IPO, CPO, KTO at the default shape (N2048 H1024 V32000)
    python -m bench.run_table --quick              # small shapes, 2 rounds: a < 90 s smoke run
    python -m bench.run_table --quick --all-losses # the same with every loss: < 120 s
    python -m bench.run_table --all-completion     # loss batches without prompt mask
    python -m bench.run_table --json bench/results/table.json

Timing is interleaved, memory isolated. The CPU this runs on drifts: the same GEMM can take 1250 ms in
one process and 1800 ms a few minutes later, so times taken in separate processes at different moments
give ratios (to the bare-GEMM floor, to a peer) that are off by up to ~1.5x. Peak memory, on the other
hand, is a per-process high-water mark and needs a process of its own. So every table comes from two
passes:

- Memory pass (`peak extra MiB`, `first-call ms`): every (op, variant, shape, head) case runs in a fresh
  process, which builds the inputs, reads its RSS, runs one first call (timed on its own: it includes
  torch.compile for Liger), `--warmup - 1` more untimed steps and `--steps` timed steps, and reports
  `ru_maxrss` after the steps minus the RSS read before the first call ("peak extra": what the op adds
  on top of its inputs, gradients included). The median of its own steps is kept in the JSON
  (`isolated_median_ms`) but is not what the table shows. pyprefopt, trl and liger are checked against
  the naive reference there, after the steps.
- Time pass (`median ms`, `x bare`, `x pyprefopt`): every (op, shape, head) group runs in one fresh
  process, which builds every variant of the group (inputs of all of them first, the big naive ones
  included), runs each variant's first call and warm-up steps (Liger's torch.compile happens here),
  then `--rounds` rounds; round k runs every variant once, starting at the k-th (a fixed rotation: with
  as many rounds as variants, each variant takes every position once), and times each step. `median
  ms` is a variant's median over the rounds; `x bare` and `x pyprefopt` are the medians over the rounds
  of the per-round ratios (variant / bare_gemms, variant / pyprefopt in the same round), so a drift of
  the CPU between rounds cancels out of the ratios. This process holds every variant's inputs and
  gradients at once (a few GiB at the full qwen shape); its memory is not measured.

Isolation: `--isolation process` (default) starts `python -m bench.run_table --worker` per case and per
group. `--isolation fork` (default with --quick) starts two workers, which import what the variants
need once (TRL's import alone takes 5-15 s) and fork a fresh child per case and per group: one runs
the torch-only cases, then the trl cases, then the time groups, importing trl and then liger only when
they are first needed; the other the liger cases. So each memory case's child holds the same imports
as a fresh interpreter of its own would (this matters: with TRL imported, Liger's first call imports
less and its peak extra drops by ~40 MiB). The workers never run a torch op, so each child starts
with an unstarted OpenMP pool and a high-water mark equal to its RSS.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

from bench import variants as V
from bench.resident_memory import rss_mib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2**20
CASE_TIMEOUT_S = 1800  # --case-timeout; a forked child that hangs (e.g. in OpenMP) is killed after it


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ----------------------------------------------------------------------------------------------------
# Worker side


def _shape_by_name(name: str, quick: bool) -> V.Shape:
    for s in V.named_shapes(quick):
        if s.name == name:
            return s
    raise ValueError(f"unknown shape {name!r}")


def _import_peer(op: str, variant: str):
    """Import what the variant needs before anything is timed (and, in fork mode, before forking)."""
    import importlib

    for module in V.peer_modules(op, variant):
        importlib.import_module(module)


def _warm_lazy_imports():
    """The first backward with an explicit (non-scalar) gradient imports sympy and torch's symbolic
    shapes (~0.5 s, ~30 MiB): pay it before the first timed call, as a long-running trainer has."""
    import torch

    y = torch.zeros(2, requires_grad=True)
    (y * 2).backward(torch.ones(2))


def run_case(case: dict) -> dict:
    """Build, measure and (optionally) check one case; returns its result row."""
    import torch

    shape = _shape_by_name(case["shape"], case["quick"])
    row = dict(case)
    row.update(shape_dims=dict(n=shape.n, h=shape.h, v=shape.v, rows=shape.rows, seq_len=shape.seq_len))
    row["threads"] = torch.get_num_threads()
    _warm_lazy_imports()
    t = time.perf_counter()
    step = V.build(case["op"], case["variant"], shape, case["head"], case["all_completion"])
    row["build_s"] = time.perf_counter() - t
    row["projected_tokens"] = step.projected_tokens
    row["note"] = step.note
    gc.collect()
    rss0, hw0 = rss_mib() * MiB, max_rss()
    t = time.perf_counter()
    step()
    row["first_call_ms"] = (time.perf_counter() - t) * 1e3
    for _ in range(case["warmup"] - 1):
        step()
    times = []
    for _ in range(case["steps"]):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    hw1 = max_rss()
    row["times_ms"] = times
    row["median_ms"] = statistics.median(times)
    row["rss_before_mib"] = rss0 / MiB
    row["peak_extra_mib"] = (hw1 - rss0) / MiB
    # The steps never raised the process's high-water mark: what building left behind was higher,
    # so peak_extra is only an upper bound.
    row["peak_is_upper_bound"] = hw1 <= hw0
    row["status"] = "ok"
    if case["do_check"] and case["variant"] not in ("bare_gemms", "naive"):
        try:
            V.assert_matches_naive(step, case["all_completion"])
            row["check"] = "ok"
        except AssertionError as e:
            row["check"] = "FAIL"
            row["check_error"] = str(e)[:2000]
    return row


def _ms_since(t: float) -> float:
    return (time.perf_counter() - t) * 1e3


def run_group(group: dict) -> dict:
    """Time every variant of one (op, shape, head) group interleaved, in this one process.

    Builds all the variants' inputs first, then runs each variant's first call and warm-up steps, then
    `rounds` rounds: round k runs the variants once each, starting at the k-th (a fixed rotation),
    timing each step. A variant that raises is dropped from the rounds and reported in `errors`.
    """
    import torch

    shape = _shape_by_name(group["shape"], group["quick"])
    res = dict(group)
    res.update(threads=torch.get_num_threads(), build_s={}, first_call_ms={}, errors={},
               round_order=[], round_times_ms=[])
    _warm_lazy_imports()
    steps = {}
    for v in group["variants"]:
        try:
            t = time.perf_counter()
            steps[v] = V.build(group["op"], v, shape, group["head"], group["all_completion"])
            res["build_s"][v] = time.perf_counter() - t
        except Exception as e:
            res["errors"][v] = f"build: {type(e).__name__}: {e}"
    gc.collect()
    # Warm-up, before any timed round: first calls (torch.compile for liger) and the extra warm-up steps.
    for v in list(steps):
        try:
            t = time.perf_counter()
            steps[v]()
            res["first_call_ms"][v] = _ms_since(t)
            for _ in range(group["warmup"] - 1):
                steps[v]()
        except Exception as e:
            res["errors"][v] = f"warm-up: {type(e).__name__}: {e}"
            del steps[v]
    live = list(steps)
    for k in range(group["rounds"]):
        order = live[k % len(live):] + live[: k % len(live)] if live else []
        times = {}
        for v in order:
            if v not in steps:  # raised in an earlier round
                continue
            try:
                t = time.perf_counter()
                steps[v]()
                times[v] = _ms_since(t)
            except Exception as e:
                res["errors"][v] = f"round {k}: {type(e).__name__}: {e}"
                del steps[v]
        res["round_order"].append(order)
        res["round_times_ms"].append(times)
    res["status"] = "ok"
    return res


def _run_job_safely(job: dict) -> dict:
    try:
        return run_group(job) if job["kind"] == "time" else run_case(job)
    except Exception as e:  # a failing variant is a row, not a crash of the table
        return dict(job, status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())


def _fork_job(job: dict, timeout_s: float) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
        path = f.name
    try:
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                row = _run_job_safely(job)
                with open(path, "w") as out:
                    json.dump(row, out)
                code = 0
            finally:
                os._exit(code)
        deadline = time.monotonic() + timeout_s
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                return dict(job, status="error", error=f"timed out after {timeout_s} s")
            time.sleep(0.05)
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return dict(job, status="error", error=f"child exited with status {status} and no result")
    finally:
        os.unlink(path)


def _job_variants(job: dict) -> list[str]:
    return list(job["variants"]) if job["kind"] == "time" else [job["variant"]]


def _job_timeout(job: dict, case_timeout_s: float) -> float:
    """A group runs every variant of a case and then some: a case's timeout per variant."""
    return case_timeout_s * len(_job_variants(job))


def worker_main(jobs: list[dict], fork: bool, timeout_s: float):
    """Prints one JSON line per job (a memory case or a time group), prefixed so the parent can pick
    them out of other output."""
    if not fork and len(jobs) != 1:
        raise SystemExit("a worker without --fork runs exactly one job")
    # Imports only, no torch op: a forked child must find the OpenMP pool unstarted.
    import torch.fx.experimental.symbolic_shapes  # noqa: F401  (see _warm_lazy_imports)

    for job in jobs:
        # Each job's imports just before it, so a job sees what the jobs before it imported plus its
        # own: the parent orders the jobs so that a memory case sees no other peer's import (what a
        # peer's import brings in is no longer charged to another's first call: TRL's import alone
        # lowers Liger's peak extra by ~40 MiB).
        for variant in _job_variants(job):
            _import_peer(job["op"], variant)
        # Everything alive now (the imports: ~millions of objects with TRL) into the permanent
        # generation: a collection in the job (run_case's, or an automatic one during a timed step)
        # then scans only the job's own objects. Without it each such collection walks all of TRL's
        # objects (~0.5 s on 2 cores, and in a forked child it copies every page they sit on).
        gc.collect()
        gc.freeze()
        row = _fork_job(job, _job_timeout(job, timeout_s)) if fork else _run_job_safely(job)
        print("@@ROW " + json.dumps(row), flush=True)
    gc.unfreeze()  # so that interpreter shutdown frees them as usual


# ----------------------------------------------------------------------------------------------------
# Parent side


def machine_info() -> dict:
    import torch

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    from importlib import metadata

    for dist in ("pyprefopt", "trl", "liger-kernel"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    try:
        info["git"] = subprocess.run(
            ["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    return info


def plan_cases(args) -> tuple[list[dict], list[dict]]:
    """(memory cases to run, rows that will not run: not installed / n/a (the peer has no such loss, or
    cannot run here) / skipped (quick mode))."""
    cases, fixed = [], []
    for op in args.ops:
        # Ops that --all-losses added (not named in --ops) run at V.EXTRA_LOSS_SHAPES only.
        op_shapes = V.op_shapes(op, args.quick) if op in args.extra_ops else V.shapes(args.quick)
        for shape in op_shapes + V.on_request_shapes(args.quick):
            if shape.name not in (args.shapes or [s.name for s in op_shapes]):
                continue
            for head in args.heads:
                for variant in V.OP_VARIANTS[op]:
                    if args.variants and variant not in args.variants:
                        continue
                    case = dict(
                        kind="memory",
                        op=op,
                        variant=variant,
                        shape=shape.name,
                        head=head,
                        all_completion=args.all_completion and op != "primitive",
                        quick=args.quick,
                        steps=args.steps,
                        warmup=args.warmup,
                        do_check=args.check,
                    )
                    dims = dict(n=shape.n, h=shape.h, v=shape.v, rows=shape.rows, seq_len=shape.seq_len)
                    if not V.peer_installed(variant):
                        fixed.append(dict(case, shape_dims=dims, status="not installed",
                                          error=f"python package {V.PEER_PACKAGES[variant]!r} is not installed"))
                    elif reason := V.unavailable_reason(op, variant):
                        fixed.append(dict(case, shape_dims=dims, status="n/a", error=reason))
                    elif args.quick and (reason := V.quick_skip_reason(op, variant, shape, head)):
                        fixed.append(dict(case, shape_dims=dims, status="skipped", error=reason))
                    else:
                        cases.append(case)
    return cases, fixed


def plan_groups(cases: list[dict], args) -> list[dict]:
    """One time group per (op, shape, head): the variants of the memory cases, in table order."""
    groups = {}
    for c in cases:
        g = groups.setdefault(_key(c), dict(
            kind="time", op=c["op"], shape=c["shape"], head=c["head"], all_completion=c["all_completion"],
            quick=c["quick"], warmup=args.warmup, rounds=args.rounds, variants=[]))
        g["variants"].append(c["variant"])
    return list(groups.values())


def _job_id(job: dict) -> tuple:
    return (job["kind"], job["op"], job.get("variant"), job["shape"], job["head"])


def _spawn(jobs: list[dict], fork: bool, log, timeout_s: float) -> list[dict]:
    cmd = [sys.executable, "-m", "bench.run_table", "--worker", json.dumps(jobs), "--case-timeout", str(timeout_s)]
    if fork:
        cmd.append("--fork")
    timeout = sum(_job_timeout(j, timeout_s) for j in jobs) + 120
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        rows = [dict(j, status="error", error=f"worker timed out after {timeout} s") for j in jobs]
    else:
        rows = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("@@ROW ")]
        done = {_job_id(r) for r in rows}
        for j in jobs:
            if _job_id(j) not in done:
                tail = (proc.stderr or "").strip().splitlines()[-5:]
                rows.append(dict(j, status="error", error=f"worker exited {proc.returncode}: " + " | ".join(tail)))
    for r in rows:
        log(r)
    n_cases = sum(j["kind"] == "memory" for j in jobs)
    what = [f"{n_cases} memory case(s)"] if n_cases else []
    what += [f"{len(jobs) - n_cases} time group(s)"] if len(jobs) > n_cases else []
    variants = ", ".join(v for v in V.VARIANTS if any(v in _job_variants(j) for j in jobs))
    print(f"  ({' and '.join(what)} of {variants} in one worker in {time.perf_counter() - t0:.1f} s)",
          file=sys.stderr, flush=True)
    return rows


def _median_ratio(rounds: list[dict], num: str, den: str):
    """Median over the rounds where both ran of times[num] / times[den]."""
    ratios = [t[num] / t[den] for t in rounds if num in t and den in t and t[den] > 0]
    return statistics.median(ratios) if ratios else None


def merge_time(rows: list[dict], groups: list[dict]):
    """Put each time group's interleaved numbers on its variants' rows (in place)."""
    by_key = {_key(g): g for g in groups}
    for r in rows:
        g = by_key.get(_key(r))
        if g is None or r["variant"] not in g.get("variants", ()):
            continue
        if "times_ms" in r:  # the memory process's own steps: kept, but not what the table shows
            r["isolated_times_ms"] = r.pop("times_ms")
            r["isolated_median_ms"] = r.pop("median_ms", None)
        v = r["variant"]
        err = g.get("error") if g["status"] != "ok" else g["errors"].get(v)
        rounds = g.get("round_times_ms", [])
        times = [t[v] for t in rounds if v in t]
        r["round_times_ms"] = [t.get(v) for t in rounds]
        r["rounds"] = len(rounds)
        if times and not err:
            r["time_status"] = "ok"
            r["median_ms"] = statistics.median(times)
            r["x_bare"] = _median_ratio(rounds, v, "bare_gemms")
            r["x_pyprefopt"] = _median_ratio(rounds, v, "pyprefopt")
            r["time_first_call_ms"] = g["first_call_ms"].get(v)
        else:
            r["time_status"] = "error"
            r["time_error"] = err or "no timed round"


def _log_row(row):
    if row.get("kind") == "time":
        what = f"{row['op']:9s} {'(time)':10s} {row['shape']:8s} {row['head']:8s}"
        if row["status"] != "ok":
            print(f"  {what} error: {row.get('error', '')}", file=sys.stderr, flush=True)
            return
        rounds = row["round_times_ms"]
        parts = []
        for v in row["variants"]:
            times = [t[v] for t in rounds if v in t]
            if v in row["errors"] or not times:
                parts.append(f"{v} error: {row['errors'].get(v, 'no timed round')}")
                continue
            ratio = _median_ratio(rounds, v, "bare_gemms")
            parts.append(f"{v} {statistics.median(times):.1f} ms" + (f" ({ratio:.2f}x bare)" if ratio else ""))
        print(f"  {what} {len(rounds)} rounds: " + ", ".join(parts), file=sys.stderr, flush=True)
        return
    what = f"{row['op']:9s} {row['variant']:10s} {row['shape']:8s} {row['head']:8s}"
    if row["status"] == "ok":
        check = f" check={row['check']}" if "check" in row else ""
        print(f"  {what} isolated {row['median_ms']:8.1f} ms  first {row['first_call_ms']:9.1f} ms  "
              f"+{row['peak_extra_mib']:8.1f} MiB{check}", file=sys.stderr, flush=True)
    else:
        print(f"  {what} {row['status']}: {row.get('error', '')}", file=sys.stderr, flush=True)


def _key(row):
    return (row["op"], row["shape"], row["head"])


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def render_table(rows: list[dict], machine: dict, args) -> str:
    naive = {_key(r): r for r in rows if r["variant"] == "naive" and r["status"] == "ok"}
    bare = {_key(r): r for r in rows if r["variant"] == "bare_gemms" and r["status"] == "ok"}
    lines = [
        "## pyprefopt CPU benchmark" + (" (--quick: small shapes, not for conclusions)" if args.quick else ""),
        "",
        f"- machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs "
        f"({machine['affinity_cpus']} usable), torch threads {machine['torch_threads']}",
        f"- torch {machine['torch']}, python {machine['python']}, pyprefopt {machine['pyprefopt']} "
        f"(git {machine['git']}), trl {machine['trl']}, liger-kernel {machine['liger-kernel']}",
        "- fp32, forward + backward per step. Time, interleaved: one fresh process per (op, shape, head) "
        "group builds every variant, runs each one's first call (torch.compile for liger)"
        + (f" and {args.warmup - 1} more warm-up step(s)" if args.warmup > 1 else "")
        + f", then {args.rounds} rounds of one step per variant in a fixed rotation; "
        "`median ms` = median over the rounds, `x bare` / `x pyprefopt` = median over the rounds of the "
        "per-round ratio to bare_gemms / pyprefopt (the CPU's speed drifts over minutes: only times taken "
        "side by side are compared)",
        f"- memory, isolated: one fresh process per case (isolation: {args.isolation}); `first-call ms` is "
        "its first call (includes torch.compile for liger); peak extra = ru_maxrss after "
        f"{args.warmup - 1 + args.steps} more step(s) - RSS before the first call (inputs built; gradients and "
        "every temporary count); `<=` marks an upper bound (the steps never raised the process's high-water mark); the "
        "check runs there; `over bare MiB` = peak extra - bare_gemms' peak extra: what a variant adds over the "
        "floor's process, which holds the same inputs and preallocated outputs and pays the same runtime "
        "growth on its first GEMMs (allocator, OpenMP, oneDNN)",
        "- primitive: N tokens, every label valid. Losses (`<method>-loss`, beta=0.1): B rows x T tokens, "
        + ("no masked position (--all-completion)" if args.all_completion
           else "first T/4 labels of each row = -100 (prompt)")
        + "; pyprefopt skips ignored positions before any matmul, naive/trl/liger project all N. "
        "sft: mean NLL over the non-ignored tokens; dpo (sigmoid), ipo: chosen rows first, fixed reference "
        "log-probs; cpo: chosen rows first, alpha=1 (NLL on chosen), no reference; kto: first B/2 rows "
        "desirable, fixed reference log-probs, KL point from fixed per-row KL log-probs (not projected)",
        "- bare_gemms = the floor: frozen head 2 GEMMs (h@W.T, Z@W), trained head 3 (+ Z.T@h), over the tokens "
        "pyprefopt projects (the `proj` column), in the op's token blocks and vocabulary tiles and through "
        "pyprefopt.cpu_linear like the op (oneDNN for large fp32 GEMMs; naive, trl and liger run torch's fp32 "
        "matmul, which is MKL), with nothing between the GEMMs",
        "- trl = TRL's chunked log-prob function (as its fused LM head calls it without Triton), its sequence "
        "sums fed to the same pyprefopt.losses function",
        "- liger takes no precomputed reference log-probs: DPO runs reference-free (the others use fixed "
        "reference log-probs; same GEMMs either way); KTO (reference-free it would saturate) computes the "
        "reference log-probs from the reference hidden states, one more no-grad GEMM; Liger has no IPO loss; "
        "its SFT loss (fused linear cross-entropy) is Triton kernels",
        "",
        "| variant | op | head | shape | proj | median ms | x bare | x pyprefopt | first-call ms | peak extra MiB "
        "| over bare MiB | x naive mem | check | note |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        d = r.get("shape_dims", {})
        shape = f"N{d.get('n')} H{d.get('h')} V{d.get('v')}"
        if r["op"] != "primitive":
            shape += f" (B{d.get('rows')}xT{d.get('seq_len')})"
        mem_ok = r["status"] == "ok"
        time_ok = r.get("time_status") == "ok"
        if not mem_ok and not time_ok:
            lines.append(f"| {r['variant']} | {r['op']} | {r['head']} | {shape} | | {r['status']} | | | | | | | | "
                         f"{r.get('error', '')[:200]} |")
            continue
        notes = [r.get("note", "")] if r.get("note") else []
        if not mem_ok:
            notes.append(f"memory case {r['status']}: {r.get('error', '')[:200]}")
        if not time_ok:
            notes.append(f"time: {r.get('time_error', 'not timed')[:200]}")
        n = naive.get(_key(r))
        b = bare.get(_key(r))
        mem = mem_ratio = over_bare = first = None
        if mem_ok:
            mem = ("<=" if r["peak_is_upper_bound"] else "") + f"{r['peak_extra_mib']:.1f}"
            mem_ratio = r["peak_extra_mib"] / n["peak_extra_mib"] if n and n["peak_extra_mib"] > 0 else None
            over_bare = r["peak_extra_mib"] - b["peak_extra_mib"] if b and b is not r else None
            first = r["first_call_ms"]
        lines.append(
            f"| {r['variant']} | {r['op']} | {r['head']} | {shape} | {_fmt(r.get('projected_tokens'), '')} | "
            f"{_fmt(r.get('median_ms') if time_ok else None, '.1f')} | "
            f"{_fmt(r.get('x_bare') if time_ok else None, '.2f')} | "
            f"{_fmt(r.get('x_pyprefopt') if time_ok else None, '.2f')} | {_fmt(first, '.1f')} | {mem or ''} | "
            f"{_fmt(over_bare, '.1f')} | {_fmt(mem_ratio, '.2f')} | {r.get('check', '')} | {'; '.join(notes)} |"
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with every default filled in (`args.extra_ops`: the ops --all-losses added)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small shapes, 2 rounds and 2 steps (< 90 s in all, < 120 s with --all-losses)")
    p.add_argument("--all-losses", action="store_true",
                   help=f"add the loss ops {', '.join(V.EXTRA_LOSS_OPS)} (those not named in --ops) at the "
                        f"{'/'.join(V.EXTRA_LOSS_SHAPES)} shape only")
    p.add_argument("--all-completion", action="store_true", help="loss batches with no masked (prompt) position")
    p.add_argument("--rounds", type=int, default=None,
                   help="time pass: interleaved rounds per group, one step of every variant each "
                        "(default 5, --quick 2)")
    p.add_argument("--steps", type=int, default=None,
                   help="memory pass: steps per case after the warm-up, before ru_maxrss is read "
                        "(default 5, --quick 2)")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps before the rounds / the steps, the first call included")
    p.add_argument("--ops", nargs="+", choices=V.OPS, default=None,
                   help=f"default: {' '.join(V.DEFAULT_OPS)} (at every shape); ops named here run at every shape")
    p.add_argument("--variants", nargs="+", choices=V.VARIANTS)
    p.add_argument("--heads", nargs="+", choices=V.HEADS, default=list(V.HEADS))
    p.add_argument("--shapes", nargs="+",
                   help="shape names: default, qwen, and qwen-1pair (full size, runs only when named)")
    p.add_argument("--isolation", choices=("process", "fork"), default=None,
                   help="fresh interpreter per case and per group (default) or a fork of one worker per case "
                        "and per group (default with --quick)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the memory pass's check of pyprefopt/trl/liger against the naive reference")
    p.add_argument("--json", help="write the rows, the time groups and machine info as JSON to this path")
    p.add_argument("--case-timeout", type=float, default=None,
                   help=f"seconds before a case is killed, per variant for a group "
                        f"(default {CASE_TIMEOUT_S}, --quick 300)")
    p.add_argument("--worker", metavar="JOBS_JSON", help=argparse.SUPPRESS)
    p.add_argument("--fork", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        return args
    if args.ops is None:
        args.ops = list(V.DEFAULT_OPS)
    args.extra_ops = [op for op in V.EXTRA_LOSS_OPS if op not in args.ops] if args.all_losses else []
    args.ops += args.extra_ops
    if args.steps is None:
        args.steps = 2 if args.quick else 5
    if args.rounds is None:
        args.rounds = 2 if args.quick else 5
    if args.case_timeout is None:
        args.case_timeout = 300 if args.quick else CASE_TIMEOUT_S
    if args.isolation is None:
        args.isolation = "fork" if args.quick else "process"
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        p.error("--warmup, --steps and --rounds must be >= 1")
    known = [s.name for s in V.named_shapes(args.quick)]
    if args.shapes and set(args.shapes) - set(known):
        p.error(f"unknown shape(s) {sorted(set(args.shapes) - set(known))}" + (" in --quick mode" if args.quick else "")
                + f"; known: {', '.join(known)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(json.loads(args.worker), args.fork, args.case_timeout or CASE_TIMEOUT_S)

    t0 = time.perf_counter()
    machine = machine_info()
    cases, fixed = plan_cases(args)
    groups = plan_groups(cases, args)
    print(f"memory pass: {len(cases)} cases; time pass: {len(groups)} groups x {args.rounds} rounds; "
          f"isolation={args.isolation}", file=sys.stderr, flush=True)
    for r in fixed:
        _log_row(r)
    rows = list(fixed)
    if args.isolation == "process":
        for c in cases:
            rows += _spawn([c], fork=False, log=_log_row, timeout_s=args.case_timeout)
        timed = [t for g in groups for t in _spawn([g], fork=False, log=_log_row, timeout_s=args.case_timeout)]
    else:
        # Two workers, each importing a peer only when its first job needs it, so that every memory
        # case is forked from a worker holding torch + its own variant's package only (as with a
        # fresh interpreter): one runs the torch-only cases, then the trl cases, then the time groups
        # (which import liger too); the other the liger cases.
        jobs = [c for c in cases if c["variant"] in ("bare_gemms", "naive", "pyprefopt")]
        jobs += [c for c in cases if c["variant"] == "trl"] + groups
        done = _spawn(jobs, fork=True, log=_log_row, timeout_s=args.case_timeout) if jobs else []
        liger = [c for c in cases if c["variant"] == "liger"]
        done += _spawn(liger, fork=True, log=_log_row, timeout_s=args.case_timeout) if liger else []
        rows += [r for r in done if r["kind"] == "memory"]
        timed = [r for r in done if r["kind"] == "time"]
    merge_time(rows, timed)
    order = {(c["op"], c["variant"], c["shape"], c["head"]): i for i, c in enumerate(
        [dict(op=op, variant=v, shape=s.name, head=h) for op in V.OPS for s in V.named_shapes(args.quick)
         for h in V.HEADS for v in V.OP_VARIANTS[op]])}
    rows.sort(key=lambda r: order.get((r["op"], r["variant"], r["shape"], r["head"]), 1 << 30))
    elapsed = time.perf_counter() - t0

    print(render_table(rows, machine, args))
    print(f"\n(total wall time {elapsed:.1f} s)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "wall_s": elapsed, "rows": rows,
                       "time_groups": timed}, f, indent=1)
    failed = [r for r in rows if r["status"] == "error" or r.get("check") == "FAIL"
              or r.get("time_status") == "error"]
    failed += [g for g in timed if g["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
