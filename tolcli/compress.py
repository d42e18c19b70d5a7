"""Compress a ToL bundle layer by layer: casts, quantisation, uniform and adaptive-rank SVD, combinations.

Every scheme writes bundle format v1 through the same resumable staging as ``precompute``. Each layer's
manifest entry records its codec and parameters, stored bytes, bits per value, and its relative
Frobenius error against the input (token-weighted too, when weights are given).

Schemes:

- ``fp32`` / ``fp16`` / ``bf16``: dense casts;
- ``int4`` / ``nf4`` / ``int8``: group-wise quantisation along the hidden axis;
- ``svd``: the same rank for every layer (``--rank R`` or ``--ratio F``);
- ``adaptive-svd``: per-layer ranks minimising the total squared error under one byte budget
  (``--budget``), or the smallest rank keeping a fraction of each layer's energy (``--energy``);
- ``svd+int4``, ``adaptive-svd+int4`` (and ``+nf4``, ``+int8``): the ``A`` factor quantised, ``B`` fp16.

SVD errors can be weighted per token (``--token-weights`` counts, or ``--calibration`` text counted with
the bundle's tokenizer), or per layer *and* token in estimated loss units (``--sensitivity CHECKPOINT``
with ``--calibration``: :mod:`tolcli.sensitivity`), which makes adaptive ranks follow the loss.

``--ratio`` and fractional ``--budget`` are fractions of the **dense fp16 bytes** of the layers being
compressed (``V * h * 2`` per layer): ``--ratio 0.25`` means a quarter of what fp16 tables would take.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tolcli import __version__
from tolcli.bundle.manifest import created_timestamp
from tolcli.bundle.reader import Bundle, open_bundle
from tolcli.bundle.spec import TOKENIZER_TENSOR, layer_tensor
from tolcli.bundle.writer import Staging, WriteOptions
from tolcli.codecs import Codec, DenseCodec, DictAccess, Int4Codec, Int8Codec, NF4Codec, SVDCodec
from tolcli.codecs.svd import gram_spectrum
from tolcli.dtypes import tensor_to_numpy
from tolcli.errors import InputError, UsageError
from tolcli.fsutil import parse_size, sha256_file
from tolcli.progress import NullProgress, Progress
from tolcli.text import load_token_weights

DENSE_SCHEMES = ("fp32", "fp16", "bf16")
QUANT_SCHEMES = ("int4", "nf4", "int8")
SVD_KINDS = ("svd", "adaptive-svd")
SCHEMES: tuple[str, ...] = (
    *DENSE_SCHEMES,
    *QUANT_SCHEMES,
    *SVD_KINDS,
    *(f"{k}+{q}" for k in SVD_KINDS for q in QUANT_SCHEMES),
)
DEFAULT_GROUP = {"int4": 64, "nf4": 64}
DEFAULT_A_GROUP = 32  # the A factor's group size (ranks are kept multiples of it)


@dataclass
class CompressOptions:
    """Everything ``tolcli compress`` takes besides input and output (see the CLI reference)."""

    scheme: str
    rank: int | None = None
    ratio: float | None = None
    budget: str | None = None
    energy: float | None = None
    rank_multiple: int = 8
    min_rank: int | None = None
    max_rank: int | None = None
    svd_method: str = "exact"
    oversample: int = 10
    power_iters: int = 2
    seed: int = 0
    group_size: int | None = None
    symmetric: bool = False
    factor_dtype: str = "fp16"
    token_weights: str | None = None
    calibration: str | None = None
    sensitivity: str | None = None
    weight_floor: float = 1.0


def parse_scheme(scheme: str) -> tuple[str, str | None]:
    """``"adaptive-svd+int4"`` -> ``("adaptive-svd", "int4")``; ``"int4"`` -> ``("quant", "int4")``."""
    if scheme not in SCHEMES:
        raise UsageError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if scheme in DENSE_SCHEMES:
        return "dense", None
    if scheme in QUANT_SCHEMES:
        return "quant", scheme
    kind, _, quant = scheme.partition("+")
    return kind, quant or None


def quant_codec(quant: str, group_size: int | None, symmetric: bool, width: int) -> Codec:
    if symmetric and quant != "int4":
        raise UsageError("--symmetric applies to int4 only (nf4 and int8 are symmetric already)")
    if quant == "int8":
        return Int8Codec(group_size or width)
    group = group_size or DEFAULT_GROUP[quant]
    return Int4Codec(group, symmetric) if quant == "int4" else NF4Codec(group)


def parse_budget(text: str, dense_fp16_bytes: int) -> int:
    """``"0.25"`` (a fraction of dense fp16), ``"12MB"``, ``"1.5GiB"`` or ``"123456"`` -> bytes."""
    try:
        value, unit = parse_size(text)
    except UsageError:
        raise UsageError(
            f"--budget {text!r}: expected a fraction such as 0.25, or bytes such as 12MB or 1.5GiB"
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
            hint="raise --budget or lower --min-rank",
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
    if not 0 < energy <= 1:
        raise UsageError(f"--energy must be in (0, 1], got {energy}")
    out = {}
    for layer, ev in spectra.items():
        cum = torch.cumsum(ev, 0) / ev.sum().clamp_min(1e-300)
        r = int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)).item()) + 1
        out[layer] = min(max_rank, max(min_rank, math.ceil(r / multiple) * multiple))
    return out


@dataclass
class CompressResult:
    path: Path
    manifest: dict[str, Any]
    seconds: float
    ranks: dict[int, int] = field(default_factory=dict)

    @property
    def stored_bytes(self) -> int:
        return sum(e.get("stored_bytes", 0) for e in self.manifest["layers"])


class _Planner:
    """Builds each layer's codec from the options (ranks need spectra for adaptive-svd)."""

    def __init__(
        self, opts: CompressOptions, bundle: Bundle, weights: dict[int, torch.Tensor] | None, progress: Progress
    ):
        self.opts, self.b, self.weights = opts, bundle, weights
        self.kind, self.quant = parse_scheme(opts.scheme)
        V, h = bundle.vocab_size, bundle.hidden_size
        self.layers = sorted(bundle.layers)
        self.ranks: dict[int, int] = {}
        if self.kind in SVD_KINDS:
            self._plan_svd(V, h, progress)
        elif any(x is not None for x in (opts.rank, opts.ratio, opts.budget, opts.energy)):
            raise UsageError(f"--rank/--ratio/--budget/--energy apply to SVD schemes, not {opts.scheme}")

    def _a_codec(self, rank: int) -> Codec:
        if self.quant is None:
            return DenseCodec(self.opts.factor_dtype)
        return quant_codec(
            self.quant,
            self.opts.group_size or (DEFAULT_A_GROUP if self.quant != "int8" else None),
            self.opts.symmetric,
            rank,
        )

    def _multiple(self) -> int:
        m = self.opts.rank_multiple
        if m < 1:
            raise UsageError(f"--rank-multiple must be >= 1, got {m}")
        if self.quant in ("int4", "nf4"):
            g = self.opts.group_size or DEFAULT_A_GROUP
            m = m * g // math.gcd(m, g)  # ranks must fill whole quantisation groups
        return m

    def _plan_svd(self, V: int, h: int, progress: Progress) -> None:
        o = self.opts
        top = min(V, h)
        mult = self._multiple()
        min_rank = o.min_rank if o.min_rank is not None else mult
        max_rank = min(top, o.max_rank if o.max_rank is not None else top)
        if min_rank < 1 or min_rank > max_rank:
            raise UsageError(f"need 1 <= --min-rank ({min_rank}) <= --max-rank ({max_rank})")
        per_rank = self.codec_for_rank(mult).stored_bytes(V, h) / mult
        dense16 = V * h * 2
        if self.kind == "svd":
            if (o.rank is None) == (o.ratio is None):
                raise UsageError("svd needs exactly one of --rank R and --ratio F")
            if o.budget is not None or o.energy is not None:
                raise UsageError("--budget/--energy apply to adaptive-svd; svd takes --rank or --ratio")
            if o.rank is not None:
                rank = o.rank
            else:
                if not 0 < o.ratio <= 4:  # type: ignore[operator]
                    raise UsageError(f"--ratio must be in (0, 4], got {o.ratio}")
                rank = _round_to(o.ratio * dense16 / per_rank, mult)  # type: ignore[operator]
            if not 1 <= rank <= top:
                raise UsageError(f"rank {rank} is outside 1..{top}")
            self.ranks = dict.fromkeys(self.layers, rank)
            return
        if (o.budget is None) == (o.energy is None):
            raise UsageError("adaptive-svd needs exactly one of --budget and --energy")
        if o.rank is not None or o.ratio is not None:
            raise UsageError("--rank/--ratio apply to svd; adaptive-svd takes --budget or --energy")
        progress.start(f"spectra of {len(self.layers)} layer(s)", len(self.layers))
        spectra = {}
        for i in self.layers:
            spectra[i] = gram_spectrum(self.b.dense_layer(i), self.weights_for(i))[0]
            progress.advance(1)
        progress.finish()
        if o.energy is not None:
            self.ranks = energy_ranks(spectra, o.energy, multiple=mult, min_rank=min_rank, max_rank=max_rank)
        else:
            budget = parse_budget(o.budget, dense16 * len(self.layers))  # type: ignore[arg-type]
            self.ranks = allocate_ranks(spectra, per_rank, budget, multiple=mult, min_rank=min_rank, max_rank=max_rank)

    def weights_for(self, layer: int) -> torch.Tensor | None:
        return None if self.weights is None else self.weights[layer]

    def codec_for_rank(self, rank: int, layer: int | None = None) -> SVDCodec:
        o = self.opts
        return SVDCodec(
            rank,
            self._a_codec(rank),
            "F16",
            method=o.svd_method,
            oversample=o.oversample,
            power_iters=o.power_iters,
            seed=o.seed,
            weights=None if layer is None else self.weights_for(layer),
        )

    def codec(self, layer: int) -> Codec:
        if self.kind == "dense":
            return DenseCodec(self.opts.scheme)
        if self.kind == "quant":
            return quant_codec(self.quant, self.opts.group_size, self.opts.symmetric, self.b.hidden_size)  # type: ignore[arg-type]
        return self.codec_for_rank(self.ranks[layer], layer)


