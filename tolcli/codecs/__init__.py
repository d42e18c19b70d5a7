"""Codecs: how one layer's ToL table is stored. One small interface (:class:`Codec`), one class per codec,
and next to each its spec (:class:`CodecSpec`): the options a user chooses it with.

A codec turns a [rows, width] fp32 table into named tensors (its *roles*) and decodes any set of rows
back from them. Its parameters live in the manifest (``layers[i].params``) and in its tensors, never in
names. ``docs/bundle-format.md`` specifies each codec's tensors and decoding.

Adding a codec is one module here: a :class:`Codec` subclass with a ``name`` (which registers it for
reading bundles) and a frozen-dataclass :class:`CodecSpec` subclass with ``codec = ThatCodec`` (which
makes it available to ``compress`` and to spec strings such as ``int4(group=32)``: :func:`parse_spec`),
imported below.
"""

from tolcli.codecs.base import (
    Codec,
    CodecSpec,
    DictAccess,
    PrefixedAccess,
    RankedSpec,
    TensorAccess,
    codec_from_manifest,
)
from tolcli.codecs.dense import Dense, DenseCodec
from tolcli.codecs.quant import (
    FITS,
    NF4,
    NF4_LEVELS,
    Int2,
    Int2Codec,
    Int3,
    Int3Codec,
    Int4,
    Int4Codec,
    Int8,
    Int8Codec,
    NF4Codec,
)
from tolcli.codecs.spec import format_spec, parse_spec, spec_names
from tolcli.codecs.svd import SVD, SVDCodec

__all__ = [
    "FITS",
    "NF4",
    "NF4_LEVELS",
    "SVD",
    "Codec",
    "CodecSpec",
    "Dense",
    "DenseCodec",
    "DictAccess",
    "Int2",
    "Int2Codec",
    "Int3",
    "Int3Codec",
    "Int4",
    "Int4Codec",
    "Int8",
    "Int8Codec",
    "NF4Codec",
    "PrefixedAccess",
    "RankedSpec",
    "SVDCodec",
    "TensorAccess",
    "codec_from_manifest",
    "format_spec",
    "parse_spec",
    "spec_names",
]
from tolcli.codecs.mixed import Mixed, MixedCodec  # noqa: F401  (registers the mixed codec)
