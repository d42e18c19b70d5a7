"""Read bundles: the single way anything in tolcli reads ToLs.

``open_bundle(path)`` validates the container header, the manifest (schema, then against the stored
tensors), and returns a :class:`Bundle` whose :meth:`Bundle.lookup` (one layer) and :meth:`Bundle.lookup_layers`
(every present layer, optionally into a caller's buffer) decode rows on demand: gathered from a zero-copy view of a
memory map where the container has one (safetensors; HDF5 datasets whose rows lie back to back in the file), from
the map through each chunk's offset for other uncompressed HDF5, through HDF5's chunked reads for compressed HDF5.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tolcli.bundle.container import ContainerReader, container_of
from tolcli.bundle.entries import TensorEntry, rows_per_block
from tolcli.bundle.manifest import FP16_MAX, canonical_json, check_against_tensors, parse_manifest
from tolcli.bundle.sharded import ShardedReader
from tolcli.bundle.spec import TOKENIZER_TENSOR
from tolcli.codecs import Codec, codec_from_manifest
from tolcli.dtypes import DTYPES
from tolcli.errors import InputError, UsageError, VerifyError
from tolcli.jsonsafe import cut, regular_file

# Stored dense values may exceed the exact table's ``max_abs`` by the rounding to their dtype (bf16: 2^-8 relative,
# fp16: 2^-11, subnormals: 2^-24 absolute), never more; and a value beyond fp16 range by more than that rounding
# comes from an exact value beyond it, so the manifest's ``fp16_overflow`` must count it.
_ROUNDING = 2.0**-7
# Gather buffers of lookup_layers kept per thread and run for the next call, up to this size each (a decoder's
# batches; a one-off lookup of the whole vocabulary allocates instead of pinning a table's worth of memory).
MAX_SCRATCH_BYTES = 64 << 20
# Lookups of at most this many ids over dense layers take :meth:`Bundle._fast_dense` (no torch op per call).
MAX_FAST_IDS = 64
_TINY = 2.0**-24


@dataclass(frozen=True)
class LayerInfo:
    index: int
    codec: Codec
    tensors: dict[str, str]  # role -> tensor name
    entry: dict[str, Any]  # the manifest entry


class _StackedAccess:
    """TensorAccess over a run of layers whose codecs are alike and whose role tensors lie at a constant stride in
    the memory map: row ``k * n + j`` of a role is row ``ids[j]`` of the ``k``-th layer's tensor, so a row-wise codec
    decodes every layer of the run in one call, from one gather per role."""

    def __init__(self, stacks: dict[str, np.ndarray], idx: np.ndarray, scratch: dict[str, np.ndarray]):
        self.stacks, self.idx = stacks, idx  # role -> [layers, rows, ...] strided view; this lookup's ids
        self.scratch = scratch  # role -> a buffer this thread reuses across lookups (fresh memory costs page faults)

    def rows(self, role: str, ids: Tensor) -> Tensor:
        """The role's rows of every layer of the run, in a reused buffer: valid until the next lookup (a codec's
        ``decode_into`` consumes them at once)."""
        stack, idx = self.stacks[role], self.idx
        if ids.numel() != stack.shape[0] * idx.size:  # pragma: no cover - only lookup_layers calls it
            raise AssertionError("stacked rows are read with the stacked ids of the current lookup")
        buf = self.scratch.get(role)
        shape = (stack.shape[0], idx.size, *stack.shape[2:])
        if buf is None or buf.dtype != stack.dtype or buf.size < math.prod(shape):
            buf = np.empty(math.prod(shape), dtype=stack.dtype)
            if buf.nbytes <= MAX_SCRATCH_BYTES:  # kept for the next lookup; a huge one-off batch is not
                self.scratch[role] = buf
        arr = buf[: math.prod(shape)].reshape(shape)
        for k in range(stack.shape[0]):  # each layer's view is contiguous; ids are checked, so no bounds buffering
            np.take(stack[k], idx, axis=0, out=arr[k], mode="clip")
        t = torch.from_numpy(arr.reshape(ids.numel(), *stack.shape[2:]))
        return t.view(torch.bfloat16) if arr.dtype == np.uint16 else t

    def full(self, role: str) -> Tensor:  # pragma: no cover - row-wise codecs read rows only
        raise AssertionError("row-wise codecs read rows only")


@dataclass(frozen=True)
class _DenseStack:
    """Layers ``start .. start + count - 1`` (positions in :attr:`Bundle.present_layers`) of a dense run, as one
    read-only ``[count, vocab, hidden]`` view of the memory map in the stored dtype (BF16 as uint16 bits)."""

    start: int
    count: int
    table: np.ndarray
    bf16: bool


@dataclass(frozen=True)
class _PairStack:
    """Layers ``start .. start + count - 1`` of a 4-bit run (:meth:`Codec.nibble_pairs`): its roles as read-only
    ``[count, vocab, ...]`` views of the memory map, the byte -> level pair table and the group size."""

    start: int
    count: int
    codes: np.ndarray  # U8 [count, vocab, hidden/2]
    scales: np.ndarray  # F16 [count, vocab, hidden/group]
    offsets: np.ndarray | None
    pairs: np.ndarray  # uint64 [256]: two float32 levels per byte
    group: int


@dataclass
class _Run:
    """Consecutive present layers (``start`` is the first one's position) decoded by one call where ``access`` is
    a :class:`_StackedAccess`, else (one layer) through its own access."""

    start: int
    layers: list[int]
    codec: Codec
    views: list[dict[str, np.ndarray]]  # per layer, role -> zero-copy view (empty: none)
    stacks: dict[str, np.ndarray] | None = None  # role -> [layers, rows, ...], for runs of more than one layer


class _Access:
    """TensorAccess for one layer: rows/full reads of its roles' tensors."""

    stable_views = True  # its views are the bundle's memory map, the same for the bundle's life

    def __init__(self, bundle: Bundle, layer: LayerInfo):
        self.bundle, self.layer = bundle, layer

    def rows(self, role: str, ids: Tensor) -> Tensor:
        return self.bundle._rows(self.layer.tensors[role], ids)

    def full(self, role: str) -> Tensor:
        return self.bundle.tensor(self.layer.tensors[role])

    def full_f32(self, role: str) -> Tensor:
        return self.bundle._tensor_f32(self.layer.tensors[role])

    def view(self, role: str) -> np.ndarray | None:
        """The role's zero-copy view of the memory map (checked against the manifest), or None."""
        return self.bundle._view(self.layer.tensors[role])


def as_float32(arr: np.ndarray, dtype: str) -> np.ndarray:
    """A float block in its storage dtype (BF16 as uint16 bits) as float32 values."""
    if dtype == "BF16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32, copy=False)


def magnitude_stats(arr: np.ndarray, dtype: str) -> tuple[float, int]:
    """``(largest finite |x|, count of |x| beyond fp16 range plus rounding, Inf included)`` of a float block."""
    if dtype not in ("F32", "F16", "BF16") or arr.size == 0:
        return 0.0, 0
    mag = np.abs(as_float32(arr, dtype))
    finite = mag[np.isfinite(mag)]
    largest = float(finite.max()) if finite.size else 0.0
    return largest, int((mag > FP16_MAX * (1 + _ROUNDING)).sum())


def nonfinite_counts(arr: np.ndarray, dtype: str) -> tuple[int, int]:
    """``(NaN count, Inf count)`` of a block in its storage dtype (BF16 is stored as uint16 bit patterns:
    exponent bits all ones, with a zero mantissa for Inf); ``(0, 0)`` for integer dtypes."""
    if dtype in ("F32", "F16"):
        return int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
    if dtype == "BF16":
        special = (arr & 0x7F80) == 0x7F80
        mantissa = (arr & 0x007F) != 0
        return int((special & mantissa).sum()), int((special & ~mantissa).sum())
    return 0, 0


class Bundle:
    """An open, validated ToL bundle. Use :func:`open_bundle`."""

    def __init__(self, path: Path, reader: ContainerReader):
        self.path = path
        self._reader = reader
        self.container: str = reader.container
        self.manifest: dict[str, Any] = parse_manifest(reader.manifest_text, where=str(path))
        check_against_tensors(self.manifest, reader.stored(), where=str(path))
        self.vocab_size: int = self.manifest["model"]["vocab_size"]
        self.hidden_size: int = self.manifest["model"]["hidden_size"]
        self.num_layers: int = self.manifest["model"]["num_layers"]
        self.layers: dict[int, LayerInfo] = {
            e["index"]: LayerInfo(e["index"], codec_from_manifest(e["codec"], e["params"]), dict(e["tensors"]), e)
            for e in self.manifest["layers"]
            if e["status"] == "present"
        }
        self.present_layers: tuple[int, ...] = tuple(sorted(self.layers))
        self._accesses = {i: _Access(self, info) for i, info in self.layers.items()}
        self._full_cache: dict[str, Tensor] = {}
        self._f32_cache: dict[str, Tensor] = {}
        self._views: dict[str, np.ndarray | None] = {}
        self._last_ids: tuple[Tensor | None, np.ndarray] = (None, np.zeros(0, dtype=np.int64))
        self._run_plan: list[_Run] | None = None
        self._dense_plan: list[_DenseStack] | None = None  # empty: lookups take the general path
        self._pair_plan: list[_PairStack] | None = None  # likewise, for 4-bit layers
        self._out_np: tuple[Tensor, int, int, list[Any]] | None = None  # last ``out``, address, ids, targets
        self._placeholders: dict[int, Tensor] = {}
        self._scratch = threading.local()  # per thread: run -> role -> gather buffer
        self._magnitudes: dict[str, tuple[float, int]] = {}
        # The tables of dense layers, whose values the manifest's max_abs and fp16_overflow bound (see verify).
        self._dense_tables = {info.tensors["table"] for info in self.layers.values() if info.codec.name == "dense"}

    @property
    def manifest_sha256(self) -> str:
        """SHA-256 of the manifest's canonical JSON: what a runtime can pin besides the file's own sha256."""
        return hashlib.sha256(canonical_json(self.manifest).encode("utf-8")).hexdigest()

    # ---- reading -----------------------------------------------------------------------------------
    @property
    def tensor_names(self) -> list[str]:
        return sorted(self.manifest["tensors"])

    def tensor(self, name: str) -> Tensor:
        """A whole stored tensor, as a torch tensor of its stored dtype (cached: codecs' small factors)."""
        if name not in self._full_cache:
            info = self.manifest["tensors"][name]
            arr = np.ascontiguousarray(self._reader.array(name))
            t = torch.from_numpy(arr.copy())
            self._full_cache[name] = t.view(torch.bfloat16) if info["dtype"] == "BF16" else t
        return self._full_cache[name]

    def _tensor_f32(self, name: str) -> Tensor:
        """A whole stored tensor as fp32 (cached: an SVD's ``B``, multiplied on every lookup)."""
        if name not in self._f32_cache:
            self._f32_cache[name] = self.tensor(name).float()
        return self._f32_cache[name]

    def _view(self, name: str) -> np.ndarray | None:
        """The container's zero-copy view of a tensor (cached), or None where it has none."""
        if name not in self._views:
            get = getattr(self._reader, "view", None)
            view = None if get is None else get(name)
            info = self.manifest["tensors"][name]
            if view is not None and (view.dtype != DTYPES[info["dtype"]].numpy or list(view.shape) != info["shape"]):
                view = None  # never: the stored tensors were checked against the manifest
            self._views[name] = view
        return self._views[name]

    def _rows(self, name: str, ids: Tensor) -> Tensor:
        last, last_np = self._last_ids  # the ids of the current lookup, already as numpy
        idx = last_np if ids is last else ids.cpu().to(torch.long).numpy()
        view = self._view(name)
        arr = np.take(view, idx, axis=0) if view is not None else np.ascontiguousarray(self._reader.rows(name, idx))
        t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if arr.dtype == np.uint16 else t

    def _layer_info(self, layer: int) -> LayerInfo:
        info = self.layers.get(layer)
        if info is None:
            status = "dropped" if 0 <= layer < self.num_layers else "out of range"
            raise InputError(f"layer {layer} is {status} in this bundle", path=self.path)
        return info

    def _checked_ids(self, token_ids: Tensor | list[int]) -> tuple[Tensor, tuple[int, ...]]:
        """``(flat int64 CPU ids, their shape)``; ids outside the vocabulary are refused."""
        ids = _integer_ids(token_ids, self.path)
        flat = ids.reshape(-1).numpy()
        lo, hi = _id_range(flat)
        if flat.size and (lo < 0 or hi >= self.vocab_size):
            raise InputError(f"token id outside the vocabulary [0, {self.vocab_size})", path=self.path)
        checked = torch.from_numpy(flat)
        self._last_ids = (checked, flat)  # one attribute write: another thread's lookup never sees half of it
        return checked, tuple(ids.shape)  # this call's ids, whatever another thread wrote meanwhile

    def lookup(self, layer: int, token_ids: Tensor | list[int]) -> Tensor:
        """Decoded ToL rows of ``layer`` for ``token_ids`` (any shape): fp32, shape (*ids.shape, hidden)."""
        info = self._layer_info(layer)
        flat, shape = self._checked_ids(token_ids)
        out = torch.empty(flat.numel(), self.hidden_size, dtype=torch.float32)
        info.codec.decode_into(self._accesses[layer], flat, out)
        return out.reshape(*shape, self.hidden_size)

    def read_rows(self, layer: int, start: int, stop: int) -> Tensor:
        """Rows ``start`` to ``stop - 1`` of ``layer`` decoded to fp32 [stop - start, hidden], then the memory-mapped
        pages read so far handed back to the kernel (:meth:`release_pages`): what a pass over a whole table in
        batches calls (compress), so that its resident memory stays at one batch whatever the vocabulary."""
        if not 0 <= start <= stop <= self.vocab_size:
            raise UsageError(f"rows `start`={start} to `stop`={stop} are not a range of [0, {self.vocab_size}]")
        rows = self.lookup(layer, torch.arange(start, stop))
        self.release_pages()
        return rows

    def release_pages(self) -> None:
        """Drop this process's mappings of the file pages read so far (``madvise(MADV_DONTNEED)``; they stay in
        the page cache): VmHWM then counts only what is read between two calls. A no-op for containers read
        without a memory map."""
        release = getattr(self._reader, "release", None)
        if release is not None:
            release()

    def lookup_layers(self, token_ids: Tensor | list[int], *, out: Tensor | None = None) -> Tensor:
        """Decoded rows of every present layer (:attr:`present_layers`, in order) for ``token_ids`` (any shape):
        fp32 ``[len(present_layers), *ids.shape, hidden]``, the same values as :meth:`lookup` layer by layer.

        What a decoder calls once per step. ``out``: a contiguous fp32 CPU tensor of exactly that shape, written in
        place and returned, so that no memory is allocated per call (fresh memory of a large batch costs the
        operating system's page faults, more than the lookup itself). Up to :data:`MAX_FAST_IDS` ids over dense
        layers take a path with no torch operation but one widening copy per stack of layers (a list, a numpy
        integer array or an int64 CPU tensor of ids; the same values and refusals).

        Example:
            >>> import tempfile, pathlib, torch
            >>> from tolcli import open_bundle, precompute, demo_checkpoint_path
            >>> path = pathlib.Path(tempfile.mkdtemp()) / "demo.safetensors"
            >>> _ = precompute(demo_checkpoint_path(), path, dtype="fp16", layers="0,2")
            >>> b = open_bundle(path)
            >>> buf = torch.empty(2, 3, 128)
            >>> b.lookup_layers([5, 0, 5], out=buf) is buf, torch.equal(buf[1], b.lookup(2, [5, 0, 5]))
            (True, True)
        """
        fast = self._fast_dense(token_ids, out)
        if fast is None:
            fast = self._fast_pairs(token_ids, out)
        if fast is not None:
            return fast
        flat, shape = self._checked_ids(token_ids)
        want = (len(self.present_layers), *shape, self.hidden_size)
        if out is None:
            out = torch.empty(want, dtype=torch.float32)
        else:
            check_out(out, want, torch.device("cpu"))
        rows = out.view(len(self.present_layers), flat.numel(), self.hidden_size)
        shared: dict[str, Tensor] = {}  # what layers sharing tensors decode once (a cross-layer SVD's A rows)
        for run in self._runs():
            if len(run.layers) == 1:
                run.codec.decode_into_shared(self._accesses[run.layers[0]], flat, rows[run.start], shared)
            else:
                block = rows[run.start : run.start + len(run.layers)].view(-1, self.hidden_size)
                access = _StackedAccess(run.stacks or {}, flat.numpy(), self._scratch_of(run.start))
                run.codec.decode_into(access, self._placeholder(len(run.layers) * flat.numel()), block)
        return out

    def _fast_dense(self, token_ids: Tensor | list[int], out: Tensor | None) -> Tensor | None:
        """:meth:`lookup_layers` for up to :data:`MAX_FAST_IDS` valid ids when every present layer is a dense table
        with a zero-copy view: per stack of layers, one ``numpy.take`` (F32: straight into ``out``; F16/BF16: into a
        reused buffer, then one torch copy that widens with SIMD, where numpy's fp16 cast is scalar), with the
        buffers and ``out``'s views cached. None when the call does not qualify: anything unusual, every refusal
        included, takes the general path, which raises."""
        plan = self._dense_plan if self._dense_plan is not None else self._plan_dense()
        ids = _small_ids(token_ids, self.vocab_size) if plan else None
        if ids is None:
            return None
        flat, shape = ids
        want = (len(self.present_layers), *shape, self.hidden_size)
        if out is None:
            out = torch.empty(want, dtype=torch.float32)
            targets = _targets(out, plan, len(flat))
        else:
            targets = self._out_targets(out, want, plan, len(flat))
            if targets is None:
                return None
        mine = self._scratch.__dict__
        bufs = mine.get("fast")
        if bufs is None or bufs[0] != len(flat):
            bufs = mine["fast"] = (len(flat), [_gather_buffer(s, len(flat)) for s in plan])
        for s, target, (raw, wide) in zip(plan, targets, bufs[1], strict=True):
            if wide is None:  # F32: gathered straight into out (ids are checked: no bounds buffering)
                _take_rows(s.table, flat, target)
            else:
                _take_rows(s.table, flat, raw)
                target.copy_(wide)
        return out

    def _fast_pairs(self, token_ids: Tensor | list[int], out: Tensor | None) -> Tensor | None:
        """:meth:`lookup_layers` for up to :data:`MAX_FAST_IDS` valid ids when every present layer is a 4-bit codec
        (int4, nf4: :meth:`Codec.nibble_pairs`) with zero-copy views: per stack of layers, one ``numpy.take`` per
        role into reused buffers, one through the pair table straight into ``out``, one multiply and one add: the
        operations of :func:`~tolcli.codecs.quant.decode_pairs_into`, so the same values. None when the call does
        not qualify (the general path then decides, refusals included)."""
        plan = self._pair_plan if self._pair_plan is not None else self._plan_pairs()
        ids = _small_ids(token_ids, self.vocab_size) if plan else None
        if ids is None:
            return None
        flat, shape = ids
        n, want = len(flat), (len(self.present_layers), *shape, self.hidden_size)
        if out is None:
            out = torch.empty(want, dtype=torch.float32)
        elif not _plain_out(out, want):
            return None
        rows = out.detach().numpy().reshape(-1, n, self.hidden_size)
        mine = self._scratch.__dict__
        bufs = mine.get("pairs")
        if bufs is None or bufs[0] != n:
            bufs = mine["pairs"] = (n, [_pair_buffers(s, n) for s in plan])
        for s, (codes, scales, wide_s, offsets, wide_o) in zip(plan, bufs[1], strict=True):
            target = rows[s.start : s.start + s.count]
            _take_rows(s.codes, flat, codes)
            s.pairs.take(codes, out=target.view(np.uint64), mode="clip")  # uint8 indices: always in the 256
            grouped = target.reshape(s.count, n, -1, s.group)
            _take_rows(s.scales, flat, scales)
            np.copyto(wide_s, scales)
            np.multiply(grouped, wide_s[..., None], out=grouped)
            if s.offsets is not None:
                _take_rows(s.offsets, flat, offsets)
                np.copyto(wide_o, offsets)
                np.add(grouped, wide_o[..., None], out=grouped)
        return out

    def _plan_pairs(self) -> list[_PairStack]:
        """The stacks :meth:`_fast_pairs` reads (cached), or an empty list unless every present layer is a 4-bit
        pair-table codec with zero-copy views (stacked runs from :meth:`_runs`)."""
        plan: list[_PairStack] = []
        for run in self._runs():
            got = run.codec.nibble_pairs()
            if got is None or not run.views[0]:
                plan = []
                break
            pairs, has_offsets = got
            views = run.stacks if run.stacks else {role: v[None] for role, v in run.views[0].items()}
            group = int(getattr(run.codec, "group_size", 0))
            h = self.hidden_size
            if (
                set(views) != ({"codes", "scales", "offsets"} if has_offsets else {"codes", "scales"})
                or group < 1
                or views["codes"].shape[2] * 2 != h
                or views["scales"].shape[2] * group != h
                or views["codes"].dtype != np.uint8
                or views["scales"].dtype != np.float16
                or (has_offsets and views["offsets"].shape != views["scales"].shape)
            ):  # a layout this path does not know (a plug-in codec): the general path reads it
                plan = []
                break
            offsets = views.get("offsets")
            plan.append(_PairStack(run.start, len(run.layers), views["codes"], views["scales"], offsets, pairs, group))
        self._pair_plan = plan
        return plan

    def _out_targets(self, out: Tensor, want: tuple[int, ...], plan: list[_DenseStack], n: int) -> list[Any] | None:
        """:func:`_targets` of ``out`` when it is a contiguous fp32 CPU tensor of shape ``want`` (cached for the last
        buffer seen, checked by identity and address on every call), else None."""
        if not _plain_out(out, want):
            return None
        cached, ptr = self._out_np, out.data_ptr()
        if cached is not None and cached[0] is out and cached[1] == ptr and cached[2] == n:
            return cached[3]
        targets = _targets(out, plan, n)
        self._out_np = (out, ptr, n, targets)
        return targets

    def _plan_dense(self) -> list[_DenseStack]:
        """The stacks :meth:`_fast_dense` reads (cached), or an empty list unless every present layer is dense with
        a zero-copy view (stacked runs from :meth:`_runs`: every byte read is a byte of a validated view)."""
        plan: list[_DenseStack] = []
        for run in self._runs():
            if run.codec.name != "dense" or not run.views[0] or set(run.views[0]) != {"table"}:
                plan = []
                break
            table = run.stacks["table"] if run.stacks else run.views[0]["table"][None]
            plan.append(_DenseStack(run.start, len(run.layers), table, run.codec.params()["dtype"] == "BF16"))
        self._dense_plan = plan
        return plan

    def _scratch_of(self, run: int) -> dict[str, np.ndarray]:
        """This thread's reusable gather buffers for a run (role -> buffer)."""
        mine = self._scratch.__dict__.setdefault("runs", {})
        return mine.setdefault(run, {})

    def _placeholder(self, n: int) -> Tensor:
        """Ids of a stacked decode (:class:`_StackedAccess`): only their count is read; cached per count."""
        if self._placeholders.get(n) is None:
            self._placeholders = {n: torch.empty(n, dtype=torch.long)}  # one decoder batch size at a time
        return self._placeholders[n]

    def _runs(self) -> list[_Run]:
        """The present layers grouped into runs decoded together (cached; see :class:`_StackedAccess`)."""
        if self._run_plan is None:
            runs: list[_Run] = []
            for k, layer in enumerate(self.present_layers):
                info = self.layers[layer]
                views = self._layer_views(info)
                if runs and views and _extends(runs[-1], info.codec, views):
                    runs[-1].layers.append(layer)
                    runs[-1].views.append(views)
                else:
                    runs.append(_Run(k, [layer], info.codec, [views]))
            for run in runs:
                if len(run.layers) > 1:
                    run.stacks = {role: _stack(run, role) for role in run.views[0]}
            self._run_plan = runs
        return self._run_plan

    def _layer_views(self, info: LayerInfo) -> dict[str, np.ndarray]:
        """Role -> zero-copy view of a row-wise layer's tensors; empty when a role has none."""
        if not info.codec.row_wise:
            return {}
        views = {role: self._view(name) for role, name in info.tensors.items()}
        return {} if any(v is None for v in views.values()) else views  # type: ignore[misc]

    def dense_layer(self, layer: int) -> Tensor:
        """A whole decoded layer table [vocab, hidden] in fp32."""
        return self.lookup(layer, torch.arange(self.vocab_size))

    def tokenizer_bytes(self) -> bytes | None:
        if TOKENIZER_TENSOR not in self.manifest["tensors"]:
            return None
        return bytes(np.asarray(self._reader.array(TOKENIZER_TENSOR)).tobytes())

    def tokenizer(self):
        """The embedded ``tokenizers.Tokenizer``, or None."""
        from tokenizers import Tokenizer

        raw = self.tokenizer_bytes()
        if raw is None:
            return None
        try:
            return Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises its own exception types
            raise InputError(f"the embedded tokenizer does not load ({cut(str(e), 200)})", path=self.path) from None

    def entry(self, name: str) -> TensorEntry:
        """A stored tensor as a :class:`TensorEntry` streaming its exact bytes (for convert, drop, ...)."""
        info = self.manifest["tensors"][name]
        shape = tuple(info["shape"])
        row = info["bytes"] // shape[0] if shape and shape[0] else info["bytes"]
        return TensorEntry(
            name, info["dtype"], shape, info["sha256"], lambda: self._reader.blocks(name, rows_per_block(row))
        )

    # ---- integrity ---------------------------------------------------------------------------------
    def verify(self, progress=None) -> int:
        """Recompute every tensor's sha256 and check its values (:meth:`check_values`) in one pass over the
        data; raise VerifyError naming the first bad tensor or layer. Returns the bytes read."""
        counts: dict[str, tuple[int, int]] = {}
        total = 0
        check_files = getattr(self._reader, "verify_files", None)
        if check_files is not None:  # a sharded bundle: each shard against the index's sha256
            check_files()
        for name in self.tensor_names:
            digest, nbytes, counts[name] = self._scan(name, hashing=True, progress=progress)
            total += nbytes
            want = self.manifest["tensors"][name]["sha256"]
            if digest != want:
                raise VerifyError(
                    f"tensor {name!r}: sha256 {digest[:16]}... does not match the manifest ({want[:16]}...)",
                    path=self.path,
                )
        self._judge_values(counts)
        return total

    def check_values(self) -> dict[str, int]:
        """Count NaN and Inf in every float tensor. NaN never belongs in a bundle; Inf only where the layer
        records fp16 overflow. Raises VerifyError naming the layer and the counts; returns Inf counts."""
        return self._judge_values({n: self._scan(n, hashing=False)[2] for n in self.tensor_names})

    def _scan(self, name: str, *, hashing: bool, progress=None) -> tuple[str, int, tuple[int, int]]:
        """One read of a tensor: (sha256 or "", bytes, (NaN count, Inf count)); counts are 0 for integers. The
        magnitudes of dense tables are kept in ``self._magnitudes`` for :meth:`_judge_values`."""
        dtype = self.manifest["tensors"][name]["dtype"]
        dense = name in self._dense_tables
        h = hashlib.sha256()
        nbytes = nan = inf = big = 0
        largest = 0.0
        for block in self.entry(name).blocks():
            arr = np.ascontiguousarray(block, dtype=DTYPES[dtype].numpy)
            if hashing:
                h.update(memoryview(arr).cast("B"))
            n_nan, n_inf = nonfinite_counts(arr, dtype)
            nan += n_nan
            inf += n_inf
            if dense:
                block_max, block_big = magnitude_stats(arr, dtype)
                largest, big = max(largest, block_max), big + block_big
            nbytes += arr.nbytes
            if progress is not None:
                progress(arr.nbytes)
        if dense:
            self._magnitudes[name] = (largest, big)
        return (h.hexdigest() if hashing else ""), nbytes, (nan, inf)

    def _judge_values(self, counts: dict[str, tuple[int, int]]) -> dict[str, int]:
        """NaN never; Inf only in an F16 dense table, at most its recorded ``fp16_overflow``; in a dense table, no
        finite value beyond ``max_abs`` (plus rounding) and no more values beyond fp16 range than recorded."""
        infs: dict[str, int] = {}
        for e in self.manifest["layers"]:
            if e["status"] != "present":
                continue
            nan = sum(counts[n][0] for n in e["tensors"].values())
            inf = sum(counts[n][1] for n in e["tensors"].values())
            f16_dense = e["codec"] == "dense" and e["params"]["dtype"] == "F16"
            allowed_inf = e.get("fp16_overflow", 0) if f16_dense else 0
            if nan or inf > allowed_inf:
                raise VerifyError(
                    f"layer {e['index']}: {nan:,} NaN and {inf:,} Inf values in its tensors"
                    f" (the manifest accounts for {allowed_inf:,} fp16 overflows"
                    + ("" if f16_dense else "; Inf is allowed only in an F16 dense table")
                    + ")",
                    path=self.path,
                )
            self._judge_magnitudes(e)
            if inf:
                infs[f"layer {e['index']}"] = inf
        return infs

    def _judge_magnitudes(self, e: dict[str, Any]) -> None:
        stats = self._magnitudes.get(e["tensors"].get("table", ""))
        if e["codec"] != "dense" or stats is None:
            return
        largest, big = stats
        bound = e.get("max_abs")
        if bound is not None and largest > bound * (1 + _ROUNDING) + _TINY:
            raise VerifyError(
                f"layer {e['index']}: the table holds a value of magnitude {largest:.6g}, "
                f"the manifest's max_abs is {bound:.6g}",
                path=self.path,
            )
        if big > e.get("fp16_overflow", 0):
            raise VerifyError(
                f"layer {e['index']}: {big:,} values beyond the fp16 range, "
                f"the manifest's fp16_overflow is {e.get('fp16_overflow', 0):,}",
                path=self.path,
            )

    def as_source(self):
        """A :class:`tolcli.model.ContextFreeSource` that reads this bundle (dropped layers give zero)."""
        return BundleSource(self)

    def close(self) -> None:
        self._full_cache.clear()
        self._f32_cache.clear()
        self._views.clear()
        self._run_plan = None
        self._dense_plan, self._pair_plan, self._out_np = None, None, None
        self._scratch = threading.local()
        self._reader.close()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _address(view: np.ndarray) -> int:
    return view.__array_interface__["data"][0]


def _extends(run: _Run, codec: Codec, views: dict[str, np.ndarray]) -> bool:
    """Whether a layer continues ``run``: the same codec and parameters, tensors of the same shapes and types, each
    role's tensor at the run's constant stride from the previous layer's (every byte a stacked view reads is then
    a byte of one of the run's own validated views)."""
    first, last = run.views[0], run.views[-1]
    if not first or type(codec) is not type(run.codec) or codec.params() != run.codec.params():
        return False
    if set(views) != set(first):
        return False
    for role, v in views.items():
        if v.shape != first[role].shape or v.dtype != first[role].dtype or v.strides != first[role].strides:
            return False
        stride = _address(v) - _address(last[role])
        if stride <= 0 or (len(run.views) > 1 and stride != _address(last[role]) - _address(run.views[-2][role])):
            return False
    return True


def _stack(run: _Run, role: str) -> np.ndarray:
    """A role's tensors of every layer of ``run`` as one read-only [layers, rows, ...] view."""
    first = run.views[0][role]
    stride = _address(run.views[1][role]) - _address(first)
    shape, strides = (len(run.views), *first.shape), (stride, *first.strides)
    return np.lib.stride_tricks.as_strided(first, shape=shape, strides=strides, writeable=False)


def _id_range(flat: np.ndarray) -> tuple[int, int]:
    """``(min, max)`` of int64 ids (0, 0 when empty); a few ids in Python, whose call overhead is numpy's tenth."""
    if flat.size <= 16:
        vals = flat.tolist()
        return (min(vals), max(vals)) if vals else (0, 0)
    return int(flat.min()), int(flat.max())


def _targets(out: Tensor, plan: list[_DenseStack], n: int) -> list[Any]:
    """Where each stack of :meth:`Bundle._fast_dense` lands in ``out``: a numpy view (F32 stacks) or a torch view
    (F16/BF16, widened by torch) of its ``[count, n, hidden]`` block."""
    rows = out.view(-1, n, out.shape[-1])
    arr = rows.detach().numpy() if any(s.table.dtype == np.float32 for s in plan) else None
    return [
        arr[s.start : s.start + s.count] if s.table.dtype == np.float32 else rows[s.start : s.start + s.count]
        for s in plan
    ]


def _gather_buffer(s: _DenseStack, n: int) -> tuple[np.ndarray | None, Tensor | None]:
    """A ``[count, n, hidden]`` buffer in a 16-bit stack's stored dtype and its torch view (fp16 or bf16), or
    ``(None, None)`` for an F32 stack (gathered straight into ``out``)."""
    if s.table.dtype == np.float32:
        return None, None
    raw = np.empty((s.count, n, s.table.shape[2]), dtype=s.table.dtype)
    wide = torch.from_numpy(raw)
    return raw, wide.view(torch.bfloat16) if s.bf16 else wide


def _plain_out(out: Tensor, want: tuple[int, ...]) -> bool:
    """Whether ``out`` is what the fast paths write into directly: a contiguous fp32 CPU tensor of shape ``want``
    (anything else goes to the general path, which refuses what it must)."""
    return (
        isinstance(out, Tensor)
        and out.dtype is torch.float32
        and out.is_cpu
        and out.shape == want
        and out.is_contiguous()
        and not out.requires_grad
    )


def _take_rows(stack: np.ndarray, flat: list[int], out: np.ndarray) -> None:
    """``out[k] = stack[k][flat]`` for a ``[layers, rows, ...]`` view: one ``numpy.take`` when the stack is one
    contiguous block, else one per layer (``numpy.take`` copies a non-contiguous source whole: 70 us for a 2 MB
    stack of scales, against 2 us per layer). Ids are checked, so no bounds buffering."""
    if stack.flags.c_contiguous:
        stack.take(flat, axis=1, out=out, mode="clip")  # the method: numpy.take's wrapper costs ~1.5 us a call
        return
    for k in range(stack.shape[0]):
        stack[k].take(flat, axis=0, out=out[k], mode="clip")


def _pair_buffers(s: _PairStack, n: int) -> tuple[np.ndarray, ...]:
    """Reused gather buffers of a :class:`_PairStack` for ``n`` ids: codes, scales (F16 and widened to fp32) and
    offsets (likewise, or empty)."""
    scales = np.empty((s.count, n, s.scales.shape[2]), dtype=s.scales.dtype)
    offsets = np.empty((s.count, n, 0 if s.offsets is None else s.offsets.shape[2]), dtype=np.float16)
    return (
        np.empty((s.count, n, s.codes.shape[2]), dtype=np.uint8),
        scales,
        np.empty(scales.shape, dtype=np.float32),
        offsets,
        np.empty(offsets.shape, dtype=np.float32),
    )


def _small_ids(token_ids: Tensor | list[int], vocab: int) -> tuple[list[int], tuple[int, ...]] | None:
    """``(flat ids, shape)`` of 1 to :data:`MAX_FAST_IDS` valid ids given as a flat list of Python ints, an integer
    numpy array or an int64 CPU tensor; None for anything else (other types, bools, empty, out of range: the general
    path judges those)."""
    if isinstance(token_ids, Tensor):
        if token_ids.dtype is not torch.long or not token_ids.is_cpu or not 0 < token_ids.numel() <= MAX_FAST_IDS:
            return None
        shape = tuple(token_ids.shape)
        flat = (token_ids if len(shape) == 1 else token_ids.reshape(-1)).tolist()
    elif (
        isinstance(token_ids, np.ndarray)
        and (token_ids.dtype.kind == "i" or (token_ids.dtype.kind == "u" and token_ids.dtype.itemsize < 8))
        and 0 < token_ids.size <= MAX_FAST_IDS
    ):  # uint64 is refused by the general path (it may not fit int64): the same refusal here
        flat, shape = token_ids.ravel().tolist(), token_ids.shape
    elif type(token_ids) is list and 0 < len(token_ids) <= MAX_FAST_IDS:
        flat, shape = token_ids, (len(token_ids),)
        if not all(type(x) is int for x in flat):
            return None
    else:
        return None
    return (flat, shape) if min(flat) >= 0 and max(flat) < vocab else None


def check_out(out: Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    """Refuse an ``out`` buffer that is not a contiguous fp32 tensor of ``shape`` on ``device`` that needs no
    gradient (lookups write it in place, which autograd cannot follow)."""
    ok = (
        isinstance(out, Tensor)
        and out.dtype == torch.float32
        and out.device.type == device.type
        and device.index in (None, out.device.index)
        and tuple(out.shape) == shape
        and out.is_contiguous()
        and not out.requires_grad
    )
    if not ok:
        raise UsageError(
            f"`out` must be a contiguous fp32 tensor of shape {list(shape)} on {device}, not requiring grad"
        )


def _integer_ids(token_ids: Tensor | list[int], path: Path) -> Tensor:
    """Token ids as an int64 CPU tensor; floats, booleans and values beyond int64 are refused, never truncated."""
    if isinstance(token_ids, Tensor) and token_ids.dtype == torch.long:
        return token_ids.cpu()
    try:
        ids = torch.as_tensor(token_ids)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:
        raise InputError(f"token ids must be integers ({cut(str(e), 120)})", path=path) from None
    if ids.numel() == 0:
        return ids.to(device="cpu", dtype=torch.long)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise InputError(f"token ids must be integers, got {str(ids.dtype).removeprefix('torch.')}", path=path)
    if ids.dtype == torch.uint64:
        raise InputError("token ids must fit int64", path=path)
    return ids.to(device="cpu", dtype=torch.long)


class BundleSource:
    """Feeds a model's context-free terms from a bundle's lookups."""

    def __init__(self, bundle: Bundle):
        self.bundle = bundle

    def __call__(self, layer: int, token_ids: Tensor, x0: Tensor) -> Tensor | None:
        if layer not in self.bundle.layers:
            return None
        return self.bundle.lookup(layer, token_ids.cpu()).to(device=x0.device, dtype=x0.dtype)


def open_bundle(path: str | Path, *, verify: bool = False) -> Bundle:
    """Open and validate a ToL bundle: a container file such as ``.safetensors`` or ``.h5``/``.hdf5`` (told apart
    by content, :func:`~tolcli.bundle.container.container_of`), or a sharded bundle directory (``tol.index.json`` +
    shards).

    ``verify=True`` also recomputes every tensor's sha256 before returning.

    Example:
        >>> import tempfile, pathlib
        >>> from tolcli import open_bundle, precompute, demo_checkpoint_path
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "demo.safetensors"
        >>> _ = precompute(demo_checkpoint_path(), out, dtype="fp16")
        >>> b = open_bundle(out)
        >>> b.lookup(0, [1, 2, 3]).shape
        torch.Size([3, 128])
    """
    path = Path(path)
    if not path.exists():
        raise InputError("bundle not found", path=path)
    if not path.is_dir():
        regular_file(path, what="bundle")  # a FIFO or device would block the reader
    reader: ContainerReader = ShardedReader(path) if path.is_dir() else container_of(path).open(path)
    try:
        bundle = Bundle(path, reader)
        if verify:
            bundle.verify()
    except BaseException:
        reader.close()
        raise
    return bundle
