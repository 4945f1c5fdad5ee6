"""benchmarks/soak_rooms.py keeps working: a tiny run (timings are not
checked, only that rooms came and went, every broadcast reached every
stream once and in order, and every process was stopped)."""
import json
import subprocess
import sys
from pathlib import Path

from test_benchmarks import _nothing_left, _tagged

ROOT = Path(__file__).resolve().parents[1]


def test_soak_rooms_runs_and_rooms_leave_nothing_behind():
    env, tag = _tagged()
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.soak_rooms", "--seconds", "4", "--baseline", "1", "--window", "1",
         "--streams", "50", "--rooms", "100", "--max-idle", "1", "--clients", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["lost"] == summary["duplicate_or_out_of_order"] == summary["status"] == 0, summary
    assert summary["rooms_made"] >= 100 and summary["rooms_finished"] >= 50, summary
    # live rooms (one second's) and rooms waiting for max_idle, not every room ever made
    assert summary["channels_last"] < summary["rooms_made"], summary
    _nothing_left(tag, "the soak left its server running")
