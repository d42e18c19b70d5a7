"""Paper shapes (vocab 128,256, hidden 2,048, FFN 5,464, 2 layers): each step vs its bound, and its peak RSS.

``python -m benchmarks paper_scale`` (about 15-25 minutes on 2 cores) or ``python -m benchmarks.paper_scale
[--quick] [--vocab V] [--hidden H] [--ffn F] [--layers L] [--rank R] [--parts P,...]`` (parts: precompute, compress,
codecs, lookup, eval; precompute always runs, the others read its bundle). Through ``python -m benchmarks``, the
environment sets the shapes: ``TOLCLI_BENCH_QUICK=1`` (vocab 32,000, hidden 512, FFN 1,366: a few minutes),
``TOLCLI_BENCH_VOCAB``, ``_HIDDEN``, ``_FFN``, ``_LAYERS``, ``_RANK``.

Every step (and every bound) runs in a fresh Python process, which reports its own wall time and its peak RSS
(``VmHWM``), so one step's memory never shows up in another's. Ratios are bound time / measured time: 1.00x is
at the bound, higher is better; a bound is measured in the same run on the same shapes:

- precompute: the same three matmuls per row batch with bare ``torch.mm`` (fp32, on a sample of the rows,
  scaled to the whole vocabulary: matmul time is linear in rows);
- compress svd: one ``torch.mm`` of the same Gram ``T^T T`` (fp32) plus one ``h x h`` ``eigh`` (fp64), per layer;
- compress int4/nf4/int8: no time bound; memory: a small multiple of one row batch (issue 15's goal);
- compress with issue 16's codecs (``mixed`` at 3 bits, the sweep's cross-layer SVD at 2.5 bits): no time bound;
  memory: bounded by row batches, not by the vocabulary;
- lookups (``Bundle.lookup_layers(ids, out=buf)`` into a reused buffer, as a decoder calls it): ``numpy.take`` of
  the same stored rows from memory (1 id), a memcpy of the bytes the call returns into preallocated memory (4,096
  ids);
- eval: the model's own forward (its context-free FFNs computed, no bundle) on the same tokens.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks._util import row
from tolcli.choices import cross_svd_spec

REPO = Path(__file__).resolve().parents[1]
QUANT = ("int4", "nf4", "int8")
LOOKUP_BATCHES = (1, 4096)
MM_BATCH = 4096  # precompute's default row batch


@dataclass(frozen=True)
class Shape:
    """The synthetic model and the sizes of what is measured on it."""

    vocab: int = 128_256
    hidden: int = 2_048
    ffn: int = 5_464
    layers: int = 2
    rank: int = 256
    eval_tokens: int = 1_024
    eval_ctx: int = 256
    quick: bool = False

    @property
    def table_bytes(self) -> int:
        """One layer's fp32 ToL."""
        return self.vocab * self.hidden * 4


PAPER = Shape()
QUICK = Shape(vocab=32_000, hidden=512, ffn=1_366, eval_tokens=2_048, quick=True)
_ENV = {"vocab": "TOLCLI_BENCH_VOCAB", "hidden": "TOLCLI_BENCH_HIDDEN", "ffn": "TOLCLI_BENCH_FFN"}
_ENV |= {"layers": "TOLCLI_BENCH_LAYERS", "rank": "TOLCLI_BENCH_RANK"}


def shape_from(env: Mapping[str, str], overrides: Mapping[str, int | None] | None = None) -> Shape:
    """The paper shapes, or the quick ones (``TOLCLI_BENCH_QUICK=1``), with per-field overrides (env, then args)."""
    shape = QUICK if env.get("TOLCLI_BENCH_QUICK", "") not in ("", "0") else PAPER
    values = {k: int(env[v]) for k, v in _ENV.items() if env.get(v)}
    values |= {k: v for k, v in (overrides or {}).items() if v is not None}
    if any(v < 1 for v in values.values()):
        raise SystemExit(f"paper_scale: shapes must be >= 1, got {values}")
    return replace(shape, **values)


# ---------------------------------------------------------------- steps: each runs in its own process


