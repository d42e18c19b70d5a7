"""The CI recipe runs end to end on the demo model and gates on perplexity; the workflow runs what it documents."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import require

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "docs" / "examples" / "ci.sh"
WORKFLOW = ROOT / "docs" / "examples" / "github-actions.yml"
COPY = "ci/tol-bundles.sh"  # where docs/ci.md and the workflow put the recipe in a user's repository


def recipe(repo: Path, path: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the recipe as a user's repository does: its own copy, from the repository's root."""
    (repo / COPY).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(RECIPE, repo / COPY)
    base = {k: v for k, v in os.environ.items() if k not in ("TOLCLI", "PYTHON", "OUT", "CHECKPOINT", "DATA")}
    return subprocess.run(
        ["bash", COPY],
        cwd=repo,
        env={**base, "PATH": path, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=900,
    )


def poisoned_path(tmp_path: Path) -> str:
    """PATH whose first `python` and `python3` fail: the recipe must not run whatever Python comes first."""
    bad = tmp_path / "other-python"
    bad.mkdir(exist_ok=True)
    for name in ("python", "python3", "tolcli"):
        (bad / name).write_text("#!/bin/sh\necho 'the wrong Python' >&2\nexit 97\n")
        (bad / name).chmod(0o755)
    return f"{bad}{os.pathsep}{os.environ['PATH']}"


def test_ci_recipe_on_the_demo(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)  # the repository's venv
    r = recipe(repo, poisoned_path(tmp_path), OUT="artifacts")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "the wrong Python" not in r.stderr
    out = repo / "artifacts"
    report = json.loads((out / "eval.json").read_text())
    assert [v["kind"] for v in report["variants"]] == ["baseline", "bundle", "bundle"]
    assert report["variants"][1]["ppl_change_pct"] < 1.0  # int4
    sums = (out / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == 3
    subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, check=True, capture_output=True)
    assert json.loads((out / "info.json").read_text())["model_type"] == "memoryllm"
    # the gate: an impossible limit fails with exit 3, and the report is still written; PYTHON picks the environment
    bare = tmp_path / "bare"
    bare.mkdir()
    r = recipe(bare, poisoned_path(tmp_path), PYTHON=sys.executable, MAX_INCREASE="0.01", OUT="gated")
    assert r.returncode == 3 and json.loads((bare / "gated" / "eval.json").read_text())["variants"]


def test_the_recipe_without_a_venv_uses_python3(tmp_path: Path) -> None:
    r = recipe(tmp_path, poisoned_path(tmp_path), CHECKPOINT="/nonexistent")
    assert r.returncode == 97 and "the wrong Python" in r.stderr  # python3 from PATH: here, the poisoned one


def test_the_workflow_installs_tolcli_and_runs_the_copied_recipe() -> None:
    yaml = require("yaml")
    flow = yaml.safe_load(WORKFLOW.read_text())
    steps = flow["jobs"]["bundles"]["steps"]
    runs = [s.get("run", "") for s in steps]
    install = next(r for r in runs if "pip install" in r)
    assert "python -m venv .venv" in install  # where ci.sh looks for tolcli's Python
    assert re.search(r'\.venv/bin/python -m pip install "\$TOLCLI_SPEC"', install)
    assert flow["env"]["TOLCLI_SPEC"].startswith("tolcli[plot] @ git+https://")  # not a registry release
    assert any(r.strip().startswith(f"bash {COPY}") for r in runs)
    assert f"cp docs/examples/ci.sh {COPY}" in (ROOT / "docs" / "ci.md").read_text()  # how the copy gets there
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()"
    written = set(re.findall(r'"\$OUT/([\w.-]+)"', RECIPE.read_text())) | {"SHA256SUMS"}
    for line in upload["with"]["path"].split():
        name = line.removeprefix("artifacts/")
        assert name == "*.safetensors" or name in written, name
