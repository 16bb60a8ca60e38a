"""Render README.md's "## Layout" section from the tree, and rewrite or check it.

Each package is listed with its modules and each module's docstring summary (its first
paragraph); the other top-level folders briefly, with their files. Run after adding, splitting or
renaming a module:

    python3 scripts/readme_layout.py --write    # rewrite the section in place
    python3 scripts/readme_layout.py --check    # exit 1 with a diff if it is out of date
    python3 scripts/readme_layout.py            # print the section

``tests/test_readme.py`` runs the check, so the section cannot drift from the tree.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Layout"

PACKAGES = {
    "aqe_retrieval": "the core both programs stand on (imports neither of them, no HTTP)",
    "index_builder": "the offline builder: `index-builder`",
    "service": "the search service: `search-service` (FastAPI)",
}
TESTS = (
    "one test module per module of the core (test_<module>.py), the programs' tests, end-to-end "
    "and reliability tests; reference.py is a numpy port of fast-reid's aqe (the oracle), "
    "parity.py judges parity with it allowing exact ties, helpers.py makes seeded data and starts "
    "real services"
)
# (folder, what it is, file pattern listed after it)
FOLDERS = [
    ("benchmarks", "the figures of the Benchmarks section", "*"),
    ("scripts", "demo, data set, load and crash tests, this section", "*.py"),
    ("docker", "the image, compose file and deployment guide", "*"),
    ("deploy/k8s", "Kubernetes examples", "*.yaml"),
    ("docs", "the AQE contract and the evaluation plots", "*"),
]
INTRO = (
    "One core package and two programs on it. Each module with the summary line of its docstring;\n"
    "generated from the tree by `python3 scripts/readme_layout.py --write` (a test checks it)."
)
LINE = 120  # wrap descriptions at this width


def summary(path: Path) -> str:
    """The first paragraph of a module's docstring on one line, reST markup removed."""
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"), str(path))) or ""
    text = " ".join(doc.split("\n\n")[0].split())
    text = re.sub(r":[a-z]+:`~?([^`]+)`", lambda m: m.group(1).rsplit(".", 1)[-1], text)
    return text.replace("``", "`")


def _rows(entries: list[tuple[str, str]]) -> list[str]:
    """Names in one column, their descriptions wrapped in the next."""
    col = max(len(name) for name, _ in entries) + 2
    lines = []
    for name, text in entries:
        wrapped = textwrap.wrap(text, LINE - col, break_on_hyphens=False) or [""]
        lines.append((name.ljust(col) + wrapped[0]).rstrip())
        lines += [" " * col + more for more in wrapped[1:]]
    return lines


def render(root: Path = REPO) -> str:
    """The whole section, heading included, ending in one newline."""
    entries: list[tuple[str, str]] = []
    for package, what in PACKAGES.items():
        entries.append((f"{package}/", what))
        for module in sorted((root / package).glob("*.py")):
            if module.name != "__init__.py":
                entries.append((f"  {module.name}", summary(module)))
    entries.append(("tests/", TESTS))
    for folder, what, pattern in FOLDERS:
        names = sorted(
            p.name + ("/" if p.is_dir() else "")
            for p in (root / folder).glob(pattern)
            if p.name != "__pycache__"
        )
        entries.append((f"{folder}/", f"{what}: {', '.join(names)}" if names else what))
    return "\n".join([HEADING, "", INTRO, "", "```text", *_rows(entries), "```"]) + "\n"


def split_readme(text: str) -> tuple[str, str, str]:
    """``(before, section, after)``: the section runs from its heading to the next ``## `` heading."""
    match = re.search(rf"^{re.escape(HEADING)}[ \t]*$", text, re.M)
    if match is None:
        raise SystemExit(f"README.md has no '{HEADING}' section")
    following = re.search(r"^## ", text[match.end() :], re.M)
    end = match.end() + following.start() if following else len(text)
    return text[: match.start()], text[match.start() : end], text[end:]


def updated(readme: str, section: str) -> str:
    """``readme`` with its Layout section replaced by ``section`` (a blank line before the next)."""
    before, _, after = split_readme(readme)
    return before + section + ("\n" + after if after else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="rewrite the section of README.md in place")
    mode.add_argument("--check", action="store_true", help="exit 1 with a diff if the section is stale")
    parser.add_argument("--root", type=Path, default=REPO, help="repository root (default: this one)")
    args = parser.parse_args(argv)
    readme_path = args.root / "README.md"
    readme = readme_path.read_text(encoding="utf-8")
    fresh = updated(readme, render(args.root))
    if args.write:
        if fresh != readme:
            readme_path.write_text(fresh, encoding="utf-8")
            print(f"{readme_path}: Layout section rewritten")
        return 0
    if args.check:
        if fresh == readme:
            return 0
        diff = difflib.unified_diff(
            readme.splitlines(keepends=True),
            fresh.splitlines(keepends=True),
            "README.md",
            "README.md (from the tree)",
        )
        sys.stdout.writelines(diff)
        print("\nREADME.md's Layout section is out of date: run python3 scripts/readme_layout.py --write")
        return 1
    sys.stdout.write(render(args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
