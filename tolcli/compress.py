"""Compress a ToL bundle layer by layer: casts, quantisation, uniform and adaptive-rank SVD, combinations.

Every codec writes bundle format v1 through the same resumable staging as ``precompute``. Each layer's
manifest entry records its codec and parameters, stored bytes, bits per value, and its relative
Frobenius error against the input (token-weighted too, when weights are given).

The codec is a spec from :mod:`tolcli.codecs` (``svd(rank=64,a=int4(group=32))``), or one of these
schemes, which map to specs:

- ``fp32`` / ``fp16`` / ``bf16``: dense casts;
- ``int4`` / ``nf4`` / ``int8`` / ``int3`` / ``int2``: group-wise quantisation along the hidden axis, each
  group's scale fitted by ``fit`` (``mse``: a clipping search plus least squares; ``minmax``: the range);
- ``svd``: the same rank for every layer (``--rank R`` or ``--ratio F``);
- ``adaptive-svd``: per-layer ranks minimising the total squared error under one byte budget
  (``--budget``), or the smallest rank keeping a fraction of each layer's energy (``--energy``);
- ``svd+int4``, ``adaptive-svd+int4`` (and ``+nf4``, ``+int8``): the ``A`` factor quantised, ``B`` fp16.

The work is three steps: plan (the spec, token weights, and ranks for a ranked spec such as SVD),
encode each layer (:func:`encode_layer`, pure), write (the staging, then the manifest).

SVD errors can be weighted per token (``--token-weights`` counts, or ``--calibration`` text counted with
the bundle's tokenizer), or per layer *and* token in estimated loss units (``--sensitivity CHECKPOINT``
with ``--calibration``: :mod:`tolcli.sensitivity`), which makes adaptive ranks follow the loss.

``--ratio`` and fractional ``--budget`` are fractions of the **dense fp16 bytes** of the layers being
compressed (``V * h * 2`` per layer): ``--ratio 0.25`` means a quarter of what fp16 tables would take.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tolcli import __version__
from tolcli.autoplan import (
    DEFAULT_CANDIDATES,
    VALIDATE_PLANS,
    AutoPlan,
    Validation,
    alternative_plans,
    candidate_specs,
    choose,
    measure_candidates,
)
from tolcli.bundle.manifest import attribute_bytes, created_timestamp
from tolcli.bundle.reader import Bundle, open_bundle
from tolcli.bundle.spec import TOKENIZER_TENSOR
from tolcli.bundle.writer import Staging, WriteOptions
from tolcli.checkpoint import Checkpoint, open_checkpoint
from tolcli.choices import DENSE_SCHEMES, QUANT_SCHEMES, SCHEMES, SVD_KINDS
from tolcli.codecs import NF4, SVD, Codec, CodecSpec, Dense, DictAccess, Int2, Int3, Int4, Int8, RankedSpec, parse_spec
from tolcli.codecs.base import BatchEncoder, RowSource
from tolcli.codecs.spec import split_items
from tolcli.codecs.svd import DEFAULT_GRAM
from tolcli.data import read_data
from tolcli.demo import resolve_checkpoint_arg
from tolcli.dtypes import DTYPES, tensor_to_numpy
from tolcli.errors import InputError, UsageError
from tolcli.feedback import CarriedRows, Carry
from tolcli.fsutil import check_output, parse_size
from tolcli.model import load_model
from tolcli.pairing import check_pairing
from tolcli.precompute import resolve_device
from tolcli.progress import NullProgress, Progress
from tolcli.sensitivity import sensitivity_weights, token_sensitivity
from tolcli.text import load_token_weights, tokens_of

DEFAULT_GROUP = 64  # int4 / nf4
BATCH_BYTES = 8 << 20  # fp32 bytes of one row batch when streaming a layer (``batch_rows`` overrides)
DEFAULT_A_GROUP = 32  # the A factor's group size in the svd+int4/nf4 schemes (ranks are kept multiples of it)
# The CompressOptions fields that weight tokens; the others besides scheme and codec are the scheme's options.
_WEIGHTING_FIELDS = ("token_weights", "calibration", "sensitivity", "weight_floor")
# The CompressOptions fields that are not scheme options (a `codec` spec refuses the others).
_NOT_SCHEME_OPTIONS = ("scheme", "codec", *_WEIGHTING_FIELDS, "allow_source_mismatch", "error_feedback")


@dataclass(frozen=True)
class Weighting:
    """How layer errors are weighted per token: by counts (a ``token_weights`` ``.npy``, or ``calibration``
    text), or per layer and token by the loss's sensitivity (``sensitivity``: a checkpoint, with
    ``calibration``); ``floor`` is added to every weight. ``allow_source_mismatch``: use a ``sensitivity``
    checkpoint that the bundle was not computed from (:func:`tolcli.pairing.check_pairing`)."""

    token_weights: str | None = None
    calibration: str | None = None
    sensitivity: str | Checkpoint | None = None
    floor: float = 1.0
    allow_source_mismatch: bool = False
    device: str = "cpu"  # where the sensitivity passes run (auto, cpu, cuda, cuda:N)
    feedback: bool = False  # sensitivity of errors coded with error feedback (tolcli.feedback)


@dataclass
class CompressOptions:
    """Everything ``tolcli compress`` takes besides input and output (see the CLI reference).

    The codec is either a ``scheme`` with the scheme options (``CompressOptions("svd+int4", rank=64)``), or
    ``codec``: a spec string or a spec from :mod:`tolcli.codecs`, which carries its own options
    (``CompressOptions(codec="svd(rank=64,a=int4(group=32))")``). The token-weighting options
    (``token_weights``, ``calibration``, ``sensitivity``, ``weight_floor``) apply to both. ``sensitivity`` is a
    checkpoint argument (a path, ``demo``) or an open :class:`~tolcli.checkpoint.Checkpoint` (opened with a tensor
    map, say); the bundle must have been computed from it, unless ``allow_source_mismatch``.
    """

    scheme: str | None = None
    rank: int | None = None
    ratio: float | None = None
    budget: str | None = None
    energy: float | None = None
    rank_multiple: int = 8
    min_rank: int | None = None
    max_rank: int | None = None
    svd_method: str = "exact"
    svd_gram: str | None = None
    oversample: int = 10
    power_iters: int = 2
    seed: int = 0
    group_size: int | None = None
    symmetric: bool = False
    fit: str | None = None
    center: bool = False  # quantised schemes (not an SVD's A factor): code the table minus its mean row
    factor_dtype: str = "fp16"
    token_weights: str | None = None
    calibration: str | None = None
    sensitivity: str | Checkpoint | None = None
    weight_floor: float = 1.0
    codec: str | CodecSpec | None = None
    allow_source_mismatch: bool = False
    candidates: str | None = None  # scheme "auto": the codec specs to choose among, comma-separated
    validate: str | None = None  # scheme "auto": text to evaluate the top plans on (with the sensitivity model)
    validate_plans: int | None = None  # scheme "auto" with validate: how many plans (default VALIDATE_PLANS)
    error_feedback: bool = False  # code each layer with the error the layers before it left (tolcli.feedback)

    def codec_spec(self) -> CodecSpec:
        """The codec spec these options choose, validated."""
        if self.scheme == AUTO_SCHEME:
            raise UsageError("scheme auto chooses a codec per layer: it is no single codec spec")
        for name in ("candidates", "validate", "validate_plans"):
            if getattr(self, name) is not None:
                raise UsageError(f"`{name}` applies to scheme auto only")
        if self.codec is None:
            return scheme_spec(self)
        if self.scheme is not None:
            raise UsageError("give `scheme` or `codec`, not both")
        scheme_options = [f for f in fields(self) if f.name not in _NOT_SCHEME_OPTIONS]
        given = [f"`{f.name}`" for f in scheme_options if getattr(self, f.name) != f.default]
        if given:
            raise UsageError(
                f"{', '.join(given)}: only with `scheme`; a `codec` spec carries its own options, "
                "e.g. svd(rank=64,a=int4(group=32))"
            )
        return parse_spec(self.codec) if isinstance(self.codec, str) else self.codec

    def weighting(self) -> Weighting:
        return Weighting(
            self.token_weights,
            self.calibration,
            self.sensitivity,
            self.weight_floor,
            self.allow_source_mismatch,
            feedback=self.error_feedback,
        )

    def record(self) -> dict[str, Any]:
        """What the manifest's history records of these options (an open ``sensitivity`` checkpoint by its
        directory name; ``allow_source_mismatch`` and ``center`` only when set)."""
        if self.codec is None:  # every scheme option that is set, as tolcli always recorded them
            quiet = ("scheme", "allow_source_mismatch", "center", "error_feedback")  # newer ones: below, when set
            keys = [f.name for f in fields(self) if f.name not in quiet]
            rec = {"scheme": self.scheme, **self._set(keys)}
            if self.center:  # newer than the others: recorded only when set, so earlier outputs keep their bytes
                rec["center"] = True
        else:
            rec = {"codec": str(self.codec_spec()), **self._set(_WEIGHTING_FIELDS)}
        if self.allow_source_mismatch:
            rec["allow_source_mismatch"] = True
        if self.error_feedback:  # recorded only when set, so earlier outputs keep their bytes
            rec["error_feedback"] = True
        return rec

    def _set(self, keys: Sequence[str]) -> dict[str, Any]:
        """The options named ``keys`` that are set (not None), as JSON values."""
        out = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        if isinstance(out.get("sensitivity"), Checkpoint):
            out["sensitivity"] = out["sensitivity"].path.name
        return out


# ---- scheme auto: a codec per layer under one budget ----------------------------------------------------------
AUTO_SCHEME = "auto"
# The CompressOptions fields scheme auto uses besides the weighting ones.
_AUTO_FIELDS = (
    "scheme",
    "budget",
    "candidates",
    "validate",
    "validate_plans",
    *_WEIGHTING_FIELDS,
    "allow_source_mismatch",
    "error_feedback",
)


def check_auto_options(o: CompressOptions) -> None:
    """Scheme ``auto`` takes a ``budget``, optionally ``candidates`` and token weights; nothing a codec spec says."""
    if o.codec is not None:
        raise UsageError("give `scheme` auto or a `codec`, not both")
    if o.budget is None:
        raise UsageError("scheme auto needs a `budget` (--budget 0.1875 or 12MB)")
    if o.validate is not None and o.sensitivity is None:
        raise UsageError(
            "`validate` evaluates plans with the model: give it as `sensitivity` (with `calibration` text)",
            hint="e.g. --sensitivity ./my-memoryllm --calibration calib.txt --validate calib.txt",
        )
    if o.validate is not None and not Path(o.validate).is_file():
        raise InputError(f"`validate` {o.validate}: no such file", hint="give calibration text to evaluate plans on")
    if o.validate_plans is not None and (o.validate is None or o.validate_plans < 1):
        raise UsageError(f"`validate_plans` {o.validate_plans}: give a count of at least 1, with `validate`")
    given = [f"`{f.name}`" for f in fields(o) if f.name not in _AUTO_FIELDS and getattr(o, f.name) != f.default]
    if given:
        raise UsageError(
            f"{', '.join(given)}: not with scheme auto, which chooses each layer's codec and its options; "
            "name the codecs to choose among with `candidates`, e.g. 'int4,mixed(bits=3),svd(rank=64,a=int4)'"
        )


def _row_errors(codec: Codec, source: RowSource) -> torch.Tensor:
    """Per-row squared errors (fp64 [V]) of ``codec`` on a layer, measured as compress measures them."""
    stats = ErrorStats(source.rows)
    enc = codec.encoder(source)
    if enc is None:
        table = torch.cat([rows for _, rows in source.batches()])
        stats.add(0, table, codec.decode_rows(DictAccess(codec.encode(table)), torch.arange(source.rows)))
    else:
        for _ in _encoded_batches(source, codec, enc, stats):
            pass
    return stats.err


def plan_auto_layers(
    o: CompressOptions,
    b: Bundle,
    weights: dict[int, torch.Tensor] | None,
    progress: Progress,
    batch_rows: int,
    memo: CompressMemo | None = None,
    weights_key: Any = None,
) -> AutoPlan:
    """Scheme ``auto``'s plan for bundle ``b`` (:mod:`tolcli.autoplan`); the candidates' measurements come from
    ``memo`` when an earlier call measured them on the same input with the same weights."""
    texts = split_items(o.candidates) if o.candidates is not None else DEFAULT_CANDIDATES
    specs = candidate_specs(texts, b.hidden_size)
    budget = parse_budget(str(o.budget), b.vocab_size * b.hidden_size * 2 * len(b.layers))
    key = (b.manifest_sha256, tuple(str(s) for s in specs), weights_key, batch_rows)
    sources = {i: LayerRows(b, i, batch_rows) for i in b.layers}
    measured = memoized(
        memo, "measured", key, lambda: measure_candidates(sources, specs, weights, _row_errors, progress)
    )
    return AutoPlan(budget, choose(measured, budget), measured)


@dataclass
class CompressMemo:
    """Work that several :func:`compress` calls on the same input can share (``sweep`` passes one to all its
    builds): the token weights of a weighting (``sensitivity`` runs the model over the calibration text) and scheme
    auto's measured candidates. Entries are keyed by the input's manifest (its tensors' sha256), the options they
    depend on and the identity of the files named (path, size, modification time), so a changed file or option
    computes afresh."""

    weights: dict[Any, Any] = field(default_factory=dict)
    measured: dict[Any, Any] = field(default_factory=dict)


def memoized(memo: CompressMemo | None, table: str, key: Any, compute: Callable[[], Any]) -> Any:
    """``compute()``, or what it gave for ``key`` in ``memo``'s ``table`` (stored there on the first call)."""
    if memo is None:
        return compute()
    entries = getattr(memo, table)
    if key not in entries:
        entries[key] = compute()
    return entries[key]


def _file_id(path: str | Path | None) -> Any:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return (str(path), None)
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def weights_key(w: Weighting, b: Bundle) -> Any:
    """What :func:`load_weights` depends on, for :class:`CompressMemo`."""
    s = w.sensitivity
    if isinstance(s, Checkpoint):
        sens: Any = ("checkpoint", id(s), _file_id(s.path))
    else:
        sens = None if s is None else ("arg", str(s), _file_id(s))
    return (
        b.manifest_sha256,
        _file_id(w.token_weights),
        _file_id(w.calibration),
        sens,
        w.floor,
        w.allow_source_mismatch,
        w.device,
        w.feedback,
    )


VALIDATE_PREFIX = ".tolcli-validate-"  # + host + "-" + pid + "-" + random: validate_auto's private directory


def _host_tag() -> str:
    import socket

    return "".join(c for c in socket.gethostname() if c.isalnum())[:32] or "host"


def remove_stale_validations(work_dir: Path) -> list[Path]:
    """Remove the private directories that ``validate`` runs on this host left in ``work_dir`` when killed (their
    process no longer exists); a live run's, another host's, anything not a plain directory, are left alone."""
    import shutil
    import stat

    removed = []
    prefix = f"{VALIDATE_PREFIX}{_host_tag()}-"
    for entry in work_dir.glob(f"{VALIDATE_PREFIX}*"):
        pid_text = entry.name[len(prefix) :].split("-", 1)[0] if entry.name.startswith(prefix) else ""
        if not pid_text.isdigit():
            continue
        try:
            if not stat.S_ISDIR(entry.lstat().st_mode):
                continue
            os.kill(int(pid_text), 0)
            continue  # alive (or another user's: PermissionError below)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
        except (OSError, OverflowError, ValueError):
            continue
    return removed


def validate_auto(
    o: CompressOptions,
    b: Bundle,
    plan: AutoPlan,
    weights: dict[int, torch.Tensor] | None,
    work_dir: Path,
    device: str,
    progress: Progress,
    batch_rows: int,
) -> AutoPlan:
    """``validate``: write the top plans (:func:`tolcli.autoplan.alternative_plans`) as bundles in a private
    directory under ``work_dir``, evaluate them on the ``validate`` text with the ``sensitivity`` model (the
    protocol's defaults), and return ``plan`` with the results and the plan of least mean KL chosen."""
    import shutil
    import tempfile

    from tolcli.evaluation import eval_ppl

    ckpt = _sensitivity_checkpoint(o.weighting(), b, lambda s: None)  # (its warnings were said by load_weights)
    alternatives = alternative_plans(plan.measured, plan.budget_bytes, o.validate_plans or VALIDATE_PLANS)
    remove_stale_validations(work_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"{VALIDATE_PREFIX}{_host_tag()}-{os.getpid()}-", dir=work_dir))
    try:
        paths = []
        for k, (_, chosen) in enumerate(alternatives):
            path = tmp / f"plan{k}.safetensors"
            write = WriteOptions.make(path, container="safetensors", force=True)
            staging = Staging(
                path, {"command": "compress", "validate": k}, resume=False, options=write, note=lambda s: None
            )
            specs = {i: parse_spec(c.spec) for i, c in chosen.items()}
            manifest = _stage_layers(
                b, specs, AUTO_SCHEME, weights, staging, progress, batch_rows, {}, None, {}, o.error_feedback
            )
            paths.append(staging.finish(manifest))
        report = eval_ppl(
            ckpt,
            [o.validate],
            tols=paths,
            device=device,
            allow_source_mismatch=o.allow_source_mismatch,
            progress=progress,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results = [
        Validation(label, chosen, float(v["mean_kl"]), float(v["ppl_change_pct"]))
        for (label, chosen), v in zip(alternatives, report.variants[1:], strict=True)
    ]
    return plan.validated(results)


# ---- schemes: shorthands for specs ---------------------------------------------------------------------------
def parse_scheme(scheme: str) -> tuple[str, str | None]:
    """``"adaptive-svd+int4"`` -> ``("adaptive-svd", "int4")``; ``"int4"`` -> ``("quant", "int4")``."""
    if scheme not in SCHEMES:
        raise UsageError(f"unknown `scheme` {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme in DENSE_SCHEMES:
        return "dense", None
    if scheme in QUANT_SCHEMES:
        return "quant", scheme
    kind, _, quant = scheme.partition("+")
    return kind, quant or None


def quant_spec(quant: str, group: int | None, symmetric: bool, fit: str | None = None) -> CodecSpec:
    """The spec of scheme ``quant`` (int4, nf4, int8, int3 or int2) with a group size (``None``: the default) and a
    scale ``fit`` (``None``: the specs' default, :data:`~tolcli.codecs.quant.DEFAULT_FIT`)."""
    if symmetric and quant != "int4":
        raise UsageError("`symmetric` applies to int4 only (nf4 and int8 are symmetric already)")
    fit_kw = {} if fit is None else {"fit": fit}
    if quant == "int8":
        return Int8(group, **fit_kw)
    group = DEFAULT_GROUP if group is None else group
    if quant == "int4":
        return Int4(group, symmetric, **fit_kw)
    return {"nf4": NF4, "int3": Int3, "int2": Int2}[quant](group, **fit_kw)


def scheme_spec(o: CompressOptions) -> CodecSpec:
    """The spec that ``o.scheme`` and its options stand for."""
    if o.scheme is None:
        raise UsageError("give a `scheme` or a `codec` spec")
    kind, quant = parse_scheme(o.scheme)
    if kind not in SVD_KINDS:
        if any(x is not None for x in (o.rank, o.ratio, o.budget, o.energy)):
            raise UsageError(f"`rank`/`ratio`/`budget`/`energy` apply to SVD schemes, not {o.scheme}")
        if kind == "dense":
            if o.center:
                raise UsageError(f"`center` applies to int4, nf4, int8, int3 and int2, not {o.scheme}")
            if o.fit is not None:
                raise UsageError(f"`fit` applies to quantised schemes, not {o.scheme}")
            return Dense(o.scheme)
        spec = quant_spec(o.scheme, o.group_size, o.symmetric, o.fit)
        return replace(spec, center=True) if o.center else spec  # type: ignore[type-var]
    if o.center:
        raise UsageError(f"`center` applies to int4, nf4, int8, int3 and int2, not {o.scheme}")
    _check_rank_choice(kind, o)
    if quant is None:
        if o.fit is not None:
            raise UsageError(f"`fit` applies to quantised schemes (svd+int4, ...), not {o.scheme}")
        a = Dense(o.factor_dtype)
    else:
        group = o.group_size if o.group_size is not None or quant == "int8" else DEFAULT_A_GROUP
        a = quant_spec(quant, group, o.symmetric, o.fit)
    return SVD(
        rank=o.rank,
        ratio=o.ratio,
        budget=o.budget,
        energy=o.energy,
        min_rank=o.min_rank,
        max_rank=o.max_rank,
        rank_multiple=o.rank_multiple,
        a=a,
        method=o.svd_method,
        gram=o.svd_gram or DEFAULT_GRAM,
        oversample=o.oversample,
        power_iters=o.power_iters,
        seed=o.seed,
    )


def _check_rank_choice(kind: str, o: CompressOptions) -> None:
    if kind == "svd":
        if (o.rank is None) == (o.ratio is None):
            raise UsageError("svd needs exactly one of `rank` and `ratio`")
        if o.budget is not None or o.energy is not None:
            raise UsageError("`budget`/`energy` apply to adaptive-svd; svd takes `rank` or `ratio`")
    else:
        if (o.budget is None) == (o.energy is None):
            raise UsageError("adaptive-svd needs exactly one of `budget` and `energy`")
        if o.rank is not None or o.ratio is not None:
            raise UsageError("`rank`/`ratio` apply to svd; adaptive-svd takes `budget` or `energy`")


# ---- planning: ranks -----------------------------------------------------------------------------------------
def parse_budget(text: str, dense_fp16_bytes: int) -> int:
    """``"0.25"`` (a fraction of dense fp16), ``"12MB"``, ``"1.5GiB"`` or ``"123456"`` -> bytes."""
    try:
        value, unit = parse_size(text)
    except UsageError:
        raise UsageError(
            f"budget {text!r}: expected a fraction such as 0.25, or bytes such as 12MB or 1.5GiB"
        ) from None
    if not unit and value <= 1.0:
        return int(value * dense_fp16_bytes)
    return int(value)


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, round(x / multiple) * multiple)


def allocate_ranks(
    spectra: dict[int, torch.Tensor],
    bytes_per_rank: float,
    budget: int,
    *,
    multiple: int,
    min_rank: int,
    max_rank: int,
) -> dict[int, int]:
    """Greedy rank allocation: repeatedly give ``multiple`` more rank to the layer whose next singular
    values remove the most squared error, until the byte budget is spent. Each layer's gains are
    non-increasing (sorted eigenvalues), so greedy is optimal for this separable problem at this step
    size; every layer gets at least ``min_rank`` and at most ``max_rank``."""
    ranks = dict.fromkeys(spectra, min_rank)
    spent = bytes_per_rank * min_rank * len(spectra)
    if spent > budget:
        raise UsageError(
            f"the budget ({budget:,} bytes) is below the minimum rank {min_rank} on every layer ({int(spent):,} bytes)",
            hint="raise the budget or lower the minimum rank",
        )
    step_cost = bytes_per_rank * multiple
    heap: list[tuple[float, int]] = []

    def push(layer: int) -> None:
        r = ranks[layer]
        if r + multiple <= max_rank:
            gain = float(spectra[layer][r : r + multiple].sum())
            heapq.heappush(heap, (-gain, layer))

    for layer in spectra:
        push(layer)
    while heap and spent + step_cost <= budget:
        _, layer = heapq.heappop(heap)
        ranks[layer] += multiple
        spent += step_cost
        push(layer)
    return ranks


def energy_ranks(
    spectra: dict[int, torch.Tensor], energy: float, *, multiple: int, min_rank: int, max_rank: int
) -> dict[int, int]:
    """Per layer, the smallest rank (a multiple of ``multiple``) keeping ``energy`` of the squared norm."""
    out = {}
    for layer, ev in spectra.items():
        cum = torch.cumsum(ev, 0) / ev.sum().clamp_min(1e-300)
        r = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)).item()) + 1
        out[layer] = min(max_rank, max(min_rank, math.ceil(r / multiple) * multiple))
    return out