def _peak_rss() -> int:
    """This process's peak resident set (VmHWM), bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_baseline(s: Shape, d: Path, **_: Any) -> dict[str, Any]:
    """Nothing but the imports every step makes: the interpreter's own peak RSS, subtracted from the others'."""
    import tolcli.compress
    import tolcli.precompute
    import tolcli.scoring  # noqa: F401

    return {}


def step_checkpoint(s: Shape, d: Path, **_: Any) -> dict[str, Any]:
    """The synthetic memoryllm checkpoint, fp16 weights, tokenizer-free (a random-weight model of ``s``)."""
    from tolcli.testing import tiny_config, write_random_checkpoint

    cfg = tiny_config(
        "memoryllm",
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.ffn,
        num_hidden_layers=s.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=max(256, s.eval_ctx),
    )
    return {"seconds": _timed(lambda: write_random_checkpoint(d / "ckpt", cfg, seed=0, dtype=torch.float16))}


def step_precompute(s: Shape, d: Path, **_: Any) -> dict[str, Any]:
    from tolcli import precompute

    out = d / "dense.safetensors"
    return {
        "seconds": _timed(lambda: precompute(d / "ckpt", out, dtype="fp32", batch_rows=MM_BATCH)),
        "bytes": out.stat().st_size,
    }


def step_precompute_bound(s: Shape, d: Path, **_: Any) -> dict[str, Any]:
    """The same matmuls (gate, up, down per row batch) with bare torch.mm on random fp32 matrices."""
    g = torch.Generator().manual_seed(0)
    rows = min(s.vocab, 4 * MM_BATCH)
    x = torch.randn(rows, s.hidden, generator=g)
    w1, w2 = torch.randn(s.ffn, s.hidden, generator=g), torch.randn(s.ffn, s.hidden, generator=g)
    w3 = torch.randn(s.hidden, s.ffn, generator=g)

    def mm(xb: torch.Tensor) -> None:
        torch.mm(torch.mm(xb, w1.T) * torch.mm(xb, w2.T), w3.T)

    mm(x[:MM_BATCH])  # warm-up
    t = min(_timed(lambda: [mm(x[i : i + MM_BATCH]) for i in range(0, rows, MM_BATCH)]) for _ in range(2))
    return {"seconds": t * s.layers * s.vocab / rows, "rows_sampled": rows}


def step_compress(
    s: Shape,
    d: Path,
    *,
    label: str,
    scheme: str | None = None,
    rank: int | None = None,
    codec: str | None = None,
    feedback: bool = False,
) -> dict[str, Any]:
    """``compress`` of the dense fp32 bundle with a ``scheme`` (and ``rank``) or a ``codec`` spec (``feedback``:
    with error feedback across layers)."""
    from tolcli import CompressOptions, compress

    out = d / f"{label}.safetensors"
    opts = CompressOptions(scheme, rank=rank, codec=codec, error_feedback=feedback)
    t = _timed(lambda: compress(d / "dense.safetensors", out, opts))
    return {"seconds": t, "bytes": out.stat().st_size}


def _mm_eigh(d: Path) -> tuple[float, float]:
    """One fp32 torch.mm of a layer's Gram and one fp64 eigh of it (best of 2 and 3)."""
    from tolcli import open_bundle

    with open_bundle(d / "dense.safetensors") as b:
        table = b.dense_layer(next(iter(b.layers))).contiguous()
    gram = torch.mm(table.T, table)  # also the warm-up
    t_mm = min(_timed(lambda: torch.mm(table.T, table)) for _ in range(2))
    t_eigh = min(_timed(lambda: torch.linalg.eigh(gram.double())) for _ in range(3))
    return t_mm, t_eigh


def step_svd_bound(s: Shape, d: Path, **_: Any) -> dict[str, Any]:
    """:func:`_mm_eigh` times the layer count; and the factorisation alone as compress runs it (the streamed fp32
    Gram from the mapped bundle, then eigh), for one layer."""
    from tolcli import open_bundle
    from tolcli.codecs.svd import fit_basis_energy
    from tolcli.compress import LayerRows, default_batch_rows

    t_mm, t_eigh = _mm_eigh(d)
    with open_bundle(d / "dense.safetensors") as b:
        rows = LayerRows(b, next(iter(b.layers)), default_batch_rows(b.hidden_size))
        t_fit = _timed(lambda: fit_basis_energy(rows, s.rank, method="exact"))
    return {"seconds": s.layers * (t_mm + t_eigh), "mm": t_mm, "eigh": t_eigh, "fit": t_fit}


def _per_call(fn: Callable[[torch.Tensor], object], ids: list[torch.Tensor], repeat: int = 3) -> float:
    """Best-of-``repeat`` mean seconds per call of ``fn`` over ``ids`` (after a warm-up); as many of ``ids`` as fit
    in about half a second per pass, at least 5, so that a slow path cannot stall the benchmark."""
    t_one = min(_timed(lambda x=x: fn(x)) for x in ids[:3])
    ids = ids[: max(5, min(len(ids), int(0.5 / max(t_one, 1e-9))))]
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for x in ids:
            fn(x)
        best = min(best, (time.perf_counter() - t0) / len(ids))
    return best


