"""The pytest plugin as another project meets it: pytest runs in a
subprocess, in a fresh venv where the wheel is installed (``wheel_venv``),
on a tiny suite of its own. A suite that uses no comet fixture must not load
CherryPy nor print its engine log; one that does gets working fixtures."""
from __future__ import annotations

import os
import textwrap

# Written by the tiny suite's conftest after the session (after every
# plugin's sessionfinish): was CherryPy ever imported, is the plugin there.
CONFTEST = '''
import sys

def pytest_unconfigure(config):
    with open("report.txt", "w") as f:
        f.write(f"cherrypy={'cherrypy' in sys.modules} plugin={config.pluginmanager.has_plugin('comet')}")
'''


def run_suite(venv, tmp_path, tests: str, *args, env=None):
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_it.py").write_text(textwrap.dedent(tests))
    result = venv.run("-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *args, cwd=tmp_path, env=env)
    return result, (tmp_path / "report.txt").read_text()


def test_unrelated_suite_loads_no_cherrypy_and_prints_no_engine_log(wheel_venv, tmp_path):
    result, report = run_suite(wheel_venv, tmp_path, """
        import sys

        def test_plain():
            assert "cherrypy" not in sys.modules
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert report == "cherrypy=False plugin=True"
    assert "ENGINE" not in result.stdout + result.stderr


def test_suite_using_a_fixture_gets_a_live_server_and_a_quiet_exit(wheel_venv, tmp_path):
    result, report = run_suite(wheel_venv, tmp_path, """
        import cherrypy
        from comet.testing import http_get

        class Root:
            @cherrypy.expose
            def index(self):
                return "hello"

        def test_page(comet_cherrypy):
            server = comet_cherrypy(Root())
            assert http_get(server.url + "/")[2] == b"hello"
    """)
    assert result.returncode == 0, result.stdout + result.stderr
    assert report == "cherrypy=True plugin=True"
    assert "ENGINE" not in result.stdout + result.stderr


def test_comet_redis_skips_with_a_reason_without_redis_server(wheel_venv, tmp_path):
    # PATH holds the venv's python and nothing else: no redis-server.
    env = {**os.environ, "PATH": os.path.dirname(wheel_venv.python)}
    result, _ = run_suite(wheel_venv, tmp_path, """
        def test_needs_redis(comet_redis):
            raise AssertionError("ran without redis-server")
    """, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout
    assert "redis-server not found on PATH" in result.stdout
