"""Extract the demo model's training and held-out text from the Python standard library's docstrings.

Nothing is downloaded and no text is copied into the repository: the corpus is rebuilt from the
running interpreter's own ``Lib/`` directory. Modules are split by a hash of their path into train
(~95%) and held-out (~5%), so the held-out text never appears in training.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import sysconfig
from pathlib import Path

SKIP_PARTS = {"test", "tests", "site-packages", "idle_test", "__pycache__", "lib2to3", "turtledemo"}


CALIBRATION_EVERY = 20  # docs/compression.md: the calibration text is every 20th training document


def stdlib_files() -> list[Path]:
    """The standard library's modules, in a deterministic order (tests and tool folders left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts) & SKIP_PARTS)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def docstrings(path: Path) -> list[str]:
    """The docstrings of a module, its classes and functions (at least 40 characters), cleaned."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc and len(doc) >= 40:
                out.append(inspect.cleandoc(doc))
    return out


def is_heldout(rel: str) -> bool:
    """Whether a module (by its path below ``Lib/``) belongs to the held-out text."""
    return hashlib.sha256(rel.encode()).digest()[0] < 13  # ~5% of modules


def build_corpus() -> tuple[list[str], list[str]]:
    """(train documents, held-out documents), deduplicated, in a deterministic order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    train: list[str] = []
    held: list[str] = []
    for f in stdlib_files():
        rel = f.relative_to(root).as_posix()
        for d in docstrings(f):
            if d in seen:
                continue
            seen.add(d)
            (held if is_heldout(rel) else train).append(d)
    from pydoc_data.topics import topics  # the language reference, shipped with every CPython

    for key in sorted(topics):
        text = topics[key].strip()
        if text and text not in seen:
            seen.add(text)
            (held if is_heldout("pydoc_data/topics/" + key) else train).append(text)
    return train, held


def calibration_text(train: list[str], every: int = CALIBRATION_EVERY) -> str:
    """Every ``every``-th training document, joined as the training text is (``"\\n\\n"``): calibration text for
    ``compress --calibration`` / ``sweep --calibration`` that never sees the held-out text."""
    return "\n\n".join(train[::every]) + "\n"


def main(argv: list[str] | None = None) -> None:
    """Print the corpus's sizes; with ``--calibration FILE``, also write the calibration text there."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calibration", type=Path, metavar="FILE", help="write every 20th training document here")
    args = ap.parse_args(argv)
    tr, he = build_corpus()
    shipped = Path(__file__).resolve().parent.parent / "tolcli" / "demo" / "heldout.txt"
    same = shipped.is_file() and shipped.read_text(encoding="utf-8") == "\n\n".join(he) + "\n"
    print(f"train: {len(tr):,} documents, {sum(map(len, tr)):,} characters")
    print(
        f"held-out: {len(he):,} documents, {sum(map(len, he)):,} characters, "
        + ("the same text as" if same else "NOT the text of (another Python version?)")
        + " tolcli/demo/heldout.txt"
    )
    if args.calibration is not None:
        text = calibration_text(tr)
        args.calibration.write_text(text, encoding="utf-8")
        print(f"wrote {args.calibration} ({len(tr[::CALIBRATION_EVERY]):,} documents, {len(text):,} characters)")


if __name__ == "__main__":
    main()
