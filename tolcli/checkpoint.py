"""Read model checkpoints lazily and strictly.

Accepted forms (``docs/checkpoint-format.md``):

- a directory with ``config.json`` and one of ``model.safetensors``,
  ``model.safetensors.index.json`` (+ shards), ``pytorch_model.bin``, ``pytorch_model.bin.index.json``
  (+ shards), or a single ``*.safetensors`` / ``*.pt`` / ``*.bin`` file;
- a weights file directly, with ``config.json`` beside it.

Nothing is loaded when a checkpoint is opened: only headers are read, every tensor's name, shape and
dtype are checked against the layout, and a tensor is read when a command asks for it. Torch pickles are
read with ``weights_only=True`` (and ``mmap=True``), so a pickle that would run code is refused.

Every file of a checkpoint directory (``config.json``, ``tokenizer.json``, the weights and their index) must be a
regular file inside that directory: a symlink that resolves elsewhere (``tokenizer.json -> ~/.ssh/id_rsa``) is
refused before it is read, so nothing outside the checkpoint can end up embedded in a bundle. ``tokenizer.json`` is
validated when the checkpoint is opened (at most :data:`~tolcli.bundle.spec.MAX_TOKENIZER_BYTES`, UTF-8, and it must
load with ``tokenizers``), before any command embeds or uses it. JSON files are read with :mod:`tolcli.jsonsafe`.
"""

from __future__ import annotations

import pickle
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tolcli.bundle.spec import MAX_HEADER_BYTES, MAX_TOKENIZER_BYTES
from tolcli.bundle.st_format import not_safetensors_reason
from tolcli.config import ModelConfig
from tolcli.errors import CheckpointError
from tolcli.hub import link_root
from tolcli.jsonsafe import cut, inside, load_file, loads, plain_file_name, read_bytes, regular_file, short
from tolcli.layout import IGNORED_SUFFIXES, LM_HEAD, TensorSpec, expected_tensors

CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"
ST_SINGLE = "model.safetensors"
ST_INDEX = "model.safetensors.index.json"
PT_SINGLE = "pytorch_model.bin"
PT_INDEX = "pytorch_model.bin.index.json"
MAX_INDEX_BYTES = 64 << 20
MAX_TENSOR_MAP_BYTES = 16 << 20

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class StoredTensor:
    """Where a canonical tensor lives: file, name inside the file, shape and dtype."""

    file: Path
    source_name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class TensorMap:
    """Renames foreign tensor names to canonical ones (``--tensor-map FILE.json``).

    JSON form::

        {"names": {"transformer.wte.weight": "model.embed_tokens.weight"},
         "patterns": [{"match": "^transformer\\\\.h\\\\.(\\\\d+)\\\\.ln_1\\\\.weight$",
                       "replace": "model.layers.\\\\1.input_layernorm.weight"}],
         "ignore": ["^transformer\\\\.h\\\\.\\\\d+\\\\.attn\\\\.masked_bias$"]}

    ``names`` is tried first, then the first ``patterns`` entry whose regex matches the whole name;
    names matching ``ignore`` are skipped; anything else keeps its name.
    """

    def __init__(
        self, names: dict[str, str], patterns: list[tuple[re.Pattern[str], str]], ignore: list[re.Pattern[str]]
    ):
        self.names, self.patterns, self.ignore = names, patterns, ignore

    @classmethod
    def from_file(cls, path: str | Path) -> TensorMap:
        path = Path(path)
        data = load_file(
            path,
            what="cannot read tensor map",
            max_bytes=MAX_TENSOR_MAP_BYTES,
            error=CheckpointError,
            label="tensor map",
        )
        if not isinstance(data, dict) or set(data) - {"names", "patterns", "ignore"}:
            raise CheckpointError('tensor map must be an object with keys "names", "patterns", "ignore"', path=path)
        names = data.get("names", {})
        if not isinstance(names, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
            raise CheckpointError('"names" must map strings to strings', path=path)
        patterns: list[tuple[re.Pattern[str], str]] = []
        for j, item in enumerate(data.get("patterns", [])):
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("match"), str)
                or not isinstance(item.get("replace"), str)
            ):
                raise CheckpointError(f'patterns[{j}] must be {{"match": regex, "replace": template}}', path=path)
            patterns.append((_compile(item["match"], path), item["replace"]))
        ignore = [_compile(r, path) for r in data.get("ignore", []) if isinstance(r, str)]
        return cls(names, patterns, ignore)

    def apply(self, name: str) -> str | None:
        """Canonical name for ``name``, or None when it is ignored."""
        if name in self.names:
            return self.names[name]
        if any(r.fullmatch(name) for r in self.ignore):
            return None
        for regex, template in self.patterns:
            m = regex.fullmatch(name)
            if m:
                return m.expand(template)
        return name


