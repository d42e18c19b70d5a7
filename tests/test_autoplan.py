"""``compress --scheme auto --budget B``: the choice against brute force, the measured errors against an
independent encode, the written bundle against the plan, and the CLI."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tolcli import CompressOptions, compress, open_bundle, precompute
from tolcli.autoplan import AutoPlan, Candidate, Validation, alternative_plans, candidate_specs, choose, plan_auto
from tolcli.codecs import DictAccess, parse_spec
from tolcli.codecs.base import TableRows
from tolcli.errors import InputError, OutputError, UsageError
from tolcli.testing import tiny_config, write_random_checkpoint, write_word_tokenizer


def brute_force(measured: dict[int, list[Candidate]], budget: int) -> float:
    """The least total error of any one-candidate-per-layer choice within the budget."""
    best = float("inf")
    for combo in itertools.product(*(measured[i] for i in sorted(measured))):
        if sum(c.stored_bytes for c in combo) <= budget:
            best = min(best, sum(c.error for c in combo))
    return best


def test_the_choice_is_optimal_where_each_layer_trades_bytes_for_error_convexly() -> None:
    """Equal byte steps and convex error curves: marginal analysis is optimal, so the plan must equal the brute-force
    optimum at every budget between the smallest and the largest choice."""
    g = np.random.default_rng(0)
    measured = {}
    for layer in range(4):
        gains = np.sort(g.random(5) * 100 + 1)[::-1]  # diminishing returns per 100 bytes
        errors = 1000 - np.concatenate([[0], np.cumsum(gains)])
        measured[layer] = [Candidate(f"c{k}", 100 * (k + 1), float(e)) for k, e in enumerate(errors)]
    for budget in range(400, 2401, 100):
        chosen = choose(measured, budget)
        assert sum(c.stored_bytes for c in chosen.values()) <= budget
        assert sum(c.error for c in chosen.values()) == pytest.approx(brute_force(measured, budget), rel=1e-12)


def test_the_choice_fits_and_is_near_brute_force_on_random_menus() -> None:
    """Arbitrary (non-convex) menus: always within the budget, never worse than the best uniform choice, and within
    a few percent of the brute-force optimum on these instances (the problem is a multiple-choice knapsack)."""
    g = np.random.default_rng(1)
    worst = 1.0
    for _ in range(30):
        measured = {
            layer: [Candidate(f"c{k}", int(b), float(e)) for k, (b, e) in enumerate(zip(bs, es, strict=True))]
            for layer, (bs, es) in enumerate(
                (g.integers(50, 500, 5), g.random(5) * g.integers(1, 100)) for _ in range(4)
            )
        }
        floor = sum(min(c.stored_bytes for c in cs) for cs in measured.values())
        budget = int(floor + g.random() * 800)
        chosen = choose(measured, budget)
        total = sum(c.error for c in chosen.values())
        assert sum(c.stored_bytes for c in chosen.values()) <= budget
        optimum = brute_force(measured, budget)
        assert total >= optimum - 1e-9
        worst = max(worst, total / max(optimum, 1e-12))
    assert worst < 1.25, worst


def test_bytes_the_lagrangian_choice_leaves_are_spent() -> None:
    """B lies above the lower convex hull of (bytes, error), so no multiplier picks it; at a budget of 200 the
    multiplier's choice is A (C does not fit) and the 100 bytes left buy the upgrade to B."""
    a, b, c = Candidate("A", 100, 100.0), Candidate("B", 150, 90.0), Candidate("C", 300, 0.0)
    assert choose({0: [a, b, c]}, 200) == {0: b}
    assert choose({0: [a, b, c]}, 300) == {0: c} and choose({0: [a, b, c]}, 149) == {0: a}


def test_a_budget_below_the_smallest_candidates_is_refused() -> None:
    measured = {0: [Candidate("a", 100, 1.0)], 1: [Candidate("b", 50, 2.0), Candidate("c", 80, 1.0)]}
    with pytest.raises(UsageError, match="below the smallest candidates' 150 bytes"):
        choose(measured, 149)
    assert {i: c.spec for i, c in choose(measured, 150).items()} == {0: "a", 1: "b"}


def test_candidates_that_cannot_encode_the_width_are_left_out() -> None:
    specs = [str(s) for s in candidate_specs(["int4(group=128)", "int8", "svd(rank=H/2,a=int4(group=32))"], 64)]
    assert specs == ["int8", "svd(rank=32,a=int4(group=32))"]  # group 128 does not divide 64
    with pytest.raises(UsageError, match="no candidate codec"):
        candidate_specs(["int4(group=128)"], 64)


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("auto")
    ckpt = write_random_checkpoint(d / "ckpt", tiny_config("memoryllm", hidden_size=64, num_hidden_layers=3))
    return precompute(ckpt, d / "dense.safetensors", dtype="fp32").path


