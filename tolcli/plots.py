"""PNG figures (matplotlib, an optional dependency: ``pip install 'tolcli[plot]'``)."""

from __future__ import annotations

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


def sweep_figures(out: Path, rows: list[dict[str, Any]], protocol: dict[str, Any], note) -> list[Path]:
    """``rate_distortion.png`` and ``drop_layers.png`` for a sweep's rows."""
    plt = _pyplot(note)
    if plt is None:
        return []
    title = f"{protocol['model']}: {protocol['tokens_scored']:,} tokens, ctx {protocol['ctx']}"
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for family in dict.fromkeys(
        r["family"] for r in rows if r["stored_bytes"] is not None and r["family"] != "dense fp32"
    ):
        pts = sorted((r["fraction_of_dense_fp16"], r["ppl_change_pct"]) for r in rows if r["family"] == family)
        ax.plot([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], marker="o", label=family)
    ax.set_yscale("log")
    ax.set_xlabel("stored bytes / dense fp16 bytes")
    ax.set_ylabel("perplexity increase, % (log; <= 0.001% drawn at 0.001%)")
    ax.set_title(f"Rate-distortion of ToL compression\n{title}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    rd = out / "rate_distortion.png"
    fig.savefig(rd)
    plt.close(fig)
    drops = sorted((r["layers_dropped"], r["ppl"]) for r in rows if "layers_dropped" in r)
    paths = [rd]
    if drops:
        base = rows[0]["ppl"]
        fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
        ax.plot([0] + [d[0] for d in drops], [base] + [d[1] for d in drops], marker="o")
        ax.set_xlabel("last layers dropped")
        ax.set_ylabel("perplexity")
        ax.set_yscale("log")
        ax.set_title(f"Dropping the last layers' ToLs\n{title}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        dl = out / "drop_layers.png"
        fig.savefig(dl)
        plt.close(fig)
        paths.append(dl)
    return paths