def _compile(regex: str, path: Path) -> re.Pattern[str]:
    try:
        return re.compile(regex)
    except re.error as e:
        raise CheckpointError(f"invalid regex {short(regex, 120)}: {e}", path=path) from None


def _check_safetensors_header(path: Path) -> None:
    """The JSON header of a safetensors weights file through the hardened loader before the safetensors library
    parses it (no repeated tensor names, NaN, huge integers or deep nesting). A file that is not safetensors at all
    is left to ``safe_open``, whose failure is explained by :func:`not_safetensors_reason`."""
    size = regular_file(path, what="weights file", error=CheckpointError).st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return
        (n,) = struct.unpack("<Q", head)
        if not 2 <= n <= MAX_HEADER_BYTES or 8 + n > size or f.read(1) != b"{":
            return
        f.seek(8)
        raw = f.read(n)
    loads(raw, path=path, what="corrupted safetensors header", max_bytes=MAX_HEADER_BYTES, error=CheckpointError)


class _SafetensorsFile:
    def __init__(self, path: Path):
        self.path = path
        _check_safetensors_header(path)
        try:
            self.handle = safe_open(str(path), framework="pt", device="cpu")
        except FileNotFoundError:
            raise CheckpointError("weights file not found", path=path) from None
        except Exception as e:  # safetensors raises its own error types for bad headers
            with open(path, "rb") as f:
                reason = not_safetensors_reason(f.read(64))
            raise CheckpointError(
                reason or f"not a readable safetensors file ({cut(str(e), 200)})",
                path=path,
                hint="check that the download completed",
            ) from None

    def entries(self) -> dict[str, tuple[tuple[int, ...], str]]:
        out = {}
        for name in self.handle.keys():  # noqa: SIM118 - a safe_open handle, not a dict
            sl = self.handle.get_slice(name)
            out[name] = (tuple(sl.get_shape()), sl.get_dtype())
        return out

    def get(self, name: str) -> torch.Tensor:
        return self.handle.get_tensor(name)


