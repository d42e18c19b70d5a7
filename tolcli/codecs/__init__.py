"""Codecs: how one layer's ToL table is stored. One small interface (:class:`Codec`), one class per codec.

A codec turns a [rows, width] fp32 table into named tensors (its *roles*) and decodes any set of rows
back from them. Its parameters live in the manifest (``layers[i].params``) and in its tensors, never in
names. ``docs/bundle-format.md`` specifies each codec's tensors and decoding.
"""

from tolcli.codecs.base import Codec, DictAccess, PrefixedAccess, TensorAccess, codec_from_manifest
from tolcli.codecs.dense import DenseCodec
from tolcli.codecs.quant import NF4_LEVELS, Int4Codec, Int8Codec, NF4Codec
from tolcli.codecs.svd import SVDCodec

__all__ = [
    "NF4_LEVELS",
    "Codec",
    "DenseCodec",
    "DictAccess",
    "Int4Codec",
    "Int8Codec",
    "NF4Codec",
    "PrefixedAccess",
    "SVDCodec",
    "TensorAccess",
    "codec_from_manifest",
]
