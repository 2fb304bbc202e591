"""Tests whose checks run in WORLD gloo CPU processes that torchrun starts (each of its own, as a user's job runs: not
children of the test process), and the one failure of gloo's own they tolerate.

torch 2.13's gloo backend now and then aborts a CPU process from one of its own threads ("terminate called without
an active exception"), also in a script of nothing but init_process_group, init_device_mesh and two collectives.
A run that ends in that abort alone, with no exception of the test's own, passes if every process had reported all
its checks passed (the abort came after them) and is run again otherwise; any other failure, an assertion of the
test among them, fails at once.

    # in tests/test_x.py
    def _worker(case):
        dist.init_process_group("gloo")
        try:
            ...checks...
            report_every_check_passed(dist.get_rank())
        finally:
            dist.destroy_process_group()

    def test_x():
        run_in_processes("tests.test_x", "case")

    if __name__ == "__main__":
        _worker(sys.argv[1])
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
GLOO_ABORT = "terminate called without an active exception"
GLOO_ABORT_RETRIES = 2
EVERY_CHECK_PASSED = "every check passed"
# A frame of a worker's own exception (warnings name these files too, but not in this form).
OWN_FRAME = re.compile(r'File "[^"]*/(pyprefopt|tests)/[^"]*", line')


def report_every_check_passed(rank: int):
    print(f"rank {rank}: {EVERY_CHECK_PASSED}", flush=True)


def _gloo_abort_only(result) -> bool:
    return result.returncode != 0 and GLOO_ABORT in result.stderr and not OWN_FRAME.search(result.stderr)


def _every_check_passed(result) -> bool:
    return all(f"rank {rank}: {EVERY_CHECK_PASSED}" in result.stdout for rank in range(WORLD))


def run_in_processes(module: str, *args: str, env: dict | None = None, timeout: int = 600):
    """`torchrun --standalone --nproc_per_node WORLD -m module *args` from the repository root; fails with the
    processes' stderr unless every process reported its checks passed and the run ended well or in gloo's abort
    alone."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD), "-m",
               module, *args]
    for _ in range(GLOO_ABORT_RETRIES + 1):
        result = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if _every_check_passed(result) and (result.returncode == 0 or _gloo_abort_only(result)):
            return
        if not _gloo_abort_only(result):
            break
    assert result.returncode == 0 and _every_check_passed(result), result.stderr[-4000:]
