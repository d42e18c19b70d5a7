"""Progress displays (issue 18): labelled units, a heartbeat at a bounded rate off a terminal, the elapsed time kept
after a bar ends, and no display left running after a failure."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from tolcli import progress as P

REPO = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _run_phase(period: float, seconds: float, step: float, total: int) -> list[str]:
    clock, out = Clock(), io.StringIO()
    hb = P.HeartbeatProgress(out, period=period, clock=clock)
    hb.start("precompute 2 layer(s)", total)
    steps = round(seconds / step)
    for _ in range(steps):
        clock.t += step
        hb.advance(total // steps)
    hb.finish()
    return out.getvalue().splitlines()


def test_an_hour_long_phase_logs_one_line_per_period() -> None:
    # 3,600 s in 0.5 s steps with a 30 s period: a beat at t = 30, 60, ..., 3,570 (119; at 3,600 the phase is
    # complete, so no beat) plus the closing line: 120. At 30 s, 60 steps of 16 rows: 960 rows; 3,570 s left.
    lines = _run_phase(30.0, 3600.0, 0.5, 7200 * 16)
    assert len(lines) == 120
    assert lines[0] == "tolcli: precompute 2 layer(s): 960/115,200 rows (1%), 30.0s elapsed, about 59m30s left"
    assert lines[-1] == "tolcli: precompute 2 layer(s): done, 115,200 rows in 1h00m"


def test_a_phase_shorter_than_the_period_logs_nothing() -> None:
    assert _run_phase(30.0, 29.0, 0.5, 58) == []


def test_status_estimates_what_is_left_from_the_rate_so_far() -> None:
    # 1/4 done after 60 s: the remaining 3/4 at the same rate take 180 s.
    clock = Clock()
    hb = P.HeartbeatProgress(io.StringIO(), period=30, clock=clock)
    hb.start("verify", 4 << 30)
    clock.t += 60
    hb.advance(1 << 30)
    assert hb.status(clock.t) == "verify: 1,073,741,824/4.0 GiB (25%), 1m00s elapsed, about 3m00s left"


def test_close_all_stops_a_running_heartbeat_with_where_it_was() -> None:
    clock, out = Clock(), io.StringIO()
    hb = P.HeartbeatProgress(out, period=1, clock=clock)
    hb.start("eval-ppl (2 variant(s))", 10)
    clock.t += 2
    hb.advance(4)
    P.close_all()
    hb.finish()  # already stopped: nothing more
    lines = out.getvalue().splitlines()
    assert lines[-1] == "tolcli: stopped: eval-ppl (2 variant(s)): 4/10 batches (40%), 2.0s elapsed, about 3.0s left"
    assert len(lines) == 2


def test_terminal_bar_keeps_the_elapsed_time_and_is_stopped_after_a_failure() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100)
    bar = P.TerminalProgress(console)
    bar.start("compress 2 layer(s) (int4 g64)", 2)
    bar.advance(2)
    bar.finish()
    assert re.search(r"tolcli: compress 2 layer\(s\) \(int4 g64\): done, 2 layers in \d+\.\ds", buf.getvalue())
    bar2 = P.TerminalProgress(console)
    bar2.start("precompute 1 layer(s)", 100)
    live = bar2._bar.live
    assert live.is_started
    P.close_all()  # what the CLI does before printing an error line
    assert not live.is_started and bar2._bar is None


def test_units_and_durations() -> None:
    assert P.count_text(1536, "bytes") == "1.5 KiB" and P.count_text(12345, "rows") == "12,345 rows"
    assert P.duration_text(0.44) == "0.4s" and P.duration_text(245) == "4m05s" and P.duration_text(3725) == "1h02m"
    assert P.heartbeat_seconds({"TOLCLI_HEARTBEAT_SECONDS": "5"}) == 5.0
    for bad in ("", "0", "-3", "nan", "x"):
        assert P.heartbeat_seconds({"TOLCLI_HEARTBEAT_SECONDS": bad}) == 30.0


def test_every_library_phase_has_a_unit() -> None:
    # Every `progress.start(...)` in the library names a phase whose first word has a unit (a new phase must add one).
    starts = re.compile(r"""(?:progress|prog)\.start\(\s*f?["']([^"'{ ]+)""")
    words = {m.group(1) for f in (REPO / "tolcli").rglob("*.py") for m in starts.finditer(f.read_text())}
    assert {"precompute", "compress", "eval-ppl", "verify", "pack"} <= words
    assert {w: P.unit_of(w) for w in words if P.unit_of(w) == "steps"} == {}


def test_cli_off_a_terminal_logs_heartbeats_on_stderr_only(tmp_path: Path) -> None:
    env = {**os.environ, "TOLCLI_HEARTBEAT_SECONDS": "0.01", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "tolcli", "precompute", str(REPO / "tolcli/demo/memoryllm"), "-o"]
    r = subprocess.run([*cmd, str(tmp_path / "a.safetensors")], capture_output=True, text=True, env=env, check=True)
    beats = [ln for ln in r.stderr.splitlines() if re.match(r"tolcli: precompute 6 layer\(s\): [\d,]+/24,576 rows", ln)]
    assert beats and "tolcli: precompute 6 layer(s): done, 24,576 rows in" in r.stderr
    assert "rows" not in r.stdout
    j = subprocess.run([*cmd, str(tmp_path / "b.safetensors"), "--json"], capture_output=True, text=True, env=env)
    assert j.returncode == 0 and j.stderr == ""