def plan_ranks(
    spec: CodecSpec,
    b: Bundle,
    weights: dict[int, torch.Tensor] | None,
    progress: Progress,
    batch_rows: int | None = None,
) -> dict[int, int]:
    """Each layer's rank under a ranked spec (``{}`` for any other): given, from a ratio, or allocated (from
    each layer's spectrum, its Gram read in batches of ``batch_rows`` rows)."""
    if not isinstance(spec, RankedSpec):
        return {}
    V, h = b.vocab_size, b.hidden_size
    layers = sorted(b.layers)
    top, step = min(V, h), spec.rank_step()
    min_rank = spec.min_rank if spec.min_rank is not None else step
    max_rank = min(top, spec.max_rank if spec.max_rank is not None else top)
    if min_rank < 1 or min_rank > max_rank:
        raise UsageError(f"{spec.name} needs 1 <= min rank ({min_rank}) <= max rank ({max_rank})")
    fixed, per_rank = rank_bytes(spec, V, h)
    dense16 = V * h * 2
    if not spec.adaptive:
        if spec.ratio is not None:
            _check_fixed_bytes(spec, spec.ratio * dense16, fixed, per_rank * min_rank, "of each layer")
        rank = spec.rank if spec.ratio is None else _round_to((spec.ratio * dense16 - fixed) / per_rank, step)
        if not 1 <= rank <= top:
            raise UsageError(f"rank {rank} is outside 1..{top}")
        return dict.fromkeys(layers, rank)
    batch_rows = default_batch_rows(h) if batch_rows is None else batch_rows
    progress.start(f"spectra of {len(layers)} layer(s)", len(layers))
    spectra = {}
    for i in layers:
        spectra[i] = spec.spectrum(LayerRows(b, i, batch_rows), None if weights is None else weights[i])
        progress.advance(1)
    progress.finish()
    kw = {"multiple": step, "min_rank": min_rank, "max_rank": max_rank}
    if spec.energy is not None:
        return energy_ranks(spectra, spec.energy, **kw)
    total = parse_budget(str(spec.budget), dense16 * len(layers))
    _check_fixed_bytes(spec, total, fixed * len(layers), per_rank * min_rank * len(layers), "")
    return allocate_ranks(spectra, per_rank, int(total - fixed * len(layers)), **kw)


