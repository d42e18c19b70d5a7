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
CROSS_SVD_SPEC = "svd(budget={budget!r},cross_layer=true,normalize=false,a=mixed(bits=4.4),b=int8)"
DEFAULT_BATCH_ROWS = 4096  # precompute: vocabulary rows per batch
PROTOCOLS = ("tolcli", "hf-sliding", "lm-eval-rolling", "llama-cpp")  # eval-ppl --protocol (docs/evaluation.md)
DOC_SEPARATORS = ("eos", "bos", "blank-line")  # eval-ppl --doc-sep: what goes between two documents of a file
