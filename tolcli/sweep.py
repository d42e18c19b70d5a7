"""``tolcli sweep``: what every compression choice costs, on one model and one text, in one table.

Builds the dense bundle once, then a grid of compressed bundles (uniform SVD ranks, adaptive budgets at
the same bytes as each uniform rank, int4 group sizes, nf4, int8, int3, int2, adaptive-svd+int4, the ``mixed``
row codec and ``compress --scheme auto`` at each of ``bits`` bits per value, and any codec spec strings asked
for), evaluates all of them and every drop-last-K on the same windows, and writes
``results.json``, ``results.csv``, ``results.md`` (:mod:`tolcli.sweep_report`) and two plots (with matplotlib, an
optional dependency): bytes vs
perplexity change, and layers dropped vs perplexity.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tolcli.bundle.reader import open_bundle
from tolcli.bundle.summary import bundle_summary
from tolcli.checkpoint import Checkpoint, open_checkpoint
from tolcli.choices import DENSE_SCHEMES, SCHEMES, SWEEP_BITS, SWEEP_FAMILIES, cross_svd_spec
from tolcli.codecs import parse_spec
from tolcli.codecs.spec import split_items
from tolcli.compress import AUTO_SCHEME, CompressMemo, CompressOptions, compress
from tolcli.crosslayer import MAX_EXACT_WIDTH
from tolcli.errors import InputError, OutputError, UsageError
from tolcli.evaluation import eval_ppl
from tolcli.fsutil import write_text_atomic
from tolcli.pairing import check_pairing
from tolcli.plots import sweep_figures
from tolcli.precompute import precompute
from tolcli.progress import NullProgress, Progress
from tolcli.sweep_report import results_markdown

FAMILIES = SWEEP_FAMILIES
# Every compress scheme is a sweep item too: the families above (their own grids), casts (one bundle each),
# svd+Q (one bundle per rank) and adaptive-svd+Q (one per budget). fp32 is the dense reference every sweep has.
ACCEPTED = (*FAMILIES, *(s for s in SCHEMES if s not in FAMILIES))


@dataclass(frozen=True)
class SweepItems:
    """What one ``--schemes`` list asks for: families/schemes, codec spec strings and existing bundles."""

    families: tuple[str, ...] = ()
    codecs: tuple[str, ...] = ()
    bundles: tuple[Path, ...] = ()


def parse_sweep_items(text: str) -> SweepItems:
    """One grammar for everything a sweep evaluates (``sweep --schemes``), comma-separated:

    - a family or any compress scheme (``int4``, ``svd``, ``drop``, ``fp16``, ``svd+nf4``, ``adaptive-svd+int8``...);
    - a codec spec string (``int4(group=32)``, ``svd(budget=0.1,a=nf4(group=32))``): one bundle each;
    - the path of an existing bundle (a ``.safetensors``/``.h5`` file or a sharded directory), evaluated as it is.

    A name is read as a family or scheme first; write ``./int4`` for a bundle file of that name.

    Example:
        >>> parse_sweep_items("int4, svd+nf4, int4(group=32), drop")
        SweepItems(families=('int4', 'svd+nf4', 'drop'), codecs=('int4(group=32)',), bundles=())
    """
    families: list[str] = []
    codecs: list[str] = []
    bundles: list[Path] = []
    for item in split_items(text):
        if item in ACCEPTED:
            families.append(item)
        elif "(" in item:
            codecs.append(item)
        elif Path(item).exists():
            bundles.append(Path(item))
        else:
            raise UsageError(
                f"sweep item {item!r} is not a family or scheme ({', '.join(ACCEPTED)}), a codec spec "
                "(int4(group=32)) or an existing bundle"
            )
    return SweepItems(tuple(families), tuple(codecs), tuple(bundles))


@dataclass
class SweepOptions:
    """The grid. ``ranks`` default to h/16, h/8, h/4 and h/2; ``calibration`` adds loss-weighted SVD
    variants (token counts for uniform ranks, ``--sensitivity`` for adaptive ones); ``codecs`` adds one
    bundle per codec spec string (``"svd(budget=0.1,a=nf4(group=32))"``), named by its canonical spelling;
    ``bundles`` adds existing bundles as they are. ``families`` takes every compress scheme too (``fp16``: one
    bundle; ``svd+Q``: one per rank; ``adaptive-svd+Q``: one per ``int4_budgets`` entry). The ``mixed``, ``auto``
    and ``cross-svd`` families build one bundle per ``bits`` entry (bits per value; the budget of auto and cross-svd
    is ``bits / 16`` of fp16; cross-svd: :func:`~tolcli.choices.cross_svd_spec`), weighted by ``--sensitivity`` on
    the calibration text when ``calibration`` is given; with ``error_feedback`` each of them also with compress's
    ``error_feedback`` (:mod:`tolcli.feedback`), named with ``-fb`` added."""

    families: Sequence[str] = FAMILIES
    ranks: Sequence[int] | None = None
    group_sizes: Sequence[int] = (32, 64, 128)
    int4_budgets: Sequence[float] = (0.1, 0.15, 0.25)
    bits: Sequence[float] = SWEEP_BITS
    calibration: str | None = None
    protocol: str = "tolcli"
    ctx: int | None = None  # default: min(512, the model's max_position_embeddings)
    stride: int | None = None
    text_field: str = "text"
    doc_sep: str = "eos"
    max_tokens: int | None = None
    batch_size: int = 4
    device: str = "auto"
    codecs: Sequence[str] = ()
    bundles: Sequence[str | Path] = ()  # existing bundles, evaluated as they are (named by their file name)
    error_feedback: bool = False  # the mixed, auto and cross-svd bundles also coded with error feedback


@dataclass
class SweepResult:
    directory: Path
    rows: list[dict[str, Any]]
    protocol: dict[str, Any]
    plots: list[Path] = field(default_factory=list)
    seconds: float = 0.0


def _grid(opts: SweepOptions, hidden: int, layers: int = 1) -> list[tuple[str, str, CompressOptions | None]]:
    """(name, family, options) per bundle. Adaptive budgets are the bytes of the uniform bundle of the same
    rank, so uniform SVD bundles are built whenever either SVD family is asked for."""
    bad = set(opts.families) - set(ACCEPTED)
    if bad:
        raise UsageError(f"unknown sweep families {sorted(bad)}; choose from {', '.join(ACCEPTED)}")
    ranks = list(opts.ranks or sorted({max(8, hidden // k // 8 * 8) for k in (16, 8, 4, 2)}))
    cal = opts.calibration
    grid: list[tuple[str, str, CompressOptions | None]] = []
    fam = set(opts.families)
    for r in ranks:
        if "svd" in fam or "adaptive-svd" in fam:
            grid.append((f"svd-r{r}", "svd", CompressOptions("svd", rank=r)))
            if cal:
                grid.append((f"svd-r{r}-weighted", "svd (weighted)", CompressOptions("svd", rank=r, calibration=cal)))
        if "adaptive-svd" in fam:
            grid.append((f"adaptive-svd@r{r}", "adaptive-svd", None))  # budget = bytes of svd-r{r}
            if cal:
                grid.append((f"adaptive-svd@r{r}-sensitivity", "adaptive-svd (sensitivity)", None))
    if "int4" in fam:
        grid += [(f"int4-g{g}", "int4", CompressOptions("int4", group_size=g)) for g in opts.group_sizes]
    if "nf4" in fam:
        grid.append(("nf4-g64", "nf4", CompressOptions("nf4", group_size=64)))
    if "int8" in fam:
        grid.append(("int8", "int8", CompressOptions("int8")))
    grid += [(f"{q}-g64", q, CompressOptions(q, group_size=64)) for q in ("int3", "int2") if q in fam]
    if "adaptive-svd+int4" in fam:
        grid += [
            (f"adaptive-svd+int4-{b}", "adaptive-svd+int4", CompressOptions("adaptive-svd+int4", budget=str(b)))
            for b in opts.int4_budgets
        ]
    grid += _rate_grid(opts, layers * hidden)
    for s in dict.fromkeys(f for f in opts.families if f not in FAMILIES):  # the other compress schemes
        if s in DENSE_SCHEMES:
            grid += [] if s == "fp32" else [(s, s, CompressOptions(s))]  # fp32: the dense-fp32 reference
        elif s.startswith("svd+"):
            grid += [(f"{s}-r{r}", s, CompressOptions(s, rank=r)) for r in ranks]
        else:  # adaptive-svd+Q
            grid += [(f"{s}-{b}", s, CompressOptions(s, budget=str(b))) for b in opts.int4_budgets]
    specs = [parse_spec(c) for c in opts.codecs]
    grid += [(str(s), s.name, CompressOptions(codec=s)) for s in specs]
    unique: dict[str, tuple[str, str, CompressOptions | None]] = {}
    for item in grid:  # the same name is the same bundle ("int8" and "int8()"): built and evaluated once
        unique.setdefault(item[0], item)
    return list(unique.values())


def _rate_grid(opts: SweepOptions, stack_width: int = 1) -> list[tuple[str, str, CompressOptions | None]]:
    """The ``mixed``, ``auto`` and ``cross-svd`` bundles: one per ``bits`` entry. With calibration text they are
    weighted by loss sensitivity (set in :func:`_build`, which has the checkpoint), as compress ``--sensitivity``
    weights them."""
    for b in opts.bits:
        if not 0 < b <= 16:
            raise UsageError(f"sweep bits {b:g}: give bits per value in (0, 16], e.g. 2,2.5,3,4")
    suffix, label = ("-sensitivity", " (sensitivity)") if opts.calibration else ("", "")
    grid: list[tuple[str, str, CompressOptions | None]] = []
    if "mixed" in opts.families:
        for b in opts.bits:
            spec = parse_spec(f"mixed(bits={b:g})")
            grid.append((f"mixed-{b:g}b{suffix}", f"mixed{label}", CompressOptions(codec=spec)))
    if "auto" in opts.families:
        for b in opts.bits:
            grid.append((f"auto-{b:g}b{suffix}", f"auto{label}", CompressOptions(AUTO_SCHEME, budget=repr(b / 16))))
    if "cross-svd" in opts.families:
        for b in opts.bits:
            spec = parse_spec(cross_svd_spec(b))
            if stack_width > MAX_EXACT_WIDTH:  # too wide for the exact Gram (every real model): the range finder
                spec = replace(spec, method="randomized")
            grid.append((f"cross-svd-{b:g}b{suffix}", f"cross-svd{label}", CompressOptions(codec=spec)))
    if opts.error_feedback:
        grid += [(f"{n}-fb", f"{f} + feedback", replace(o, error_feedback=True)) for n, f, o in grid if o is not None]
    return grid


def _existing(opts: SweepOptions, taken: set[str], checkpoint: Checkpoint) -> dict[str, Path]:
    """name -> path of the existing bundles to evaluate, each checked to open (a bad one is refused up front)."""
    found: dict[str, Path] = {}
    for b in opts.bundles:
        path = Path(b)
        with open_bundle(path) as bundle:
            # a bundle of another model is refused before anything is built (eval_ppl says any warning, once)
            try:
                check_pairing(checkpoint, bundle, allow_mismatch=False)
            except InputError as e:  # sweep has no --allow-source-mismatch: evaluate such a bundle with eval-ppl
                e.hint = "sweep evaluates bundles of its own checkpoint; eval-ppl --allow-source-mismatch takes others"
                raise
        name = path.name
        while name in taken or name in found:
            name = f"{name}+"
        found[name] = path
    return found


def _at_uniform_bytes(name: str, built: dict[str, Path], opts: SweepOptions, checkpoint: Checkpoint) -> CompressOptions:
    """adaptive-svd at the stored bytes of the uniform bundle ``name`` refers to (``adaptive-svd@r16``: ``svd-r16``)."""
    uniform = name.split("@", 1)[1].removesuffix("-sensitivity")
    with open_bundle(built[f"svd-{uniform}"]) as u:
        budget = sum(e["stored_bytes"] for e in u.manifest["layers"] if e["status"] == "present")
    copts = CompressOptions("adaptive-svd", budget=str(budget))
    if name.endswith("-sensitivity"):
        copts.calibration, copts.sensitivity = opts.calibration, checkpoint
    return copts


def _build(
    grid: list[tuple[str, str, CompressOptions | None]],
    dense: Path,
    opts: SweepOptions,
    checkpoint: Checkpoint,
    progress: Progress,
    note: Callable[[str], None],
) -> tuple[dict[str, Path], dict[str, str]]:
    """Compress every bundle of the grid next to ``dense``; returns name -> path and name -> family."""
    built: dict[str, Path] = {}
    families: dict[str, str] = {}
    memo = CompressMemo()  # the sensitivity weights and auto's measurements: computed once for every bits entry
    progress.start(f"sweep: build {len(grid)} bundle(s)", len(grid))
    for name, family, copts in grid:
        copts = copts or _at_uniform_bytes(name, built, opts, checkpoint)
        if name.removesuffix("-fb").endswith("-sensitivity") and family.startswith(("mixed", "auto", "cross-svd")):
            copts = replace(copts, calibration=opts.calibration, sensitivity=checkpoint)
        try:
            built[name] = compress(dense, dense.parent / f"{name}.safetensors", copts, force=True, memo=memo).path
            families[name] = family
        except UsageError as e:  # e.g. a budget below the minimum rank at this model's size
            note(f"skipping {name}: {e.one_line()}")
        progress.advance(1)
    progress.finish()
    return built, families


def _row(name: str, variant: dict[str, Any], family: str, path: Path | None) -> dict[str, Any]:
    """One row of the results: the variant's scores, and what its bundle (if any) stores."""
    row: dict[str, Any] = {
        "name": name,
        "family": family,
        "ppl": variant["ppl"],
        "ppl_stderr": variant["ppl_stderr"],
        "ppl_change_pct": variant["ppl_change_pct"],
        "ppl_change_pct_ci": variant.get("ppl_change_pct_ci"),
        "bits_per_byte": variant["bits_per_byte"],
        "mean_kl": variant["mean_kl"],
        "kl_p99": variant["kl"]["p99"] if "kl" in variant else None,
        "top1_agreement": variant["top1_agreement"],
        "stored_bytes": None,
        "fraction_of_dense_fp16": None,
        "mean_rel_error": None,
        "ranks": None,
    }
    if path is not None:
        with open_bundle(path) as b:
            present = [e for e in b.manifest["layers"] if e["status"] == "present"]
            summary = bundle_summary(b.manifest)
            row["stored_bytes"] = summary["stored_bytes"]
            row["fraction_of_dense_fp16"] = summary["fraction_of_dense_fp16"]
            row["mean_rel_error"] = sum(e["rel_error"] for e in present) / len(present)
            if all("rank" in e["params"] for e in present):  # (auto bundles mix codecs per layer)
                row["ranks"] = [e["params"]["rank"] for e in present]
    if name.startswith("drop-last-"):
        row["layers_dropped"] = int(name.rsplit("-", 1)[1])
    return row


