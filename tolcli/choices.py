"""The names and defaults the CLI offers (schemes, sweep families, batch sizes): plain data, importable
without torch so that ``--help`` and ``--version`` stay fast. The library modules use the same values."""

from __future__ import annotations

DENSE_SCHEMES = ("fp32", "fp16", "bf16")
QUANT_SCHEMES = ("int4", "nf4", "int8", "int3", "int2")
# compress --fit: how quantisers fit each group's scale, the default first (docs/compression.md, "Fitting scales")
FITS = ("mse", "minmax")
SVD_KINDS = ("svd", "adaptive-svd")
SCHEMES: tuple[str, ...] = (
    *DENSE_SCHEMES,
    *QUANT_SCHEMES,
    *SVD_KINDS,
    *(f"{k}+{q}" for k in SVD_KINDS for q in QUANT_SCHEMES),
)
SWEEP_FAMILIES = (
    "svd",
    "adaptive-svd",
    "int4",
    "nf4",
    "int8",
    "int3",
    "int2",
    "adaptive-svd+int4",
    "mixed",
    "auto",
    "cross-svd",
    "drop",
)
# sweep --bits: the bits per value of the mixed, auto and cross-svd families (as a fraction of fp16: bits / 16)
SWEEP_BITS = (1.6, 2.0, 2.5, 3.0, 4.0)
# the cross-svd family: a cross-layer SVD whose mixed A at these bits per value chooses the rank (then takes every
# byte left), B in int8; 4.4 chose the rank of least KL on the demo's calibration text at 10% and 12.5% of fp16
CROSS_SVD_SPEC = "svd(budget={budget!r},cross_layer=true,normalize=false,a=mixed(bits=4.4),b=int8{residual})"
# ... and its per-layer mixed residual: (from bits per value, the residual's bits), the first that applies. The
# residual bits of least KL on the demo's calibration text: 0.5 and 0.9 tried at 1.6 bits per value, 0.6 and 0.9 at 2,
# 0.6/0.9/1.2/1.5/2.0 at 2.5, 0.9 and 1.5 at 3 (docs/compression.md, "A residual")
CROSS_SVD_RESIDUAL = ((2.5, 1.5), (2.0, 0.9), (0.0, 0.5))


def cross_svd_spec(bits: float) -> str:
    """The sweep's ``cross-svd`` spec at ``bits`` per value (``bits / 16`` of fp16)."""
    res = next((r for at, r in CROSS_SVD_RESIDUAL if bits >= at), None)
    return CROSS_SVD_SPEC.format(budget=bits / 16, residual="" if res is None else f",residual=mixed(bits={res})")


DEFAULT_BATCH_ROWS = 4096  # precompute: vocabulary rows per batch
PROTOCOLS = ("tolcli", "hf-sliding", "lm-eval-rolling", "llama-cpp")  # eval-ppl --protocol (docs/evaluation.md)
DOC_SEPARATORS = ("eos", "bos", "blank-line")  # eval-ppl --doc-sep: what goes between two documents of a file
