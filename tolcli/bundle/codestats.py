"""How compressible a bundle's stored codes still are: the order-0 entropy of every code tensor and the zstd size of
every layer (``tolcli inspect --entropy``, :func:`code_statistics`).

A quantised layer stores each code in ``b`` bits; its codes' empirical entropy ``H`` (bits per code, from their
histogram) is what an ideal order-0 entropy coder would spend instead. ``H`` well below ``b`` says the levels are
used unevenly (the codec wastes bits a better level placement or an entropy-coded container would recover); ``H``
near ``b`` says the codes are as dense as they can be. The zstd figure is what a general-purpose compressor finds
in the layer's stored bytes (codes, scales and the rest) at level 3: what a transport or an artifact store gains.

Code tensors are the roles a codec names in :meth:`tolcli.codecs.base.Codec.code_roles`; they are read in blocks
through :meth:`tolcli.bundle.reader.Bundle.entry` (memory bounded by a block whatever the layer's size), unpacked
as the bundle format prescribes (each row a little-endian bit stream), and counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from tolcli.bundle.manifest import owned_tensors

ZSTD_LEVEL = 3
HISTOGRAM_CHUNK = 1 << 20  # codes counted at once


@dataclass(frozen=True)
class LayerCodeStats:
    """One present layer's figures (``asdict`` gives the ``--json`` object)."""

    index: int
    codec: str
    codes: int  # integer codes the layer stores (0 for codecs without any, e.g. dense)
    stored_bits_per_code: float | None  # their stored width, averaged over the code tensors (None: no codes)
    entropy_bits_per_code: float | None  # their empirical order-0 entropy, per code tensor, averaged likewise
    stored_bytes: int  # every tensor of the layer
    zstd_bytes: int  # every tensor of the layer, each compressed by zstd at ZSTD_LEVEL
    entropy_coded_bytes: int  # stored_bytes with the code tensors at their entropy (an ideal order-0 coder)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def entropy_bits(counts: np.ndarray) -> float:
    """Order-0 entropy in bits per symbol of a histogram (empty: 0).

    Example:
        >>> entropy_bits(np.array([1, 1, 1, 1])), entropy_bits(np.array([8, 0])), entropy_bits(np.array([2, 1, 1]))
        (2.0, 0.0, 1.5)
    """
    total = int(counts.sum())
    if total == 0:
        return 0.0
    p = counts[counts > 0].astype(np.float64) / total
    return 0.0 - float((p * np.log2(p)).sum())  # 0.0, not -0.0, for one symbol


def code_histogram(blocks: Iterable[np.ndarray], bits: int) -> np.ndarray:
    """Histogram (``2**bits`` bins) of the codes in blocks of rows of a code tensor: bytes [rows, n] holding each
    row's codes as one little-endian bit stream of ``bits``-bit codes (for 8 bits, one code per byte, signed or
    not: the histogram of the byte values)."""
    from tolcli.codecs.mixed import unpack_codes_np

    counts = np.zeros(1 << bits, dtype=np.int64)
    for block in blocks:
        raw = np.ascontiguousarray(block).view(np.uint8)
        raw = raw.reshape(raw.shape[0], -1) if raw.ndim > 1 else raw.reshape(1, -1)
        codes = (raw if bits == 8 else unpack_codes_np(raw, bits)).reshape(-1)
        for a in range(0, codes.size, HISTOGRAM_CHUNK):  # bincount makes an int64 copy: bounded to a chunk
            counts += np.bincount(codes[a : a + HISTOGRAM_CHUNK], minlength=1 << bits)
    return counts


def zstd_size(blocks: Iterable[np.ndarray], level: int = ZSTD_LEVEL) -> int:
    """Bytes of one zstd frame of the blocks' bytes, compressed as they stream."""
    import zstandard

    c = zstandard.ZstdCompressor(level=level).compressobj()
    n = 0
    for block in blocks:
        n += len(c.compress(np.ascontiguousarray(block).tobytes()))
    return n + len(c.flush())


def bytes_to_read(bundle: Any) -> int:
    """What :func:`code_statistics` reads of an open bundle (its progress total): every tensor of every present
    layer once for zstd, the code tensors once more for their histogram."""
    return sum(
        bundle.entry(name).nbytes * (2 if role in bundle.layers[i].codec.code_roles() else 1)
        for i, tensors in _owned(bundle).items()
        for role, name in tensors.items()
    )


def _owned(bundle: Any) -> dict[int, dict[str, str]]:
    """Each present layer's tensors, a shared one only under the first layer that reads it (as the manifest counts
    its bytes: :func:`~tolcli.bundle.manifest.owned_tensors`)."""
    return owned_tensors((i, bundle.layers[i].tensors) for i in sorted(bundle.layers))


def code_statistics(bundle: Any, progress: Callable[[int], None] | None = None) -> list[LayerCodeStats]:
    """:class:`LayerCodeStats` of every present layer of an open :class:`tolcli.bundle.reader.Bundle`, in layer
    order; ``progress(bytes)`` is called as tensors are read (every tensor once for zstd, code tensors once more
    for their histogram)."""
    out = []
    owned = _owned(bundle)
    for index in sorted(bundle.layers):
        info = bundle.layers[index]
        widths = info.codec.code_roles()
        codes = 0
        stored_bits = entropy_total = 0.0
        stored = packed = zbytes = 0
        for role, name in owned[index].items():
            entry = bundle.entry(name)
            stored += entry.nbytes
            zbytes += zstd_size(_counted(entry.blocks(), progress))
            bits = widths.get(role)
            if bits is None:
                continue
            hist = code_histogram(_counted(entry.blocks(), progress), bits)
            n = int(hist.sum())
            codes += n
            packed += entry.nbytes
            stored_bits += bits * n
            entropy_total += entropy_bits(hist) * n
        out.append(
            LayerCodeStats(
                index=index,
                codec=info.codec.name,
                codes=codes,
                stored_bits_per_code=stored_bits / codes if codes else None,
                entropy_bits_per_code=entropy_total / codes if codes else None,
                stored_bytes=stored,
                zstd_bytes=zbytes,
                entropy_coded_bytes=stored - packed + math.ceil(entropy_total / 8),
            )
        )
    return out


def _counted(blocks: Iterable[np.ndarray], progress: Callable[[int], None] | None) -> Iterable[np.ndarray]:
    for block in blocks:
        if progress is not None:
            progress(block.nbytes)
        yield block
