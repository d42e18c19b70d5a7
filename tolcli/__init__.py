"""tolcli: precompute, compress, verify and evaluate token-wise lookups (ToLs) of MemoryLLM models.

The public API (the CLI is a thin layer over it):

- :func:`open_checkpoint` / :class:`Checkpoint`: read and validate a checkpoint, lazily;
- :class:`ModelConfig`: the architecture;
- :func:`load_model` / :class:`Transformer`: the reference model, with pluggable context-free sources;
- :func:`describe_checkpoint`: what ``tolcli info`` reports;
- :func:`precompute`: compute a checkpoint's ToLs into a bundle;
- :func:`open_bundle` / :class:`Bundle`: read and verify bundles (``.lookup(layer, ids)``);
- :func:`compress` / :class:`CompressOptions`: SVD, adaptive-rank SVD, int4/nf4/int8 and combinations
  (:class:`CompressMemo` shares token weights and auto's measurements between calls on one input);
- :func:`convert_bundle`: safetensors <-> HDF5, losslessly;
- :func:`eval_ppl`: perplexity, KL and top-1 agreement of the model with its FFNs and with bundles;
- :func:`drop_layers`, :func:`strip_checkpoint`: smaller bundles, deployable checkpoints;
- :func:`generate_text` / :class:`SamplingOptions` / :class:`KVCache`: text generation from what tolcli ships;
- :func:`read_data`: evaluation data files (text, records, parquet, compressed, datasets directories);
- :func:`set_threads`: torch's thread pools, as ``--threads`` sets them;
- :class:`TolcliError`: the one error type (subclasses carry the CLI exit code).
"""

__version__ = "0.1.0"

import sys
import types
from typing import TYPE_CHECKING, Any

# The public API, imported on first use (PEP 562): ``import tolcli`` (and ``tolcli --version``, ``tolcli schema``)
# loads neither torch nor h5py.
_LAZY: dict[str, str] = {
    "convert_bundle": "tolcli.bundle.convert",
    "drop_layers": "tolcli.bundle.drop",
    "Bundle": "tolcli.bundle.reader",
    "BundleSource": "tolcli.bundle.reader",
    "open_bundle": "tolcli.bundle.reader",
    "Checkpoint": "tolcli.checkpoint",
    "TensorMap": "tolcli.checkpoint",
    "open_checkpoint": "tolcli.checkpoint",
    "CompressMemo": "tolcli.compress",
    "CompressOptions": "tolcli.compress",
    "compress": "tolcli.compress",
    "ModelConfig": "tolcli.config",
    "demo_checkpoint_path": "tolcli.demo",
    "demo_heldout_path": "tolcli.demo",
    "ExitCode": "tolcli.errors",
    "TolcliError": "tolcli.errors",
    "describe_checkpoint": "tolcli.info",
    "FFNSource": "tolcli.model",
    "TableSource": "tolcli.model",
    "Transformer": "tolcli.model",
    "ZeroSource": "tolcli.model",
    "load_model": "tolcli.model",
    "EvalReport": "tolcli.evaluation",
    "eval_ppl": "tolcli.evaluation",
    "precompute": "tolcli.precompute",
    "strip_checkpoint": "tolcli.strip",
    "SweepOptions": "tolcli.sweep",
    "sweep": "tolcli.sweep",
    "read_data": "tolcli.data",
    "SamplingOptions": "tolcli.generate",
    "generate_text": "tolcli.generate",
    "KVCache": "tolcli.model",
    "set_threads": "tolcli.threads",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tolcli' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


class _Package(types.ModuleType):
    """Keeps ``tolcli.precompute`` (and ``compress``, ``sweep``) the API function once its submodule of the
    same name is imported: the import system would otherwise bind the module over the name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from tolcli.bundle.convert import convert_bundle
    from tolcli.bundle.drop import drop_layers
    from tolcli.bundle.reader import Bundle, BundleSource, open_bundle
    from tolcli.checkpoint import Checkpoint, TensorMap, open_checkpoint
    from tolcli.compress import CompressMemo, CompressOptions, compress
    from tolcli.config import ModelConfig
    from tolcli.data import read_data
    from tolcli.demo import demo_checkpoint_path, demo_heldout_path
    from tolcli.errors import ExitCode, TolcliError
    from tolcli.evaluation import EvalReport, eval_ppl
    from tolcli.generate import SamplingOptions, generate_text
    from tolcli.info import describe_checkpoint
    from tolcli.model import FFNSource, KVCache, TableSource, Transformer, ZeroSource, load_model
    from tolcli.precompute import precompute
    from tolcli.strip import strip_checkpoint
    from tolcli.sweep import SweepOptions, sweep
    from tolcli.threads import set_threads

__all__ = [
    "Bundle",
    "BundleSource",
    "Checkpoint",
    "CompressMemo",
    "CompressOptions",
    "EvalReport",
    "ExitCode",
    "FFNSource",
    "KVCache",
    "ModelConfig",
    "SamplingOptions",
    "SweepOptions",
    "TableSource",
    "TensorMap",
    "TolcliError",
    "Transformer",
    "ZeroSource",
    "__version__",
    "compress",
    "convert_bundle",
    "demo_checkpoint_path",
    "demo_heldout_path",
    "describe_checkpoint",
    "drop_layers",
    "eval_ppl",
    "generate_text",
    "load_model",
    "open_bundle",
    "open_checkpoint",
    "precompute",
    "read_data",
    "set_threads",
    "strip_checkpoint",
    "sweep",
]
