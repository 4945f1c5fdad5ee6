"""comet's pytest plugin: the ``comet_cherrypy``, ``comet_wsgi`` and
``comet_redis`` fixtures, registered for every suite once comet is installed
(the ``pytest11`` entry point ``comet``).

It lives outside the ``comet`` package on purpose: importing ``comet``
imports CherryPy (it registers ``tools.comet``), and a suite that never uses
a comet fixture should not load CherryPy, nor see its engine log at exit. So
this module imports only pytest; :mod:`comet.testing` is imported by the
first fixture that needs it. Disable it with ``-p no:comet``.

Example::

    def test_say(comet_cherrypy):
        server = comet_cherrypy(Root())
        ...
"""
from __future__ import annotations

import shutil
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterator

import pytest

if TYPE_CHECKING:  # only for the annotations: importing comet loads CherryPy
    from comet.testing import CherryPyServer, RedisServer, WSGIServer

# Whether comet_cherrypy ran in this session: only then is the engine ours
# to exit at the end (a suite's own CherryPy use is left alone).
_engine_used = False


@pytest.fixture
def comet_cherrypy() -> Iterator[Callable[..., CherryPyServer]]:
    """Factory: ``comet_cherrypy(root, config=None, **kw)`` starts a
    CherryPy app on a free port (:class:`comet.testing.CherryPyServer`)
    and stops it after the test."""
    global _engine_used
    from comet.testing import CherryPyServer

    _engine_used = True
    started: list[CherryPyServer] = []

    def start(root: Any, config: dict[str, Any] | None = None, **kw: Any) -> CherryPyServer:
        server = CherryPyServer(root, config, **kw).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def comet_wsgi() -> Iterator[Callable[..., WSGIServer]]:
    """Factory: ``comet_wsgi(app, **kw)`` serves a WSGI app under cheroot
    on a free port (:class:`comet.testing.WSGIServer`) and stops it after
    the test."""
    from comet.testing import WSGIServer

    started: list[WSGIServer] = []

    def start(app: Callable[..., Any], **kw: Any) -> WSGIServer:
        server = WSGIServer(app, **kw).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def comet_redis() -> Iterator[RedisServer]:
    """One real redis-server for the test session (see
    :class:`comet.testing.RedisServer`); the test is skipped, saying why,
    when redis-server is not installed. Tests keep apart by channel names
    or a ``prefix`` of their own."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not found on PATH: install it (Debian: apt-get install redis-server)")
    from comet.testing import RedisServer

    with RedisServer() as server:
        yield server


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    """Exit a CherryPy engine the fixtures left stopped, so the process ends
    cleanly instead of CherryPy warning at interpreter exit. A suite that
    never used ``comet_cherrypy`` is left alone."""
    cp = sys.modules.get("cherrypy")
    if _engine_used and cp is not None and cp.engine.state == cp.engine.states.STOPPED:
        cp.engine.exit()
