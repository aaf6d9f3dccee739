"""Passes are leaves: a module of ``passes/`` imports mqc core only, never another pass, the recipe layer or models.

Shared graph helpers live in core (``mqc/graph/``, ``mqc/linear_quant.py``), so a pass can be read, changed and
tested alone. Checked on the source with ``ast``, for top-level and function-local imports alike.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PASSES = Path(__file__).resolve().parents[2] / "passes"
FORBIDDEN = ("mqc.passes", "mqc.recipes", "mqc.models", "mqc.cli", "mqc.compiler", "passes", "models")


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, "." * node.level + (node.module or "")))
    return found


def _violations(path: Path) -> list[str]:
    bad = []
    for line, module in _imports(path):
        if module.startswith("."):
            bad.append(f"{path.name}:{line}: relative import {module!r}")
        elif any(module == f or module.startswith(f + ".") for f in FORBIDDEN):
            bad.append(f"{path.name}:{line}: imports {module}")
    return bad


@pytest.mark.parametrize("path", sorted(PASSES.glob("*.py")), ids=lambda p: p.name)
def test_pass_module_imports_core_only(path):
    assert _violations(path) == []


def test_the_rule_catches_what_it_forbids(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from mqc.passes.mas import X\nfrom . import cmc\nimport mqc.recipes\n"
                      "def f():\n    from mqc.models.packaged import resolve\n")
    assert len(_violations(sample)) == 4
