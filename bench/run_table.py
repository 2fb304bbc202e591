"""Time and memory table of `fused_linear_logprobs` and `FusedLinearPreferenceLoss("dpo")` vs their peers.

    python bench/run_table.py                      # full shapes, one fresh process per case
    python bench/run_table.py --quick              # small shapes, 2 steps: a < 60 s smoke run
    python bench/run_table.py --all-completion     # DPO batch without prompt mask
    python bench/run_table.py --json bench/results/table.json

Every (op, variant, shape, head) case runs in a fresh process (`--worker`), which builds the inputs,
reads its RSS, runs one first call (timed on its own: it includes torch.compile for Liger) and
`--warmup - 1` more untimed steps, then K timed steps (`--steps`), and reports their median and
`ru_maxrss` after the steps minus the RSS read before the first call ("peak extra": what the op adds
on top of its inputs, gradients included).

Isolation: `--isolation process` (default) starts `python bench/run_table.py --worker` per case.
`--isolation fork` (default with --quick) starts one worker per set of imports (the torch-only
variants, trl, liger), which imports them once (TRL's import alone takes 5-15 s) and forks a fresh
child per case; the worker never runs a torch op, so each child starts with an unstarted OpenMP pool
and a high-water mark equal to its RSS.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import variants as V  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")
MiB = 2**20
CASE_TIMEOUT_S = 1800  # --case-timeout; a forked child that hangs (e.g. in OpenMP) is killed after it


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def max_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ----------------------------------------------------------------------------------------------------
# Worker side


def _shape_by_name(name: str, quick: bool) -> V.Shape:
    for s in V.shapes(quick):
        if s.name == name:
            return s
    raise ValueError(f"unknown shape {name!r}")


def _import_peer(variant: str):
    """Import what the variant needs before anything is timed (and, in fork mode, before forking)."""
    if variant == "trl":
        import trl.trainer.utils  # noqa: F401
    elif variant == "liger":
        import liger_kernel.chunked_loss  # noqa: F401


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
    rss0, hw0 = current_rss(), max_rss()
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


def _run_case_safely(case: dict) -> dict:
    try:
        return run_case(case)
    except Exception as e:  # a failing variant is a row, not a crash of the table
        return dict(case, status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())


def _fork_case(case: dict, timeout_s: float) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as f:
        path = f.name
    try:
        pid = os.fork()
        if pid == 0:  # child
            code = 1
            try:
                row = _run_case_safely(case)
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
                return dict(case, status="error", error=f"timed out after {timeout_s} s")
            time.sleep(0.05)
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return dict(case, status="error", error=f"child exited with status {status} and no result")
    finally:
        os.unlink(path)


def worker_main(cases: list[dict], fork: bool, timeout_s: float):
    """Prints one JSON line per case, prefixed so the parent can pick them out of other output."""
    if not fork and len(cases) != 1:
        raise SystemExit("a worker without --fork runs exactly one case")
    # Imports only, no torch op: a forked child must find the OpenMP pool unstarted.
    import torch.fx.experimental.symbolic_shapes  # noqa: F401  (see _warm_lazy_imports)

    for variant in {c["variant"] for c in cases}:
        _import_peer(variant)
    for case in cases:
        row = _fork_case(case, timeout_s) if fork else _run_case_safely(case)
        print("@@ROW " + json.dumps(row), flush=True)


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
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        info["git"] = subprocess.run(
            ["git", "-C", root, "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    return info


def plan_cases(args) -> tuple[list[dict], list[dict]]:
    """(cases to run, rows that will not run: not installed / skipped)."""
    cases, fixed = [], []
    for op in args.ops:
        for shape in V.shapes(args.quick):
            if args.shapes and shape.name not in args.shapes:
                continue
            for head in args.heads:
                for variant in V.OP_VARIANTS[op]:
                    if args.variants and variant not in args.variants:
                        continue
                    case = dict(
                        op=op,
                        variant=variant,
                        shape=shape.name,
                        head=head,
                        all_completion=args.all_completion and op == "dpo-loss",
                        quick=args.quick,
                        steps=args.steps,
                        warmup=args.warmup,
                        do_check=args.check,
                    )
                    dims = dict(n=shape.n, h=shape.h, v=shape.v, rows=shape.rows, seq_len=shape.seq_len)
                    if not V.peer_installed(variant):
                        fixed.append(dict(case, shape_dims=dims, status="not installed",
                                          error=f"python package {V.PEER_PACKAGES[variant]!r} is not installed"))
                    elif args.quick and (reason := V.quick_skip_reason(op, variant, shape)):
                        fixed.append(dict(case, shape_dims=dims, status="skipped", error=reason))
                    else:
                        cases.append(case)
    return cases, fixed


def _spawn(cases: list[dict], fork: bool, log, timeout_s: float) -> list[dict]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(cases), "--case-timeout", str(timeout_s)]
    if fork:
        cmd.append("--fork")
    timeout = timeout_s * len(cases) + 120
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [dict(c, status="error", error=f"worker timed out after {timeout} s") for c in cases]
    rows = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("@@ROW ")]
    done = {(r["op"], r["variant"], r["shape"], r["head"]) for r in rows}
    for c in cases:
        if (c["op"], c["variant"], c["shape"], c["head"]) not in done:
            tail = (proc.stderr or "").strip().splitlines()[-5:]
            rows.append(dict(c, status="error", error=f"worker exited {proc.returncode}: " + " | ".join(tail)))
    for r in rows:
        log(r)
    names = ", ".join(sorted({c["variant"] for c in cases}))
    print(f"  ({len(cases)} case(s) of {names} in {time.perf_counter() - t0:.1f} s)",
          file=sys.stderr, flush=True)
    return rows


def _log_row(row):
    what = f"{row['op']:9s} {row['variant']:10s} {row['shape']:8s} {row['head']:8s}"
    if row["status"] == "ok":
        check = f" check={row['check']}" if "check" in row else ""
        print(f"  {what} {row['median_ms']:10.1f} ms  first {row['first_call_ms']:9.1f} ms  "
              f"+{row['peak_extra_mib']:8.1f} MiB{check}", file=sys.stderr, flush=True)
    else:
        print(f"  {what} {row['status']}: {row.get('error', '')}", file=sys.stderr, flush=True)


def _key(row):
    return (row["op"], row["shape"], row["head"])


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def render_table(rows: list[dict], machine: dict, args) -> str:
    bare = {_key(r): r for r in rows if r["variant"] == "bare_gemms" and r["status"] == "ok"}
    naive = {_key(r): r for r in rows if r["variant"] == "naive" and r["status"] == "ok"}
    lines = [
        "## pyprefopt CPU benchmark" + (" (--quick: small shapes, not for conclusions)" if args.quick else ""),
        "",
        f"- machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs "
        f"({machine['affinity_cpus']} usable), torch threads {machine['torch_threads']}",
        f"- torch {machine['torch']}, python {machine['python']}, pyprefopt {machine['pyprefopt']} "
        f"(git {machine['git']}), trl {machine['trl']}, liger-kernel {machine['liger-kernel']}",
        f"- fp32, forward + backward per step; median of {args.steps} timed steps after {args.warmup} warm-up "
        f"step(s); first call timed separately (includes torch.compile for liger); isolation: {args.isolation}",
        "- peak extra = ru_maxrss after the steps - RSS before the first call (inputs built; gradients and "
        "every temporary count); `<=` marks an upper bound (the steps never raised the process's high-water mark)",
        "- primitive: N tokens, every label valid. dpo-loss: B rows x T tokens (chosen rows first), "
        + ("no masked position (--all-completion)" if args.all_completion
           else "first T/4 labels of each row = -100 (prompt)")
        + "; pyprefopt skips ignored positions before any matmul, naive/trl/liger project all N",
        "- bare_gemms = the floor: frozen head 2 GEMMs (h@W.T, Z@W), trained head 3 (+ Z.T@h), on preallocated "
        "outputs, over the tokens pyprefopt projects (the `proj` column); `x bare` = median / that floor",
        "- liger runs reference-free (it takes no precomputed reference log-probs); the others use fixed "
        "reference log-probs; same GEMMs either way",
        "",
        "| variant | op | head | shape | proj | median ms | x bare | first-call ms | peak extra MiB | x naive mem "
        "| check | note |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        d = r.get("shape_dims", {})
        shape = f"N{d.get('n')} H{d.get('h')} V{d.get('v')}"
        if r["op"] == "dpo-loss":
            shape += f" (B{d.get('rows')}xT{d.get('seq_len')})"
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | {r['op']} | {r['head']} | {shape} | | {r['status']} | | | | | | "
                         f"{r.get('error', '')[:200]} |")
            continue
        b, n = bare.get(_key(r)), naive.get(_key(r))
        ratio = r["median_ms"] / b["median_ms"] if b else None
        mem_ratio = r["peak_extra_mib"] / n["peak_extra_mib"] if n and n["peak_extra_mib"] > 0 else None
        mem = ("<=" if r["peak_is_upper_bound"] else "") + f"{r['peak_extra_mib']:.1f}"
        lines.append(
            f"| {r['variant']} | {r['op']} | {r['head']} | {shape} | {r['projected_tokens']} | "
            f"{r['median_ms']:.1f} | {_fmt(ratio, '.2f')} | {r['first_call_ms']:.1f} | {mem} | "
            f"{_fmt(mem_ratio, '.2f')} | {r.get('check', '')} | {r.get('note', '')} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes and 2 steps (< 60 s in all)")
    p.add_argument("--all-completion", action="store_true", help="DPO batch with no masked (prompt) position")
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (default 5, --quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them, the first call included")
    p.add_argument("--ops", nargs="+", choices=V.OPS, default=list(V.OPS))
    p.add_argument("--variants", nargs="+", choices=V.VARIANTS)
    p.add_argument("--heads", nargs="+", choices=V.HEADS, default=list(V.HEADS))
    p.add_argument("--shapes", nargs="+", help="shape names: default, qwen")
    p.add_argument("--isolation", choices=("process", "fork"), default=None,
                   help="fresh interpreter per case (default) or a fork per case (default with --quick)")
    p.add_argument("--no-check", dest="check", action="store_false",
                   help="skip the after-timing check of pyprefopt/trl/liger against the naive reference")
    p.add_argument("--json", help="write the rows and machine info as JSON to this path")
    p.add_argument("--case-timeout", type=float, default=None,
                   help=f"seconds before a case is killed (default {CASE_TIMEOUT_S}, --quick 300)")
    p.add_argument("--worker", metavar="CASES_JSON", help=argparse.SUPPRESS)
    p.add_argument("--fork", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker is not None:
        return worker_main(json.loads(args.worker), args.fork, args.case_timeout or CASE_TIMEOUT_S)

    if args.steps is None:
        args.steps = 2 if args.quick else 5
    if args.case_timeout is None:
        args.case_timeout = 300 if args.quick else CASE_TIMEOUT_S
    if args.isolation is None:
        args.isolation = "fork" if args.quick else "process"
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be >= 1")

    t0 = time.perf_counter()
    machine = machine_info()
    cases, fixed = plan_cases(args)
    print(f"{len(cases)} cases, isolation={args.isolation}", file=sys.stderr, flush=True)
    for r in fixed:
        _log_row(r)
    rows = list(fixed)
    if args.isolation == "process":
        for c in cases:
            rows += _spawn([c], fork=False, log=_log_row, timeout_s=args.case_timeout)
    else:
        # One worker per set of imports: the torch-only variants share one, each peer has its own.
        for variants in (("bare_gemms", "naive", "pyprefopt"), ("trl",), ("liger",)):
            group = [c for c in cases if c["variant"] in variants]
            if group:
                rows += _spawn(group, fork=True, log=_log_row, timeout_s=args.case_timeout)
    order = {(c["op"], c["variant"], c["shape"], c["head"]): i for i, c in enumerate(
        [dict(op=op, variant=v, shape=s.name, head=h) for op in V.OPS for s in V.shapes(args.quick)
         for h in V.HEADS for v in V.OP_VARIANTS[op]])}
    rows.sort(key=lambda r: order.get((r["op"], r["variant"], r["shape"], r["head"]), 1 << 30))
    elapsed = time.perf_counter() - t0

    print(render_table(rows, machine, args))
    print(f"\n(total wall time {elapsed:.1f} s)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "wall_s": elapsed, "rows": rows}, f, indent=1)
    failed = [r for r in rows if r["status"] == "error" or r.get("check") == "FAIL"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
