"""The documentation site builds with --strict, and its runnable examples pass as doctests."""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import commlib

ROOT = Path(__file__).resolve().parents[1]
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("page", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_doc_page_examples(page):
    result = doctest.testfile(str(ROOT / "docs" / page), module_relative=False, optionflags=FLAGS)
    assert result.failed == 0


def test_library_docstring_examples():
    attempted = 0
    for info in pkgutil.walk_packages(commlib.__path__, "commlib."):
        if info.name.endswith("__main__"):
            continue
        result = doctest.testmod(importlib.import_module(info.name), optionflags=FLAGS)
        assert result.failed == 0, info.name
        attempted += result.attempted
    assert attempted >= 70


def _readme_code_blocks():
    text = (ROOT / "README.md").read_text()
    blocks, inside, current = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if inside is None:
                inside, current = line[3:].strip(), []
            else:
                blocks.append((inside, "\n".join(current)))
                inside = None
        elif inside is not None:
            current.append(line)
    return text, blocks


def test_readme_is_a_front_page():
    """The README stays short, its links lead to files that exist, and its snippets name real API."""
    import ast
    import re

    from commlib import hooks

    text, blocks = _readme_code_blocks()
    assert len(text.splitlines()) <= 250
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (ROOT / target).exists(), target
    python = [code for lang, code in blocks if lang == "python"]
    assert len(python) >= 3
    for code in python:
        tree = ast.parse(code)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("commlib"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name) or importlib.util.find_spec(
                        f"{node.module}.{alias.name}"), f"{node.module}.{alias.name}"
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in {"hooks", "compress"}):
                module = importlib.import_module(f"commlib.{node.func.value.id}")
                assert hasattr(module, node.func.attr), f"{node.func.value.id}.{node.func.attr}"
                if node.func.attr == "make":
                    assert node.args[0].value in hooks.names()
