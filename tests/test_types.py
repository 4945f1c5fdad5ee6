"""The package's type annotations hold: ``mypy --strict`` finds nothing."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Modules that pass ``mypy --strict``. The rest of the package joins this
#: list as it becomes clean (then the list becomes the whole package).
CHECKED = [
    "comet/framing.py",
    "comet/backends/__init__.py",
    "comet/backends/redis.py",
    "comet/stats.py",
    "comet/processes.py",
    "comet/counters.py",
    "comet/demo.py",
    "comet/errors.py",
]


def test_mypy_strict(tmp_path: Path) -> None:
    # Modules they import but that are not checked yet are followed for their
    # types, silently: their own errors are not this test's business (yet).
    # A cache of its own: nothing written into the repository, and no cache
    # shared with a concurrent run.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--cache-dir", str(tmp_path),
         *CHECKED],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"mypy --strict found errors:\n{result.stdout}{result.stderr}"
