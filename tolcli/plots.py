"""PNG figures (matplotlib, an optional dependency: ``pip install 'tolcli[plot]'``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tolcli.errors import OutputError, UsageError


def _pyplot(note=None):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if note is None:
            raise UsageError("plots need matplotlib", hint="pip install 'tolcli[plot]'") from None
        note("matplotlib is not installed: skipping the plots (pip install 'tolcli[plot]')")
        return None
    return plt


def layer_figure(manifest: dict[str, Any], out: Path, title: str) -> Path:
    """Per layer: stored bytes, rank (SVD) or bits per value, and relative error; dropped layers marked."""
    plt = _pyplot()
    layers = manifest["layers"]
    idx = [e["index"] for e in layers]
    present = [e["status"] == "present" for e in layers]
    stored = [e.get("stored_bytes", 0) / 1e6 for e in layers]
    ranks = [e.get("params", {}).get("rank") for e in layers]
    has_rank = any(r is not None for r in ranks)
    second = [r or 0 for r in ranks] if has_rank else [e.get("bits_per_value", 0) for e in layers]
    errors = [e.get("rel_error") or 0.0 for e in layers]
    fig, axes = plt.subplots(3, 1, figsize=(7.5, 6.5), dpi=120, sharex=True)
    colors = ["tab:blue" if p else "lightgray" for p in present]
    axes[0].bar(idx, stored, color=colors)
    axes[0].set_ylabel("stored MB")
    axes[1].bar(idx, second, color=colors)
    axes[1].set_ylabel("rank" if has_rank else "bits / value")
    axes[2].bar(idx, errors, color=colors)
    axes[2].set_ylabel("rel. error")
    axes[2].set_xlabel("layer")
    for ax in axes:
        ax.grid(True, axis="y", alpha=0.3)
        for i, p in zip(idx, present, strict=True):
            if not p:
                ax.text(i, 0, "dropped", ha="center", va="bottom", rotation=90, fontsize=8, color="gray")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        fig.savefig(out)
    except OSError as e:
        raise OutputError(f"cannot write the plot: {e.strerror}", path=out) from None
    finally:
        plt.close(fig)
    return out


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")
SYMLOG_LINTHRESH = 0.01  # % change: linear within +-0.01%, logarithmic beyond, so zero and negative changes show


def point_label(name: str, family: str) -> str:
    """What tells a family's points apart: ``int4-g32`` -> ``g32``, ``adaptive-svd@r8`` -> ``@r8``."""
    stem = family.split(" ")[0]
    rest = name[len(stem) :].lstrip("-") if name.startswith(stem) else name
    return rest or name


@dataclass
class Series:
    """One family's points on the rate-distortion plot, sorted by stored bytes."""

    family: str
    x: list[float]
    change: list[float]
    err: list[tuple[float, float]]  # below, above the point: the confidence interval of the change (0 when unknown)
    kl: list[float]
    labels: list[str]


def rd_series(rows: list[dict[str, Any]]) -> list[Series]:
    """The rate-distortion series of a sweep's rows: every bundle but the dense fp32 one, by family, in order."""
    bundles = [r for r in rows if r["stored_bytes"] is not None and r["family"] != "dense fp32"]
    out = []
    for family in dict.fromkeys(r["family"] for r in bundles):
        pts = sorted((r for r in bundles if r["family"] == family), key=lambda r: r["fraction_of_dense_fp16"])
        ci = [r.get("ppl_change_pct_ci") or [r["ppl_change_pct"]] * 2 for r in pts]
        out.append(
            Series(
                family,
                [r["fraction_of_dense_fp16"] for r in pts],
                [r["ppl_change_pct"] for r in pts],
                [(r["ppl_change_pct"] - lo, hi - r["ppl_change_pct"]) for r, (lo, hi) in zip(pts, ci, strict=True)],
                [r["mean_kl"] for r in pts],
                [point_label(r["name"], family) for r in pts],
            )
        )
    return out


