"""``tolcli drop``: a bundle without some layers. Every original layer index stays in the manifest,
marked ``dropped``, so no runtime can misalign layers; the kept tensors are copied byte for byte."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tolcli.bundle.manifest import attribute_bytes
from tolcli.bundle.reader import open_bundle
from tolcli.bundle.spec import TOKENIZER_TENSOR
from tolcli.bundle.writer import WriteOptions, write_bundle
from tolcli.errors import UsageError
from tolcli.fsutil import check_output
from tolcli.layout import parse_layer_spec


def layers_to_keep(num_layers: int, *, drop_last: int | None, keep_layers: str | None) -> set[int]:
    if (drop_last is None) == (keep_layers is None):
        raise UsageError("give exactly one of `drop_last` and `keep_layers`")
    if drop_last is not None:
        if not 0 <= drop_last <= num_layers:
            raise UsageError(f"--drop-last must be within 0..{num_layers}, got {drop_last}")
        return set(range(num_layers - drop_last))
    return set(parse_layer_spec(keep_layers, num_layers))  # type: ignore[arg-type]


def drop_layers(
    src: str | Path,
    out: str | Path,
    *,
    drop_last: int | None = None,
    keep_layers: str | None = None,
    container: str | None = None,
    force: bool = False,
    max_shard_size: int | str | None = None,
    verify_input: bool = False,
) -> tuple[Path, dict[str, Any]]:
    """Write ``out`` holding only the kept layers of ``src``; returns the path and the new manifest.

    Example:
        >>> import tempfile, pathlib
        >>> from tolcli import drop_layers, precompute, demo_checkpoint_path
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> src = precompute(demo_checkpoint_path(), d / "t.safetensors", dtype="bf16").path
        >>> _, manifest = drop_layers(src, d / "t4.safetensors", drop_last=2)
        >>> [e["status"] for e in manifest["layers"]]
        ['present', 'present', 'present', 'present', 'dropped', 'dropped']
    """
    options = WriteOptions.make(Path(out), container=container, max_shard_size=max_shard_size, force=force)
    check_output(Path(out), force=force, directory=options.sharded, make_parent=False)  # before reading the input
    with open_bundle(src, verify=verify_input) as b:
        keep = layers_to_keep(b.num_layers, drop_last=drop_last, keep_layers=keep_layers)
        if not keep & set(b.present_layers):
            raise UsageError(
                f"this keeps none of the bundle's {len(b.present_layers)} present layers: the output would hold no "
                "table (a model runs the same with no bundle at all)",
                hint="drop fewer layers; eval-ppl --drop-last measures dropping all of them without writing",
            )
        layers, names = [], set()
        for e in b.manifest["layers"]:
            if e["status"] == "present" and e["index"] in keep:
                layers.append(e)
                names.update(e["tensors"].values())  # a shared tensor stays while a kept layer reads it
            else:
                layers.append({"index": e["index"], "status": "dropped"})
        if TOKENIZER_TENSOR in b.manifest["tensors"]:
            names.add(TOKENIZER_TENSOR)
        manifest = {k: v for k, v in b.manifest.items() if k != "tensors"}
        # a shared tensor's bytes move to the first kept layer that reads it
        manifest["layers"] = attribute_bytes(layers, b.manifest["tensors"], b.vocab_size * b.hidden_size)
        step: dict[str, Any] = {"command": "drop", "kept": sorted(keep)}
        manifest["history"] = [*b.manifest.get("history", []), step]
        path = write_bundle(Path(out), [b.entry(n) for n in sorted(names)], manifest, options)
    with open_bundle(path) as written:
        return path, written.manifest
