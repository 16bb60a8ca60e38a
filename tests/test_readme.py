"""README.md and docs/ against the tree: the Layout section is generated, nothing points outside.

After adding, splitting or renaming a module: ``python3 scripts/readme_layout.py --write``.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "readme_layout.py"


@pytest.fixture(scope="module")
def layout():
    spec = importlib.util.spec_from_file_location("readme_layout", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tracked_files() -> list[str]:
    """The repository's tracked files (every file but .git's, outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True, timeout=30
        ).stdout
        return sorted(p for p in out.decode().split("\0") if p and (REPO / p).is_file())
    except (OSError, subprocess.SubprocessError):
        return sorted(
            str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and ".git" not in p.parts
        )


def test_the_layout_section_is_the_one_the_tree_gives(layout):
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    _, section, _ = layout.split_readme(readme)
    assert section.rstrip("\n") == layout.render(REPO).rstrip("\n"), (
        "README.md's Layout section is out of date: run python3 scripts/readme_layout.py --write"
    )


def test_the_check_command_passes():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_package_module_is_listed_with_its_summary(layout):
    section = layout.render(REPO)
    for package in layout.PACKAGES:
        assert f"\n{package}/ " in section
        for module in (REPO / package).glob("*.py"):
            if module.name != "__init__.py":
                assert f"\n  {module.name} " in section
                assert layout.summary(module).split()[0] in section


def _fake_repo(tmp_path: Path, layout) -> Path:
    for package in layout.PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
        (tmp_path / package / "one.py").write_text(f'"""First module of ``{package}``.\n\nMore."""\n')
    (tmp_path / "README.md").write_text("# Title\n\n## Layout\n\nold\n\n## After\n\nkept\n")
    return tmp_path


def test_write_then_check_on_a_tree_that_changes(tmp_path, layout, capsys):
    root = _fake_repo(tmp_path, layout)
    assert layout.main(["--check", "--root", str(root)]) == 1
    assert "--write" in capsys.readouterr().out
    assert layout.main(["--write", "--root", str(root)]) == 0
    text = (root / "README.md").read_text()
    assert text.startswith("# Title\n\n## Layout\n") and text.endswith("\n\n## After\n\nkept\n")
    assert "  one.py" in text and "First module of `service`." in text and "old" not in text
    assert layout.main(["--check", "--root", str(root)]) == 0
    (root / "service" / "two.py").write_text('"""A split-off module."""\n')  # a module appears
    assert layout.main(["--check", "--root", str(root)]) == 1
    assert "+  two.py" in capsys.readouterr().out
    assert layout.main(["--write", "--root", str(root)]) == 0
    assert layout.main(["--check", "--root", str(root)]) == 0


def test_a_readme_without_the_section_is_an_error(tmp_path, layout):
    root = _fake_repo(tmp_path, layout)
    (root / "README.md").write_text("# Title\n")
    with pytest.raises(SystemExit, match="no '## Layout' section"):
        layout.main(["--check", "--root", str(root)])


DOCS = [p for p in tracked_files() if p.endswith(".md")]
TEXT = [p for p in tracked_files() if p.endswith((".md", ".py", ".toml", ".yaml", ".sh", ".txt", ".cfg"))]


# Relative paths that leave the repository on purpose: a hostile value quoted as an example.
NOT_REFERENCES = {("README.md", "../../etc")}


@pytest.mark.parametrize("path", DOCS)
def test_readme_and_docs_never_point_outside_the_repository(path):
    text = (REPO / path).read_text(encoding="utf-8")
    for i, line in enumerate(text.splitlines(), start=1):
        assert not re.search(r"\bshared/|\bseeds/", line), f"{path}:{i}: a file outside the repository"
        for rel in re.findall(r"(?<![\w.])((?:\.\./)+[\w./-]*)", line):
            if (path, rel.rstrip(".")) in NOT_REFERENCES:
                continue
            resolved = ((REPO / path).parent / rel).resolve()
            assert resolved.is_relative_to(REPO), f"{path}:{i}: {rel} is outside the repository"
            assert resolved.exists(), f"{path}:{i}: {rel} points at nothing"


def test_no_tracked_file_refers_to_the_shared_folder():
    me = str(Path(__file__).relative_to(REPO))
    offenders = [
        f"{p}:{i + 1}"
        for p in TEXT
        if p != me
        for i, line in enumerate((REPO / p).read_text(encoding="utf-8", errors="replace").splitlines())
        if re.search(r"\bshared/|\bseeds/", line)
    ]
    assert offenders == [], "these point at files outside the repository (use docs/AQE.md)"


@pytest.mark.parametrize("path", DOCS)
def test_relative_links_in_docs_resolve_inside_the_repository(path):
    text = (REPO / path).read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:|^#", target):
            continue  # a URL or an anchor
        resolved = ((REPO / path).parent / target.split("#")[0]).resolve()
        assert resolved.is_relative_to(REPO), f"{path}: link {target} leaves the repository"
        assert resolved.exists(), f"{path}: link {target} points at nothing"
