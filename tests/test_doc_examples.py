"""Every fenced example of README.md and docs/*.md runs as shown (issue 18).

The markup is documented in docs/contributing.md ("Documented examples"); in short:

- a fence tagged ``sh``, ``bash``, ``shell``, ``console`` or ``python`` is an example. Each page's examples run
  literally, in order, in a scratch directory of their own that looks like a checkout (``tolcli/``, ``docs/``,
  ``scripts/``, ``Makefile``, ``.venv``) and holds what the pages assume (:func:`checkout`);
- ``<!-- example: skip (REASON) -->`` directly before a fence: not run (a GPU, torchrun, the network, a long job).
  Every skip is reported by pytest with its reason (``-rs``); a skip without a reason fails;
- ``<!-- example: output -->`` directly before a ``text`` (or untagged) fence: what the page's previous example prints
  (stdout and stderr together). A ``console`` fence holds its own: ``$`` lines are commands, the lines under one its
  output;
- shown output is compared line by line, after stripping trailing spaces and reading a run of spaces as one; ``...``
  inside a line stands for any text within that line, and a line that is just ``...`` for any number of lines.
  Everything else, numbers included, must be equal;
- every command must exit 0, except one followed by ``echo $?`` (which then shows the status).

Generated pages (docs/cli.md, docs/api.md, docs/commands/*) are checked by tests/test_docs.py instead.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tolcli import CompressOptions, compress, demo_checkpoint_path, demo_heldout_path, precompute

ROOT = Path(__file__).resolve().parent.parent
LANGS = {"sh", "bash", "shell", "console", "python"}
GENERATED = {"cli.md", "api.md"}  # docs/commands/* are not globbed (docs/*.md only)
FENCE = re.compile(r"^( {0,3})```\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^<!--\s*example:\s*(.*?)\s*-->$")
SKIP = re.compile(r"^skip(?:\s*\((.*)\))?$")
HUB_COMMIT = "3f2a9c0d5e1b4a7f8c6d2e0b9a1f3c5d7e9b2a4c"  # docs/checkpoint-format.md names this snapshot
TIMEOUT = 900  # seconds for one example (make demo is the longest: about a minute of CPU)


@dataclass
class Example:
    """One fenced example: where it is, its code, and what the page says about it."""

    page: str
    line: int
    lang: str
    code: str
    skip: str | None = None  # the reason given by a skip marker ("" when none was given)
    shown: str | None = None  # the output the page shows after it (an output marker's fence)

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def doc_pages() -> list[Path]:
    """README.md and the hand-written pages of docs/."""
    return [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name not in GENERATED)]


def fence_body(lines: list[str], start: int, indent: str, where: str) -> tuple[str, int]:
    """The text of the fence opened at ``start`` and the index of its closing line."""
    for end in range(start + 1, len(lines)):
        if lines[end].strip() == "```":
            body = [ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[start + 1 : end]]
            return "\n".join(body) + "\n", end
    raise ValueError(f"{where}: unclosed fence")


def apply_marker(marker: str, where: str, lang: str, body: str, examples: list[Example], line: int) -> None:
    """Attach a marker to the fence that follows it: a skip reason, or shown output for the previous example."""
    if marker == "output":
        if lang not in ("", "text"):
            raise ValueError(f"{where}: shown output goes in a text fence, not {lang!r}")
        if not examples or examples[-1].lang == "console" or examples[-1].shown is not None:
            raise ValueError(f"{where}: output marker without a preceding example to compare it with")
        examples[-1].shown = body
        return
    m = SKIP.match(marker)
    if m is None:
        raise ValueError(f"{where}: unknown example marker {marker!r} (skip (REASON) or output)")
    if lang not in LANGS:
        raise ValueError(f"{where}: skip marker before a {lang or 'untagged'} fence, which is not an example")
    examples.append(Example(where.split(":")[0], line, lang, body, skip=(m.group(1) or "").strip()))


def parse_page(text: str, page: str) -> list[Example]:
    """The examples of a page, with their markers (a marker must sit directly above a fence)."""
    lines = text.splitlines()
    examples: list[Example] = []
    marker: tuple[str, int] | None = None
    i = 0
    while i < len(lines):
        fence = FENCE.match(lines[i])
        if fence is None:
            m = MARKER.match(lines[i].strip())
            if marker is not None and (m or lines[i].strip()):
                raise ValueError(f"{page}:{marker[1]}: example marker not directly before a fence")
            marker = (m.group(1), i + 1) if m else marker
            i += 1
            continue
        indent, lang = fence.groups()
        body, end = fence_body(lines, i, indent, f"{page}:{i + 1}")
        if marker is not None:
            apply_marker(marker[0], f"{page}:{marker[1]}", lang, body, examples, i + 1)
        elif lang in LANGS:
            examples.append(Example(page, i + 1, lang, body))
        marker = None
        i = end + 1
    return examples


def all_examples() -> list[Example]:
    return [e for p in doc_pages() for e in parse_page(p.read_text(encoding="utf-8"), p.relative_to(ROOT).as_posix())]


EXAMPLES = all_examples()
SKIPPED = [e for e in EXAMPLES if e.skip is not None]
RUN_PAGES = sorted({e.page for e in EXAMPLES if e.skip is None})


# --- comparing output ---------------------------------------------------------------------------------------


def normalised(text: str) -> list[str]:
    return [re.sub(r"[ \t]+", " ", ln).rstrip() for ln in text.strip("\n").splitlines()]


def line_matches(shown: str, actual: str) -> bool:
    return re.fullmatch(".*".join(re.escape(part) for part in shown.split("...")), actual) is not None


def output_matches(shown: str, actual: str) -> bool:
    """Whether ``actual`` is what ``shown`` shows, with the wildcards of the module docstring."""
    pats, lines = normalised(shown), normalised(actual)
    reach = {0}  # the numbers of actual lines consumed after each pattern line
    for p in pats:
        if p == "...":
            reach = set(range(min(reach), len(lines) + 1)) if reach else set()
        else:
            reach = {j + 1 for j in reach if j < len(lines) and line_matches(p, lines[j])}
    return len(lines) in reach


def mismatch(ex: Example, what: str, shown: str, actual: str) -> str:
    pats, lines = normalised(shown), normalised(actual)
    if len(pats) > 1 and pats[0] == "...":  # show the diff from where the page's lines begin
        start = next((j for j, ln in enumerate(lines) if line_matches(pats[1], ln)), 0)
        pats, lines = pats[1:], lines[start:]
    diff = difflib.unified_diff(pats, lines, "shown on the page", "printed", lineterm="")
    return f"{ex.id}: {what} differs from the page:\n" + "\n".join(diff)


# --- running examples ---------------------------------------------------------------------------------------


def shell_commands(code: str) -> list[str]:
    """The commands of a shell fence: lines joined at a trailing backslash, comments and blank lines left out."""
    out: list[str] = []
    pending = ""
    for ln in code.splitlines():
        pending += ln
        if ln.endswith("\\"):
            pending += "\n"
            continue
        if pending.strip() and not pending.lstrip().startswith("#"):
            out.append(pending)
        pending = ""
    return out


def console_commands(code: str) -> list[tuple[str, str]]:
    """``(command, shown output)`` pairs of a console fence."""
    pairs: list[tuple[str, list[str]]] = []
    continued = False
    for ln in code.splitlines():
        if continued:
            pairs[-1] = (pairs[-1][0] + "\n" + ln, pairs[-1][1])
        elif ln.startswith("$ "):
            pairs.append((ln[2:], []))
        elif pairs:
            pairs[-1][1].append(ln)
        continued = bool(pairs) and not pairs[-1][1] and ln.endswith("\\")
    return [(cmd, "\n".join(shown)) for cmd, shown in pairs]


def is_echo_status(cmd: str) -> bool:
    return re.sub(r"\s+#.*$", "", cmd).strip() == "echo $?"


def run_commands(cmds: list[str], cwd: Path, env: dict[str, str], scratch: Path) -> tuple[list[str], list[int]]:
    """Run commands in one bash process (as typed into one terminal); each one's output and exit status."""
    mark = "@@tolcli-example-" + hashlib.sha256(str(scratch).encode()).hexdigest()[:12] + "@@"
    status = scratch / "status"
    status.unlink(missing_ok=True)
    tail = f'__s=$?; echo "$__s" >> "{status}"; printf "%s\\n" "{mark}"; (exit "$__s")'
    script = "".join(f"{c}\n{tail}\n" for c in cmds)
    r = subprocess.run(
        ["bash", "-c", script],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # as a terminal shows them: interleaved
        timeout=TIMEOUT,
    )
    text = r.stdout.decode("utf-8", "replace")
    codes = [int(s) for s in status.read_text().split()] if status.exists() else []
    return text.split(mark + "\n")[: len(codes)], codes


