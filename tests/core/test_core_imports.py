"""Core compile does not depend on ``mqc.models``: the models package lends its hooks (``mqc.packages``)."""

import ast
import subprocess
import sys
from pathlib import Path

import mqc

CORE = Path(mqc.__file__).parent
#: The composition roots that may import mqc.models: the CLI and the package facade.
ROOTS = {"cli.py", "__init__.py"}


def test_core_modules_do_not_import_models():
    for path in sorted(CORE.glob("*.py")):
        if path.name in ROOTS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith("mqc.models") for n in names), f"{path.name} imports {names}"


def test_compiler_imports_without_models():
    code = "import sys, mqc.compiler; print(any(m.startswith('mqc.models') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "False", result.stderr


def test_package_hooks_are_registered_by_models():
    import mqc.models  # noqa: F401

    from mqc.packages import package_hooks

    hooks = package_hooks()
    assert hooks.resolve.__module__ == "mqc.models.packaged"
