"""Every private cheroot and CherryPy detail comet relies on, in one place.

Nothing else in comet reaches into a server: the other modules use the
names exported here (``tests/test_structure.py`` checks that no private
name crosses modules). Each entry says what is used and why; ``setup.py``
pins cheroot and CherryPy to the range the suite has passed on, and the
suite runs on the lowest and newest of it.

The package is split by what it touches: :mod:`~comet.internals.accept`
(cheroot's connections at accept time), :mod:`~comet.internals.connection`
(the connection of one request), :mod:`~comet.internals.cprequest`
(CherryPy's engine, server adapter and request) and
:mod:`~comet.internals.direct_request` (a CherryPy request built without
its pipeline).

cheroot (``cheroot.server``, ``cheroot.connections``):

===================================  ===========================================
``HTTPServer.gateway``               subclassed (:func:`install_gateway`) to put
                                     the cheroot request in the environ
                                     (``comet.request``): a stream needs it to
                                     take its connection over.
``HTTPServer.process_conn``          replaced per server instance by
                                     :class:`AcceptHook`: comet looks at each
                                     connection before a worker thread does.
``HTTPServer.ssl_adapter``,          TLS servers are left alone (an ``ssl``
``.timeout``                         socket cannot be peeked); how long a
                                     request head may take to arrive.
``HTTPConnection.socket``,           the plain socket (``type(...) is
``.rfile.has_data()``,               socket.socket``), whether cheroot buffered
``.remote_addr``, ``.remote_port``,  bytes already (a pipelined request), the
``.server``, ``.close()``,           peer, the server, closing; dropping
``.rfile``, ``.wfile``               cheroot's file objects when a fast route
                                     takes a socket.
``HTTPServer.request_queue_size``,   the listen backlog: raised from the default
``.socket``                          5 before the server binds, or on its
                                     listening socket (:func:`size_backlog`).
``HTTPServer.server_name``,          a direct request's ``request.local``, as
``.bind_addr``                       CherryPy's WSGI gateway makes it.
``HTTPConnection.linger``            set when a stream takes the connection:
                                     cheroot then leaves the socket open
                                     (the flag cheroot has for exactly this).
``HTTPRequest.conn``,                to take a connection: send the head now
``.ensure_headers_sent()``,          (also for a long-poll, whose body comes
``.chunked_write``,                  later), learn whether it is chunked, stop
``.close_connection``                cheroot's terminating chunk and keep-alive.
``comma_separated_headers``          how cheroot folds repeated headers; a
                                     direct request folds them the same way.
===================================  ===========================================

CherryPy (``cherrypy._cprequest``, ``cherrypy.lib``):

===================================  ===========================================
``request._sessionsaved``            the guard of ``cherrypy.lib.sessions.save``:
                                     a stream saves and unlocks the session at
                                     its start (:func:`release_session`).
``ResponseEncoder.add_charset``,     the encode tool must not relabel stream
``handler.oldhandler``               bytes (:func:`keep_charset`).
``Request`` attributes that          a *direct* request (:mod:`comet.direct`)
``Request.run`` and ``_do_respond``  is built as those two build one
set up (``header_list``,             (:func:`prepare_direct_request`), minus
``hooks``, ``toolmaps``,             the steps that did nothing for its URL
``process_headers()``, ...);         when a request went through the whole
``Response.finalize()``,             pipeline (:func:`why_not_direct`: the
``.output_status``,                  hooks and their callbacks, the dispatcher
``.header_list``; ``app.toolboxes``, and WSGI pipeline, config namespaces);
``app.wsgiapp.pipeline``,            the response head is the one cheroot
``request.hooks`` and ``Hook``       would write from ``finalize()``.
``.callback``
``request.hooks``, ``.toolmaps``,   a direct request that a generator stream
``.namespaces``, ``.body``,          keeps for its later steps lets go of
``.header_list``, ``.rfile``;        these once it is over
``response.header_list``,            (:func:`slim_spent_request`): less memory
``.cookie``                          and garbage-collector work per stream.
``HTTPError._message``               the reason a handler refused with, shown
                                     as plain text (:func:`http_error_reason`).
``Server._socket_host``,             the adapter's cheroot server, built before
``.httpserver_from_self()``,         it serves so that it gets comet's gateway
``.httpserver``, ``.bind_addr``      (:func:`cheroot_server_of`).
``request.hooks``                    gzip's ``before_finalize`` hook taken out
(``before_finalize``)                (:func:`drop_gzip`).
``request.handler``, ``.callable``   which page handler CherryPy dispatched
                                     to (:func:`dispatched_callable`).
``PageHandler.callable``, ``.args``, what ``tools.comet`` wraps: the page's
``.kwargs``                          function and its arguments, the resume
                                     cursor taken out (:func:`page_arguments`).
===================================  ===========================================

Attributes comet keeps on server objects, set and read only here: the
engine's comet plugin (``_comet_plugin``: :func:`comet_plugin_of`), a
cheroot server's :class:`AcceptHook` and fast routes (``_comet_accept``,
``_comet_routes``: :func:`accept_hook_of`, :func:`fast_routes_of`), a
direct request's mark (``comet_direct``: :func:`mark_direct`).

A failure in the accept-time hook hands the connection back to cheroot
untouched (nothing was read from it), so an ordinary page never fails
because of comet.
"""
from __future__ import annotations

from .accept import (MAX_HEAD, AcceptHook, GetHead, HeadTaker, accept_hook_of, fast_routes_of, install_accept_hook,
                     keep_fast_routes, parse_get_head)
from .connection import BACKLOG, CherootConnection, Peer, connection_for, install_gateway, peer_of, size_backlog
from .cprequest import (cheroot_server_of, comet_plugin_of, dispatched_callable, drop_gzip, http_error_reason,
                        is_direct, keep_charset, keep_comet_plugin, mark_direct, page_arguments, page_callable,
                        release_session, request_context, set_page_params)
from .direct_request import (begin_direct_request, direct_settings, end_direct_request, prepare_direct_request,
                             response_head, slim_spent_request, why_not_direct, write_access_log)

__all__ = ["install_gateway", "size_backlog", "BACKLOG", "install_accept_hook", "AcceptHook", "accept_hook_of", "fast_routes_of", "keep_fast_routes",
           "HeadTaker", "CherootConnection", "connection_for", "GetHead", "parse_get_head", "MAX_HEAD", "Peer", "peer_of",
           "why_not_direct", "begin_direct_request", "end_direct_request", "prepare_direct_request",
           "direct_settings", "write_access_log", "slim_spent_request", "response_head",
           "release_session", "keep_charset", "drop_gzip", "request_context", "http_error_reason",
           "mark_direct", "is_direct", "dispatched_callable", "page_callable", "page_arguments", "set_page_params", "cheroot_server_of", "comet_plugin_of", "keep_comet_plugin"]