def drop_series(rows: list[dict[str, Any]]) -> tuple[list[int], list[float], list[tuple[float, float]]]:
    """Layers dropped (0 first: the model itself), the perplexity change in %, and its interval's half-widths."""
    drops = sorted((r for r in rows if "layers_dropped" in r), key=lambda r: r["layers_dropped"])
    if not drops:
        return [], [], []
    ci = [r.get("ppl_change_pct_ci") or [r["ppl_change_pct"]] * 2 for r in drops]
    errs = [(r["ppl_change_pct"] - lo, hi - r["ppl_change_pct"]) for r, (lo, hi) in zip(drops, ci, strict=True)]
    x = [0, *(r["layers_dropped"] for r in drops)]
    return x, [0.0, *(r["ppl_change_pct"] for r in drops)], [(0.0, 0.0), *errs]


def _draw_rd(ax_ppl, ax_kl, series: list[Series]) -> None:
    for k, s in enumerate(series):
        style = {"marker": MARKERS[k % len(MARKERS)], "linestyle": LINESTYLES[k // len(MARKERS) % len(LINESTYLES)]}
        yerr = [[e[0] for e in s.err], [e[1] for e in s.err]]
        ax_ppl.errorbar(s.x, s.change, yerr=yerr, label=s.family, capsize=2, markersize=4, **style)
        ax_kl.plot(s.x, s.kl, label=s.family, markersize=4, **style)
        for x, y, kl, text in zip(s.x, s.change, s.kl, s.labels, strict=True):
            ax_ppl.annotate(text, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
            ax_kl.annotate(text, (x, kl), textcoords="offset points", xytext=(3, 3), fontsize=6)
    ax_ppl.set_yscale("symlog", linthresh=SYMLOG_LINTHRESH)
    ax_ppl.axhline(0.0, color="0.5", linewidth=0.8)
    ax_ppl.set_ylabel(f"perplexity change, % (symlog: linear within +-{SYMLOG_LINTHRESH}%)")
    ax_kl.set_yscale("symlog", linthresh=1e-4)
    ax_kl.set_ylabel("mean KL to the model's own FFNs, nats/token")
    for ax in (ax_ppl, ax_kl):
        ax.set_xlabel("stored bytes / dense fp16 bytes")
        ax.grid(True, which="both", alpha=0.3)
    ax_ppl.legend(fontsize=7)


def sweep_figures(out: Path, rows: list[dict[str, Any]], protocol: dict[str, Any], note) -> list[Path]:
    """``rate_distortion.png`` (perplexity change with its interval, and KL, against stored bytes) and
    ``drop_layers.png`` (perplexity change against layers dropped), each only when the sweep has its points."""
    plt = _pyplot(note)
    if plt is None:
        return []
    title = f"{protocol['model']}: {protocol['tokens_scored']:,} tokens, ctx {protocol['ctx']}"
    paths = []
    if series := rd_series(rows):
        fig, (ax_ppl, ax_kl) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120)
        _draw_rd(ax_ppl, ax_kl, series)
        fig.suptitle(f"Rate-distortion of ToL compression\n{title}", fontsize=10)
        fig.tight_layout()
        paths.append(_save(plt, fig, out / "rate_distortion.png"))
    x, change, errs = drop_series(rows)
    if x:
        fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
        ax.errorbar(x, change, yerr=[[e[0] for e in errs], [e[1] for e in errs]], marker="o", capsize=2)
        ax.set_xlabel("last layers dropped (their ToLs removed)")
        ax.set_ylabel("perplexity change, %")
        ax.set_xticks(x)
        ax.set_title(f"Dropping the last layers' ToLs\n{title}", fontsize=10)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        paths.append(_save(plt, fig, out / "drop_layers.png"))
    return paths


def _save(plt, fig, path: Path) -> Path:
    try:
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
