"""Compiled decoding of ``mixed`` layers (numba, an optional dependency: ``pip install 'tolcli[fast]'``).

One pass per class over the ids' positions: each row of the class is read straight from its stored tensors (the
zero-copy views of a bundle's memory map, or in-memory tensors), unpacked, scaled and written once into the output,
with the mean row added. The arithmetic is the format's, one fp32 rounding per operation
(``((q * scale) + offset) + mean``, no fused multiply-add: numba compiles without ``fastmath``), so the rows are
bit-identical to :func:`tolcli.codecs.mixed.decode_rows_fast` and to the reference formula (tests check both; a NaN
from a non-finite scale, which no encoder writes, may differ in sign or payload).

Without numba, or with ``TOLCLI_NUMBA=0`` in the environment, :func:`available` is False and the codec takes its
numpy path. The first use compiles the kernels (about a second; numba caches them on disk where it can); a
compilation failure disables them for the process, with the numpy path taking over.
"""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import numpy as np

# fp16 bit pattern -> its fp32 value: exact for every pattern (normal, subnormal, Inf, NaN), 256 KB.
FP16_TO_F32 = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)

_KERNELS: dict[str, Any] | None = None
_FAILED = False
_LOCK = threading.Lock()


def spread_rounds(bits: int) -> tuple[tuple[int, int, int], ...]:
    """The three rounds that spread the 8 ``bits``-bit codes of a little-endian word into its 8 bytes: the upper 4
    codes move to bit 32, then the upper 2 of each half 16 bits up, then the upper one of each pair 8 bits up. Each
    round is (bits of a field's lower half, lane, mask of the lower halves where the fields are)."""
    rounds = []
    for codes, lane in ((4, 32), (2, 16), (1, 8)):
        low = (1 << (codes * bits)) - 1
        mask = sum(low << (2 * lane * k) for k in range(64 // (2 * lane)))
        rounds.append((codes * bits, lane, mask))
    return tuple(rounds)


def _compile() -> dict[str, Any]:
    import numba
    from numba.core.errors import NumbaError, NumbaWarning

    # numba's own warnings (an unwritable cache directory, say) are not the user's concern: one filter, installed once
    # (a catch_warnings around each call would swap the process-wide filters under concurrent threads)
    warnings.filterwarnings("ignore", category=NumbaWarning)
    jit = numba.njit(cache=True, nogil=True, boundscheck=False)

    @jit
    def positions(index, ids, out):  # pragma: no cover - compiled
        """Row ids -> positions (``index``: U8 [R, n], n little-endian bytes per row); returns the smallest and
        largest position (-1 for an id out of range)."""
        R, nb = index.shape
        lo, hi = np.int64(1) << 62, np.int64(-1)
        for i in range(ids.size):
            t = ids[i]
            p = np.int64(-1)
            if 0 <= t < R:
                p = 0
                for k in range(nb):
                    p |= np.int64(index[t, k]) << (8 * k)
            out[i] = p
            lo, hi = min(lo, p), max(hi, p)
        return lo, hi

    @jit
    def mean_rows(pos, start, rows, mean, out):  # pragma: no cover - compiled
        """Rows of a zero-bit class (positions ``start .. start + rows - 1``): the mean row."""
        C = mean.size
        for i in range(pos.size):
            p = pos[i] - start
            if p < 0 or p >= rows:
                continue
            row = out[i]
            for j in range(C):
                row[j] = mean[j]

    def class_kernel(BITS: int) -> Any:
        """The kernel of one code width: ``BITS`` is a compile-time constant, so reading 8 codes from ``BITS``
        bytes and spreading them into 8 bytes (three shift-mask rounds, or 8 shifts) unrolls, and the scaling loop
        over a group vectorises. Each width unpacks the way measured fastest for it (x86-64 with AVX-512, h = 128,
        per row: 3-5 ns for 1, 3 and 4 bits, 9-10 ns for 5 and 6 bits, where the rounds took 18; about 9 ns of
        scaling on top)."""
        (H1, L1, M1), (H2, L2, M2), (H3, L3, M3) = (tuple(np.uint64(x) for x in r) for r in spread_rounds(BITS))
        MASK = np.uint64((1 << BITS) - 1)

        @jit
        def class_rows(pos, start, rows, codes, scales, offsets, group, mean, lut, q, out):  # pragma: no cover
            """Rows of one coded class: bit-stream codes (least significant bit first), fp16 scale and offset per
            group (as uint16 bits, widened by ``lut``); ``q`` is a uint8 [C] scratch row."""
            C = out.shape[1]
            G = C // group
            q64 = q.view(np.uint64)
            for i in range(pos.size):
                p = pos[i] - start
                if p < 0 or p >= rows:
                    continue
                crow = codes[p]
                if BITS == 2:  # four codes a byte: a byte loop is faster than the word rounds (measured)
                    for b in range(crow.size):
                        c = crow[b]
                        for t in range(4):
                            q[4 * b + t] = (c >> np.uint8(2 * t)) & np.uint8(3)
                elif BITS == 4:  # two codes a byte: the byte loop vectorises (faster than the rounds, measured)
                    for b in range(crow.size):
                        c = crow[b]
                        q[2 * b] = c & np.uint8(15)
                        q[2 * b + 1] = c >> np.uint8(4)
                elif BITS == 5 or BITS == 6:  # each code shifted out of the word (LLVM vectorises the rounds badly)
                    for m in range(C // 8):
                        w = np.uint64(0)
                        for b in range(BITS):
                            w |= np.uint64(crow[m * BITS + b]) << np.uint64(8 * b)
                        for t in range(8):
                            q[8 * m + t] = np.uint8((w >> np.uint64(BITS * t)) & MASK)
                else:
                    for m in range(C // 8):
                        w = np.uint64(0)
                        for b in range(BITS):
                            w |= np.uint64(crow[m * BITS + b]) << np.uint64(8 * b)
                        w = (w & M1) | (((w >> H1) & M1) << L1)
                        w = (w & M2) | (((w >> H2) & M2) << L2)
                        w = (w & M3) | (((w >> H3) & M3) << L3)
                        q64[m] = w
                row = out[i]
                for gi in range(G):
                    s = lut[scales[p, gi]]
                    f = lut[offsets[p, gi]]
                    j0 = gi * group
                    qg, mg, og = q[j0 : j0 + group], mean[j0 : j0 + group], row[j0 : j0 + group]
                    for j in range(group):  # on 1-D slices LLVM vectorises this loop (with 2-D indexing, not)
                        v = np.float32(qg[j]) * s
                        v = v + f
                        og[j] = v + mg[j]

        return class_rows

    classes = {bits: class_kernel(bits) for bits in range(1, 9)}  # each compiled on its first call
    return {"positions": positions, "mean_rows": mean_rows, "classes": classes, "compile_errors": NumbaError}


def available() -> bool:
    """Whether the compiled kernels can be used (numba importable, not disabled by ``TOLCLI_NUMBA=0``)."""
    if _FAILED or os.environ.get("TOLCLI_NUMBA", "1") == "0":
        return False
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def kernels() -> dict[str, Any] | None:
    """The compiled kernels, compiled on first use; None when unavailable or when compiling failed."""
    global _KERNELS, _FAILED
    if not available():
        return None
    with _LOCK:
        if _KERNELS is None:
            try:
                _KERNELS = _compile()
            except Exception:  # numba's own failures (say, a broken llvmlite): the numpy path decodes instead
                _FAILED = True
                return None
    return _KERNELS


class Layer:
    """One ``mixed`` layer's stored tensors as the kernels read them: ``index`` U8 [R, n], ``mean`` fp32 [C], and
    per class (bits, group, rows, first position, codes U8, scales and offsets as uint16 bits; None for zero-bit
    classes). The caller checks every shape and dtype: the kernels index without bounds checks."""

    def __init__(self, index: np.ndarray, mean: np.ndarray, classes: list[tuple[Any, ...]]):
        self.index, self.mean, self.classes = index, mean.reshape(-1), classes
        self.rows = sum(c[2] for c in classes)
        self.q = np.zeros(mean.size, dtype=np.uint8)  # one decoded row's codes (per call: see decode)


def decode(layer: Layer, ids: np.ndarray, out: np.ndarray) -> bool:
    """Decode rows ``ids`` (int64) of ``layer`` into ``out`` (fp32 [n, C], C-contiguous). Returns False when the
    kernels are unavailable (nothing written). Raises ValueError(position) for a position outside the layer's rows
    (a corrupt ``index``) or -1 for an id outside the table."""
    k = kernels()
    if k is None:
        return False
    try:
        _run(k, layer, ids, out)
    except k["compile_errors"]:  # a kernel failed to compile (the first call of a type signature compiles it)
        global _FAILED
        _FAILED = True  # the numpy path takes over from now on
        return False
    return True


def _run(k: dict[str, Any], layer: Layer, ids: np.ndarray, out: np.ndarray) -> None:
    pos = np.empty(ids.size, dtype=np.int64)
    q = np.empty_like(layer.q)  # per call: concurrent lookups on other threads (the kernels release the GIL)
    lo, hi = k["positions"](layer.index, ids, pos)
    if ids.size and (lo < 0 or hi >= layer.rows):
        raise ValueError(int(lo) if lo < 0 else int(hi))
    for bits, group, rows, start, codes, scales, offsets in layer.classes:
        if bits == 0:
            k["mean_rows"](pos, start, rows, layer.mean, out)
        else:
            k["classes"][bits](pos, start, rows, codes, scales, offsets, group, layer.mean, FP16_TO_F32, q, out)