def status_failures(ex: Example, cmds: list[str], codes: list[int], outputs: list[str]) -> list[str]:
    errors = [] if len(codes) == len(cmds) else [f"{ex.id}: only {len(codes)} of {len(cmds)} commands ran"]
    for k, (cmd, code, out) in enumerate(zip(cmds, codes, outputs, strict=False)):  # fewer codes: reported above
        if code != 0 and not (k + 1 < len(cmds) and is_echo_status(cmds[k + 1])):
            errors.append(f"{ex.id}: `{cmd}` exited {code}:\n{out[-3000:]}")
    return errors


def run_example(ex: Example, cwd: Path, env: dict[str, str], scratch: Path) -> list[str]:
    """Run one example; what differs from the page (nothing when it runs as shown)."""
    if ex.lang == "python":
        r = subprocess.run(
            [sys.executable, "-"],
            input=ex.code,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=TIMEOUT,
        )
        printed = r.stdout
        errors = [] if r.returncode == 0 else [f"{ex.id}: exited {r.returncode}:\n{printed[-3000:]}"]
        if ex.shown is not None and not output_matches(ex.shown, printed):
            errors.append(mismatch(ex, "the output", ex.shown, printed))
        return errors
    pairs = console_commands(ex.code) if ex.lang == "console" else [(c, None) for c in shell_commands(ex.code)]
    cmds = [c for c, _ in pairs]
    outputs, codes = run_commands(cmds, cwd, env, scratch)
    errors = status_failures(ex, cmds, codes, outputs)
    for (cmd, shown), printed in zip(pairs, outputs, strict=False):
        if shown is not None and not output_matches(shown, printed):
            errors.append(mismatch(ex, f"the output of `{cmd}`", shown, printed))
    if ex.shown is not None and not output_matches(ex.shown, "".join(outputs)):
        errors.append(mismatch(ex, "the output", ex.shown, "".join(outputs)))
    return errors


