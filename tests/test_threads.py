"""``--threads N`` on every compute command, and :func:`tolcli.threads.set_threads` under it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import tolcli
from tolcli.demo import demo_heldout_path
from tolcli.errors import UsageError
from tolcli.model import Transformer
from tolcli.threads import check_threads, set_threads

HELDOUT = str(demo_heldout_path())


def _commands(tmp: Path) -> dict[str, list[str]]:
    """Every compute command with otherwise valid arguments (the inputs need not exist: the option is refused
    before anything is read)."""
    return {
        "precompute": ["precompute", "demo", "-o", str(tmp / "out.safetensors")],
        "compress": ["compress", str(tmp / "in.safetensors"), "-o", str(tmp / "out.safetensors"), "-s", "int4"],
        "eval-ppl": ["eval-ppl", "demo", "--data", HELDOUT],
        "sweep": ["sweep", "demo", "--data", HELDOUT, "-o", str(tmp / "sweep")],
        "bench-lookup": ["bench-lookup", str(tmp / "in.safetensors"), "--data", HELDOUT],
        "generate": ["generate", "demo", "--prompt", "a"],
    }


COMMANDS = ("precompute", "compress", "eval-ppl", "sweep", "bench-lookup", "generate")


@pytest.fixture
def restore_threads() -> Iterator[None]:
    """Give the suite back the intra-op thread count it had (conftest sets 2)."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_threads(cli, command: str) -> None:
    r = cli(command, "--help")
    assert r.code == 0
    assert "--threads" in r.out


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
@pytest.mark.parametrize("command", COMMANDS)
def test_bad_threads_is_a_usage_error_before_any_work(cli, tmp_path: Path, command: str, value: str) -> None:
    r = cli(*_commands(tmp_path)[command], "--threads", value)
    assert r.code == 2, r.err
    assert "--threads" in r.err
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing read


@pytest.mark.parametrize("value", [0, -3, True, 1.5, "2", None])
def test_set_threads_refuses_non_counts(value: object) -> None:
    for fn in (set_threads, check_threads):
        with pytest.raises(UsageError) as e:
            fn(value)  # type: ignore[arg-type]
        assert e.value.message.startswith("`threads` must be an integer >= 1")  # the CLI shows `--threads`


def test_set_threads_sets_torch_intra_op_pool(restore_threads: None) -> None:
    torch.set_num_threads(2)
    assert set_threads(1) == 1
    assert torch.get_num_threads() == 1
    assert set_threads(3) == 3  # more than the cores is allowed (torch's rule), and a second call still applies
    assert torch.get_num_threads() == 3


def test_eval_ppl_runs_with_the_threads_asked_for(cli, monkeypatch: pytest.MonkeyPatch, restore_threads: None) -> None:
    """Every forward pass of ``eval-ppl --threads 1`` runs on one thread, and the perplexity is the one the
    default thread count gives (threads change the speed, not the numbers beyond float reassociation)."""
    seen: list[int] = []
    forward = Transformer.forward

    def spy(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Transformer, "forward", spy)
    args = ["eval-ppl", "demo", "--data", HELDOUT, "--max-tokens", "600", "--ctx", "128", "--device", "cpu", "--json"]
    torch.set_num_threads(2)
    r2 = cli(*args)
    assert r2.code == 0, r2.err
    assert seen and set(seen) == {2}
    seen.clear()
    r1 = cli(*args, "--threads", "1")
    assert r1.code == 0, r1.err
    assert seen and set(seen) == {1}
    ppl1, ppl2 = (json.loads(r.out)["variants"][0]["ppl"] for r in (r1, r2))
    assert ppl1 == pytest.approx(ppl2, rel=1e-5)


def test_threads_applies_to_both_pools_in_a_fresh_process(tmp_path: Path) -> None:
    """In a new process (as a user runs it), ``--threads 1`` sets torch's intra-op and inter-op pools before the
    command computes anything; without it torch keeps its own choice."""
    script = textwrap.dedent(
        """
        import sys, torch
        from tolcli.cli import main
        rc = main(sys.argv[1:])
        print(rc, torch.get_num_threads(), torch.get_num_interop_threads())
        """
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}  # no OMP_NUM_THREADS from the caller
    out = tmp_path / "t.safetensors"
    base = [sys.executable, "-c", script, "precompute", "demo", "-o", str(out), "--quiet"]
    default = subprocess.run(base, capture_output=True, text=True, env=env, check=True).stdout.split()
    one = subprocess.run([*base, "--force", "--threads", "1"], capture_output=True, text=True, env=env, check=True)
    assert one.stdout.split() == ["0", "1", "1"], one.stderr
    bare = [sys.executable, "-c", "import torch; print(0, torch.get_num_threads(), torch.get_num_interop_threads())"]
    assert default == subprocess.run(bare, capture_output=True, text=True, env=env, check=True).stdout.split()
    with tolcli.open_bundle(out) as b:  # the command did its work
        assert [e["status"] for e in b.manifest["layers"]] == ["present"] * b.manifest["model"]["num_layers"]