def _check_fixed_bytes(spec: RankedSpec, allowed: float, fixed: float, smallest: float, whose: str) -> None:
    """Refuse a ratio or budget (``allowed`` bytes) that cannot hold what is stored whatever the rank (``fixed``: an
    svd's residual, per-row scales) plus the smallest rank's bytes (``smallest``), naming both."""
    if fixed <= 0 or fixed + smallest <= allowed:  # without fixed bytes the rank's own checks say it best
        return
    what = f"ratio {spec.ratio:g}" if spec.ratio is not None else f"budget {spec.budget}"
    raise UsageError(
        f"{spec}: the {what} ({int(allowed):,} bytes{' ' + whose if whose else ''}) cannot hold the {int(fixed):,} "
        f"bytes stored whatever the rank (the residual, scales) and the smallest rank's {int(smallest):,}",
        hint="raise the budget, or give the residual fewer bits",
    )


def rank_bytes(spec: RankedSpec, rows: int, width: int) -> tuple[float, float]:
    """A layer's stored bytes under ``spec`` as ``fixed + per_rank * rank`` (what ranks cost, exactly as stored):
    measured at two ranks, and checked at a third (the bytes of every built-in codec are affine in the rank; an
    int8 ``A`` stores one scale per row whatever the rank)."""
    step = spec.rank_step()
    b1, b2, b3 = (spec.with_rank(k * step).build(width).stored_bytes(rows, width) for k in (1, 2, 3))
    if b3 - b2 != b2 - b1:
        raise UsageError(f"{spec}: stored bytes are not affine in the rank ({b1}, {b2}, {b3} at ranks {step}, ...)")
    per_rank = (b2 - b1) / step
    return b1 - per_rank * step, per_rank