CANDIDATES = "fp16,int8,int4,int2(group=32),mixed(bits=2),mixed(bits=3),svd(rank=32,a=int4(group=32))"


def test_auto_writes_the_plan_and_its_errors_are_what_an_independent_encode_gives(dense: Path, tmp_path: Path) -> None:
    counts = np.random.default_rng(2).integers(0, 50, open_bundle(dense).vocab_size).astype(np.float64)
    np.save(tmp_path / "counts.npy", counts)
    opts = CompressOptions(
        scheme="auto", budget="0.2", candidates=CANDIDATES, token_weights=str(tmp_path / "counts.npy")
    )
    res = compress(dense, tmp_path / "auto.safetensors", opts)
    plan = res.plan
    assert plan is not None and plan.stored_bytes <= plan.budget_bytes == int(0.2 * 64 * 2 * 3 * counts.size)
    assert len({c.spec for c in plan.chosen.values()}) >= 1 and all(len(m) == 7 for m in plan.measured.values())
    with open_bundle(dense) as d, open_bundle(res.path) as b:
        weights = torch.from_numpy(counts + 1.0)  # the token-weights rule: counts plus the floor of 1
        for i, chosen in plan.chosen.items():
            entry = b.manifest["layers"][i]
            codec = parse_spec(chosen.spec).build(64, weights=weights.float())
            table = d.dense_layer(i)
            decoded = codec.decode_rows(DictAccess(codec.encode(table)), torch.arange(table.shape[0]))
            assert (entry["codec"], entry["params"]) == (codec.name, codec.params())
            assert entry["stored_bytes"] == chosen.stored_bytes
            err = (decoded.double() - table.double()).pow(2).sum(1)
            for c in plan.measured[i]:  # every candidate was measured with the weights
                if c.spec == chosen.spec:
                    assert c.error == pytest.approx(float((weights * err).sum()), rel=1e-9)
            assert torch.equal(b.lookup(i, torch.arange(table.shape[0])), decoded)
    again = compress(dense, tmp_path / "again.safetensors", opts)
    assert again.path.read_bytes() == res.path.read_bytes()  # deterministic


def test_a_bigger_budget_never_gives_a_larger_error(dense: Path, tmp_path: Path) -> None:
    errors = []
    for k, budget in enumerate(("0.13", "0.2", "0.35")):
        opts = CompressOptions(scheme="auto", budget=budget, candidates=CANDIDATES)
        plan = compress(dense, tmp_path / f"b{k}.safetensors", opts).plan
        assert plan is not None
        errors.append(plan.error)
    assert errors[0] >= errors[1] >= errors[2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "scheme auto needs a --budget"),
        (("--budget", "0.2", "--rank", "8"), "--rank: not with scheme auto"),
        (("--budget", "0.2", "--group-size", "32"), "--group-size: not with scheme auto"),
        (("--budget", "0.2", "--candidates", "int4(group=7"), "int4(group=7"),
    ],
)
def test_auto_usage_errors(dense: Path, tmp_path: Path, cli, args: tuple[str, ...], message: str) -> None:
    r = cli("compress", dense, "-o", tmp_path / "x.safetensors", "--scheme", "auto", *args)
    assert r.code == 2 and message in r.err, r.err
    r = cli("compress", dense, "-o", tmp_path / "x.safetensors", "--scheme", "int4", "--candidates", "int4")
    assert r.code == 2 and "--candidates applies to scheme auto only" in r.err, r.err


def test_auto_cli_table_and_json(dense: Path, tmp_path: Path, cli) -> None:
    args = ("compress", dense, "-o", tmp_path / "a.safetensors", "--scheme", "auto", "--budget", "0.2")
    r = cli(*args, "--candidates", CANDIDATES)
    assert r.code == 0 and "auto:" in r.out and "weighted sq. error" in r.out, r.err
    r = cli(*args, "--candidates", CANDIDATES, "--json", "--force")
    doc = json.loads(r.out)
    assert doc["plan"]["stored_bytes"] <= doc["plan"]["budget_bytes"]
    assert sorted(doc["plan"]["layers"]) == ["0", "1", "2"] and doc["stored_bytes"] == doc["plan"]["stored_bytes"]
    r = cli("compress", dense, "-o", tmp_path / "i.safetensors", "--scheme", "int4", "--json")
    assert json.loads(r.out)["plan"] is None


