"""Crash the builder: SIGKILL ``index-builder build`` at random points, then check the index root.

Each run is ``python -m index_builder.cli build`` on a seeded gallery with ids and metadata
(default 20,000 x 64, so every phase takes a little time) into one index root, killed with
SIGKILL either at a random time spread over the duration of an uninterrupted run (measured
first) or a random moment after a phase's first file appears (staging directory, level arrays,
serving index, ids, manifest, version renamed into place), so that the short publish phase is
hit too; a few runs use a very small gallery. After every kill:

- ``current`` is absent or names a version that ``artifact.verify`` passes and
  ``artifact.load`` loads;
- every later run that gets as far as its own staging directory has removed the staging
  directories of the runs killed before it;

and after every ``--recover-every`` kills (and at the end) an unkilled run must succeed,
publish a new current version and leave no ``.staging-*`` directory behind.

Then the faults: a full disk (a 2 MiB tmpfs, when ``mount`` works here), and unusable inputs
(a directory without shards, a truncated ``.npy``, a text file named ``.npy``, ``/dev/null``, a
FIFO, a directory given as the ids file, binary metadata): each must exit non-zero within
``--fault-timeout`` seconds with one ``ERROR`` line that names the problem (no traceback),
publish nothing and leave nothing behind.

Exit status 0 when every check holds. ``--json FILE`` writes the whole record.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aqe_retrieval import artifact

REPO = Path(__file__).resolve().parents[1]

# name -> (file whose appearance arms the kill, longest random delay after it as a share of an
# uninterrupted build's duration)
TRIGGERS: dict[str, tuple[str, float]] = {
    "staging": ("staging", 0.5),
    "level": ("level_0.npy", 0.1),
    "serving": ("serving.faiss", 0.03),
    "ids": ("ids.npy", 0.03),
    "manifest": ("manifest.json", 0.005),
    "renamed": ("renamed", 0.0005),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=24, help="killed runs on the main gallery")
    p.add_argument("--small-kills", type=int, default=4, help="killed runs on a tiny gallery")
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--small-rows", type=int, default=300)
    p.add_argument(
        "--uniform-share",
        type=float,
        default=0.4,
        help="share of kills at a uniform random time (the rest: after a phase's file)",
    )
    p.add_argument("--recover-every", type=int, default=4, help="an unkilled run after this many kills")
    p.add_argument("--keep", type=int, default=3, help="--keep of every build")
    p.add_argument(
        "--launcher",
        choices=["exec", "fork"],
        default="exec",
        help="exec: each build is `python -m index_builder.cli build` (default); "
        "fork: each build is cli.main() in a process forked from a server that has "
        "imported the builder (same code path, no interpreter start: for CI)",
    )
    p.add_argument("--no-faults", action="store_true", help="skip the full-disk and input cases")
    p.add_argument("--fault-timeout", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the record as JSON to this file ('-': stdout)")
    return p.parse_args(argv)


def write_gallery(directory: Path, n: int, d: int, seed: int) -> list[str]:
    """A clustered gallery with ids and metadata; returns the build arguments that read it."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 6 + 1, d)).astype(np.float32)
    x = centres[np.arange(n) // 6] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    np.save(directory / "gallery.npy", x.astype(np.float32))
    (directory / "ids.txt").write_text("".join(f"item-{i:06d}\n" for i in range(n)))
    (directory / "meta.csv").write_text("camera,label\n" + "".join(f"{i % 6},p{i // 6}\n" for i in range(n)))
    return [
        "--gallery",
        str(directory / "gallery.npy"),
        "--ids",
        str(directory / "ids.txt"),
        "--metadata",
        str(directory / "meta.csv"),
    ]


LAUNCHER = "exec"


def builder(inputs: list[str], root: Path, keep: int, log: Path):
    """Start one build; returns a handle with ``pid``, ``poll()``, ``wait()``, ``returncode``."""
    argv = [
        "build",
        *inputs,
        "--root",
        str(root),
        "--keep",
        str(keep),
        "--threads",
        "1",
        "--no-progress",
        "--qe-k",
        "5",
    ]
    if LAUNCHER == "fork":
        return _Forked(argv, log)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "index_builder.cli", *argv], cwd=REPO, stdout=out, stderr=subprocess.STDOUT
        )


