"""The package's layers import only downward, and its mathematics loads without Lightning or transformers."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import {{ cookiecutter.package_name }} as package

PACKAGE = Path(package.__file__).parent
LAYERS = ("kl", "models", "training", "runs", "reports")  # each may import those before it


def package_imports(path: Path) -> set[str]:
    """The first-level subpackages of this package that a module imports, relative or absolute."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(parts[: len(parts) - node.level])
            target = base + (node.module.split(".") if node.module else [a.name for a in node.names])
            found.add(target[0] if target else "")
        elif isinstance(node, ast.ImportFrom | ast.Import):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            for name in filter(None, names):
                first, _, rest = name.partition(".")
                if first == PACKAGE.name and rest:
                    found.add(rest.split(".")[0])
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_the_layers_below_it(layer):
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    wrong = {
        str(path.relative_to(PACKAGE)): sorted(package_imports(path) - allowed)
        for path in sorted((PACKAGE / layer).rglob("*.py"))
        if package_imports(path) - allowed
    }
    assert not wrong, f"{layer} imports from a layer above it: {wrong}"


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    # The check above would pass on a checker that finds nothing: it must see both spellings.
    module = PACKAGE / "kl" / "_upward_probe.py"
    module.write_text(
        f"from ..training import module\nimport {PACKAGE.name}.reports.plots\nfrom .estimators import sequence_kl\n"
    )
    try:
        assert package_imports(module) == {"training", "reports", "kl"}
    finally:
        module.unlink()


def test_importing_kl_loads_neither_lightning_nor_transformers():
    code = (
        f"import sys, {PACKAGE.name}.kl as kl; kl.sequence_kl; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'transformers', 'torchmetrics'}))"
    )
    # This checkout's package, installed or not (a bake's tests run from its folder).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_the_package_root_exports_the_public_api():
    for name in package.__all__:
        assert getattr(package, name) is not None, name
    with pytest.raises(AttributeError):
        package.not_a_name  # noqa: B018