def test_a_nan_error_is_never_chosen_and_a_failing_candidate_is_left_out() -> None:
    """A zero token weight times an fp16 overflow is NaN: such a candidate is measured as infinitely bad (a NaN
    would stall the choice); a candidate that cannot encode a layer is left out for that layer; a layer no candidate
    can encode is reported with the error."""
    table = torch.randn(64, 32)
    specs = [parse_spec(t) for t in ("int8", "int4(group=32)", "mixed(bits=2)")]

    def measure(codec, source):
        if codec.name == "int8":
            return torch.full((source.rows,), float("nan"), dtype=torch.float64)
        if codec.name == "mixed":
            raise InputError("cannot encode this layer")
        return torch.ones(source.rows, dtype=torch.float64)

    plan = plan_auto({0: TableRows(table, 16), 1: TableRows(table, 16)}, specs, None, 10**9, measure)
    assert {i: c.spec for i, c in plan.chosen.items()} == {0: "int4(group=32)", 1: "int4(group=32)"}
    assert [c.spec for c in plan.measured[0]] == ["int8", "int4(group=32)"]
    assert plan.measured[0][0].error == float("inf")
    with pytest.raises(InputError, match="cannot encode this layer"):
        plan_auto({0: TableRows(table, 16)}, specs[2:], None, 10**9, measure)


def test_candidates_left_out_are_named_when_none_is_left() -> None:
    with pytest.raises(UsageError, match=r"svd\(budget=0.1\)"):
        candidate_specs(["svd(budget=0.1)"], 64)


# ---- --validate: the top plans evaluated with the model, the one of least KL kept ------------------------------
def test_alternative_plans_are_the_best_plan_of_each_kind_alone_by_brute_force() -> None:
    rng = np.random.default_rng(5)
    kinds = ("int4", "int2(group=32)", "mixed(bits=2)")
    for trial in range(20):
        measured = {
            i: [Candidate(k, int(rng.integers(5, 40)), float(rng.uniform(0.1, 10))) for k in kinds] for i in range(3)
        }
        budget = int(rng.integers(30, 100))
        try:
            plans = alternative_plans(measured, budget, top=4)
        except UsageError:
            continue
        assert plans[0] == ("all candidates", choose(measured, budget))
        expected = {}
        for k in kinds:  # brute force over one kind: every layer has exactly one candidate of it, so one plan
            only = {i: [c for c in cs if c.spec == k] for i, cs in measured.items()}
            if sum(cs[0].stored_bytes for cs in only.values()) <= budget:
                expected[f"{parse_spec(k).name} only"] = {i: cs[0] for i, cs in only.items()}
        got = dict(plans[1:])
        for label, plan in got.items():
            assert plan == expected[label] and plan != plans[0][1]
        missing = [lbl for lbl, p in expected.items() if lbl not in got and p != plans[0][1]]
        assert not missing, (trial, missing)  # top=4 leaves room for every kind
        errors = [sum(c.error for c in p.values()) for _, p in plans[1:]]
        assert errors == sorted(errors)
        assert len(alternative_plans(measured, budget, top=1)) == 1


