"""A transformers integration: ``TolcliConfig`` / ``TolcliForCausalLM``, registered with ``AutoConfig`` and
``AutoModelForCausalLM`` (model type ``tolcli_memoryllm``), and :func:`export_hf`, which writes a checkpoint
directory that ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` loads.

The model is tolcli's own :class:`tolcli.model.Transformer` (same modules, same canonical tensor names, so
transformers loads ``model.safetensors`` into it unchanged) with a transformers face: ``forward`` returns
``CausalLMOutputWithPast`` (and the loss when ``labels`` are given), ``generate()`` works (each step recomputes the
sequence; for fast decoding use :mod:`tolcli.generate`). The context-free FFNs are the checkpoint's own, or, for a
stripped checkpoint (or with ``tol=...``), a ToL bundle read through tolcli's bundle reader.

transformers is an optional dependency (``pip install 'tolcli[hf]'``); importing this module without it fails with
a clear error.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from tolcli.bundle.reader import open_bundle
from tolcli.checkpoint import CONFIG_NAME, ST_SINGLE, TOKENIZER_NAME, Checkpoint, open_checkpoint
from tolcli.config import ModelConfig
from tolcli.errors import UsageError
from tolcli.fsutil import atomic_dir
from tolcli.model import Transformer
from tolcli.strip import write_weights

try:
    import transformers
    from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise UsageError(
        f"the transformers integration needs transformers ({e})", hint="pip install 'tolcli[hf]'"
    ) from None

MODEL_TYPE = "tolcli_memoryllm"
MODELING_FILE = "modeling_tolcli.py"
# The keys of tolcli's own config that the transformers config carries (the rest are transformers' defaults).
_TOLCLI_KEYS = tuple(f.name for f in ModelConfig.__dataclass_fields__.values())


class TolcliConfig(PretrainedConfig):
    """A tolcli model's config.json for transformers: tolcli's keys (``tolcli_model_type`` holds memoryllm /
    flex_memoryllm / llama) plus ``tol`` (a bundle path, optional) and ``memory_norm_bias``."""

    model_type = MODEL_TYPE

    def __init__(
        self,
        tolcli_model_type: str = "memoryllm",
        tol: str | None = None,
        memory_norm_bias: bool = False,
        **kwargs: Any,
    ) -> None:
        self.tolcli_model_type = tolcli_model_type
        self.tol = tol
        self.memory_norm_bias = memory_norm_bias
        kwargs.setdefault("use_cache", False)  # generate() recomputes the sequence each step
        super().__init__(**kwargs)

    def tolcli_config(self) -> ModelConfig:
        d = self.to_dict()
        data = {k: d[k] for k in _TOLCLI_KEYS if k in d and d[k] is not None}
        data["model_type"] = self.tolcli_model_type
        if data.pop("stripped", False) or d.get("tolcli_stripped"):
            data["tolcli_stripped"] = True
        if d.get("tolcli_source_fingerprint"):
            data["tolcli_source_fingerprint"] = d["tolcli_source_fingerprint"]
        data.pop("source_fingerprint", None)
        return ModelConfig.from_dict(data, source="config.json")


class TolcliForCausalLM(PreTrainedModel, GenerationMixin):
    """tolcli's Transformer as a transformers causal LM (module docstring)."""

    config_class = TolcliConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]  # noqa: RUF012 (transformers reads these class attributes)

    def __init__(self, config: TolcliConfig) -> None:
        super().__init__(config)
        cfg = config.tolcli_config()
        self.cfg = cfg
        use_tol = cfg.stripped or config.tol is not None
        inner = Transformer(cfg, memory_ffn=not use_tol, memory_norm_bias=config.memory_norm_bias)
        self.model = inner.model
        self.lm_head = inner.lm_head
        if cfg.tie_word_embeddings:
            self._tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
        self._bundle = None
        self.post_init()

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def _init_weights(self, module: torch.nn.Module) -> None:  # weights come from the checkpoint
        pass

    def _source(self):
        if self.config.tol is None and not self.cfg.stripped:
            return None
        if self.config.tol is None:
            raise UsageError("this stripped checkpoint needs a ToL bundle: from_pretrained(DIR, tol='bundle')")
        if self._bundle is None:
            self._bundle = open_bundle(self.config.tol)
        return self._bundle.as_source()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        if input_ids is None:
            raise ValueError("input_ids are required")
        logits = Transformer.forward(self, input_ids, self._source())  # type: ignore[arg-type]
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
        return {"input_ids": input_ids}  # no cache: the whole sequence each step


def register() -> None:
    """Register the pair with ``AutoConfig`` / ``AutoModelForCausalLM`` (importing this module does it)."""
    try:
        transformers.AutoConfig.register(MODEL_TYPE, TolcliConfig)
        transformers.AutoModelForCausalLM.register(TolcliConfig, TolcliForCausalLM)
    except ValueError:  # already registered
        pass


register()


def hf_config_dict(ckpt: Checkpoint, *, tol: str | None = None) -> dict[str, Any]:
    """The config.json of an exported directory: tolcli's keys, the transformers model type and ``auto_map``."""
    d = ckpt.config.to_dict()
    tolcli_type = d.pop("model_type")
    bias = any(n.endswith("memory_layernorm.bias") for n in ckpt.tensors if ckpt.has(n))
    return {
        **d,
        "model_type": MODEL_TYPE,
        "tolcli_model_type": tolcli_type,
        "memory_norm_bias": bias,
        "tol": tol,
        "architectures": ["TolcliForCausalLM"],
        "auto_map": {
            "AutoConfig": f"{MODELING_FILE[:-3]}.TolcliConfig",
            "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.TolcliForCausalLM",
        },
    }


MODELING_SOURCE = '''"""transformers entry point of a tolcli checkpoint (written by `tolcli export-hf`).

Needs tolcli installed (`pip install tolcli`): the model is tolcli's own, read through tolcli's readers.
"""

from tolcli.hf import TolcliConfig, TolcliForCausalLM  # noqa: F401
'''


def export_hf(
    checkpoint: str | Path | Checkpoint, out: str | Path, *, tol: str | Path | None = None, force: bool = False
) -> Path:
    """Write ``out/``: the checkpoint's files (weights and tokenizer copied), a transformers ``config.json`` with
    ``auto_map`` and :data:`MODELING_FILE`, so ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)``
    loads it (with ``tol``, the bundle's absolute path is recorded; override it with ``from_pretrained(...,
    tol=...)``).

    Example:
        >>> import tempfile, pathlib
        >>> from tolcli import demo_checkpoint_path
        >>> d = export_hf(demo_checkpoint_path(), pathlib.Path(tempfile.mkdtemp()) / "hf")
        >>> sorted(p.name for p in d.iterdir())
        ['config.json', 'model.safetensors', 'modeling_tolcli.py', 'tokenizer.json']
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else open_checkpoint(checkpoint)
    if ckpt.config.stripped and tol is None:
        raise UsageError(f"{ckpt.path} is stripped: export it with the bundle it runs from (`tol`)")
    out = Path(out)
    tol_path = None if tol is None else str(Path(tol).resolve())
    names = [n for n in sorted(ckpt.tensors) if ckpt.has(n)]
    with atomic_dir(out, force=force) as tmp:
        write_weights(ckpt, names, tmp / ST_SINGLE)
        if ckpt.tokenizer_path is not None:
            shutil.copyfile(ckpt.tokenizer_path, tmp / TOKENIZER_NAME)
        config = hf_config_dict(ckpt, tol=tol_path)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / MODELING_FILE).write_text(MODELING_SOURCE)
    return out
