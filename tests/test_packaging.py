"""The distributions as users get them: the wheel and the sdist are built
from a clean export with ``python -m build``, checked with ``twine check
--strict``, installed into fresh venvs (``--no-deps``, offline: the
dependencies come from the CI venv, see ``FreshVenv`` in conftest.py), and
the sdist runs (a selection of) its own tests against the installed copy."""
from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import zipfile
from email.parser import HeaderParser

import comet
from conftest import FreshVenv


def test_twine_check_strict(dists):
    result = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(dists["wheel"]), str(dists["sdist"])],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("PASSED") == 2


def test_wheel_metadata(dists):
    with zipfile.ZipFile(dists["wheel"]) as whl:
        names = whl.namelist()
        [meta_name] = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = HeaderParser().parsestr(whl.read(meta_name).decode())
        entry_points = whl.read(meta_name.replace("METADATA", "entry_points.txt")).decode()
    # "comet" on PyPI is another project: ours is cherrypy-comet, imported as comet.
    assert meta["Name"] == "cherrypy-comet"
    assert meta["Version"] == comet.__version__
    assert meta["License"] == "BSD-3-Clause"
    assert "License :: OSI Approved :: BSD License" in meta.get_all("Classifier")
    assert meta["Requires-Python"] == ">=3.10"
    assert meta["Author"] and meta.get_all("Project-URL")
    assert any(n.endswith(".dist-info/LICENSE") for n in names)
    assert {"comet/py.typed", "comet/static/comet.js", "comet_pytest.py"} <= set(names)
    assert not any(n.startswith(("tests/", "examples/")) for n in names)
    # jinja2 is the examples' dependency, not comet's.
    requires = meta.get_all("Requires-Dist")
    assert [r for r in requires if "jinja2" in r.lower()] == ['jinja2>=3.1; extra == "examples"', 'jinja2>=3.1; extra == "test"']
    assert "extra" not in " ".join(r for r in requires if r.lower().startswith(("cherrypy", "cheroot")))
    assert re.search(r"^comet = comet_pytest$", entry_points, re.M)


def test_readme_install_line_installs_the_wheel(wheel_venv):
    result = wheel_venv.run("-c", "import comet, comet.wsgi, comet_pytest; print(comet.__file__); print(comet.__version__)")
    assert result.returncode == 0, result.stderr
    path, version = result.stdout.split()
    assert path.startswith(wheel_venv.site_packages) and version == comet.__version__


def test_sdist_runs_its_own_tests(dists, tmp_path):
    with tarfile.open(dists["sdist"]) as tar:
        tar.extractall(tmp_path, filter="data")
    [src] = tmp_path.iterdir()
    for name in ("LICENSE", "CHANGELOG.md", "README.md", "tests/conftest.py", "docs/index.md", "examples/lobby_game/app.py"):
        assert (src / name).is_file(), name
    venv = FreshVenv(tmp_path / "venv", dists["sdist"])
    # From inside the unpacked sdist, comet is still the installed copy (-P).
    where = venv.run("-c", "import comet; print(comet.__file__)", cwd=src)
    assert where.stdout.startswith(venv.site_packages), where.stdout + where.stderr
    # A selection: the byte tables, and live WSGI servers through the
    # installed plugin's fixtures.
    result = venv.run("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_framing.py", "tests/test_wsgi.py", cwd=src)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(r"\d+ passed", result.stdout)
