"""One definition of a bundle's size figures, used by every command that reports them (inspect, compress,
sweep, eval-ppl): bytes stored, and that as a fraction of the model's dense fp16 tables."""

from __future__ import annotations

from typing import Any


def bundle_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """Size figures of a bundle from its manifest.

    ``stored_bytes`` sums the present layers' codec bytes (the tokenizer is not counted);
    ``dense_fp16_bytes`` is what fp16 tables of **every** layer of the model would take (``V * h * 2 * L``),
    so dropping layers lowers ``fraction_of_dense_fp16``, as it lowers what a runtime must hold.

    Example:
        >>> m = {"model": {"vocab_size": 10, "hidden_size": 4, "num_layers": 2},
        ...      "layers": [{"status": "present", "stored_bytes": 40}, {"status": "dropped"}]}
        >>> s = bundle_summary(m)
        >>> s["dense_fp16_bytes"], s["fraction_of_dense_fp16"], s["layers_dropped"]
        (160, 0.25, 1)
    """
    model = manifest["model"]
    present = [e for e in manifest["layers"] if e["status"] == "present"]
    stored = sum(e["stored_bytes"] for e in present)
    dense16 = model["vocab_size"] * model["hidden_size"] * 2 * model["num_layers"]
    return {
        "layers_present": len(present),
        "layers_dropped": model["num_layers"] - len(present),
        "stored_bytes": stored,
        "dense_fp16_bytes": dense16,
        "fraction_of_dense_fp16": stored / dense16 if dense16 else 0.0,
        "error_feedback": coded_with_feedback(manifest),
    }


def coded_with_feedback(manifest: dict[str, Any]) -> bool:
    """Whether the tables were last coded with error feedback across layers (the latest ``compress`` of the history
    recorded ``error_feedback``): each partial sum of the layers is then off by one layer's coding error, and a
    layer's ``rel_error`` is its own table's (docs/compression.md, "Error feedback across layers")."""
    runs = [h for h in manifest.get("history", []) if isinstance(h, dict) and h.get("command") == "compress"]
    return bool(runs) and runs[-1].get("error_feedback") is True
