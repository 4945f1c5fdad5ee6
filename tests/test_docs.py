"""The docs cannot rot: they build with warnings as errors, every Python
snippet in them runs, and every command they give exists.

Snippets of one page run in order, in one fresh interpreter, as a module
that is not ``__main__`` (so ``if __name__ == "__main__": quickstart()``
stays a line to copy, not a server that never returns). ``REDIS_URL`` points
at the suite's redis-server. JavaScript snippets run in Chromium
(tests/browser/test_docs_js.py).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)
EPILOGUE = """
import sys as _sys
_cp = _sys.modules.get("cherrypy")
if _cp is not None and _cp.engine.state == _cp.engine.states.STOPPED:
    _cp.engine.exit()  # what a script's exit would do; keeps CherryPy from warning
"""


def blocks(page: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(page.read_text()) if lang == language]


def test_docs_build_with_warnings_as_errors(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
                             str(DOCS), str(tmp_path / "html")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    index = (tmp_path / "html" / "index.html").read_text()
    assert "<svg" in index or ".svg" in index  # the flow diagram, rendered by Graphviz at build time
    for page in DOCS.glob("*.md"):
        assert (tmp_path / "html" / f"{page.stem}.html").exists(), f"{page.name} is not in the toctree"


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "python")], ids=lambda p: p.name)
def test_python_snippets_run(page, comet_redis, tmp_path):
    script = tmp_path / f"{page.stem}_snippets.py"
    script.write_text("\n\n".join(blocks(page, "python")) + EPILOGUE)
    env = {**os.environ, "REDIS_URL": comet_redis.url, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-c",
                             f"import runpy; runpy.run_path({str(script)!r}, run_name='docs_snippet')"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{page.name}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


def test_every_page_has_its_snippets_checked():
    """A page with a code block in a language nobody runs would rot."""
    checked = {"python", "js", "sh", "text", "nginx", "ini", "lua"}  # lua: test_publish.py compares it to the script
    for page in PAGES:
        for lang, _ in FENCE.findall(page.read_text()):
            assert lang in checked, f"{page.name}: a ```{lang} block that no test runs"


def commands() -> list[str]:
    found = set()
    for page in PAGES:
        for body in blocks(page, "sh"):
            found.update(re.findall(r"python3? -m ([\w.]+)", body))
    return sorted(found)


@pytest.mark.parametrize("module", commands())
def test_commands_in_the_docs_exist(module):
    if module in ("venv", "pip", "pytest"):
        return  # the standard ones
    result = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "usage" in result.stdout, result.stderr[-2000:]


def test_run_script_commands_in_the_docs_exist():
    script = (ROOT / "run").read_text()
    for page in PAGES:
        for body in blocks(page, "sh"):
            for sub in re.findall(r"\./run (\w+)", body):
                assert f"  {sub})" in script, f"{page.name}: ./run {sub} is not a command of ./run"


def test_the_quickstart_runs_as_a_script_and_curl_shows_the_stream(tmp_path):
    """docs/quickstart.md end to end: its app.py under ``__main__`` (the
    CherryPy default port swapped for a free one), then its curl commands."""
    from comet.processes import AppProcess, free_port
    from comet.testing import wait_until

    page = DOCS / "quickstart.md"
    app = next(b for b in blocks(page, "python") if "cherrypy.quickstart" in b)
    port = free_port()
    (tmp_path / "app.py").write_text(
        f"import cherrypy\ncherrypy.config.update({{'server.socket_port': {port}}})\n" + app)
    shell = next(b for b in blocks(page, "sh") if "curl -N" in b)
    listen, say = [line.replace("8080", str(port)) for line in shell.splitlines() if line.startswith("curl")]
    # "{port}" keeps AppProcess from appending --port; app.py ignores its argv
    server = AppProcess([str(tmp_path / "app.py"), "{port}"], port=port, env={"PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    with server:
        watcher = subprocess.Popen(listen.split() + ["--max-time", "5", "-s"], stdout=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(watcher.stdout), daemon=True)
        reader.start()
        try:
            wait_until(lambda: ":ok\n" in lines, timeout=10, what="curl shows the preamble")  # subscribed
            said = subprocess.run(say.replace('"', "").split() + ["-s"], capture_output=True, text=True, timeout=10)
            assert said.stdout == "ok"
            wait_until(lambda: "data: hello\n" in lines, timeout=10, what="curl shows the event")
        finally:
            watcher.kill()
            watcher.wait(5)
            reader.join(5)
            watcher.stdout.close()
        assert lines[0] == ":ok\n" and re.fullmatch(r"id: \d+-1\n", lines[lines.index("data: hello\n") - 1])