def sweep(
    checkpoint: str | Path | Checkpoint,
    data: Sequence[str | Path],
    out_dir: str | Path,
    options: SweepOptions | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    note: Callable[[str], None] = lambda s: None,
) -> SweepResult:
    """Run the grid; see the module docstring. Returns the rows written to ``results.json``.

    Example:
        >>> import tempfile, pathlib
        >>> from tolcli import sweep, SweepOptions, demo_checkpoint_path, demo_heldout_path
        >>> opts = SweepOptions(families=("int4", "drop"), group_sizes=(64,), ctx=64, max_tokens=600)
        >>> r = sweep(demo_checkpoint_path(), [demo_heldout_path()], pathlib.Path(tempfile.mkdtemp()), opts)
        >>> [row["name"] for row in r.rows][:3]
        ['baseline', 'dense-fp32', 'int4-g64']
    """
    t0 = time.monotonic()
    opts = options or SweepOptions()
    progress = progress or NullProgress()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not force:
        raise OutputError("sweep directory is not empty", path=out, hint="pass --force to reuse it")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    cfg = ckpt.config
    # bad options and inputs are refused before anything is written
    grid = _grid(opts, cfg.hidden_size, cfg.num_hidden_layers)
    existing = _existing(opts, {name for name, _, _ in grid} | {"baseline", "dense-fp32"}, ckpt)
    (out / "bundles").mkdir(parents=True, exist_ok=True)
    dense = out / "bundles" / "dense-fp32.safetensors"
    precompute(ckpt, dense, dtype="fp32", device=opts.device, force=True)  # the exact reference
    built, families = _build(grid, dense, opts, ckpt, progress, note)
    families |= dict.fromkeys(existing, "bundle")
    built |= existing
    L = cfg.num_hidden_layers
    drops = [(f"drop-last-{k}", set(range(L - k))) for k in range(1, L + 1)] if "drop" in opts.families else []
    report = eval_ppl(
        ckpt,
        data,
        tols=[dense, *built.values()],
        protocol=opts.protocol,
        ctx=opts.ctx,
        stride=opts.stride,
        text_field=opts.text_field,
        doc_sep=opts.doc_sep,
        max_tokens=opts.max_tokens,
        batch_size=opts.batch_size,
        device=opts.device,
        extra_drops=drops,
        progress=progress,
        note=note,
    )
    names = ["baseline", "dense-fp32", *built, *(d[0] for d in drops)]
    rows = []
    for name, v in zip(names, report.variants, strict=True):
        family = "dense fp32" if name == "dense-fp32" else families.get(name, v["kind"])
        rows.append(_row(name, v, family, dense if name == "dense-fp32" else built.get(name)))
    protocol = {**report.protocol, "options": asdict(opts)}
    protocol["options"]["families"] = list(opts.families)
    protocol["options"]["bundles"] = [str(b) for b in opts.bundles]
    write_text_atomic(out / "results.json", json.dumps({"protocol": protocol, "rows": rows}, indent=2) + "\n")
    _write_csv(out / "results.csv", rows)
    write_text_atomic(out / "results.md", results_markdown(rows, protocol))
    plots = sweep_figures(out, rows, protocol, note)
    return SweepResult(out, rows, protocol, plots, time.monotonic() - t0)


CSV_COLUMNS = (
    "name",
    "family",
    "stored_bytes",
    "fraction_of_dense_fp16",
    "mean_rel_error",
    "ppl",
    "ppl_change_pct",
    "mean_kl",
    "top1_agreement",
    "ranks",
)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in rows:
        w.writerow(
            ["" if r.get(c) is None else (" ".join(map(str, r[c])) if c == "ranks" else r[c]) for c in CSV_COLUMNS]
        )
    write_text_atomic(path, buf.getvalue())
