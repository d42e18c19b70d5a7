"""The CI recipe runs end to end on the demo model and gates on perplexity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def recipe(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    bindir = Path(sys.executable).parent
    full = {
        **os.environ,
        "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}",
        "OUT": str(tmp_path / "artifacts"),
        "TOLCLI": f"{sys.executable} -m tolcli",
        **env,
    }
    return subprocess.run(
        ["bash", str(ROOT / "docs" / "examples" / "ci.sh")],
        cwd=tmp_path,
        env=full,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_ci_recipe_on_the_demo(tmp_path: Path) -> None:
    r = recipe(tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "artifacts"
    report = json.loads((out / "eval.json").read_text())
    assert [v["kind"] for v in report["variants"]] == ["baseline", "bundle", "bundle"]
    assert report["variants"][1]["ppl_change_pct"] < 1.0  # int4
    sums = (out / "SHA256SUMS").read_text().splitlines()
    assert len(sums) == 3
    subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, check=True, capture_output=True)
    assert json.loads((out / "info.json").read_text())["model_type"] == "memoryllm"
    # the gate: an impossible limit fails with exit 3, and the report is still written
    r = recipe(tmp_path, MAX_INCREASE="0.01", OUT=str(tmp_path / "gated"))
    assert r.returncode == 3 and json.loads((tmp_path / "gated" / "eval.json").read_text())["variants"]
