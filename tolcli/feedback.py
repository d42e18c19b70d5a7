"""Error feedback across layers: each layer is coded together with the error the layers before it left.

A MemoryLLM layer adds its context-free term to the residual stream, ``x_{l+1} = x_l + Attn_l(x_l) + T_l[t]``,
and nothing else reads the term: the model sees the tables only through their partial sums ``T_0 + ... + T_l``.
Coding each layer on its own, the partial sum after layer ``l`` carries every coding error so far,
``e_0 + ... + e_l``. With feedback, layer ``l`` codes ``T_l + c_l`` instead, where the carry
``c_l = (T_{l-1} + c_{l-1}) - D_{l-1}`` is what the previous layer's decoded table ``D_{l-1}`` missed
(``c`` of the first layer is 0). Then ``D_0 + ... + D_l = T_0 + ... + T_l - c_{l+1}``: every partial sum, the
last one included, is off by one layer's coding error only (noise shaping, as in sigma-delta conversion).
Each layer's own table is off by ``c_l - c_{l+1}``, the difference of two coding errors, so a bundle coded
this way is for running the model, not for reading one layer's FFN output alone (``rel_error`` in the manifest
stays that layer's table against its FFN, and is larger).

The carry is a [V, h] fp32 table: it lives in an unnamed temporary file beside the output (removed by the
operating system however the run ends), read and written a row batch at a time, so memory stays bounded.
Layers are coded in index order; a run resumed with some layers staged codes every layer again (the carry is
not staged).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tolcli.codecs.base import RowSource
from tolcli.errors import OutputError

_SPACE_HINT = "the carry needs V x h x 4 bytes free beside the output (1.05 GB at 128,256 x 2,048), for the run only"


class Carry:
    """The carry ``c``: fp32 [rows, width], all zeros at first, in an unnamed file in ``directory``."""

    def __init__(self, rows: int, width: int, directory: str | Path):
        self.width, self.directory = width, directory
        self._row_bytes = 4 * width
        try:
            self._file = tempfile.TemporaryFile(prefix=".tolcli-carry-", dir=directory)  # noqa: SIM115
            self._file.truncate(rows * self._row_bytes)  # reads as zeros; sparse until written
        except OSError as e:
            raise OutputError(
                f"cannot create the error-feedback carry file: {e.strerror}", path=directory, hint=_SPACE_HINT
            ) from None

    def read(self, start: int, n: int) -> Tensor:
        """Rows ``start .. start + n - 1`` of the carry."""
        size = n * self._row_bytes
        raw = os.pread(self._file.fileno(), size, start * self._row_bytes)
        if len(raw) != size:  # pragma: no cover - the file is ours and unnamed
            raise OutputError("the error-feedback carry file is shorter than written")
        return torch.from_numpy(np.frombuffer(raw, dtype=np.float32).copy()).reshape(n, self.width)

    def write(self, start: int, rows: Tensor) -> None:
        """Replace rows ``start ..`` of the carry by ``rows`` (fp32)."""
        data = memoryview(np.ascontiguousarray(rows.detach().to(torch.float32).numpy())).cast("B")
        offset = start * self._row_bytes
        while data:
            try:
                n = os.pwrite(self._file.fileno(), data, offset)
            except OSError as e:
                raise OutputError(
                    f"cannot write the error-feedback carry file: {e.strerror}", path=self.directory, hint=_SPACE_HINT
                ) from None
            data, offset = data[n:], offset + n

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Carry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CarriedRows:
    """A :class:`~tolcli.codecs.base.RowSource`: ``source``'s rows plus the carry, ``T_l + c_l`` (what layer ``l``
    codes). After the layer is coded, :meth:`advance` turns the carry into ``c_{l+1}`` batch by batch."""

    def __init__(self, source: RowSource, carry: Carry):
        self.source, self.carry = source, carry
        self.rows, self.width = source.rows, source.width

    def batches(self) -> Iterator[tuple[int, Tensor]]:
        for s, rows in self.source.batches():
            yield s, self.target(s, rows)

    def target(self, start: int, rows: Tensor) -> Tensor:
        """``rows`` (the table's rows ``start ..``) plus their carry."""
        return rows + self.carry.read(start, rows.shape[0])

    def advance(self, start: int, target: Tensor, decoded: Tensor) -> None:
        """Rows ``start ..`` of this layer are coded: their ``target`` (``T + c``) was decoded as ``decoded``;
        the carry to the next layer is what the decoded rows missed. Call it once per row batch, after the
        last pass that reads the batch's carry (the carry is replaced in place)."""
        self.carry.write(start, target - decoded)