# ---- planning: token weights --------------------------------------------------------------------------------
def load_weights(
    w: Weighting, b: Bundle, progress: Progress, note: Callable[[str], None] = lambda s: None
) -> tuple[dict[int, torch.Tensor] | None, dict[str, Any] | None]:
    """Per-layer token weights (the same vector for every layer unless ``sensitivity``), and their record;
    ``note`` hears the pairing warnings of a ``sensitivity`` checkpoint."""
    if w.sensitivity is not None:
        return _sensitivity_weights(w, b, progress, note)
    if w.token_weights is None and w.calibration is None:
        return None, None
    weights, info = load_token_weights(
        b.vocab_size,
        weights_file=w.token_weights,
        calibration=w.calibration,
        tokenizer=b.tokenizer() if w.calibration else None,
        floor=w.floor,
    )
    return dict.fromkeys(b.layers, weights), info


def _sensitivity_checkpoint(w: Weighting, b: Bundle, note: Callable[[str], None]) -> Checkpoint:
    """The ``sensitivity`` checkpoint, opened, with context-free FFNs, and the one ``b`` was computed from."""
    s = w.sensitivity
    ckpt = s if isinstance(s, Checkpoint) else open_checkpoint(resolve_checkpoint_arg(s))  # type: ignore[arg-type]
    cfg = ckpt.config
    if not cfg.has_memory:
        raise InputError(
            f"`sensitivity` {ckpt.path}: model_type {cfg.model_type!r} has no context-free FFN",
            hint="pass the memoryllm checkpoint the bundle was computed from",
        )
    check_pairing(ckpt, b, allow_mismatch=w.allow_source_mismatch, note=note)
    return ckpt


