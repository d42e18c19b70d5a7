"""An lm-evaluation-harness model type, ``tolcli``: any harness task with a tolcli checkpoint, optionally running its
context-free FFNs from a ToL bundle (``pip install 'tolcli[lm-eval]'``).

    python -m tolcli.lm_eval_adapter --model tolcli --model_args checkpoint=./stripped,tol=int4.safetensors \\
        --tasks hellaswag --batch_size 1

(the module registers the model type, then runs lm-eval's own command line), or from Python
``lm_eval.simple_evaluate(model="tolcli", model_args="checkpoint=...,tol=...", tasks=[...])`` after
``import tolcli.lm_eval_adapter``.

``model_args``: ``checkpoint`` (a path, ``demo`` or a Hub id in the local cache), ``tol`` (a bundle; required for a
stripped checkpoint), ``max_length`` (default: the model's ``max_position_embeddings``), ``device`` (``auto``),
``allow_source_mismatch``. The three request types follow lm-eval's HFLM for causal models: ``loglikelihood``
scores the continuation on ``(context + continuation)[-(max_length + 1):][:-1]``; ``loglikelihood_rolling`` uses
tolcli's ``lm-eval-rolling`` protocol (:mod:`tolcli.scoring`, tested against lm-eval's own window functions);
``generate_until`` decodes greedily with the KV cache (:mod:`tolcli.generate`) and cuts at the first stop string.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tolcli.bundle.reader import open_bundle
from tolcli.checkpoint import open_checkpoint
from tolcli.demo import resolve_checkpoint_arg
from tolcli.errors import UsageError
from tolcli.generate import SamplingOptions, bundle_step_source, generate
from tolcli.model import load_model
from tolcli.pairing import check_pairing
from tolcli.precompute import resolve_device
from tolcli.scoring import make_plan, score_plan
from tolcli.streams import special_tokens
from tolcli.text import load_tokenizer

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - only without the extra
    raise UsageError(
        f"the lm-evaluation-harness adapter needs lm-eval ({e})", hint="pip install 'tolcli[lm-eval]'"
    ) from None


def _flag(value: Any) -> bool:
    return value in (True, "true", "True", "1", 1)


@register_model("tolcli")
class TolcliLM(TemplateLM):
    """tolcli's model (and bundle) behind lm-eval's ``LM`` interface (module docstring)."""

    backend = "causal"

    def __init__(
        self,
        checkpoint: str = "demo",
        tol: str | None = None,
        max_length: int | str | None = None,
        device: str = "auto",
        allow_source_mismatch: Any = False,
        batch_size: Any = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        ckpt = open_checkpoint(resolve_checkpoint_arg(checkpoint))
        self.bundle = None if not tol else open_bundle(tol)
        if self.bundle is not None:
            check_pairing(ckpt, self.bundle, allow_mismatch=_flag(allow_source_mismatch))
        elif ckpt.config.stripped:
            raise UsageError(f"{ckpt.path} is stripped: pass tol=BUNDLE in model_args")
        if ckpt.tokenizer_path is not None:
            self.tokenizer = load_tokenizer(ckpt.tokenizer_path)
        elif self.bundle is not None and self.bundle.tokenizer() is not None:
            self.tokenizer = self.bundle.tokenizer()
        else:
            raise UsageError("no tokenizer: the checkpoint has no tokenizer.json and the bundle embeds none")
        self.dev = resolve_device(device)
        self.model = load_model(ckpt, device=self.dev, memory_ffn=self.bundle is None)
        self.source = None if self.bundle is None else self.bundle.as_source()
        self.specials = special_tokens(ckpt.config, self.tokenizer)
        self.max_length = int(max_length or ckpt.config.max_position_embeddings)
        if self.specials.eos is None and self.specials.bos is None:
            raise UsageError("lm-eval needs an EOS or BOS token id: set eos_token_id in config.json")

    # ---- tokens ----------------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.specials.eos if self.specials.eos is not None else self.specials.bos  # type: ignore[return-value]

    @property
    def prefix_token_id(self) -> int:
        return self.specials.bos if self.specials.bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        special = True if add_special_tokens is None else bool(add_special_tokens)
        return self.tokenizer.encode(string, add_special_tokens=special).ids

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens)

    # ---- requests --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        out = []
        for _, context_enc, continuation_enc in requests:
            whole = (context_enc + continuation_enc)[-(self.max_length + 1) :]
            inp = torch.tensor([whole[:-1]], device=self.dev)
            n = len(continuation_enc)
            logp = F.log_softmax(self.model(inp, self.source)[0, -n:].float(), dim=-1)
            cont = torch.tensor(continuation_enc, device=self.dev)
            ll = float(logp.gather(1, cont[:, None]).double().sum())
            greedy = bool((logp.argmax(-1) == cont).all())
            out.append((ll, greedy))
            self.cache_hook.add_partial("loglikelihood", None, (ll, greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (string,) in [r.args for r in requests]:
            ids = torch.tensor(self.tok_encode(string), dtype=torch.long)
            if ids.numel() == 0:
                out.append(0.0)
                continue
            plan = make_plan("lm-eval-rolling", [ids], ctx=self.max_length, specials=self.specials)
            stats = score_plan(self.model, plan, [("model", self.source)], batch_size=1)[0]
            out.append(-stats.nll_sum)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in [r.args for r in requests]:
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            n = int(gen_kwargs.get("max_gen_toks", 256))
            ids = self.tok_encode(context)[-(self.max_length - n) :]
            source = None if self.bundle is None else bundle_step_source(self.bundle)
            opts = SamplingOptions(max_new_tokens=n, stop_ids=(self.eot_token_id,))
            text = self.tok_decode(generate(self.model, ids, source=source, options=opts).new_ids)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out


def main() -> None:
    """``python -m tolcli.lm_eval_adapter ...``: lm-eval's command line with the ``tolcli`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