class _TorchFile:
    def __init__(self, path: Path):
        self.path = path
        self.state = _torch_load(path)

    def entries(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {k: (tuple(v.shape), v.dtype) for k, v in self.state.items()}

    def get(self, name: str) -> torch.Tensor:
        return self.state[name]


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except FileNotFoundError:
        raise CheckpointError("weights file not found", path=path) from None
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unsupported content"
        raise CheckpointError(
            f"refused to load: the pickle holds more than tensors ({first})",
            path=path,
            hint="tolcli loads torch files with weights_only=True; convert the checkpoint to safetensors",
        ) from None
    except Exception as e:
        raise CheckpointError(
            f"not a readable torch file ({type(e).__name__}: {cut(str(e), 200)})", path=path
        ) from None
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model"):
        obj = next(iter(obj.values()))
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError("expected a state dict (a mapping of names to tensors)", path=path)
    return obj


def _read_index(path: Path) -> dict[str, str]:
    data = load_file(
        path, what="malformed index", max_bytes=MAX_INDEX_BYTES, error=CheckpointError, label="checkpoint index"
    )
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError('malformed index: missing or empty "weight_map" object', path=path)
    for name, file in wm.items():
        if not plain_file_name(file):
            raise CheckpointError(
                f"malformed index: tensor {short(name, 120)} maps to {short(file, 120)}, "
                "expected a file name in the same directory",
                path=path,
            )
    return wm


def _contained(f: Path, directory: Path, what: str) -> Path:
    """``f``, refused when it (or a link it is) leaves ``directory``."""
    inside(f, directory, what=what, error=CheckpointError)
    return f


def _read_tokenizer(path: Path, directory: Path) -> bytes:
    """``tokenizer.json``'s bytes, validated: inside the checkpoint, a regular file of bounded size, UTF-8, and a
    tokenizer that ``tokenizers`` loads (anything else would be embedded in bundles and used to read text)."""
    from tokenizers import Tokenizer

    _contained(path, directory, "tokenizer")
    raw = read_bytes(path, max_bytes=MAX_TOKENIZER_BYTES, what="tokenizer", error=CheckpointError)
    try:
        Tokenizer.from_str(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"tokenizer is not UTF-8 ({e.reason} at byte {e.start})", path=path) from None
    except Exception as e:  # tokenizers raises its own exception types
        raise CheckpointError(
            f"not a tokenizers tokenizer ({cut(str(e), 200)})",
            path=path,
            hint="expected a Hugging Face tokenizer.json; remove it to precompute without a tokenizer",
        ) from None
    return raw


def _find_weights(directory: Path, root: Path) -> tuple[list[Path], Path | None]:
    """The weight files of a checkpoint directory, and the index that lists them (if sharded); every one a regular
    file that resolves inside ``root`` (the directory, or a Hugging Face cache snapshot's repo folder)."""
    for index_name in (ST_INDEX, PT_INDEX):
        index = directory / index_name
        if index.is_file() or index.is_symlink():
            _contained(index, root, "index")
            files = sorted({directory / f for f in _read_index(index).values()})
            for f in files:
                _contained(f, root, "shard")
                if not f.exists():
                    raise CheckpointError(f"shard {f.name} listed in {index_name} is missing", path=index)
                regular_file(f, what=f"shard {f.name}", error=CheckpointError)
            return files, index
    for single in (ST_SINGLE, PT_SINGLE):
        if (directory / single).is_file() or (directory / single).is_symlink():
            _contained(directory / single, root, "weights file")
            regular_file(directory / single, what="weights file", error=CheckpointError)
            return [directory / single], None
    candidates = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".pt", ".bin") and p.is_file())
    if len(candidates) == 1:
        return [_contained(candidates[0], root, "weights file")], None
    if not candidates:
        raise CheckpointError(
            "no weights found",
            path=directory,
            hint=f"expected {ST_SINGLE}, {ST_INDEX} with shards, {PT_SINGLE}, or one *.safetensors/*.pt file",
        )
    raise CheckpointError(
        f"several weight files ({', '.join(p.name for p in candidates[:4])}) and no index",
        path=directory,
        hint=f"add {ST_INDEX} or keep one weights file",
    )