# --- what the pages assume ----------------------------------------------------------------------------------


def venv_view(dest: Path) -> None:
    """``.venv``: the test's environment, with make's install stamp fresh, so `make demo` does not reinstall."""
    dest.mkdir()
    for p in Path(sys.prefix).iterdir():
        if p.name != ".installed":
            (dest / p.name).symlink_to(p)
    (dest / ".installed").touch()


def hf_cache(hub: Path, src: Path) -> None:
    """``org/my-memoryllm`` in a Hugging Face cache laid out as huggingface_hub writes it (blobs, links, refs)."""
    repo = hub / "models--org--my-memoryllm"
    snap = repo / "snapshots" / HUB_COMMIT
    for d in (snap, repo / "blobs", repo / "refs"):
        d.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / digest)
        (snap / f.name).symlink_to(Path("../../blobs") / digest)
    for ref in ("main", "v2"):
        (repo / "refs" / ref).write_text(HUB_COMMIT)


def heldout_excerpt(chars: int) -> str:
    """The first held-out documents, about ``chars`` characters (the user's own evaluation text, kept short)."""
    docs = demo_heldout_path().read_text(encoding="utf-8").split("\n\n")
    out: list[str] = []
    while docs and sum(map(len, out)) < chars:
        out.append(docs.pop(0))
    return "\n\n".join(out).strip() + "\n"


def datasets_dir(dest: Path, text: str) -> None:
    """``dir``: a `datasets` directory (docs/data-formats.md), when `datasets` is installed."""
    try:
        import datasets
    except ImportError:
        return
    datasets.Dataset.from_dict({"text": text.split("\n\n")}).save_to_disk(str(dest))


