"""docker/Dockerfile read as text: pinned installs, and a build context that holds what it copies.

No Docker needed; ``.ci/docker_e2e.sh`` builds and runs the image for real.
"""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "docker" / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        current += " " + stripped.removesuffix("\\")
        if not stripped.endswith("\\"):
            word, _, args = current.strip().partition(" ")
            out.append((word.upper(), args.strip()))
            current = ""
    return out


def pip_installs(text: str) -> list[list[str]]:
    """Every ``pip install`` command of the RUN instructions (``pip``, ``pip3``, ``python -m pip``)."""
    commands = []
    for word, args in instructions(text):
        if word != "RUN":
            continue
        lexer = shlex.shlex(args, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        argv: list[str] = []
        for token in [*lexer, ";"]:  # quoted strings stay whole; &&, ||, ;, | end a command
            if token not in ("&&", "||", ";", "|", ">", "<"):
                argv.append(token)
                continue
            for i, arg in enumerate(argv[:-1]):
                if Path(arg).name in ("pip", "pip3") and argv[i + 1] == "install":
                    commands.append(argv[i:])
                    break
            argv = []
    return commands


def constraint_files(argv: list[str]) -> list[str]:
    """The files ``-c`` / ``--constraint`` name in one pip command."""
    files = []
    for i, arg in enumerate(argv):
        if arg in ("-c", "--constraint") and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif arg.startswith("--constraint="):
            files.append(arg.split("=", 1)[1])
        elif arg.startswith("-c") and len(arg) > 2:
            files.append(arg[2:])
    return files


def copied_into_image() -> dict[str, str]:
    """Image path -> build-context path of every ``COPY`` (a directory destination ends in /)."""
    out = {}
    for word, args in instructions(DOCKERFILE.read_text()):
        if word != "COPY":
            continue
        *sources, dest = shlex.split(args)
        for source in sources:
            target = dest + Path(source).name if dest.endswith("/") else dest
            out[target] = source
    return out


def in_build_context(path: str) -> bool:
    """Whether ``.dockerignore`` (an allow-list: ``*`` then ``!`` entries) admits ``path``."""
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()]
    assert "*" in lines, ".dockerignore is expected to be an allow-list"
    allowed = [ln[1:].rstrip("/") for ln in lines if ln.startswith("!")]
    return any(path == a or path.startswith(a + "/") for a in allowed)


def test_the_parser_finds_pip_installs_and_their_constraints():
    text = (
        "FROM x\n# RUN pip install commented-out\nRUN python3 -m venv /v \\\n"
        " && pip install -r req.txt \\\n && pip install -c /src/constraints.txt /src\n"
        "RUN python -m pip install --constraint=c.txt y\n"
    )
    found = pip_installs(text)
    assert [constraint_files(c) for c in found] == [[], ["/src/constraints.txt"], ["c.txt"]]


def test_every_pip_install_uses_the_constraints():
    installs = pip_installs(DOCKERFILE.read_text())
    assert len(installs) >= 2, installs  # the dependencies, then the package
    for argv in installs:
        files = constraint_files(argv)
        assert files and all(Path(f).name == "constraints.txt" for f in files), (
            f"`{' '.join(argv)}` does not install with -c constraints.txt: the image would run "
            "versions CI never tested"
        )


def test_the_constraints_file_is_in_the_image_and_the_build_context():
    copied = copied_into_image()
    for argv in pip_installs(DOCKERFILE.read_text()):
        for f in constraint_files(argv):
            assert copied.get(f) == "constraints.txt", f"{f} is not COPYed from constraints.txt"
    assert in_build_context("constraints.txt")


def test_the_constraints_are_copied_before_the_dependency_layer_installs():
    steps = instructions(DOCKERFILE.read_text())
    first_install = next(i for i, (w, a) in enumerate(steps) if w == "RUN" and "pip install" in a)
    assert any(w == "COPY" and "constraints.txt" in a for w, a in steps[:first_install])


@pytest.mark.parametrize(
    "package",
    tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"],
)
def test_every_package_is_copied_and_in_the_build_context(package):
    name = package.rstrip("*")
    assert (REPO / name).is_dir()
    assert copied_into_image().get(f"/src/{name}") == name, f"docker/Dockerfile does not COPY {name}"
    assert in_build_context(name), f".dockerignore leaves {name} out of the build context"
