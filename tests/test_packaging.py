"""Nothing of ours shadows an installed package, wherever Python starts; tests/ and bench/ are packages of the
repository, never installed.

Python run from the repository root (`python -m pyprefopt.train`, `python -m pytest`, `python -m bench.NAME`, a user's
script there) puts the root first on sys.path. A regular package or module of ours under a name some distribution also
installs would then be imported in its place: our top-level `kernels/` once did that to Hugging Face's `kernels`, which
transformers imports, and broke the README's main command. The root's packages are pyprefopt, tests and bench (whose
modules import one another by their package's name, `from tests import tiny_models`); every other directory there
must yield to an installed package of its name.

Also: pyprefopt's modules import one another without cycles.
"""

from __future__ import annotations

import importlib.metadata
import json
import keyword
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROOT_PACKAGES = ("pyprefopt", "tests", "bench")
# A call of sys.path's insert, append or extend, or an assignment (plain or augmented) to sys.path or an item of it.
SYS_PATH_EDIT = re.compile(r"\bsys\.path\s*(\.\s*(insert|append|extend)\s*\(|(\[[^\]]*\])?\s*\+?=(?!=))")


def _top_level_directories() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir() if p.is_dir() and p.name.isidentifier()
                  and not keyword.iskeyword(p.name) and p.name not in ROOT_PACKAGES)


def test_every_other_top_level_directory_yields_to_an_installed_package_of_its_name(tmp_path):
    """A fake installed package named like each of our top-level directories but the root's packages (kernels, csrc,
    ...) must be what `import NAME` gives from the repository root."""
    names = _top_level_directories()
    assert "kernels" in names
    site = tmp_path / "site"
    for name in names:
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"ORIGIN = 'installed {name}'\n")
    script = "import importlib, sys\nfor name in sys.argv[1:]:\n    print(importlib.import_module(name).ORIGIN)\n"
    result = subprocess.run([sys.executable, "-c", script, *names], cwd=ROOT, capture_output=True, text=True,
                            env={"PYTHONPATH": str(site), "PATH": ""})
    assert result.returncode == 0, (
        f"a directory of ours was imported instead of the installed package:\n{result.stderr}")
    assert result.stdout.split("\n")[:-1] == [f"installed {name}" for name in names]


def test_no_package_or_module_at_the_root_shares_a_name_with_an_installed_distribution():
    """pyprefopt, tests, bench and the root's modules (setup.py) are what `import NAME` finds from the repository root:
    none may share a name with a top-level module of a distribution installed here, pyprefopt's own aside."""
    ours = set(ROOT_PACKAGES) | {p.stem for p in ROOT.glob("*.py")}
    installed = importlib.metadata.packages_distributions()
    clashes = {name: others for name in sorted(ours)
               if (others := [dist for dist in installed.get(name, []) if dist != "pyprefopt"])}
    assert not clashes, f"packages or modules of ours named like installed distributions' modules: {clashes}"


def _sys_path_edits(path: Path) -> list[str]:
    """`FILE:LINE` of each edit of sys.path in the file's text: its own code and the code strings it runs."""
    text = path.read_text(encoding="utf-8")
    lines = [text.count("\n", 0, match.start()) + 1 for match in SYS_PATH_EDIT.finditer(text)]
    return [f"{path.relative_to(ROOT)}:{line}" for line in lines]


def test_no_test_or_bench_file_edits_sys_path():
    """tests/ and bench/ run from the repository root as packages (`from bench import variants`, `python -m
    bench.bench_train`, `torchrun -m tests.test_vocab_parallel`): no file of theirs puts a folder on the module search
    path, in its own code or in code it hands a subprocess."""
    files = sorted(path for folder in ("tests", "bench") for path in (ROOT / folder).rglob("*.py"))
    assert ROOT / "tests" / "__init__.py" in files and ROOT / "bench" / "__init__.py" in files
    edits = [edit for path in files for edit in _sys_path_edits(path)]
    assert not edits, f"sys.path edited at {edits}: import from the package (`from tests import NAME`) instead"


def test_the_distribution_installs_neither_tests_nor_bench():
    """setup.py's packages and modules as setuptools reads them: pyprefopt's alone."""
    script = ("import json, setuptools\nfrom distutils.core import run_setup\n"
              "dist = run_setup('setup.py', stop_after='init')\n"
              "print(json.dumps([dist.packages or [], dist.py_modules or []]))")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    packages, modules = json.loads(result.stdout.splitlines()[-1])
    assert "pyprefopt" in packages, packages
    assert all(name.split(".")[0] == "pyprefopt" for name in packages + modules), (packages, modules)


def _package_imports() -> dict[str, set[str]]:
    """Each pyprefopt module and the pyprefopt modules it imports anywhere in its source (deferred imports
    inside functions included: a cycle through them is a cycle of the design all the same)."""
    import ast

    files = {path: f"pyprefopt.{path.stem}" for path in (ROOT / "pyprefopt").glob("*.py") if path.stem != "__init__"}
    files |= {path: f"pyprefopt.kernels.{path.stem}" for path in (ROOT / "kernels").glob("*.py")}
    modules = set(files.values())
    graph = {}
    for path, name in files.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pyprefopt"):
                imported |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        graph[name] = (imported & modules) - {name}
    return graph


def test_no_import_cycles():
    graph = _package_imports()
    assert "pyprefopt.nf4" in graph and graph["pyprefopt.train"], "the import scan found nothing"
    done, path = set(), []

    def visit(module):
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
