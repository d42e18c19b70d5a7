"""Independent references for eval-ppl's scoring protocols, each transcribed from the other tool's own source.

Nothing here imports tolcli: these are the expectations that ``tests/test_protocols.py`` holds tolcli to.

- Hugging Face, ``docs/source/en/perplexity.md`` (transformers 052b1dcd): the strided sliding-window loop.
- EleutherAI lm-evaluation-harness (4e7e0d47, v0.4.12+48): ``lm_eval/utils.py`` ``get_rolling_token_windows`` and
  ``make_disjoint_window``; ``lm_eval/models/huggingface.py`` ``loglikelihood_rolling`` and ``_loglikelihood_tokens``
  (causal backend, one request per forward, no padding); ``lm_eval/tasks/wikitext/preprocess_wikitext.py``
  ``process_results``; ``lm_eval/api/metrics.py`` ``weighted_perplexity`` and ``bits_per_byte``.
- ggml-org/llama.cpp (050fc7f3), ``tools/perplexity/perplexity.cpp``: ``perplexity()`` (the ``ppl_stride <= 0``
  path) and the statistics of ``kl_divergence()`` (``mean_and_uncertainty``, median, ``percentile``, same top).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# A causal LM as a function: token ids (T,) -> next-token logits (T, V), in fp32 as the model computes them.
LogitsFn = Callable[[Sequence[int]], torch.Tensor]


def hf_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """A transformers ``*ForCausalLM`` as a :data:`LogitsFn` (one unpadded sequence per forward)."""

    def run(ids: Sequence[int]) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=torch.tensor([list(ids)], dtype=torch.long)).logits[0]

    return run


def log_probs(logits_fn: LogitsFn, ids: Sequence[int]) -> torch.Tensor:
    """log-softmax of the model's logits, in float64: (T, V)."""
    return F.log_softmax(logits_fn(ids).double(), dim=-1)


# ==== Hugging Face: "Perplexity of fixed-length models" ==========================================================
@dataclass(frozen=True)
class GuideResult:
    """The guide's accumulators after its loop, and ``n_targets``: how many labels its losses average over (the
    valid labels after the model's internal shift; each window's loss is then weighted by ``num_valid - 1``)."""

    nll_sum: float
    n_tokens: int
    n_targets: int

    @property
    def avg_nll(self) -> float:
        return self.nll_sum / self.n_tokens

    @property
    def ppl(self) -> float:
        return math.exp(self.avg_nll)


