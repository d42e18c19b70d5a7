"""Build the shipped demo models: a small trained MemoryLLM and a llama baseline of the same shape.

Reproducible and offline: the text comes from the running Python's standard library (see
``demo_corpus.py``), the BPE tokenizer is trained with ``tokenizers``, and both models are trained on
the CPU with fixed seeds on the same token batches. Run from the repository root::

    python scripts/build_demo.py            # ~12 minutes on 2 cores

It writes ``tolcli/demo/{memoryllm,llama}/{config.json,model.safetensors,tokenizer.json}`` and
``tolcli/demo/heldout.txt`` (the held-out documents, for evaluation), then prints the figures that the
README quotes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from demo_corpus import build_corpus

from tolcli.config import ModelConfig
from tolcli.model import Transformer, ZeroSource

VOCAB = 4096
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)


def train_tokenizer(docs: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def batches(data: torch.Tensor, steps: int, batch: int, ctx: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ix = torch.randint(0, data.numel() - ctx - 1, (batch,), generator=g)
        x = torch.stack([data[i : i + ctx] for i in ix])
        y = torch.stack([data[i + 1 : i + 1 + ctx] for i in ix])
        yield x, y


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def heldout_ppl(model: Transformer, data: torch.Tensor, ctx: int, source=None) -> float:
    nll, n = 0.0, 0
    for s in range(0, data.numel() - 1, ctx):
        x = data[s : s + ctx + 1]
        if x.numel() < 2:
            break
        logits = model(x[None, :-1], source)
        nll += F.cross_entropy(logits[0].float(), x[1:], reduction="sum").item()
        n += x.numel() - 1
    return math.exp(nll / n)


def train(cfg: ModelConfig, data: torch.Tensor, held: torch.Tensor, args: argparse.Namespace) -> Transformer:
    torch.manual_seed(args.seed)
    model = Transformer(cfg, memory_norm_bias=cfg.has_memory)
    model.init_weights(std=0.02, generator=torch.Generator().manual_seed(args.seed))
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    other = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95)
    )
    t0 = time.time()
    model.train()
    for step, (x, y) in enumerate(batches(data, args.steps, args.batch, args.ctx, args.seed)):
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"  {cfg.model_type} step {step:5d} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    return model


def save(model: Transformer, cfg: ModelConfig, tok: Tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    tok.save(str(out / "tokenizer.json"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("tolcli/demo"))
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ctx", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=40)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    train_docs, held_docs = build_corpus()
    tok = train_tokenizer(train_docs)
    data = torch.tensor(tok.encode("\n\n".join(train_docs)).ids, dtype=torch.long)
    held_text = "\n\n".join(held_docs) + "\n"
    held = torch.tensor(tok.encode(held_text).ids, dtype=torch.long)
    print(f"train tokens {data.numel()}, held-out tokens {held.numel()}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "heldout.txt").write_text(held_text, encoding="utf-8")

    for mt in ("memoryllm", "llama"):
        extra = {"memory_norm_type": "layernorm", "ffn_alpha": 1.0} if mt == "memoryllm" else {}
        cfg = ModelConfig.from_dict({"model_type": mt, **SHAPE, **extra})
        model = train(cfg, data, held, args)
        model.half().float()  # evaluate the weights exactly as they are shipped
        save(model, cfg, tok, args.out / mt)
        ppl = heldout_ppl(model, held, args.ctx)
        line = f"{mt}: held-out ppl {ppl:.3f}"
        if cfg.has_memory:
            line += f", with FFN memory zeroed {heldout_ppl(model, held, args.ctx, ZeroSource()):.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