def _sensitivity_weights(
    w: Weighting, b: Bundle, progress: Progress, note: Callable[[str], None]
) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    if w.calibration is None or w.token_weights is not None:
        raise UsageError("`sensitivity` needs `calibration` text (and no `token_weights`)")
    ckpt = _sensitivity_checkpoint(w, b, note)
    tok = b.tokenizer()
    if tok is None:
        raise InputError("the bundle has no embedded tokenizer to read the calibration text with")
    data = read_data(w.calibration, vocab_size=b.vocab_size)
    tokens = tokens_of(data, tok, b.vocab_size)
    model = load_model(ckpt, device=resolve_device(w.device))
    chain = sorted(b.layers) if w.feedback else None
    S, counts = token_sensitivity(model, tokens, progress=progress, chain=chain)
    info = {
        "source": "sensitivity",
        "checkpoint": ckpt.path.name,
        "name": Path(w.calibration).name,
        "sha256": data.sha256,
        "tokens": tokens.numel(),
        "floor": w.floor,
        "layer_sensitivity": [float(x) for x in (S.sum(1) / counts.sum())],
    }
    if w.feedback:  # of the errors error feedback leaves (tolcli.sensitivity.token_sensitivity's chain)
        info["feedback"] = True
    weights = sensitivity_weights(S, counts, w.floor)
    return {i: weights[i] for i in b.layers}, info


# ---- encoding one layer ---------------------------------------------------------------------------------------
@dataclass
class EncodedLayer:
    """One layer as stored: tensor name -> (dtype, tensor), and its manifest entry."""

    tensors: dict[str, tuple[str, torch.Tensor]]
    entry: dict[str, Any]


class ErrorStats:
    """A layer's reconstruction-error statistics, accumulated row batch by row batch: the per-row squared
    errors and norms are kept (fp64, 16 bytes a row, preallocated: appending small tensors between a batch's
    large temporaries fragments the heap) and summed once at the end, so that the result is bit-for-bit the
    whole-table sum whatever the batches."""

    def __init__(self, rows: int):
        self.err = torch.empty(rows, dtype=torch.float64)
        self.norm = torch.empty(rows, dtype=torch.float64)
        self.max_abs = 0.0
        self.fp16_overflow = 0

    def add(self, start: int, rows: torch.Tensor, decoded: torch.Tensor) -> None:
        """Record rows ``start ..`` of the table: their fp32 values ``rows`` and their ``decoded`` reconstruction."""
        end = start + rows.shape[0]
        self.err[start:end] = (decoded - rows).double().pow(2).sum(1)  # squared error per row
        self.norm[start:end] = rows.double().pow(2).sum(1)
        mag = rows.abs()
        self.max_abs = max(self.max_abs, float(mag.max()))
        self.fp16_overflow += int((mag > 65504).sum())

    def fields(self, weights: torch.Tensor | None) -> dict[str, Any]:
        """The manifest entry's error fields (``weighted_rel_error`` with per-row ``weights``)."""
        err, norm = self.err, self.norm
        out: dict[str, Any] = {
            "rel_error": math.sqrt(float(err.sum()) / max(float(norm.sum()), 1e-300)),
            "max_abs": self.max_abs,
            "fp16_overflow": self.fp16_overflow,
        }
        if weights is not None:
            out["weighted_rel_error"] = math.sqrt(
                float((weights * err).sum()) / max(float((weights * norm).sum()), 1e-300)
            )
        return out


