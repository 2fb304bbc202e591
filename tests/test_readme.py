"""The README's commands run as written: the main command from the repository root with a clean output, the
plain-loop example with losses that go down; CI installs what the README tells a user to."""

import importlib.metadata
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_plain_loop_example_runs():
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- plain-loop example: tests/test_readme.py runs it -->\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its plain-loop example block"
    code = match.group(1)
    assert len(code.strip().splitlines()) <= 25
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=README.parent)
    assert result.returncode == 0, result.stderr
    losses = [float(m) for m in re.findall(r"loss (\d+\.\d+)", result.stdout)]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2], result.stdout


def _readme_commands() -> tuple[list[str], str]:
    """(the setup commands, the main command) of the README's first shell block: `SETUP && MAIN`."""
    block = re.search(r"```bash\n(.*?)\n```", README.read_text(encoding="utf-8"), re.S)
    assert block, "README lost its main command block"
    *setup, main = [part.strip() for part in block.group(1).split("&&")]
    assert main.startswith("python -m pyprefopt.train"), main
    return setup, main


def test_main_command_runs_as_written_from_the_repository_root_with_a_clean_output():
    """The README's main command, run where a newcomer runs it (the repository root, with Hugging Face's `kernels`
    installed, as transformers requires), ends in a trained run and prints the progress bar, the metrics and where
    the run went: no traceback and no third-party warning."""
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("Hugging Face's kernels is not installed: the test extra brings it, as transformers does")
    _, main = _readme_commands()
    result = subprocess.run([sys.executable, *main.split()[1:]], capture_output=True, text=True, cwd=README.parent,
                            timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    done = re.search(r"^done: (\S+) ", result.stderr, re.M)
    assert done, output
    run_dir = README.parent / done.group(1)
    try:
        assert (run_dir / "adapter_model.safetensors").is_file() and (run_dir / "metrics.jsonl").is_file()
        noise = [line for line in output.replace("\r", "\n").splitlines()
                 if re.search(r"traceback|warn|error|fail|deprecat", line, re.I)]
        assert not noise, "\n".join(noise)
    finally:
        shutil.rmtree(run_dir)


def test_ci_installs_the_project_as_the_readme_tells_a_user_to():
    """.ci/run's install is the README's, with the test extras added."""
    setup, _ = _readme_commands()
    assert len(setup) == 1 and setup[0].startswith("pip install ") and setup[0].endswith(" -e ."), setup
    ci_install = setup[0].removeprefix("pip install ").removesuffix(" -e .") + ' -e ".[test,peers]"'
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(rf"^\s*\"\$\{{pip\[@\]\}}\" install {re.escape(ci_install)}$", ci, re.M), ci_install
