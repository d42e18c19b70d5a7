"""Curated mutation testing: apply each mutant of ``mutants/*.toml`` to a scratch copy of the tree, run the
tests that must kill it, and report killed/total. Exit 0 only when every mutant is killed.

A mutant is one plausible bug: ``find`` (an exact substring occurring once in ``file``) becomes ``replace``.
``tests`` are the pytest node ids that must fail on it. The working tree is never modified: every run happens
in a temporary copy of the files git tracks (plus untracked, unignored ones), imported ahead of any install.

    python scripts/mutants.py                 # every mutant
    python scripts/mutants.py -k kl -k int8   # ids containing "kl" or "int8"
    python scripts/mutants.py --list
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    id: str
    file: str
    find: str
    replace: str
    tests: tuple[str, ...]
    why: str
    catalog: str


def load_catalog(directory: Path = ROOT / "mutants") -> list[Mutant]:
    """Every mutant of every ``*.toml`` in ``directory``, checked against the pristine tree."""
    mutants: list[Mutant] = []
    problems: list[str] = []
    for toml in sorted(directory.glob("*.toml")):
        for m in tomllib.loads(toml.read_text(encoding="utf-8")).get("mutant", []):
            mutant = Mutant(m["id"], m["file"], m["find"], m["replace"], tuple(m["tests"]), m.get("why", ""), toml.name)
            mutants.append(mutant)
            source = (ROOT / mutant.file).read_text(encoding="utf-8") if (ROOT / mutant.file).is_file() else None
            if source is None:
                problems.append(f"{toml.name}: {mutant.id}: {mutant.file} does not exist")
            elif source.count(mutant.find) != 1:
                problems.append(
                    f"{toml.name}: {mutant.id}: 'find' occurs {source.count(mutant.find)} times in {mutant.file}"
                    " (must be exactly once: the catalog is stale)"
                )
            if mutant.find == mutant.replace:
                problems.append(f"{toml.name}: {mutant.id}: replace equals find")
            if not mutant.tests:
                problems.append(f"{toml.name}: {mutant.id}: no tests")
    ids = [m.id for m in mutants]
    problems += [f"duplicate mutant id {i!r}" for i in sorted({i for i in ids if ids.count(i) > 1})]
    if problems:
        raise SystemExit("mutants: bad catalog:\n  " + "\n  ".join(problems))
    return mutants


def scratch_copy(dest: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in files:
        if not raw:
            continue
        rel = Path(os.fsdecode(raw))
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_tests(tree: Path, tests: tuple[str, ...], timeout: float) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]
    try:
        r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timed out"
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
    return r.returncode, lines[-1] if lines else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", action="append", default=[], help="run only mutants whose id contains this (repeatable)")
    ap.add_argument("--list", action="store_true", help="list the catalog and exit")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per test run (a timeout counts as killed)")
    args = ap.parse_args(argv)

    mutants = load_catalog()
    if args.k:
        mutants = [m for m in mutants if any(k in m.id for k in args.k)]
    if args.list:
        for m in mutants:
            print(f"{m.id:32} {m.file:32} {m.why}")
        print(f"{len(mutants)} mutants")
        return 0
    if not mutants:
        print("mutants: nothing selected", file=sys.stderr)
        return 2

    with tempfile.TemporaryDirectory(prefix="tolcli-mutants-") as tmp:
        tree = Path(tmp)
        scratch_copy(tree)
        check = subprocess.run(
            [sys.executable, "-c", "import tolcli; print(tolcli.__file__)"],
            cwd=tree,
            env=dict(os.environ, PYTHONPATH=str(tree)),
            capture_output=True,
            text=True,
        )
        if not check.stdout.strip().startswith(str(tree)):
            print(f"mutants: the scratch copy is not the tolcli imported ({check.stdout.strip()})", file=sys.stderr)
            return 2
        # The selected tests must pass on the unmutated tree, or a "kill" means nothing.
        every_test = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        t0 = time.monotonic()
        rc, last = run_tests(tree, every_test, args.timeout * 4)
        if rc != 0:
            print(f"mutants: the tests fail without any mutant ({last}); fix them first", file=sys.stderr)
            return 2
        print(f"baseline: {len(every_test)} test selections pass ({time.monotonic() - t0:.0f} s)", flush=True)

        survivors: list[Mutant] = []
        for i, m in enumerate(mutants, 1):
            path = tree / m.file
            original = path.read_text(encoding="utf-8")
            path.write_text(original.replace(m.find, m.replace, 1), encoding="utf-8")
            t0 = time.monotonic()
            try:
                rc, last = run_tests(tree, m.tests, args.timeout)
            finally:
                path.write_text(original, encoding="utf-8")
            verdict = "killed" if rc not in (0, 5) else ("NO TESTS RAN" if rc == 5 else "SURVIVED")
            if verdict != "killed":
                survivors.append(m)
            print(f"[{i:2}/{len(mutants)}] {verdict:8} {m.id:30} {time.monotonic() - t0:5.1f}s  {m.why}", flush=True)

    killed = len(mutants) - len(survivors)
    print(f"\n{killed}/{len(mutants)} mutants killed")
    for m in survivors:
        print(f"survivor: {m.id} ({m.catalog}): {m.file}: {m.find!r} -> {m.replace!r}")
    return 1 if survivors else 0


if __name__ == "__main__":
    raise SystemExit(main())
