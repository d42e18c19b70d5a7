"""``compress --scheme auto --budget B``: the choice against brute force, the measured errors against an
independent encode, the written bundle against the plan, and the CLI."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tolcli import CompressOptions, compress, open_bundle, precompute
from tolcli.autoplan import Candidate, candidate_specs, choose, plan_auto
from tolcli.codecs import DictAccess, parse_spec
from tolcli.codecs.base import TableRows
from tolcli.errors import InputError, UsageError
from tolcli.testing import tiny_config, write_random_checkpoint


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
    return precompute(ckpt, d / "dense.safetensors").path


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
