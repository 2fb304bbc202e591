"""A process's resident memory and its high-water mark, read from Linux's /proc/<pid>/status: what the benches and
the tests that bound a peak measure. Standard library only, so that a fresh interpreter measuring from after its own
imports adds nothing by importing this.

    before = rss_mib()
    reset_peak_rss()
    work()
    extra = peak_rss_mib() - before   # the most `work` held above what was resident before it
"""

from __future__ import annotations

from pathlib import Path


def status_mib(field: str, pid: int | str = "self") -> float | None:
    """Field `field` of /proc/<pid>/status (VmRSS: the resident set; VmHWM: its high-water mark) in MiB; None for a
    process that has none (one that has exited but is not yet reaped). OSError once the process is gone."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024  # kB
    return None


def rss_mib() -> float:
    """This process's resident set now."""
    return status_mib("VmRSS")


def peak_rss_mib() -> float:
    """This process's resident set's high-water mark since it started or since the last reset_peak_rss."""
    return status_mib("VmHWM")


def reset_peak_rss():
    """Start the high-water mark afresh from the current resident set (Linux's clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")