def _entry(
    index: int, codec: Codec, roles: Sequence[str], shape: tuple[int, int], stats: ErrorStats, weights: Any
) -> dict[str, Any]:
    """Layer ``index``'s manifest entry: codec, tensors, bytes and the error ``stats``."""
    V, h = shape
    stored = codec.stored_bytes(V, h)
    return {
        "index": index,
        "status": "present",
        "codec": codec.name,
        "params": codec.params(),
        "tensors": {role: codec.tensor_name(index, role) for role in roles},
        "stored_bytes": stored,
        "bits_per_value": 8 * stored / (V * h),
        **stats.fields(weights),
    }


def encode_layer(
    index: int,
    table: torch.Tensor,
    codec: Codec,
    weights: torch.Tensor | None = None,
    carried: CarriedRows | None = None,
) -> EncodedLayer:
    """Encode layer ``index``'s [V, h] fp32 table; the entry records the codec, bytes and reconstruction error
    (``weights``: per-token weights of the error, recorded as ``weighted_rel_error`` too). With ``carried``
    (error feedback, :mod:`tolcli.feedback`) the table plus its carry is encoded, and the carry advanced."""
    V, h = table.shape
    target = table if carried is None else carried.target(0, table)
    tensors = codec.encode(target)
    dtypes = {role: dtype for role, (_, dtype) in codec.tensor_specs(V, h).items()}
    stats = ErrorStats(V)
    decoded = codec.decode_rows(DictAccess(tensors), torch.arange(V))
    stats.add(0, table, decoded)
    if carried is not None:
        carried.advance(0, target, decoded)
    entry = _entry(index, codec, list(tensors), (V, h), stats, weights)
    return EncodedLayer({codec.tensor_name(index, r): (dtypes[r], t) for r, t in tensors.items()}, entry)