@pytest.fixture(scope="session")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkout-like directory with what the pages assume: the demo's dense and int4 bundles, a checkpoint of
    one's own (``./my-memoryllm``, ``./memoryllm-1b``: copies of the demo), evaluation text (``held-out.txt``,
    ``text.txt``), ``org/my-memoryllm`` in the Hugging Face cache under ``$HOME`` and a `datasets` directory."""
    base = tmp_path_factory.mktemp("doc-examples") / "checkout"
    base.mkdir()
    for name in ("tolcli", "docs", "scripts", "Makefile", "pyproject.toml"):
        (base / name).symlink_to(ROOT / name)
    venv_view(base / ".venv")
    demo = demo_checkpoint_path()
    for name in ("my-memoryllm", "memoryllm-1b"):
        shutil.copytree(demo, base / name)
    text = heldout_excerpt(12_000)
    for name in ("held-out.txt", "text.txt"):
        (base / name).write_text(text, encoding="utf-8")
    precompute(demo, base / "dense.safetensors", dtype="fp32")
    compress(base / "dense.safetensors", base / "int4.safetensors", CompressOptions("int4"))
    hf_cache(base / ".cache" / "huggingface" / "hub", demo)
    datasets_dir(base / "dir", text)
    return base


def example_env(home: Path) -> dict[str, str]:
    """The environment of a user's shell: the venv on PATH, ``$HOME`` the page's directory, no Hugging Face or
    tolcli settings of the machine running the tests, one torch thread (docs/ci.md: faster on a shared machine),
    no progress heartbeat (its lines depend on the machine's speed), tolcli's default width for logs, and no
    settings of a ``make`` the tests run under (``make test``: a page's ``make demo`` would print "make[1]: ...")."""
    drop = ("HF_", "XDG_", "TOLCLI_", "COLUMNS", "LINES", "SOURCE_DATE_EPOCH", "OMP_NUM_THREADS", "MAKE", "MFLAGS")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        HOME=str(home),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOLCLI_HEARTBEAT_SECONDS="3600",
    )
    return env


# --- the tests ----------------------------------------------------------------------------------------------


def written_by(examples: list[Example]) -> set[str]:
    """The names the examples write with ``-o``: a page that makes them itself starts without them."""
    return {m for ex in examples for m in re.findall(r"(?:^|\s)-o\s+([\w.-]+)", ex.code)}


@pytest.mark.parametrize("page", RUN_PAGES)
def test_page_examples_run_as_shown(page: str, checkout: Path, tmp_path: Path) -> None:
    runnable = [ex for ex in EXAMPLES if ex.page == page and ex.skip is None]
    work = tmp_path / "work"
    own = written_by(runnable)
    shutil.copytree(  # hard links: outputs are replaced, never edited in place
        checkout, work, symlinks=True, copy_function=os.link, ignore=lambda d, names: own & set(names)
    )
    env = example_env(work)
    errors = [err for ex in runnable for err in run_example(ex, work, env, tmp_path)]
    assert not errors, "\n\n".join(errors)


@pytest.mark.parametrize("example", SKIPPED, ids=[e.id for e in SKIPPED])
def test_skipped_example_says_why(example: Example) -> None:
    assert example.skip, f"{example.id}: `<!-- example: skip (REASON) -->` must give a reason"
    pytest.skip(f"{example.id} ({example.lang}): {example.skip}")


def test_every_page_with_commands_has_examples() -> None:
    per_page = {p: sum(1 for e in EXAMPLES if e.page == p) for p in {e.page for e in EXAMPLES}}
    for page in ("README.md", "docs/quickstart.md", "docs/evaluation.md", "docs/compression.md", "docs/ci.md"):
        assert per_page.get(page, 0) >= 2, (page, per_page)
    assert len(SKIPPED) * 3 < len(EXAMPLES), [e.id for e in SKIPPED]  # skips are the exception


def test_output_wildcards_are_narrow() -> None:
    printed = "wrote x.safetensors (2.04 MB) in 1.3s\nppl 69.910\nOK\n"
    assert output_matches("wrote x.safetensors (2.04 MB) in ...s\nppl 69.910\nOK", printed)
    assert output_matches("...\nOK", printed) and output_matches("wrote ...\n...", printed)
    assert output_matches("wrote  x.safetensors   (2.04 MB) in ...s  \nppl 69.910\n...\nOK", printed)
    assert not output_matches("wrote x.safetensors (2.04 MB) in ...s\nppl 69.91\nOK", printed)  # numbers exact
    assert not output_matches("wrote x.safetensors (2.05 MB) in ...\n...", printed)
    assert not output_matches("wrote ...", printed)  # `...` in a line never spans lines
    assert not output_matches("ppl 69.910\nOK", printed)  # the whole output, unless `...` says otherwise


def test_markers_are_parsed_strictly() -> None:
    page = (
        "```sh\ntolcli info demo\n```\n\n<!-- example: output -->\n```\nOK\n```\n\n"
        "<!-- example: skip -->\n```sh\nx\n```\n"
    )
    first, second = parse_page(page, "p.md")
    assert (first.line, first.code, first.shown, first.skip) == (1, "tolcli info demo\n", "OK\n", None)
    assert (second.line, second.skip) == (11, "")  # a skip without a reason: test_skipped_example_says_why fails
    for bad in (
        "<!-- example: output -->\n```\nOK\n```\n",  # output of nothing
        "<!-- example: skip (GPU) -->\nprose\n```sh\nx\n```\n",  # marker not before its fence
        "<!-- example: sometimes -->\n```sh\nx\n```\n",  # unknown marker
        "```sh\nx\n",  # unclosed fence
    ):
        with pytest.raises(ValueError):
            parse_page(bad, "p.md")


def test_console_and_shell_commands_are_split_as_typed() -> None:
    assert shell_commands("a \\\n  --b   # c\n\n# comment\nd\n") == ["a \\\n  --b   # c", "d"]
    assert console_commands("$ a \\\n  b\nout 1\nout 2\n$ echo $?\n3\n") == [
        ("a \\\n  b", "out 1\nout 2"),
        ("echo $?", "3"),
    ]