def hf_guide(model: torch.nn.Module, ids: Sequence[int], max_length: int, stride: int) -> GuideResult:
    """The guide's loop, as published (``model(input_ids, labels=target_ids).loss``; tqdm and device removed)."""
    input_ids_all = torch.tensor([list(ids)], dtype=torch.long)
    seq_len = input_ids_all.size(1)
    nll_sum = 0.0
    n_tokens = 0
    n_targets = 0  # not in the guide: what CrossEntropyLoss averages over
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = input_ids_all[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
            neg_log_likelihood = outputs.loss
        num_valid_tokens = (target_ids != -100).sum().item()  # number of valid tokens in target_ids
        batch_size = target_ids.size(0)
        num_loss_tokens = num_valid_tokens - batch_size  # subtract batch_size due to internal label shift
        nll_sum += float(neg_log_likelihood) * num_loss_tokens
        n_tokens += num_loss_tokens
        n_targets += int((target_ids[:, 1:] != -100).sum())
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return GuideResult(nll_sum, n_tokens, n_targets)


# ==== lm-evaluation-harness: loglikelihood_rolling ================================================================
def get_rolling_token_windows(
    token_list: list[int], prefix_token: int, max_seq_len: int, context_len: int
) -> Iterable[tuple[list[int], list[int]]]:
    """``lm_eval.utils.get_rolling_token_windows``, verbatim."""
    assert 1 <= context_len <= max_seq_len
    if not token_list:
        return
    # +1 offset, going from input->preds
    pred_len = max_seq_len - context_len + 1
    predicted = 0

    # Special handling for first window: predict all tokens
    first_seq_len = min(max_seq_len, len(token_list))
    yield [prefix_token] + token_list[: first_seq_len - 1], token_list[:first_seq_len]  # noqa: RUF005 (verbatim)
    predicted += first_seq_len

    while predicted < len(token_list):
        window_pred_len = min(len(token_list) - predicted, pred_len)
        window_end = predicted + window_pred_len

        yield (
            token_list[window_end - max_seq_len - 1 : window_end - 1],
            token_list[window_end - window_pred_len : window_end],
        )
        predicted += window_pred_len


def make_disjoint_window(pair: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    """``lm_eval.utils.make_disjoint_window``, verbatim."""
    a, b = pair
    return a[: len(a) - (len(b) - 1)], b


def lm_eval_loglikelihood(
    logits_fn: LogitsFn, context_enc: list[int], continuation_enc: list[int], max_length: int
) -> list[float]:
    """``HFLM._loglikelihood_tokens`` for one (context, continuation) request, causal backend: the per-token
    log-likelihoods of the continuation (lm-eval sums them)."""
    assert len(context_enc) > 0 and 0 < len(continuation_enc) <= max_length
    inp = (context_enc + continuation_enc)[-(max_length + 1) :][:-1]
    inplen, contlen = len(inp), len(continuation_enc)
    logits = log_probs(logits_fn, inp)[inplen - contlen : inplen]  # _select_cont_toks
    cont = torch.tensor(continuation_enc, dtype=torch.long)
    return torch.gather(logits, 1, cont[:, None])[:, 0].tolist()


def lm_eval_rolling(logits_fn: LogitsFn, tokens: list[int], prefix_token: int, max_length: int) -> list[float]:
    """``HFLM.loglikelihood_rolling`` for one document: the log-likelihood of every token (their sum is lm-eval's
    result for the request)."""
    windows = map(make_disjoint_window, get_rolling_token_windows(tokens, prefix_token, max_length, 1))
    return [ll for ctx, cont in windows for ll in lm_eval_loglikelihood(logits_fn, ctx, cont, max_length)]


def wikitext_counts(doc: str) -> tuple[int, int]:
    """``process_results`` of lm-eval's wikitext task: (words, bytes) of the original document."""
    return len(re.split(r"\s+", doc)), len(doc.encode("utf-8"))


def weighted_mean(items: Sequence[tuple[float, int]]) -> float:
    """``lm_eval.api.metrics.weighted_mean``."""
    a, b = zip(*items, strict=True)
    return sum(a) / sum(b)


def weighted_perplexity(items: Sequence[tuple[float, int]]) -> float:
    """``lm_eval.api.metrics.weighted_perplexity`` (word_perplexity, byte_perplexity)."""
    return math.exp(-weighted_mean(items))


def bits_per_byte(items: Sequence[tuple[float, int]]) -> float:
    """``lm_eval.api.metrics.bits_per_byte``."""
    return -weighted_mean(items) / math.log(2)


# ==== llama.cpp: perplexity() ======================================================================================
@dataclass(frozen=True)
class LlamaCppResult:
    """``perplexity()``'s final estimate: ``PPL = ppl +/- unc`` over ``len(nlls)`` scored tokens."""

    ppl: float
    unc: float
    nlls: list[float]


def llama_cpp_perplexity(
    logits_fn: LogitsFn, tokens: list[int], n_ctx: int, *, add_bos: bool = False, bos: int | None = None
) -> LlamaCppResult | None:
    """``perplexity()`` with ``n_seq = 1`` (``n_batch == n_ctx``); ``None`` where it refuses (fewer than
    ``2*n_ctx`` tokens). ``tokens`` is ``common_tokenize(ctx, prompt, true)``: the file's text as one prompt."""
    if len(tokens) < 2 * n_ctx:
        return None  # "you need at least %d tokens to evaluate perplexity with a context of %d"
    n_chunk = len(tokens) // n_ctx
    first = n_ctx // 2
    nlls: list[float] = []
    for i in range(n_chunk):
        start = i * n_ctx
        chunk = tokens[start : start + n_ctx]
        if add_bos:  # "add BOS token for the first batch of each chunk"
            chunk = [bos, *chunk[1:]]
        logits = logits_fn(chunk).double()
        for j in range(first, n_ctx - 1):  # process_logits(..., tokens + start + first, n_ctx - 1 - first)
            row, tok = logits[j], tokens[start + j + 1]
            max_logit = float(row.max())
            nlls.append(max_logit + math.log(float(torch.exp(row - max_logit).sum())) - float(row[tok]))
    count = len(nlls)
    nll = sum(nlls) / count
    nll2 = sum(v * v for v in nlls) / count - nll * nll
    ppl = math.exp(nll)
    return LlamaCppResult(ppl, math.sqrt(nll2 / (count - 1)) * ppl, nlls)


# ==== llama.cpp: kl_divergence() statistics =======================================================================
def mean_and_uncertainty(values: Sequence[float]) -> tuple[float, float]:
    """``mean_and_uncertainty`` of ``kl_divergence()``: the mean and sqrt((E[x^2] - E[x]^2) / (n - 1)).

    Computed here in two passes (sum of squared deviations / (n (n - 1))), the same quantity without cancellation."""
    n = len(values)
    mean = math.fsum(values) / n
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n * (n - 1)))


def median(values: Sequence[float]) -> float:
    """``kld_median``: the middle value, or the mean of the two middle values."""
    s = sorted(values)
    n = len(s)
    return 0.5 * (s[n // 2] + s[n // 2 - 1]) if n % 2 == 0 else s[n // 2]


def percentile(values: Sequence[float], fraction: float) -> float:
    """``percentile`` of ``kl_divergence()`` (linear interpolation at ``fraction * (n - 1)``), in double."""
    s = sorted(values)
    if fraction <= 0:
        return s[0]
    if fraction >= 1:
        return s[-1]
    p = fraction * (len(s) - 1)
    ip = int(p)
    p -= ip
    return (1 - p) * s[ip] + p * s[min(ip + 1, len(s) - 1)]


def same_top_uncertainty(p: float, count: int) -> float:
    """``p_top_unc = sqrt(p_top_val*(1 - p_top_val)/(kld.count - 1))``."""
    return math.sqrt(p * (1 - p) / (count - 1))


def kl_rows(ref_logp: torch.Tensor, var_logp: torch.Tensor) -> list[float]:
    """Per-row KL(reference || variant) = sum_v p_ref(v) (log p_ref(v) - log p_var(v)), nats, float64."""
    return (ref_logp.exp() * (ref_logp - var_logp)).sum(-1).tolist()