def default_batch_rows(width: int) -> int:
    """Rows per batch when streaming a layer: about ``BATCH_BYTES`` of fp32 rows."""
    return max(1, BATCH_BYTES // (4 * width))


class LayerRows:
    """A :class:`~tolcli.codecs.base.RowSource` over one layer of an open bundle: its rows decoded to fp32,
    ``batch`` at a time (:meth:`~tolcli.bundle.reader.Bundle.read_rows`: the input's mapped pages are given back
    after each batch, so resident memory, file pages included, does not grow with the vocabulary), refusing
    non-finite values."""

    def __init__(self, b: Bundle, layer: int, batch: int):
        if batch < 1:
            raise UsageError(f"`batch_rows` must be >= 1, got {batch}")
        self.b, self.layer, self.batch = b, layer, batch
        self.rows, self.width = b.vocab_size, b.hidden_size

    def _raw(self) -> Iterator[tuple[int, torch.Tensor]]:
        for s in range(0, self.rows, self.batch):
            yield s, self.b.read_rows(self.layer, s, min(s + self.batch, self.rows))

    def batches(self) -> Iterator[tuple[int, torch.Tensor]]:
        for s, rows in self._raw():
            if not bool(torch.isfinite(rows).all()):
                self._refuse()
            yield s, rows

    def _refuse(self) -> None:
        bad = sum(int((~torch.isfinite(rows)).sum()) for _, rows in self._raw())
        raise InputError(
            f"layer {self.layer}: {bad:,} non-finite values (NaN/Inf) in the input table",
            path=self.b.path,
            hint="recompute the bundle from a checkpoint with finite weights",
        )


def _encoded_batches(
    source: RowSource, codec: Codec, enc: BatchEncoder, stats: ErrorStats, carried: CarriedRows | None = None
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Each row batch of ``source``, encoded (its per-row roles), its error recorded in ``stats``. With
    ``carried`` (error feedback over ``source``'s table) each batch is encoded with its carry, which then advances;
    the error is still measured against ``source``'s rows."""
    for s, rows in source.batches():
        target = rows if carried is None else carried.target(s, rows)
        roles = enc.encode_rows(target)
        decoded = codec.decode_rows(DictAccess({**roles, **enc.fixed}), torch.arange(rows.shape[0]))
        stats.add(s, rows, decoded)
        if carried is not None:
            carried.advance(s, target, decoded)
        yield s, roles


def stage_streamed(
    index: int,
    source: RowSource,
    codec: Codec,
    enc: BatchEncoder,
    staging: Staging,
    weights: Any = None,
    carried: CarriedRows | None = None,
) -> dict[str, Any]:
    """Encode layer ``index`` batch by batch straight into ``staging``; returns its manifest entry.

    The first (largest) per-row role streams to its staged file as batches are encoded; the other per-row
    roles (scales, offsets: a small fraction of it) are gathered in preallocated tensors and staged after,
    then the fixed roles; the same order as ``codec.encode`` gives them."""
    specs = codec.tensor_specs(source.rows, source.width)
    stats = ErrorStats(source.rows)
    batches = _encoded_batches(source, codec, enc, stats, carried)
    roles = stage_rows(staging, batches, specs, lambda r: codec.tensor_name(index, r))
    for role, t in enc.fixed.items():
        staging.stage(codec.tensor_name(index, role), specs[role][1], specs[role][0], [tensor_to_numpy(t)])
    return _entry(index, codec, [*roles, *enc.fixed], (source.rows, source.width), stats, weights)


def stage_rows(
    staging: Staging,
    batches: Iterator[tuple[int, dict[str, torch.Tensor]]],
    specs: dict[str, tuple[tuple[int, ...], str]],
    name: Callable[[str], str],
) -> list[str]:
    """Stage the per-row roles of encoded row ``batches`` (``(first row, role -> rows)``) as the tensors ``name(role)``
    (shapes and dtypes from ``specs``); returns the roles in the order staged. The first (largest) role streams to
    its staged file as batches are encoded; the others (scales, offsets: a small fraction of it) are gathered in
    preallocated tensors and staged after."""
    first = next(batches)
    main, *rest = first[1]
    bufs = {r: torch.empty(specs[r][0], dtype=DTYPES[specs[r][1]].torch) for r in rest}

    def main_blocks() -> Iterator[np.ndarray]:
        for s, roles in itertools.chain([first], batches):
            for r in rest:
                bufs[r][s : s + roles[r].shape[0]] = roles[r]
            yield tensor_to_numpy(roles[main])

    staging.stage(name(main), specs[main][1], specs[main][0], main_blocks())
    for r, t in bufs.items():
        staging.stage(name(r), specs[r][1], specs[r][0], [tensor_to_numpy(t)])
    return [main, *rest]


# ---- the whole job ----------------------------------------------------------------------------------------------
@dataclass
class CompressResult:
    path: Path
    manifest: dict[str, Any]
    seconds: float
    ranks: dict[int, int] = field(default_factory=dict)
    plan: AutoPlan | None = None  # scheme auto: what was measured and chosen

    @property
    def stored_bytes(self) -> int:
        return sum(e.get("stored_bytes", 0) for e in self.manifest["layers"])


def _encode_layers(
    b: Bundle,
    specs: dict[int, CodecSpec],
    label: str,
    weights: dict[int, torch.Tensor] | None,
    staging: Staging,
    progress: Progress,
    batch_rows: int,
    carry: Carry | None = None,
) -> None:
    """Encode and stage every layer the staging does not hold yet, each with its spec, in row batches of
    ``batch_rows``. With a ``carry`` (error feedback) every layer is encoded, in order, unless all are staged."""
    todo = [i for i in sorted(b.layers) if staging.layer_done(i) is None]
    if carry is not None and todo:
        todo = sorted(b.layers)
    progress.start(f"compress {len(todo)} layer(s) ({label})", len(todo))
    for i in todo:
        source = LayerRows(b, i, batch_rows)
        carried = None if carry is None else CarriedRows(source, carry)
        w = None if weights is None else weights[i]
        codec = specs[i].build(b.hidden_size, weights=w)
        enc = codec.encoder(source if carried is None else carried)
        if enc is None:  # a codec that needs the whole table
            layer = encode_layer(i, torch.cat([rows for _, rows in source.batches()]), codec, w, carried)
            for name, (dtype, t) in layer.tensors.items():
                staging.stage(name, dtype, tuple(t.shape), [tensor_to_numpy(t)])
            entry = layer.entry
        else:
            entry = stage_streamed(i, source, codec, enc, staging, w, carried)
        staging.commit_layer(i, entry)
        progress.advance(1)
    progress.finish()


def input_error(entry: dict[str, Any]) -> float:
    """The error a bundle's layer already carries against the fp32 computation (0 for fp32 tables)."""
    e = entry.get("rel_error") if entry.get("status") == "present" else None
    return float(e) if e is not None and math.isfinite(e) and e > 0 else 0.0


def compounded(old: dict[str, Any], new: dict[str, Any] | None) -> dict[str, Any]:
    """Layer entry ``new`` (encoded from ``old``'s table) with ``rel_error`` against the fp32 computation, as the
    manifest schema defines it: when the input was already lossy (``e0 = old.rel_error > 0``), the error measured
    against the input, ``e1``, becomes the triangle-inequality bound ``e0 + e1 (1 + e0)`` (since
    ``||T - T2|| <= ||T - T1|| + ||T1 - T2||`` and ``||T1|| <= (1 + e0) ||T||``). ``old`` when not re-encoded."""
    if new is None:
        return old
    e0 = input_error(old)
    if e0 == 0.0 or new.get("rel_error") is None:
        return new
    return {**new, "rel_error": e0 + new["rel_error"] * (1 + e0)}


def warn_lossy_input(b: Bundle, note: Callable[[str], None]) -> None:
    """Warn when the input's tables are already compressed (not dense): errors compound. A dense bf16 or fp16 input
    (``precompute``'s default is bf16) is not warned about: its rounding (relative error ~2e-3) is far below any
    codec's and measured to change nothing (docs/compression.md); its layers' rel_error is still the bound."""
    lossy = [e for e in b.manifest["layers"] if input_error(e) > 0 and e.get("codec") != "dense"]
    if lossy:
        worst = max(input_error(e) for e in lossy)
        note(
            f"warning: the input's tables are already compressed ({len(lossy)} layer(s), relative error up to "
            f"{worst:.2e} against the fp32 computation): the errors compound, and each layer's rel_error is recorded "
            "as a bound; compress from a dense bundle for the best result"
        )


def _stage_layers(
    b: Bundle,
    specs: dict[int, CodecSpec],
    label: str,
    weights: dict[int, torch.Tensor] | None,
    staging: Staging,
    progress: Progress,
    batch_rows: int,
    record: dict[str, Any],
    weight_info: dict[str, Any] | None,
    ranks: dict[int, int],
    feedback: bool = False,
) -> dict[str, Any]:
    """Encode every layer of ``b`` with its spec into ``staging``, with the tokenizer; returns the manifest. A
    cross-layer SVD spec encodes all layers at once (:mod:`tolcli.crosslayer`). ``feedback``: code each layer with
    the error the layers before it left (:mod:`tolcli.feedback`)."""
    first = specs[min(specs)] if specs else None
    with Carry(b.vocab_size, b.hidden_size, staging.dir.parent) if feedback else contextlib.nullcontext() as carry:
        if isinstance(first, SVD) and first.cross_layer:
            if any(s != first for s in specs.values()):  # pragma: no cover - candidate_specs refuses cross-layer
                raise UsageError("a cross-layer svd encodes every layer with one spec")
            from tolcli.crosslayer import stage_stack  # it imports this module

            stage_stack(b, first, weights, staging, progress, batch_rows, carry)
        else:
            _encode_layers(b, specs, label, weights, staging, progress, batch_rows, carry)
    tok = b.tokenizer_bytes()
    if tok is not None and TOKENIZER_TENSOR not in staging.state["tensors"]:
        staging.stage_extra(TOKENIZER_TENSOR, tok)
    return _manifest(b, staging, record, weight_info, ranks)


def _manifest(
    b: Bundle, staging: Staging, record: dict[str, Any], weight_info: dict[str, Any] | None, ranks: dict[int, int]
) -> dict[str, Any]:
    """The output's manifest: the input's, with the new layer entries and a history entry for this run."""
    layers = [compounded(e, staging.layer_done(e["index"])) for e in b.manifest["layers"]]
    # a shared tensor (cross-layer SVD) counts in the first layer that reads it
    layers = attribute_bytes(layers, staging.state["tensors"], b.vocab_size * b.hidden_size)
    manifest = {k: v for k, v in b.manifest.items() if k not in ("tensors", "created")}
    manifest["tolcli_version"] = __version__
    manifest["layers"] = layers
    hist: dict[str, Any] = {"command": "compress", **record}
    if weight_info:
        hist["token_weights"] = weight_info
    if ranks:
        hist["ranks"] = [ranks.get(e["index"], 0) for e in layers]
    manifest["history"] = [*b.manifest.get("history", []), hist]
    created = created_timestamp()
    if created:
        manifest["created"] = created
    return manifest


def warn_above_fp16(spec: CodecSpec, b: Bundle, ranks: dict[int, int], note: Callable[[str], None]) -> list[int]:
    """Warn (before encoding) about layers whose chosen codec stores more bytes than dense fp16 would: an SVD above
    its break-even rank (about ``V h / (V + h)`` for fp16 factors) costs bytes and accuracy. Returns those layers."""
    fp16 = b.vocab_size * b.hidden_size * 2
    sizes = {}
    for i in b.present_layers:
        layer_spec = spec.with_rank(ranks[i]) if isinstance(spec, RankedSpec) else spec
        sizes[i] = layer_spec.build(b.hidden_size).stored_bytes(b.vocab_size, b.hidden_size)
    big = [i for i, n in sizes.items() if n > fp16]
    if big:
        worst = max(big, key=lambda i: sizes[i])
        note(
            f"warning: {len(big)} layer(s) ({', '.join(map(str, big))}) will store more bytes than dense fp16 "
            f"(layer {worst}: {sizes[worst] / fp16:.2f}x) with {spec}: lower the rank or budget, or use "
            f"--scheme fp16"
        )
    return big


def compress(
    src: str | Path,
    out: str | Path,
    options: CompressOptions,
    *,
    container: str | None = None,
    force: bool = False,
    resume: bool = False,
    compression: str | None = None,
    max_shard_size: int | str | None = None,
    verify_input: bool = False,
    batch_rows: int | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
    note: Callable[[str], None] = lambda s: None,
    memo: CompressMemo | None = None,
) -> CompressResult:
    """Compress bundle ``src`` into ``out`` with the codec ``options`` choose; returns the manifest and ranks.

    Layers are read and encoded ``batch_rows`` rows at a time (default: about 8 MiB of fp32 rows), so memory
    stays near one batch for row-wise codecs and near one h x h Gram for SVD, whatever the vocabulary
    (docs/compression.md, "Memory"). The output does not depend on ``batch_rows`` except for SVD, whose
    last bits may. ``device`` is where the ``sensitivity`` passes (forward and backward through the model) run:
    the CPU by default, so that the bytes do not depend on the machine; the codecs encode on the CPU. ``memo`` (a
    :class:`CompressMemo`) shares the token weights and scheme auto's measurements between calls on the same input.

    Example:
        >>> import tempfile, pathlib
        >>> from tolcli import precompute, compress, CompressOptions, demo_checkpoint_path
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = precompute(demo_checkpoint_path(), d / "dense.safetensors")
        >>> r = compress(d / "dense.safetensors", d / "int4.safetensors", CompressOptions("int4"))
        >>> r.manifest["layers"][0]["codec"], r.manifest["layers"][0]["bits_per_value"]
        ('int4', 4.5)
        >>> opts = CompressOptions(codec="svd(rank=32,a=int8)")
        >>> compress(d / "dense.safetensors", d / "svd.safetensors", opts).ranks[0]
        32
    """
    t0 = time.monotonic()
    auto = options.scheme == AUTO_SCHEME
    if auto:
        check_auto_options(options)
    spec, record = (None if auto else options.codec_spec()), options.record()
    out = Path(out)
    write = WriteOptions.make(
        out, container=container, compression=compression, max_shard_size=max_shard_size, force=force
    )
    # an existing output is refused before the weights, the plan or --validate cost anything (Staging checks again)
    check_output(out, force=force, directory=write.sharded, make_parent=False)
    progress = progress or NullProgress()
    with open_bundle(src, verify=verify_input) as b:
        shared = None  # a cross-layer svd: its rank, checked before the weights cost anything
        if isinstance(spec, SVD) and spec.cross_layer:
            from tolcli.crosslayer import check_stack, stack_spec  # it imports this module

            shared = stack_spec(spec, b.vocab_size, b.hidden_size, len(b.layers))
            check_stack(shared, b.vocab_size, b.hidden_size, len(b.layers), note)
            if options.error_feedback and spec.residual is None:
                raise UsageError(
                    f"{spec}: error feedback codes each layer's residual with the carry; a cross-layer svd "
                    "without a residual has nothing to carry it",
                    hint="add a residual, e.g. residual=mixed(bits=1.5), or drop --error-feedback",
                )
        weighting = replace(options.weighting(), device=device)
        wkey = None if memo is None else weights_key(weighting, b)
        weights, weight_info = memoized(memo, "weights", wkey, lambda: load_weights(weighting, b, progress, note))
        batch_rows = default_batch_rows(b.hidden_size) if batch_rows is None else batch_rows
        plan = None
        if spec is None:
            plan = plan_auto_layers(options, b, weights, progress, batch_rows, memo, wkey)
            if options.validate is not None:
                parent = out.resolve().parent
                parent.mkdir(parents=True, exist_ok=True)
                plan = validate_auto(options, b, plan, weights, parent, device, progress, batch_rows)
            specs = plan.specs()
            ranks = {i: s.rank for i, s in specs.items() if isinstance(s, RankedSpec) and s.rank is not None}
        elif shared is not None:
            ranks = dict.fromkeys(b.layers, shared.rank)
            specs = dict.fromkeys(b.layers, shared)
        else:
            ranks = plan_ranks(spec, b, weights, progress, batch_rows)
            warn_above_fp16(spec, b, ranks, note)
            specs = {i: spec.with_rank(ranks[i]) if isinstance(spec, RankedSpec) else spec for i in b.layers}
        warn_lossy_input(b, note)
        job = {
            "command": "compress",
            "input": {n: t["sha256"] for n, t in b.manifest["tensors"].items()},
            "codec": AUTO_SCHEME if spec is None else str(spec),
            "options": record,
            "weights": weight_info,
            "ranks": {str(k): v for k, v in ranks.items()},
            **write.job(),
        }
        if plan is not None:
            job["plan"] = {str(i): str(s) for i, s in specs.items()}
        staging = Staging(out, job, resume=resume, options=write, note=note)
        label = AUTO_SCHEME if spec is None else str(spec)
        manifest = _stage_layers(
            b, specs, label, weights, staging, progress, batch_rows, record, weight_info, ranks, options.error_feedback
        )
    path = staging.finish(manifest)
    with open_bundle(path) as written:
        return CompressResult(path, written.manifest, time.monotonic() - t0, ranks, plan)
