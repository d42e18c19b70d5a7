"""lm-evaluation-harness runs tolcli models: a tiny multiple-choice task and a rolling-perplexity task built in the
test (local json files, no downloads), checked against computations the test makes itself."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import require
from tolcli import demo_checkpoint_path, demo_heldout_path, eval_ppl, load_model, open_checkpoint, precompute
from tolcli.text import load_tokenizer

QUESTIONS = [
    {"question": "def main", "choices": ["():", " the", " and"], "answer": 0},
    {"question": "The value of the", "choices": [" function", "((((", " 7"], "answer": 0},
    {"question": "import", "choices": [" os", " zz", "!!"], "answer": 1},
    {"question": "return", "choices": [" None", " self", " x"], "answer": 2},
]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict[str, Path]:
    require("lm_eval")
    d = tmp_path_factory.mktemp("lmeval")
    (d / "mc.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    paragraphs = [p for p in demo_heldout_path().read_text().split("\n\n") if p.strip()][:3]
    (d / "ppl.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    (d / "tolcli_tiny_mc.yaml").write_text(
        textwrap.dedent(
            f"""\
            task: tolcli_tiny_mc
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {d / "mc.jsonl"}
            test_split: test
            output_type: multiple_choice
            doc_to_text: "{{{{question}}}}"
            doc_to_choice: "{{{{choices}}}}"
            doc_to_target: answer
            target_delimiter: ""
            metric_list:
              - metric: acc
            """
        )
    )
    (d / "tolcli_tiny_ppl.yaml").write_text(
        textwrap.dedent(
            f"""\
            task: tolcli_tiny_ppl
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {d / "ppl.jsonl"}
            test_split: test
            output_type: loglikelihood_rolling
            doc_to_text: ""
            doc_to_target: "{{{{text}}}}"
            metric_list:
              - metric: word_perplexity
              - metric: byte_perplexity
              - metric: bits_per_byte
            """
        )
    )
    return {"dir": d, "ppl": d / "ppl.jsonl"}


def _evaluate(task_dir: Path, task: str, model_args: str) -> dict:
    lm_eval = require("lm_eval")
    from lm_eval.tasks import TaskManager

    import tolcli.lm_eval_adapter  # noqa: F401  (registers the "tolcli" model type)

    out = lm_eval.simple_evaluate(
        model="tolcli", model_args=model_args, tasks=[task], task_manager=TaskManager(include_path=str(task_dir))
    )
    return out["results"][task]


def _choice_logprob(model, tok, question: str, choice: str) -> float:
    """Brute force: encode question + choice whole, score the tokens after the question's."""
    q = tok.encode(question).ids
    whole = tok.encode(question + choice).ids
    assert whole[: len(q)] == q
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([whole]))[0].float(), dim=-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(q), len(whole)))


def test_multiple_choice_accuracy_matches_brute_force(tasks) -> None:
    ckpt = open_checkpoint(demo_checkpoint_path())
    model, tok = load_model(ckpt), load_tokenizer(ckpt.tokenizer_path)
    picks = [
        max(range(3), key=lambda c, q=q: _choice_logprob(model, tok, q["question"], q["choices"][c])) for q in QUESTIONS
    ]
    want = sum(p == q["answer"] for p, q in zip(picks, QUESTIONS, strict=True)) / len(QUESTIONS)
    got = _evaluate(tasks["dir"], "tolcli_tiny_mc", "checkpoint=demo,max_length=256")
    assert got["acc,none"] == pytest.approx(want)


def test_rolling_perplexity_matches_eval_ppl_lm_eval_protocol(tasks, tmp_path: Path) -> None:
    # Expected: tolcli's lm-eval-rolling protocol (tested against lm-eval's own window functions) over the same
    # documents; word and byte counts as lm-eval's wikitext task defines them.
    report = eval_ppl(demo_checkpoint_path(), [tasks["ppl"]], protocol="lm-eval-rolling", ctx=128)
    v = report.variants[0]
    got = _evaluate(tasks["dir"], "tolcli_tiny_ppl", "checkpoint=demo,max_length=128")
    assert got["word_perplexity,none"] == pytest.approx(v["word_perplexity"], rel=1e-6)
    assert got["bits_per_byte,none"] == pytest.approx(v["bits_per_byte"], rel=1e-6)
    # a dense fp32 bundle in place of the FFNs gives the same numbers (to the precision of its rows)
    dense = precompute(demo_checkpoint_path(), tmp_path / "dense.safetensors", dtype="fp32").path
    with_tol = _evaluate(tasks["dir"], "tolcli_tiny_ppl", f"checkpoint=demo,tol={dense},max_length=128")
    assert with_tol["word_perplexity,none"] == pytest.approx(v["word_perplexity"], rel=1e-5)
    assert math.isfinite(with_tol["byte_perplexity,none"])