def test_validated_keeps_the_first_plan_of_least_kl_and_a_nan_kl_never() -> None:
    a, b = {0: Candidate("int4", 10, 1.0)}, {0: Candidate("int2", 5, 4.0)}
    plan = AutoPlan(12, a, {0: [a[0], b[0]]})
    c = {0: Candidate("int8", 11, 0.1)}
    results = [Validation("all candidates", a, math.nan, 1.0), Validation("int2 only", b, 0.5, 2.0)]
    kept = plan.validated([*results, Validation("int8 only", c, 0.9, 0.1)])
    assert kept.chosen == b and kept.validation is not None and len(kept.validation) == 3
    assert kept.as_json()["validation"][0]["mean_kl"] is None
    tie = plan.validated([Validation("all candidates", a, 0.5, 1.0), Validation("int2 only", b, 0.5, 2.0)])
    assert tie.chosen == a


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A tiny memoryllm with a word-level tokenizer (so it reads text), its dense bundle and a calibration text."""
    d = tmp_path_factory.mktemp("validate")
    cfg = tiny_config("memoryllm", hidden_size=64, num_hidden_layers=3)
    ckpt = write_random_checkpoint(d / "ckpt", cfg, tokenizer=write_word_tokenizer(d / "tokenizer.json"))
    calib = d / "calib.txt"
    calib.write_text(" ".join(random.Random(0).choices([f"w{i}" for i in range(100)], k=600)), encoding="utf-8")
    return ckpt, precompute(ckpt, d / "dense.safetensors", dtype="fp32").path, calib


VALIDATE_CANDIDATES = "int4(group=64),int2(group=32),mixed(bits=2),svd(rank=H/4,a=int4(group=32))"


def _validate_opts(small: tuple[Path, Path, Path], **kw) -> CompressOptions:
    ckpt, _, calib = small
    return CompressOptions(
        scheme="auto",
        budget="0.25",
        candidates=VALIDATE_CANDIDATES,
        calibration=str(calib),
        sensitivity=str(ckpt),
        validate=str(calib),
        **kw,
    )


def test_validate_writes_the_plan_of_least_kl_and_its_kl_is_the_written_bundles(
    small: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    from tolcli import eval_ppl

    ckpt, dense, calib = small
    res = compress(dense, tmp_path / "v.safetensors", _validate_opts(small))
    plan = res.plan
    assert plan is not None and plan.validation is not None and len(plan.validation) == 3
    assert plan.validation[0].label == "all candidates"
    assert all(v.stored_bytes <= plan.budget_bytes for v in plan.validation)
    kls = [v.mean_kl for v in plan.validation]
    kept = plan.validation[kls.index(min(kls))]
    assert plan.chosen == kept.chosen
    with open_bundle(res.path) as b:
        assert [b.manifest["layers"][i]["codec"] for i in sorted(kept.chosen)] == [
            parse_spec(c.spec).name for _, c in sorted(kept.chosen.items())
        ]
    # the KL recorded for the kept plan is the written bundle's, measured again from scratch
    report = eval_ppl(ckpt, [calib], tols=[res.path])
    assert report.variants[1]["mean_kl"] == pytest.approx(kept.mean_kl, rel=1e-9)
    assert not list(tmp_path.glob(".tolcli-validate-*"))  # the plans' bundles are gone


def test_validate_overrides_the_proxy_and_cleans_up_on_failure(
    small: tuple[Path, Path, Path], tmp_path: Path, monkeypatch
) -> None:
    import sys

    import tolcli.evaluation

    dense = small[1]
    real = tolcli.evaluation.eval_ppl

    def second_is_best(*args, **kwargs):
        report = real(*args, **kwargs)
        for k, v in enumerate(report.variants[1:]):
            v["mean_kl"] = 1.0 if k != 1 else 0.5
        return report

    monkeypatch.setattr(tolcli.evaluation, "eval_ppl", second_is_best)
    plan = compress(dense, tmp_path / "v.safetensors", _validate_opts(small, validate_plans=2)).plan
    assert plan is not None and plan.validation is not None and len(plan.validation) == 2
    assert plan.chosen == plan.validation[1].chosen != plan.validation[0].chosen

    def fails(*args, **kwargs):
        raise InputError("no text")

    monkeypatch.setattr(tolcli.evaluation, "eval_ppl", fails)
    with pytest.raises(InputError, match="no text"):
        compress(dense, tmp_path / "w.safetensors", _validate_opts(small))
    assert not list(tmp_path.glob(".tolcli-validate-*")) and not (tmp_path / "w.safetensors").exists()

    def never(*args, **kwargs):
        raise AssertionError("an existing output is refused before anything is evaluated")

    monkeypatch.setattr(tolcli.evaluation, "eval_ppl", never)
    monkeypatch.setattr(sys.modules["tolcli.compress"], "load_weights", never)
    existing = tmp_path / "v.safetensors"
    with pytest.raises(OutputError, match="output exists"):
        compress(dense, existing, _validate_opts(small))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--scheme", "auto", "--budget", "0.2", "--validate", "c.txt"), "--validate evaluates plans with the model"),
        (("--scheme", "int4", "--validate", "c.txt"), "--validate applies to scheme auto only"),
    ],
)
def test_validate_usage_errors(dense: Path, tmp_path: Path, cli, args: tuple[str, ...], message: str) -> None:
    r = cli("compress", dense, "-o", tmp_path / "x.safetensors", *args)
    assert r.code == 2 and message in r.err, r.err
    with pytest.raises(UsageError, match="validate_plans"):
        compress(dense, tmp_path / "x.safetensors", CompressOptions(scheme="auto", budget="0.2", validate_plans=2))


def test_validate_cli_table_and_json(small: tuple[Path, Path, Path], tmp_path: Path, cli) -> None:
    ckpt, dense, calib = small
    args = ("compress", dense, "-o", tmp_path / "a.safetensors", "--scheme", "auto", "--budget", "0.25")
    args += ("--candidates", "int4(group=64),int2(group=32),mixed(bits=2)", "--sensitivity", ckpt)
    args += ("--calibration", calib, "--validate", calib)
    r = cli(*args)
    assert r.code == 0 and "--validate: plans evaluated" in r.out and "kept" in r.out, r.err
    r = cli(*args, "--json", "--force")
    doc = json.loads(r.out)
    rows = doc["plan"]["validation"]
    assert rows[0]["label"] == "all candidates" and {"mean_kl", "ppl_change_pct", "layers"} <= set(rows[0])
    kept = min(rows, key=lambda v: v["mean_kl"])
    assert {k: v["codec"] for k, v in doc["plan"]["layers"].items()} == kept["layers"]


def test_a_sweep_row_of_a_bundle_mixing_svd_and_other_codecs_has_no_ranks(dense: Path, tmp_path: Path) -> None:
    from tolcli.sweep import _row

    opts = CompressOptions(scheme="auto", budget="0.4", candidates="svd(rank=H/2,a=int4(group=32)),int2(group=32)")
    res = compress(dense, tmp_path / "m.safetensors", opts)
    codecs = {e["codec"] for e in res.manifest["layers"]}
    variant = {"ppl": 1.0, "ppl_stderr": 0.0, "ppl_change_pct": 0.0, "bits_per_byte": None}
    variant |= {"mean_kl": 0.0, "top1_agreement": 1.0}
    row = _row("auto", variant, "auto", res.path)
    assert codecs == {"svd", "int2"} and row["ranks"] is None, codecs  # (it raised KeyError before)
    assert row["stored_bytes"] == res.stored_bytes


def test_validate_removes_the_directories_of_killed_runs_only(tmp_path: Path) -> None:
    """A SIGKILLed ``--validate`` leaves its private directory: the next run beside it removes those of dead
    processes on this host, and never a live run's, another host's, or a symlink (its target survives)."""
    import os
    import subprocess
    import sys

    from tolcli.compress import VALIDATE_PREFIX, _host_tag, remove_stale_validations

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    host = _host_tag()
    killed = tmp_path / f"{VALIDATE_PREFIX}{host}-{pid}-abc"
    live = tmp_path / f"{VALIDATE_PREFIX}{host}-{os.getpid()}-def"
    other = tmp_path / f"{VALIDATE_PREFIX}otherhost-{pid}-ghi"
    for d in (killed, live, other):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "plan0.safetensors").write_bytes(b"x")
    target = tmp_path / "keep"
    target.mkdir()
    (target / "f").write_bytes(b"y")
    link = tmp_path / f"{VALIDATE_PREFIX}{host}-{pid}-lnk"
    link.symlink_to(target, target_is_directory=True)
    assert remove_stale_validations(tmp_path) == [killed]
    assert not killed.exists() and live.exists() and other.exists() and link.is_symlink()
    assert (target / "f").read_bytes() == b"y"


def test_a_memo_computes_the_weights_and_the_measurements_once_and_changes_no_byte(
    small: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``sweep`` builds auto bundles at several budgets through one CompressMemo: the sensitivity passes and the
    candidates' measurements run once, and every bundle is byte for byte the one a fresh compress writes; a
    changed calibration file (another size and time) is measured afresh."""
    import sys

    from tolcli import CompressMemo

    module = sys.modules["tolcli.compress"]
    calls = {"sensitivity": 0, "measure": 0}
    real_sens, real_measure = module.token_sensitivity, module.measure_candidates

    def sens(*a, **k):
        calls["sensitivity"] += 1
        return real_sens(*a, **k)

    def measure(*a, **k):
        calls["measure"] += 1
        return real_measure(*a, **k)

    monkeypatch.setattr(module, "token_sensitivity", sens)
    monkeypatch.setattr(module, "measure_candidates", measure)
    ckpt, dense, shipped = small
    calib = tmp_path / "calib.txt"
    calib.write_bytes(shipped.read_bytes())
    memo = CompressMemo()
    for budget in ("0.15", "0.25"):
        opts = CompressOptions(
            scheme="auto",
            budget=budget,
            calibration=str(calib),
            sensitivity=str(ckpt),
            candidates=VALIDATE_CANDIDATES,
        )
        shared = compress(dense, tmp_path / f"m{budget}.safetensors", opts, memo=memo).path
        fresh = compress(dense, tmp_path / f"f{budget}.safetensors", opts).path
        assert shared.read_bytes() == fresh.read_bytes()
    assert calls == {"sensitivity": 3, "measure": 3}  # the memo's once, and each fresh compress's
    calib.write_text(calib.read_text(encoding="utf-8") + " more words", encoding="utf-8")
    compress(dense, tmp_path / "changed.safetensors", opts, memo=memo)
    assert calls == {"sensitivity": 4, "measure": 4}
