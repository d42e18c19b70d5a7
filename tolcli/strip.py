"""``tolcli strip``: the deployable checkpoint, without the context-free FFN weights.

Once the ToLs are in a bundle, the context-free FFNs (``mlp.*`` and ``memory_layernorm.*`` of every
layer) are dead weight: what remains are the paper's active parameters plus embeddings and head. The
stripped checkpoint keeps the canonical layout, marks itself with ``"tolcli_stripped": true`` in
``config.json``, and runs only together with a bundle (``eval-ppl CHECKPOINT --tol BUNDLE``). It records the
source fingerprint of the full checkpoint (``"tolcli_source_fingerprint"``, :mod:`tolcli.pairing`), so that it can
still be tied to the bundles computed from that checkpoint; ``tols`` names bundles that must pair before anything is
written.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from tolcli.bundle import st_format
from tolcli.bundle.entries import TensorEntry
from tolcli.bundle.reader import open_bundle
from tolcli.checkpoint import CONFIG_NAME, ST_SINGLE, TOKENIZER_NAME, Checkpoint, open_checkpoint
from tolcli.dtypes import TORCH_TO_DTYPE, tensor_to_numpy
from tolcli.errors import UsageError
from tolcli.fsutil import atomic_dir
from tolcli.layout import MEMORY_FFN
from tolcli.pairing import check_pairing, source_fingerprint


def write_weights(ckpt: Checkpoint, names: list[str], path: Path) -> None:
    """``names`` of the checkpoint, canonical names and stored dtypes, as one safetensors file (tensors read one
    at a time)."""

    def entry(name: str) -> TensorEntry:
        st = ckpt.tensors[name]
        return TensorEntry(
            name,
            TORCH_TO_DTYPE[st.dtype].name,
            st.shape,
            "",
            lambda: iter([tensor_to_numpy(ckpt.load(name, dtype=None))]),
        )

    with open(path, "wb") as f:
        st_format.write(f, [entry(n) for n in names], None)


@dataclass(frozen=True)
class StripResult:
    path: Path
    kept: int
    removed: int
    bytes_removed: int
    source_fingerprint: str | None = None  # recorded in the stripped config.json (tolcli.pairing)


def strip_checkpoint(
    checkpoint: str | Path | Checkpoint,
    out: str | Path,
    *,
    force: bool = False,
    tols: Sequence[str | Path] = (),
    allow_source_mismatch: bool = False,
    note: Callable[[str], None] = lambda s: None,
) -> StripResult:
    """Write ``out/`` (config.json with ``tolcli_stripped`` and ``tolcli_source_fingerprint``, model.safetensors,
    tokenizer.json).

    Each bundle of ``tols`` must have been computed from ``checkpoint`` (:func:`tolcli.pairing.check_pairing`):
    one that was not is refused before anything is written, unless ``allow_source_mismatch`` (then a warning goes to
    ``note``).

    Example:
        >>> import tempfile, pathlib
        >>> from tolcli import strip_checkpoint, open_checkpoint, demo_checkpoint_path
        >>> r = strip_checkpoint(demo_checkpoint_path(), pathlib.Path(tempfile.mkdtemp()) / "active")
        >>> r.removed, open_checkpoint(r.path).config.stripped
        (30, True)
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    cfg = ckpt.config
    if not cfg.has_memory:
        raise UsageError(f"{ckpt.path}: model_type {cfg.model_type!r} has no context-free FFN to strip")
    if cfg.stripped:
        raise UsageError(f"{ckpt.path} is already stripped")
    for tol in tols:
        with open_bundle(tol) as b:
            check_pairing(ckpt, b, allow_mismatch=allow_source_mismatch, note=note)
    fingerprint = source_fingerprint(ckpt)
    out = Path(out)
    keep = [n for n in sorted(ckpt.tensors) if ckpt.specs[n].group != MEMORY_FFN and ckpt.has(n)]
    removed = [n for n in ckpt.tensors if ckpt.specs[n].group == MEMORY_FFN]

    with atomic_dir(out, force=force) as tmp:
        write_weights(ckpt, keep, tmp / ST_SINGLE)
        stripped = replace(cfg, stripped=True, source_fingerprint=fingerprint)
        (tmp / CONFIG_NAME).write_text(json.dumps(stripped.to_dict(), indent=2, sort_keys=True) + "\n")
        if ckpt.tokenizer_path is not None:
            shutil.copyfile(ckpt.tokenizer_path, tmp / TOKENIZER_NAME)
        open_checkpoint(tmp)  # what we wrote must read back as a valid stripped checkpoint
    nbytes = sum(ckpt.tensors[n].dtype.itemsize * math.prod(ckpt.tensors[n].shape) for n in removed)
    return StripResult(out, len(keep), len(removed), nbytes, fingerprint)