def _id_batches(vocab: int, batch: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    calls = 2000 if batch == 1 else 8
    return [torch.randint(0, vocab, (batch,), generator=g) for _ in range(calls)]


def step_lookup(s: Shape, d: Path, *, label: str) -> dict[str, Any]:
    """Per-call time of all present layers' rows for 1 and 4,096 ids: one ``Bundle.lookup_layers`` call into a
    reused fp32 buffer."""
    from tolcli import open_bundle

    res: dict[str, Any] = {"api": "lookup_layers(ids, out=buf)"}
    with open_bundle(d / f"{label}.safetensors") as b:
        for n in LOOKUP_BATCHES:
            ids = _id_batches(s.vocab, n)
            buf = torch.empty(len(b.present_layers), n, b.hidden_size)  # a decoder's reused buffer

            def fn(x: torch.Tensor, buf: torch.Tensor = buf) -> torch.Tensor:
                return b.lookup_layers(x, out=buf)

            res[f"seconds_{n}"] = _per_call(fn, ids)
            res[f"bytes_{n}"] = buf.nbytes
    return res


def step_lookup_bound(s: Shape, d: Path, *, nbytes: list[int]) -> dict[str, Any]:
    """numpy.take of fp16 rows from in-memory tables (every layer); memcpy of ``nbytes`` into preallocated memory."""
    g = np.random.default_rng(0)
    tables = [g.standard_normal((s.vocab, s.hidden), dtype=np.float32).astype(np.float16) for _ in range(s.layers)]
    res: dict[str, Any] = {}
    for n in LOOKUP_BATCHES:
        ids = [x.numpy() for x in _id_batches(s.vocab, n)]
        res[f"take_{n}"] = _per_call(lambda x: [np.take(t, x, axis=0) for t in tables], ids)  # type: ignore[arg-type,misc]
    for size in nbytes:
        src, dst = np.ones(size, dtype=np.uint8), np.zeros(size, dtype=np.uint8)  # into preallocated memory
        res[f"memcpy_{size}"] = _per_call(lambda _, src=src, dst=dst: np.copyto(dst, src), [torch.empty(0)] * 8)
    return res


def step_eval(s: Shape, d: Path, *, label: str | None) -> dict[str, Any]:
    """eval-ppl's scoring on random tokens: with the model's own FFNs (``label`` None) or a bundle's rows."""
    from tolcli import load_model, open_bundle, open_checkpoint
    from tolcli.scoring import score

    tokens = torch.randint(0, s.vocab, (s.eval_tokens,), generator=torch.Generator().manual_seed(0))
    ckpt = open_checkpoint(d / "ckpt")
    model = load_model(ckpt, memory_ffn=label is None)
    with torch.no_grad(), open_bundle(d / f"{label}.safetensors") if label else nullcontext() as b:
        src = b.as_source() if b is not None else None
        score(model, tokens[: 2 * s.eval_ctx], ctx=s.eval_ctx, batch_size=4, source=src)  # warm-up
        t = _timed(lambda: score(model, tokens, ctx=s.eval_ctx, batch_size=4, source=src))
    return {"seconds": t, "tokens": s.eval_tokens}


STEPS: dict[str, Callable[..., dict[str, Any]]] = {
    "baseline": step_baseline,
    "checkpoint": step_checkpoint,
    "precompute": step_precompute,
    "precompute_bound": step_precompute_bound,
    "compress": step_compress,
    "svd_bound": step_svd_bound,
    "lookup": step_lookup,
    "lookup_bound": step_lookup_bound,
    "eval": step_eval,
}


def _child(name: str, shape: str, directory: str, kwargs: str) -> None:
    res = STEPS[name](Shape(**json.loads(shape)), Path(directory), **json.loads(kwargs))
    res["peak_rss"] = _peak_rss()
    print(json.dumps(res))


# ---------------------------------------------------------------- the parent: run the steps, format the table


class Runner:
    """Runs steps in fresh processes; a failed step is reported and leaves ``None`` (later steps go on)."""

    def __init__(self, shape: Shape, directory: Path):
        self.shape, self.dir = shape, directory
        self.failures: list[str] = []
        self.base_rss = 0  # the interpreter and imports alone (the baseline step)

    def __call__(self, name: str, **kwargs: Any) -> dict[str, Any] | None:
        cmd = [sys.executable, "-m", "benchmarks.paper_scale", "--step", name, json.dumps(asdict(self.shape))]
        cmd += [str(self.dir), json.dumps(kwargs)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        print(f"paper_scale: {name} {kwargs or ''} {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
        if r.returncode != 0:
            tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            self.failures.append(f"  {name} {kwargs or ''}: FAILED (exit {r.returncode}): {tail}")
            return None
        return json.loads(r.stdout.strip().splitlines()[-1])


def _mem(run: Runner, res: Mapping[str, Any]) -> str:
    """Peak RSS, and what is above the interpreter's own in fp32 layer tables."""
    above = (res["peak_rss"] - run.base_rss) / run.shape.table_bytes
    return f"peak RSS {res['peak_rss'] / 1e9:.2f} GB (+{above:.2f} tables)"


def _secs(t: float) -> str:
    return f"{t * 1e6:.1f} us" if t < 1e-3 else f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.1f} s"


def _precompute_lines(run: Runner) -> list[str]:
    res, bound = run("precompute"), run("precompute_bound")
    if res is None or bound is None:
        return []
    goal = f"bare torch.mm {_secs(bound['seconds'])} (from {bound['rows_sampled']:,} rows/layer); {_mem(run, res)}"
    return [row("precompute -> fp32 safetensors", _secs(res["seconds"]), bound["seconds"] / res["seconds"], goal)]


def _compress_lines(run: Runner) -> list[str]:
    out = []
    for scheme in QUANT:
        if res := run("compress", label=scheme, scheme=scheme):
            goal = f"{_mem(run, res)} (goal: a small multiple of one row batch)"
            out.append(row(f"compress {scheme}", _secs(res["seconds"]), None, goal))
    res, bound = run("compress", label="svd", scheme="svd", rank=run.shape.rank), run("svd_bound")
    if res is not None and bound is not None:
        goal = f"Gram mm {_secs(bound['mm'])} + eigh {_secs(bound['eigh'])} per layer (goal >= 0.67x); "
        goal += f"{_mem(run, res)} (goal: <= 1.5 tables)"
        ratio = bound["seconds"] / res["seconds"]
        out.append(row(f"compress svd rank {run.shape.rank} (exact)", _secs(res["seconds"]), ratio, goal))
        fit = bound["fit"]
        goal = "streamed Gram from the bundle + eigh, per layer, vs one Gram mm + eigh (goal >= 0.67x)"
        out.append(row("  of which the factorisation", _secs(fit), (bound["mm"] + bound["eigh"]) / fit, goal))
    return out


# Issue 16's codecs at the bits per value of its goals: (label, spec, error feedback). The cross-layer spec is the
# sweep's. int4 with error feedback: what the carry (a table-sized file, read and written a batch at a time) costs.
CODECS = (
    ("mixed-3b", "mixed(bits=3.0)", False),
    ("cross-svd-2.5b", cross_svd_spec(2.5), False),
    ("int4-g64-fb", "int4(group=64)", True),
)


def _codec_lines(run: Runner) -> list[str]:
    """Issue 16's codecs: time, stored bytes, and memory (goal: bounded by row batches, not by the vocabulary)."""
    out = []
    dense16 = run.shape.layers * run.shape.table_bytes / 2
    for label, spec, feedback in CODECS:
        if res := run("compress", label=label, codec=spec, feedback=feedback):
            goal = f"{res['bytes'] / dense16:.3f} of fp16 (file); {_mem(run, res)}"
            out.append(row(f"compress {label}", _secs(res["seconds"]), None, goal))
    return out


# The goals, as bound time / lookup time.
LOOKUP_GOALS = {("fp16", 1): ">= 0.33x", ("fp16", 4096): ">= 0.5x", ("int4", 4096): ">= 0.3x"}


def _lookup_lines(run: Runner) -> list[str]:
    found = {}
    if run("compress", label="fp16", scheme="fp16"):  # the dense fp16 bundle a runtime would read
        found = {label: res for label in ("fp16", "int4") if (res := run("lookup", label=label))}
    sizes = sorted({v[f"bytes_{n}"] for v in found.values() for n in LOOKUP_BATCHES if n > 1})
    bound = run("lookup_bound", nbytes=sizes) if found else None
    if bound is None:
        return []
    out = []
    for (label, res), n in itertools.product(found.items(), LOOKUP_BATCHES):
        t = res[f"seconds_{n}"]
        ref, what = (bound["take_1"], "numpy.take") if n == 1 else (bound[f"memcpy_{res[f'bytes_{n}']}"], "memcpy")
        goal = f"{what} {_secs(ref)} (goal {LOOKUP_GOALS.get((label, n), '-')}); {res['api']}, {run.shape.layers} "
        goal += f"layers; {_mem(run, res)}"
        out.append(row(f"lookup {label}, {n:,} id{'s' if n > 1 else ''} (per call)", _secs(t), ref / t, goal))
    return out


def _eval_lines(run: Runner) -> list[str]:
    base = run("eval", label=None)
    if base is None:
        return []
    tok = run.shape.eval_tokens
    out = [row("eval: own FFNs (the bound)", f"{tok / base['seconds']:,.0f} tok/s", 1.0, _mem(run, base))]
    for label in ("fp16", "int4"):
        if (run.dir / f"{label}.safetensors").exists() and (res := run("eval", label=label)):
            name, speed, ratio = (
                f"eval: {label} bundle",
                f"{tok / res['seconds']:,.0f} tok/s",
                base["seconds"] / res["seconds"],
            )
            out.append(row(name, speed, ratio, f"goal >= 1.0x; {_mem(run, res)}"))
    return out


# What a run measures, in order; every part after the first reads the dense bundle precompute writes.
PARTS: dict[str, Callable[[Runner], list[str]]] = {
    "precompute": _precompute_lines,
    "compress": _compress_lines,
    "codecs": _codec_lines,
    "lookup": _lookup_lines,
    "eval": _eval_lines,
}


def run(shape: Shape | None = None, parts: set[str] | None = None) -> list[str]:
    """The whole benchmark (what ``python -m benchmarks paper_scale`` prints), or only ``parts`` of it (precompute
    always runs: the others read its bundle; ``eval`` of the bundles needs ``lookup``'s)."""
    parts = None if parts is None else parts | {"precompute"}
    s = shape or shape_from(os.environ)
    mode = {PAPER: "paper shapes", QUICK: "QUICK MODE (not the paper shapes)"}.get(s, "CUSTOM SHAPES (not the paper's)")
    lines = [
        f"{mode}: synthetic memoryllm, vocab {s.vocab:,}, hidden {s.hidden:,}, FFN {s.ffn:,}, {s.layers} layers, fp16 "
        f"weights; one fp32 table = {s.table_bytes / 1e9:.3f} GB; {torch.get_num_threads()} torch threads",
        "  ratio = bound time / measured time (1.00x: at the bound); peak RSS = VmHWM of the step's own process, "
        "(+N tables) = above the interpreter's own, in fp32 layer tables",
    ]
    with tempfile.TemporaryDirectory(prefix="tolcli-paper-") as d:
        runner = Runner(s, Path(d))
        base = runner("baseline")
        runner.base_rss = base["peak_rss"] if base else 0
        lines.append(
            row("python + torch + tolcli imported (baseline)", "", None, f"peak RSS {runner.base_rss / 1e9:.2f} GB")
        )
        if ckpt := runner("checkpoint"):
            lines.append(row("synthetic checkpoint (setup)", _secs(ckpt["seconds"]), None, _mem(runner, ckpt)))
            for name, part in PARTS.items():
                if parts is None or name in parts:
                    lines += part(runner)
    return lines + runner.failures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.paper_scale", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="vocab 32,000, hidden 512, FFN 1,366 (a few minutes)")
    for name in ("vocab", "hidden", "ffn", "layers", "rank"):
        ap.add_argument(f"--{name}", type=int, default=None)
    ap.add_argument("--parts", default=None, help=f"comma-separated parts to run (default all: {','.join(PARTS)})")
    ap.add_argument("--step", nargs=4, metavar=("NAME", "SHAPE", "DIR", "KWARGS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.step:
        _child(*a.step)
        return 0
    env = {**os.environ, **({"TOLCLI_BENCH_QUICK": "1"} if a.quick else {})}
    shape = shape_from(env, {k: getattr(a, k) for k in ("vocab", "hidden", "ffn", "layers", "rank")})
    parts = None if a.parts is None else {p.strip() for p in a.parts.split(",")}
    if parts is not None and not parts <= set(PARTS):
        raise SystemExit(f"paper_scale: unknown parts {sorted(parts - set(PARTS))} (known: {', '.join(PARTS)})")
    t0 = time.perf_counter()
    for line in run(shape, parts):
        print(line, flush=True)
    print(f"  ({time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
