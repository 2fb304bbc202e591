"""Nothing of ours shadows an installed package, wherever Python starts.

Python run from the repository root (`python -m pyprefopt.train`, `python -m pytest`, a user's script there) puts the
root first on sys.path, and pytest puts tests/ and bench/ there for their modules. A regular package or module of
ours under a name some distribution also installs would then be imported in its place: our top-level `kernels/`
once did that to Hugging Face's `kernels`, which transformers imports, and broke the README's main command.

Also: pyprefopt's modules import one another without cycles.
"""

from __future__ import annotations

import importlib.metadata
import keyword
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _top_level_directories() -> list[str]:
    return sorted(p.name for p in ROOT.iterdir()
                  if p.is_dir() and p.name.isidentifier() and not keyword.iskeyword(p.name) and p.name != "pyprefopt")


def test_every_top_level_directory_yields_to_an_installed_package_of_its_name(tmp_path):
    """A fake installed package named like each of our top-level directories (kernels, tests, bench, csrc, ...)
    must be what `import NAME` gives from the repository root. Only pyprefopt itself may be found there."""
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


def test_no_module_that_tests_or_benches_put_on_sys_path_shadows_an_installed_distribution():
    """pytest imports tests/*.py and bench/*.py as top-level modules: none may share a name with a top-level module
    of any distribution installed here."""
    ours = {p.stem for folder in ("tests", "bench") for p in (ROOT / folder).glob("*.py")}
    ours |= {p.stem for p in ROOT.glob("*.py")}
    installed = importlib.metadata.packages_distributions()
    clashes = {name: installed[name] for name in sorted(ours) if name in installed}
    assert not clashes, f"modules of ours named like installed distributions' modules: {clashes}"


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