class Checkpoint:
    """A validated, lazily read checkpoint.

    Opening reads ``config.json`` and the weight headers, maps names (``tensor_map``), and checks every
    tensor's shape and dtype against the canonical layout. Tensors are read by :meth:`load`;
    :attr:`loaded` records which names were read.
    """

    def __init__(self, path: str | Path, *, tensor_map: TensorMap | None = None, config: ModelConfig | None = None):
        path = Path(path)
        if not path.exists():
            raise CheckpointError("checkpoint not found", path=path)
        self.path = path
        self.directory = path if path.is_dir() else path.parent
        root = link_root(self.directory)  # a Hugging Face cache snapshot's files link into its repo folder's blobs/
        if config is None:
            _contained(self.directory / CONFIG_NAME, root, "config")
        self.config = config or ModelConfig.from_file(self.directory / CONFIG_NAME)
        tok = self.directory / TOKENIZER_NAME
        self.tokenizer_path: Path | None = None
        self.tokenizer_bytes: bytes | None = None  # validated (see _read_tokenizer)
        if tok.exists() or tok.is_symlink():
            self.tokenizer_bytes = _read_tokenizer(tok, root)
            self.tokenizer_path = tok
        if path.is_dir():
            self.files, self.index_path = _find_weights(path, root)
        else:
            self.files, self.index_path = [path], None
        self.loaded: list[str] = []
        self._handles: dict[Path, _SafetensorsFile | _TorchFile] = {}
        self.tensors: dict[str, StoredTensor] = {}
        self.specs: dict[str, TensorSpec] = expected_tensors(self.config)
        self._scan(tensor_map)

    # ---- opening ---------------------------------------------------------------------------------
    def _handle(self, f: Path) -> _SafetensorsFile | _TorchFile:
        if f not in self._handles:
            self._handles[f] = _SafetensorsFile(f) if f.suffix == ".safetensors" else _TorchFile(f)
        return self._handles[f]

    def _scan(self, tensor_map: TensorMap | None) -> None:
        index = _read_index(self.index_path) if self.index_path else None
        for f in self.files:
            for src, (shape, dt) in self._handle(f).entries().items():
                dtype = SAFETENSORS_DTYPES.get(dt) if isinstance(dt, str) else dt
                if src.endswith(IGNORED_SUFFIXES):
                    continue
                name = tensor_map.apply(src) if tensor_map else src
                if name is None:
                    continue
                if index is not None and index.get(src) != f.name:
                    raise CheckpointError(
                        f"tensor {src!r} is in {f.name} but the index says {index.get(src)!r}", path=self.index_path
                    )
                if name in self.tensors:
                    other = self.tensors[name]
                    raise CheckpointError(
                        f"tensor {name!r} appears twice ({other.file.name}:{other.source_name} and {f.name}:{src})",
                        path=f,
                    )
                if dtype not in FLOAT_DTYPES:
                    raise CheckpointError(f"tensor {src!r} has dtype {dt}; expected fp32, fp16 or bf16", path=f)
                spec = self.specs.get(name)
                if spec is None:
                    raise CheckpointError(
                        f"unexpected tensor {src!r}"
                        + (f" (mapped to {name!r})" if name != src else "")
                        + f" for model_type {self.config.model_type}",
                        path=f,
                        hint="rename it with --tensor-map FILE.json (see docs/checkpoint-format.md)",
                    )
                if shape != spec.shape:
                    raise CheckpointError(
                        f"tensor {src!r} has shape {list(shape)}, expected {list(spec.shape)} from config.json",
                        path=f,
                    )
                self.tensors[name] = StoredTensor(f, src, shape, dtype)  # type: ignore[arg-type]
        if index is not None:
            found = {t.source_name for t in self.tensors.values()}
            lost = [n for n in index if n not in found and not n.endswith(IGNORED_SUFFIXES)]
            if lost and tensor_map is None:
                raise CheckpointError(f"index lists {lost[0]!r} but no shard holds it", path=self.index_path)
        for spec in self.specs.values():
            if not spec.optional and spec.name not in self.tensors:
                raise CheckpointError(
                    f"missing tensor {spec.name!r} (shape {list(spec.shape)})",
                    path=self.files[0] if len(self.files) == 1 else self.directory,
                    hint="is model_type right, and are all shards present?",
                )

    # ---- access ------------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.tensors and not (name == LM_HEAD and self.config.tie_word_embeddings)

    def load(
        self, name: str, *, dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu"
    ) -> torch.Tensor:
        """Read one tensor by canonical name, cast to ``dtype`` (None keeps the stored dtype)."""
        st = self.tensors.get(name)
        if st is None:
            raise CheckpointError(f"missing tensor {name!r}", path=self.directory)
        t = self._handle(st.file).get(st.source_name)
        self.loaded.append(name)
        return t.to(device=device, dtype=dtype or t.dtype)

    def total_bytes(self) -> int:
        return sum(t.dtype.itemsize * _numel(t.shape) for t in self.tensors.values())

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def open_checkpoint(path: str | Path, *, tensor_map: str | Path | TensorMap | None = None) -> Checkpoint:
    """Open and validate a checkpoint (directory or weights file); see :class:`Checkpoint`.

    Example:
        >>> from tolcli import open_checkpoint, demo_checkpoint_path
        >>> ckpt = open_checkpoint(demo_checkpoint_path("memoryllm"))
        >>> ckpt.config.model_type, ckpt.config.num_hidden_layers
        ('memoryllm', 6)
    """
    tm = TensorMap.from_file(tensor_map) if isinstance(tensor_map, (str, Path)) else tensor_map
    return Checkpoint(path, tensor_map=tm)
