"""Imports point one way: cli -> infer -> train -> numerics -> pipeline (see STYLE.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# package folder -> inkpipe packages it must not import
FORBIDDEN = {
    "pipeline": ("inkpipe.numerics", "inkpipe.train", "inkpipe.infer", "inkpipe.cli"),
    "numerics": ("inkpipe.train", "inkpipe.infer", "inkpipe.cli"),
    "train": ("inkpipe.infer", "inkpipe.cli"),
    "infer": ("inkpipe.cli",),
}
# infer may use train's model factory and checkpoint loading, nothing else
INFER_MAY_USE = ("inkpipe.train.checkpoint", "inkpipe.train.models")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def _is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_stages_do_not_import_upwards(package):
    for path in sorted((ROOT / package).glob("*.py")):
        for module in imported_modules(path):
            bad = [p for p in FORBIDDEN[package] if _is_within(module, p)]
            assert not bad, f"{path.relative_to(ROOT)} imports {module}"
            if package == "infer" and _is_within(module, "inkpipe.train"):
                assert module in INFER_MAY_USE, f"{path.relative_to(ROOT)} imports {module}"
