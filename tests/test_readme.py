"""The README's plain-loop example runs as printed, and the losses it prints go down."""

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_plain_loop_example_runs():
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- plain-loop example: tests/test_readme.py runs it -->\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its plain-loop example block"
    code = match.group(1)
    assert len(code.strip().splitlines()) <= 25
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=README.parent / "tests")
    assert result.returncode == 0, result.stderr
    losses = [float(m) for m in re.findall(r"loss (\d+\.\d+)", result.stdout)]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2], result.stdout
