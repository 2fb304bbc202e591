"""`python -m pyprefopt.train` as a torchrun worker that watches which process reads the model's weights:

    torchrun ... -m tests.checkpoint_read_guard COUNTS {fail,count} ARGS...

runs the train CLI with ARGS and writes COUNTS.<rank>, the number of reads of a .safetensors file outside the run's
--output-dir that the process attempted. With `fail`, such a read fails (AssertionError) on every process but the
first.
Reads are seen through safetensors' Python entry points, replaced before transformers imports them, and through
Python's audit hook for opened files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import safetensors
import safetensors.torch

RANK = int(os.environ.get("RANK", "0"))
reads = 0
fail = False


def _watch(path, output_dir: Path):
    """Count a read of `path` if it is a checkpoint's weights; on a process but the first, fail it."""
    global reads
    if not str(path).endswith(".safetensors") or Path(path).resolve().is_relative_to(output_dir):
        return
    reads += 1
    if fail and RANK != 0:
        raise AssertionError(f"process {RANK} read the checkpoint's {path}")


def _watched(read, output_dir: Path):
    def watched(path, *args, **kwargs):
        _watch(path, output_dir)
        return read(path, *args, **kwargs)

    return watched


def main(counts: str, mode: str, argv: list[str]) -> int:
    global fail
    fail = mode == "fail"
    output_dir = Path(argv[argv.index("--output-dir") + 1]).resolve()
    for module in (safetensors, safetensors.torch):
        module.safe_open = _watched(module.safe_open, output_dir)
    safetensors.torch.load_file = _watched(safetensors.torch.load_file, output_dir)
    sys.addaudithook(lambda event, args: _watch(args[0], output_dir) if event == "open" and args[0] else None)

    from pyprefopt import train

    code = train.main(argv)
    Path(f"{counts}.{RANK}").write_text(str(reads))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
