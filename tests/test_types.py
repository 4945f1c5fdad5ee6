"""The package's type annotations hold: ``mypy --strict`` finds nothing."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: The whole package passes ``mypy --strict`` (it ships ``py.typed``), and the pytest plugin.
CHECKED = ["comet", "comet_pytest.py"]


@pytest.mark.skipif(os.environ.get("COMET_LOWEST_DEPS") == "1",
                    reason="types are checked once, against the newest dependencies (.venv): redis-py 5.0 "
                           "annotates less, and --strict would report its gaps as comet's")
def test_mypy_strict(tmp_path: Path) -> None:
    # A cache of its own: nothing written into the repository, and no cache
    # shared with a concurrent run.
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path),
         *CHECKED],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"mypy --strict found errors:\n{result.stdout}{result.stderr}"
