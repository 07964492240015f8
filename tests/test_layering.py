"""The import graph of commlib: no cycles, and the import-linter contracts of pyproject.toml hold
(and break when a module imports across the layering)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

grimp = pytest.importorskip("grimp")

ROOT = Path(__file__).resolve().parents[1]
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())"]


def cycles(graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    adjacency = {m: sorted(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for start in sorted(adjacency):
        if start in index:
            continue
        work = [(start, iter(adjacency[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            advanced = False
            for nxt in edges:
                if nxt not in adjacency:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(adjacency[nxt])))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_commlib_import_graph_has_no_cycles():
    graph = grimp.build_graph("commlib", cache_dir=None)
    assert len(graph.modules) > 60
    assert cycles(graph) == []


def test_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    package = tmp_path / "loopy"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from loopy import b\n")  # function-level imports count
    (package / "b.py").write_text("import loopy.a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cycles(grimp.build_graph("loopy", cache_dir=None)) == [["loopy.a", "loopy.b"]]


def lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*LINT, "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                          timeout=240)


def copy_of_commlib(tmp_path: Path) -> Path:
    skip = shutil.ignore_patterns("__pycache__", "_csrc", "*.so")
    shutil.copytree(ROOT / "commlib", tmp_path / "commlib", ignore=skip)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_import_linter_contracts_hold():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout


@pytest.mark.parametrize("importer,line,contract", [
    ("compress/topk.py", "from commlib.hooks import ef  # noqa\n", "commlib's layers"),  # upward
    ("comm/patterns.py", "import workloads.train  # noqa\n", "imports no demo code"),  # a demo driver
    ("optim/lowrank.py", "import transformers  # noqa\n", "imports no demo code"),
])
def test_import_linter_fails_on_a_wrong_import(tmp_path, importer, line, contract):
    copy = copy_of_commlib(tmp_path)
    if "workloads" in line:
        shutil.copytree(ROOT / "workloads", copy / "workloads", ignore=shutil.ignore_patterns("__pycache__"))
    path = copy / "commlib" / importer
    path.write_text(path.read_text() + "\n" + line)
    out = lint(copy)
    assert out.returncode == 1, out.stdout + out.stderr
    broken = [row for row in out.stdout.splitlines() if "BROKEN" in row]
    assert broken and contract in out.stdout.split("BROKEN")[0].rsplit("\n\n", 1)[-1] + broken[0], out.stdout
    assert "1 broken" in out.stdout
