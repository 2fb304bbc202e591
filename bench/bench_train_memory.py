"""Resident memory of a long default DPO run: `python -m pyprefopt.train --method dpo` on the embedded model and
the bundled data (which it loops over, epoch after epoch) must hold a flat resident set, not grow step after step.

    python -m bench.bench_train_memory                    # RSS at steps 20, 100 and 500: the table
    python -m bench.bench_train_memory --steps 20 100 300 --json /tmp/train_memory.json
    PYPREFOPT_BENCH_QUICK=0 pytest bench/bench_train_memory.py -m heavy   # the pytest version at full size

The run is the CLI itself in a fresh interpreter (default settings, `--max-steps` the last step asked for), so it
starts with its own allocator, oneDNN caches and thread pool, as a user's run does. A sampler reads the child's
current resident set (VmRSS of /proc/<pid>/status; the run's own `peak_memory_mib` is the high-water mark, which
never goes down) every 20 ms and tails its metrics.jsonl: the resident set "at step s" is the median of the first
samples taken after each of steps s-4 .. s was logged, i.e. between steps, five boundaries so that one
transient (a garbage collection, the final evaluation) does not decide it. Reported: each step's resident set,
its ratio to the first step's, and the median step time over the run. Timings on a shared CPU are noisy; the
resident set is the figure this bench is about.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from bench import variants as V
from bench.resident_memory import status_mib

FULL_STEPS = (20, 100, 500)
# Quick mode (CI): an 80-step run, measured from step 25, once the bounded caches have filled (they grow the
# resident set by about a tenth over the first 25 steps); unbounded, it kept growing past step 25 by a fifth
# every 50 steps, so a flat one there still says the growth is gone.
QUICK_STEPS = (25, 80)
# Most a later step's resident set may differ from the first measured step's, as a fraction.
TOLERANCE = 0.10
# Logged steps (ending at the asked one) whose boundary samples make up one step's figure.
WINDOW = 5
POLL_SECONDS = 0.02


def _vm_rss_mib(pid: int) -> float | None:
    try:
        return status_mib("VmRSS", pid)
    except OSError:  # the process has exited
        return None


def measure(steps, method: str = "dpo", extra_args=(), env=None) -> dict:
    """Run `python -m pyprefopt.train --method <method> --max-steps max(steps)` (default settings otherwise,
    `extra_args` appended) and sample its resident set; returns {"rss_mib": {step: MiB}, "median_step_seconds",
    "wall_seconds", "max_rss_mib"}."""
    steps = sorted(set(steps))
    wanted = {s - i for s in steps for i in range(WINDOW) if s - i >= 1}
    child_env = dict(os.environ if env is None else env, TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory(prefix="pyprefopt-memory-") as tmp:
        out = Path(tmp) / "run"
        metrics = out / "metrics.jsonl"
        log = open(Path(tmp) / "stderr.txt", "w+", encoding="utf-8")
        cmd = [sys.executable, "-m", "pyprefopt.train", "--method", method, "--max-steps", str(steps[-1]),
               "--output-dir", str(out), *extra_args]
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=child_env, stdout=subprocess.DEVNULL, stderr=log)
        boundary, step_seconds, max_rss = {}, [], 0.0
        offset, pending = 0, ""
        try:
            while True:
                running = proc.poll() is None
                rss = _vm_rss_mib(proc.pid) if running else None
                if rss is not None:
                    max_rss = max(max_rss, rss)
                if metrics.exists():
                    with open(metrics, encoding="utf-8") as f:
                        f.seek(offset)
                        pending += f.read()
                        offset = f.tell()
                    while "\n" in pending:
                        line, pending = pending.split("\n", 1)
                        record = json.loads(line)
                        if "step_seconds" not in record:
                            continue  # the evaluation before the first step
                        step_seconds.append(record["step_seconds"])
                        if record["step"] in wanted and rss is not None:
                            boundary[record["step"]] = rss
                if not running:
                    break
                time.sleep(POLL_SECONDS)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n{log.read()[-4000:]}")
    rss_mib = {}
    for s in steps:
        seen = [boundary[t] for t in range(max(1, s - WINDOW + 1), s + 1) if t in boundary]
        if not seen:
            raise RuntimeError(f"no sample at steps {max(1, s - WINDOW + 1)}..{s}: the sampler missed them")
        rss_mib[s] = statistics.median(seen)
    return {"rss_mib": rss_mib, "median_step_seconds": statistics.median(step_seconds), "wall_seconds": wall,
            "max_rss_mib": max_rss}


def table(result: dict) -> str:
    rss = result["rss_mib"]
    first = min(rss)
    lines = [f"| step | RSS MiB | ratio to step {first} |", "|---|---|---|"]
    lines += [f"| {s} | {v:.0f} | {v / rss[first]:.3f} |" for s, v in sorted(rss.items())]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=list(FULL_STEPS), help="steps to read the RSS at")
    p.add_argument("--method", default="dpo", help="the run's --method")
    p.add_argument("--json", type=Path, default=None, help="also write the raw result here")
    p.add_argument("train_args", nargs="*", help="more options for the run, after `--`")
    a = p.parse_args(argv)
    if min(a.steps) < 1:
        p.error("--steps must be at least 1")
    result = measure(a.steps, a.method, a.train_args)
    print(table(result))
    print(f"\nmedian step {1e3 * result['median_step_seconds']:.0f} ms; wall {result['wall_seconds']:.0f} s; "
          f"peak RSS {result['max_rss_mib']:.0f} MiB; `python -m pyprefopt.train --method {a.method} --max-steps "
          f"{max(a.steps)}`{' ' + ' '.join(a.train_args) if a.train_args else ''}; torch "
          f"{_torch_version()}, {os.cpu_count()} CPUs")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"settings": vars(a) | {"json": str(a.json)}, "result": result}, indent=1,
                                     default=str))


def _torch_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("torch")


# ---------------------------------------------------------------------------------------------- pytest


@pytest.mark.heavy
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/status")
def test_default_dpo_run_holds_a_flat_resident_set():
    """Steps 25 and 80 (quick) or 20, 100 and 500 (PYPREFOPT_BENCH_QUICK=0) of a default DPO run: every step's
    resident set within TOLERANCE of the first's."""
    steps = QUICK_STEPS if V.env_quick() else FULL_STEPS
    result = measure(steps)
    rss = result["rss_mib"]
    first = rss[min(rss)]
    print("\n" + table(result))
    for s, v in rss.items():
        assert abs(v / first - 1) <= TOLERANCE, f"RSS at step {s} is {v:.0f} MiB, {v / first:.2f}x step " \
                                                f"{min(rss)}'s {first:.0f} MiB:\n{table(result)}"


if __name__ == "__main__":
    main()
