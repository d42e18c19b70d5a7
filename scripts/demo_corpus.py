"""Extract the demo model's training and held-out text from the Python standard library's docstrings.

Nothing is downloaded and no text is copied into the repository: the corpus is rebuilt from the
running interpreter's own ``Lib/`` directory. Modules are split by a hash of their path into train
(~95%) and held-out (~5%), so the held-out text never appears in training.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import sysconfig
from pathlib import Path

SKIP_PARTS = {"test", "tests", "site-packages", "idle_test", "__pycache__", "lib2to3", "turtledemo"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not (set(p.relative_to(root).parts) & SKIP_PARTS)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def docstrings(path: Path) -> list[str]:
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


if __name__ == "__main__":
    tr, he = build_corpus()
    print(len(tr), sum(map(len, tr)), len(he), sum(map(len, he)))