def _weights(
    o: CompressOptions, b: Bundle, progress: Progress
) -> tuple[dict[int, torch.Tensor] | None, dict[str, Any] | None]:
    """Per-layer token weights (the same vector for every layer unless --sensitivity), and their record."""
    V = b.vocab_size
    if o.sensitivity is None:
        if o.token_weights is None and o.calibration is None:
            return None, None
        w, info = load_token_weights(
            V,
            weights_file=o.token_weights,
            calibration=o.calibration,
            tokenizer=b.tokenizer() if o.calibration else None,
            floor=o.weight_floor,
        )
        return dict.fromkeys(b.layers, w), info
    from tolcli.checkpoint import open_checkpoint
    from tolcli.demo import resolve_checkpoint_arg
    from tolcli.model import load_model
    from tolcli.sensitivity import sensitivity_weights, token_sensitivity
    from tolcli.text import read_tokens

    if o.calibration is None or o.token_weights is not None:
        raise UsageError("--sensitivity needs --calibration TEXT (and no --token-weights)")
    ckpt = open_checkpoint(resolve_checkpoint_arg(o.sensitivity))
    cfg = ckpt.config
    if not cfg.has_memory:
        raise InputError(
            f"--sensitivity {ckpt.path}: model_type {cfg.model_type!r} has no context-free FFN",
            hint="pass the memoryllm checkpoint the bundle was computed from",
        )
    if (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) != (V, b.hidden_size, b.num_layers):
        raise InputError(
            f"checkpoint {ckpt.path} (vocab {cfg.vocab_size}, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} "
            f"layers) does not match the bundle (vocab {V}, hidden {b.hidden_size}, {b.num_layers} layers)"
        )
    tok = b.tokenizer()
    if tok is None:
        raise InputError("the bundle has no embedded tokenizer to read the calibration text with")
    tokens = read_tokens(o.calibration, tok, V)
    S, counts = token_sensitivity(load_model(ckpt), tokens, progress=progress)
    w = sensitivity_weights(S, counts, o.weight_floor)
    info = {
        "source": "sensitivity",
        "checkpoint": ckpt.path.name,
        "name": Path(o.calibration).name,
        "sha256": sha256_file(Path(o.calibration)),
        "tokens": tokens.numel(),
        "floor": o.weight_floor,
        "layer_sensitivity": [float(x) for x in (S.sum(1) / counts.sum())],
    }
    return {i: w[i] for i in b.layers}, info


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
    progress: Progress | None = None,
    note: Callable[[str], None] = lambda s: None,
) -> CompressResult:
    """Compress bundle ``src`` into ``out`` with ``options.scheme``; returns the manifest and per-layer errors.

    Example:
        >>> import tempfile, pathlib
        >>> from tolcli import precompute, compress, CompressOptions, demo_checkpoint_path
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = precompute(demo_checkpoint_path(), d / "dense.safetensors")
        >>> r = compress(d / "dense.safetensors", d / "int4.safetensors", CompressOptions("int4"))
        >>> r.manifest["layers"][0]["codec"], r.manifest["layers"][0]["bits_per_value"]
        ('int4', 4.5)
    """
    t0 = time.monotonic()
    out = Path(out)
    options_w = WriteOptions.make(
        out, container=container, compression=compression, max_shard_size=max_shard_size, force=force
    )
    progress = progress or NullProgress()
    with open_bundle(src, verify=verify_input) as b:
        V, h = b.vocab_size, b.hidden_size
        weights, weight_info = _weights(options, b, progress)
        plan = _Planner(options, b, weights, progress)
        job = {
            "command": "compress",
            "input": {n: t["sha256"] for n, t in b.manifest["tensors"].items()},
            "options": asdict(options),
            "weights": weight_info,
            "ranks": {str(k): v for k, v in plan.ranks.items()},
            **options_w.job(),
        }
        staging = Staging(out, job, resume=resume, options=options_w, note=note)
        result = CompressResult(out, {}, 0.0, dict(plan.ranks))
        todo = [i for i in plan.layers if staging.layer_done(i) is None]
        progress.start(f"compress {len(todo)} layer(s) ({options.scheme})", len(todo))
        for i in todo:
            table = b.dense_layer(i)  # (V, h) fp32
            bad = int((~torch.isfinite(table)).sum())
            if bad:
                raise InputError(
                    f"layer {i}: {bad:,} non-finite values (NaN/Inf) in the input table",
                    path=src,
                    hint="recompute the bundle from a checkpoint with finite weights",
                )
            codec = plan.codec(i)
            tensors = codec.encode(table)
            names = {}
            for role, t in tensors.items():
                names[role] = layer_tensor(i, role)
                dtype = codec.tensor_specs(V, h)[role][1]
                staging.stage(names[role], dtype, tuple(t.shape), [tensor_to_numpy(t)])
            decoded = codec.decode_rows(DictAccess(tensors), torch.arange(V))
            err = (decoded - table).double().pow(2).sum(1)  # (V,) squared error per row
            norm = table.double().pow(2).sum(1)
            stored = codec.stored_bytes(V, h)
            entry: dict[str, Any] = {
                "index": i,
                "status": "present",
                "codec": codec.name,
                "params": codec.params(),
                "tensors": names,
                "stored_bytes": stored,
                "bits_per_value": 8 * stored / (V * h),
                "rel_error": math.sqrt(float(err.sum()) / max(float(norm.sum()), 1e-300)),
                "max_abs": float(table.abs().max()),
                "fp16_overflow": int((table.abs() > 65504).sum()),
            }
            if weights is not None:
                w = weights[i]
                entry["weighted_rel_error"] = math.sqrt(float((w * err).sum()) / max(float((w * norm).sum()), 1e-300))
            staging.commit_layer(i, entry)
            progress.advance(1)
        progress.finish()
        tok = b.tokenizer_bytes()
        if tok is not None and TOKENIZER_TENSOR not in staging.state["tensors"]:
            staging.stage_extra(TOKENIZER_TENSOR, tok)
        layers = [staging.layer_done(e["index"]) or e for e in b.manifest["layers"]]
        manifest = {k: v for k, v in b.manifest.items() if k not in ("tensors", "created")}
        manifest["tolcli_version"] = __version__
        manifest["layers"] = layers
        hist: dict[str, Any] = {"command": "compress", "scheme": options.scheme}
        hist.update({k: v for k, v in asdict(options).items() if v is not None and k not in ("scheme",)})
        if weight_info:
            hist["token_weights"] = weight_info
        if plan.ranks:
            hist["ranks"] = [plan.ranks.get(e["index"], 0) for e in layers]
        manifest["history"] = [*b.manifest.get("history", []), hist]
        created = created_timestamp()
        if created:
            manifest["created"] = created
    path = staging.finish(manifest)
    with open_bundle(path) as written:
        result.manifest = written.manifest
    result.path, result.seconds = path, time.monotonic() - t0
    return result
