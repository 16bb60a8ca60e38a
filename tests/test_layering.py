"""Dependencies point one way: the builder and the service stand on the core, never on each other."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("aqe_retrieval", "index_builder", "service")
FORBIDDEN = {
    "aqe_retrieval": {"index_builder", "service", "fastapi", "starlette", "uvicorn", "tqdm"},
    "index_builder": {"service", "fastapi", "starlette", "uvicorn"},
    "service": {"index_builder", "tqdm"},
}


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, at any depth (lazy imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_the_parser_sees_lazy_imports(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\ndef f():\n    from service.app import create_app\n")
    assert imported_modules(probe) == {"os", "service"}


@pytest.mark.parametrize("package", PACKAGES)
def test_no_package_imports_the_ones_above_it(package: str) -> None:
    offenders = {
        str(p.relative_to(REPO)): sorted(imported_modules(p) & FORBIDDEN[package])
        for p in sorted((REPO / package).rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_service_workers_never_load_the_builder() -> None:
    """Importing the app (what each worker does) leaves the builder and tqdm out of the process."""
    code = (
        "import sys, service.app, service.main\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('index_builder', 'tqdm'))\n"
        "print(bad)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[]"