def _run_cli(argv: list[str], log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    from index_builder.cli import main as cli_main

    sys.exit(cli_main(argv))


class _Forked:
    """``cli.main(argv)`` in a child of a forkserver that has imported the builder already."""

    _context = None

    def __init__(self, argv: list[str], log: Path) -> None:
        if _Forked._context is None:
            import multiprocessing

            _Forked._context = multiprocessing.get_context("forkserver")
            _Forked._context.set_forkserver_preload(["index_builder.cli"])
        self.process = _Forked._context.Process(target=_run_cli, args=(argv, str(log)))
        self.process.start()
        self.pid = self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode

    def poll(self) -> int | None:
        return self.process.exitcode

    def wait(self) -> int | None:
        self.process.join()
        return self.process.exitcode


def staging_of(root: Path, pid: int) -> Path | None:
    found = list(root.glob(f"{artifact.STAGING_PREFIX}*-{pid}"))
    return found[0] if found else None


def versions(root: Path) -> set[str]:
    return set(artifact.version_ids(root))


def armed(root: Path, pid: int, before: set[str], what: str) -> bool:
    if what == "renamed":
        return bool(versions(root) - before)
    stage = staging_of(root, pid)
    if stage is None:
        return False
    return what == "staging" or (stage / what).exists()


def phase_at_kill(root: Path, pid: int, before: set[str], current_before: str | None) -> str:
    """Where the run was when it died, read from what it left on disk."""
    stage = staging_of(root, pid)
    new = versions(root) - before
    if stage is not None:
        names = {p.name for p in stage.iterdir()}
        if any(n.startswith(f".{artifact.MANIFEST}") or n == artifact.MANIFEST for n in names):
            return "publish: manifest written"
        if "serving.faiss" in names and "ids.npy" in names and any(n.startswith("meta_") for n in names):
            return "publish: checksums + fsync"
        if "serving.faiss" in names:
            return "saving ids / metadata"
        if "level_0.npy" in names:
            return "expand + serving index"
        return "kNN graph"
    if new:
        cur = artifact.current_version(root)
        return "publish: switched current, pruning" if cur in new else "publish: renamed, before current"
    if artifact.current_version(root) != current_before:
        return "publish: switched current, pruning"
    return "start-up + input checks"


def check_root(root: Path) -> list[str]:
    """The crash-safety invariant of an index root; returns the problems found."""
    problems = []
    try:
        cur = artifact.current_version(root)
    except artifact.ArtifactError as exc:
        return [f"current unreadable: {exc}"]
    if cur is not None:
        try:
            damage = artifact.verify(root, cur)
            if damage:
                problems.append(f"current {cur} damaged: {damage}")
            else:
                artifact.load(root, cur)
        except artifact.ArtifactError as exc:
            problems.append(f"current {cur} does not load: {exc}")
    return problems


def incomplete_versions(root: Path) -> list[str]:
    """Non-current version directories that do not verify (e.g. a prune cut short)."""
    bad = []
    for v in artifact.version_ids(root):
        try:
            if artifact.verify(root, v):
                bad.append(v)
        except artifact.ArtifactError:
            bad.append(v)
    return bad


def measure(inputs: list[str], work: Path, keep: int) -> float:
    """Seconds of an uninterrupted build (the second of two: the first warms caches up)."""
    root = work / "timing-root"
    took = []
    for _ in range(2):
        t0 = time.monotonic()
        proc = builder(inputs, root, keep, work / "timing.log")
        if proc.wait() != 0:
            raise SystemExit(
                f"crash_test: an uninterrupted build failed:\n{(work / 'timing.log').read_text()[-3000:]}"
            )
        took.append(time.monotonic() - t0)
    shutil.rmtree(root)
    return took[-1]


def kill_run(
    inputs: list[str], root: Path, keep: int, log: Path, rng: random.Random, trigger: str, duration: float
) -> dict:
    """Start a build, SIGKILL it at the chosen moment; returns what happened."""
    before, current_before = versions(root), artifact.current_version(root)
    dead_before = {p.name for p in root.glob(f"{artifact.STAGING_PREFIX}*")} if root.exists() else set()
    t0 = time.monotonic()
    proc = builder(inputs, root, keep, log)
    if trigger == "uniform":
        at = t0 + rng.uniform(0.05, 0.95 * duration)
        while time.monotonic() < at and proc.poll() is None:
            time.sleep(0.002)
    else:
        what, delay = TRIGGERS[trigger]
        deadline = t0 + 3 * duration + 10
        while proc.poll() is None and not armed(root, proc.pid, before, what):
            if time.monotonic() > deadline:
                break
            time.sleep(0.0005)
        time.sleep(rng.uniform(0, delay * duration))
    finished = proc.poll() is not None
    if not finished:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = time.monotonic() - t0
    phase = "completed before the kill" if finished else phase_at_kill(root, proc.pid, before, current_before)
    own = staging_of(root, proc.pid)
    # Staging directories of earlier dead runs must be gone once this run made its own.
    leftovers = sorted(dead_before & {p.name for p in root.glob(f"{artifact.STAGING_PREFIX}*")})
    return {
        "trigger": trigger,
        "killed_at_s": round(killed_at, 3),
        "phase": phase,
        "exit": proc.returncode,
        "problems": check_root(root),
        "not_cleaned": leftovers if own is not None or finished else [],
        "incomplete_versions": incomplete_versions(root),
        "stray_files": stray_files(root),
    }


KNOWN = {artifact.CURRENT, artifact.VERSIONS, artifact.STATUS, artifact.LOCK}


def stray_files(root: Path) -> list[str]:
    """Entries of the root that are neither the format's own nor a staging directory."""
    if not root.exists():
        return []
    return sorted(
        p.name
        for p in root.iterdir()
        if p.name not in KNOWN and not p.name.startswith(artifact.STAGING_PREFIX)
    )


def recover(inputs: list[str], root: Path, keep: int, log: Path) -> dict:
    """An unkilled run after crashes: must succeed, publish, and leave no staging behind."""
    current_before = artifact.current_version(root)
    rc = builder(inputs, root, keep, log).wait()
    problems = check_root(root)
    current = artifact.current_version(root)
    if rc != 0:
        problems.append(f"exit status {rc}")
    if current is None or current == current_before:
        problems.append("nothing new published")
    left = sorted(p.name for p in root.glob(f"{artifact.STAGING_PREFIX}*"))
    if left:
        problems.append(f"staging left behind: {left}")
    return {"exit": rc, "problems": problems}


# ---------------------------------------------------------------------------------- faults


def run_fault(name: str, args_: list[str], root: Path, timeout: float, expect: str) -> dict:
    """Run a build that must fail cleanly; check exit, message, and that nothing changed."""
    before = (artifact.current_version(root), versions(root)) if root.exists() else (None, set())
    cmd = [
        sys.executable,
        "-m",
        "index_builder.cli",
        "build",
        *args_,
        "--root",
        str(root),
        "--no-progress",
        "--threads",
        "1",
    ]
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        rc, err = proc.returncode, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, err = None, f"still running after {timeout:.0f}s (killed): " + str(exc.stderr or "")
    errors = [line for line in err.splitlines() if " ERROR " in line]
    after = (artifact.current_version(root), versions(root)) if root.exists() else (None, set())
    problems = []
    if rc is None:
        problems.append(f"hangs (no exit within {timeout:.0f}s)")
    elif rc == 0:
        problems.append("exit status 0")
    if "Traceback" in err:
        problems.append("a traceback instead of an error message")
    if rc is not None and not any(expect.lower() in line.lower() for line in errors):
        problems.append(f"no ERROR line naming {expect!r}")
    if after != before:
        problems.append("something was published")
    if root.exists() and list(root.glob(f"{artifact.STAGING_PREFIX}*")):
        problems.append("staging left behind")
    last = errors[-1] if errors else err.strip().splitlines()[-1] if err.strip() else ""
    return {"case": name, "exit": rc, "message": last[-300:], "problems": problems}


def faults(work: Path, inputs: list[str], timeout: float) -> list[dict]:
    bad = work / "bad"
    bad.mkdir()
    gallery = Path(inputs[1])
    (bad / "empty").mkdir()
    (bad / "truncated.npy").write_bytes(gallery.read_bytes()[:1000])
    (bad / "text.npy").write_text("not an array\n")
    os.mkfifo(bad / "fifo.npy")
    (bad / "ids-dir").mkdir()
    (bad / "meta.bin").write_bytes(bytes(range(256)) * 8)
    root = work / "fault-root"
    cases: list[tuple[str, list[str], str]] = [
        ("directory without .npy shards", ["--gallery", str(bad / "empty")], "no .npy"),
        ("truncated .npy", ["--gallery", str(bad / "truncated.npy")], "truncated.npy"),
        ("text file named .npy", ["--gallery", str(bad / "text.npy")], "text.npy"),
        ("/dev/null as gallery", ["--gallery", "/dev/null"], "/dev/null"),
        ("missing gallery", ["--gallery", str(bad / "nope.npy")], "no such file"),
        ("FIFO as gallery", ["--gallery", str(bad / "fifo.npy")], "fifo.npy"),
        ("directory as ids file", [*inputs[:2], "--ids", str(bad / "ids-dir")], "ids-dir"),
        ("binary metadata", [*inputs[:2], "--metadata", str(bad / "meta.bin")], "meta.bin"),
    ]
    results = [run_fault(name, a, root, timeout, expect) for name, a, expect in cases]
    results.append(full_disk(work, inputs, timeout))
    return results


def full_disk(work: Path, inputs: list[str], timeout: float) -> dict:
    """A build into a 2 MiB tmpfs (skipped where mount is not allowed)."""
    mnt = work / "tiny-fs"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        return {"case": "full disk (2 MiB tmpfs)", "skipped": mounted.stderr.strip()[:200], "problems": []}
    try:
        return run_fault("full disk (2 MiB tmpfs)", inputs, mnt / "root", timeout, "No space left on device")
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# ------------------------------------------------------------------------------------ main


def plan(n: int, uniform_share: float, rng: random.Random) -> list[str]:
    """Kill triggers: a share at uniform times, the rest cycling through the phase files."""
    n_uniform = round(n * uniform_share)
    phased = [list(TRIGGERS)[i % len(TRIGGERS)] for i in range(n - n_uniform)]
    order = ["uniform"] * n_uniform + phased
    rng.shuffle(order)
    return order


def main(argv: list[str] | None = None) -> int:
    global LAUNCHER
    args = parse_args(argv)
    LAUNCHER = args.launcher
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="aqe-crash-"))
    try:
        record = run(args, rng, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(record), file=sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        text = json.dumps(record, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0 if record["passed"] else 1


def run(args: argparse.Namespace, rng: random.Random, work: Path) -> dict:
    big = write_gallery(work / "big", args.rows, args.dim, args.seed)
    small = write_gallery(work / "small", args.small_rows, 16, args.seed + 1)
    durations = {"big": measure(big, work, args.keep)}
    if args.small_kills:
        durations["small"] = measure(small, work, args.keep)
    root, log = work / "root", work / "builds.log"
    kills: list[dict] = []
    recoveries: list[dict] = []
    runs: list[tuple[list[str], str, str]] = [
        (big, "big", t) for t in plan(args.kills, args.uniform_share, rng)
    ] + [(small, "small", t) for t in plan(args.small_kills, args.uniform_share, rng)]
    retries = len(runs) // 2  # a run that finished before its kill is run again, this often
    i = 0
    while i < len(runs):
        inputs, size, trigger = runs[i]
        i += 1
        result = kill_run(inputs, root, args.keep, log, rng, trigger, durations[size])
        kills.append({"gallery": size, **result})
        if result["phase"] == "completed before the kill" and retries > 0:
            retries -= 1
            runs.append(runs[i - 1])
        if i % args.recover_every == 0 or i == len(runs):
            recoveries.append(recover(inputs, root, args.keep, log))
    fault_results = [] if args.no_faults else faults(work, big, args.fault_timeout)
    killed = [k for k in kills if k["phase"] != "completed before the kill"]
    checks = {
        "current_always_complete": all(not k["problems"] for k in kills),
        "leftovers_cleaned_by_next_run": all(not k["not_cleaned"] for k in kills),
        "recovery_runs_succeed": all(not r["problems"] for r in recoveries),
        "faults_fail_cleanly": all(not f["problems"] for f in fault_results),
        "enough_kills": len(killed) >= min(20, args.kills + args.small_kills),
    }
    return {
        "durations_s": {k: round(v, 2) for k, v in durations.items()},
        "kills": kills,
        "recoveries": recoveries,
        "faults": fault_results,
        "killed": len(killed),
        "phases": dict(Counter(k["phase"] for k in kills)),
        "incomplete_versions_seen": sorted({v for k in kills for v in k["incomplete_versions"]}),
        "stray_files_seen": sorted({f for k in kills for f in k["stray_files"]}),
        "checks": checks,
        "passed": all(checks.values()),
    }


def report(r: dict) -> str:
    timing = ", ".join(f"{v}s ({k})" for k, v in r["durations_s"].items())
    lines = [
        f"uninterrupted build: {timing}; {r['killed']} runs killed, {len(r['recoveries'])} recovery runs",
        "phases hit:",
    ]
    lines += [f"  {n:>3}  {phase}" for phase, n in sorted(r["phases"].items(), key=lambda x: x[0])]
    for k in r["kills"]:
        for p in k["problems"] + [f"not cleaned: {x}" for x in k["not_cleaned"]]:
            lines.append(f"  kill at {k['killed_at_s']}s ({k['phase']}): {p}")
    for rec in r["recoveries"]:
        lines += [f"  recovery: {p}" for p in rec["problems"]]
    if r["incomplete_versions_seen"]:
        lines.append(
            f"  note: non-current versions left incomplete (a prune cut short): "
            f"{r['incomplete_versions_seen']}"
        )
    if r["stray_files_seen"]:
        lines.append(f"  note: stray files left in the root: {r['stray_files_seen']}")
    if r["faults"]:
        lines.append("faults:")
    for f in r["faults"]:
        state = (
            ("skipped: " + f["skipped"])
            if "skipped" in f
            else ("ok" if not f["problems"] else "FAIL: " + "; ".join(f["problems"]))
        )
        lines.append(f"  {f['case']:<32} exit {f.get('exit')!s:<5} {state}")
        if f.get("message"):
            lines.append(f"      {f['message'][:160]}")
    lines += [f"  [{'ok' if v else 'FAIL'}] {k}" for k, v in r["checks"].items()]
    lines.append("PASSED" if r["passed"] else "FAILED")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
