"""How soon the server notices a client that vanished without a word.

A laptop that sleeps, a phone that leaves Wi-Fi, a NAT that forgets its
mapping: the client's side of the connection is gone, but no FIN and no RST
ever arrive. Left to Linux's defaults, TCP retransmits for about 15 minutes
before it gives up, and meanwhile the stream, its subscription and its
presence ("ann is here") stay.

Every stream socket gets two TCP options, from its heartbeat *h* (seconds),
by :func:`watch_peer`, wherever the stream opens (parked, fast route, direct,
thread mode; a thread-mode stream gives its socket its own options back when
it ends, since the connection may serve more requests):

* ``TCP_USER_TIMEOUT`` of ``2 h + 4`` seconds (:func:`user_timeout`): data
  the server sent that stays unacknowledged that long makes the kernel
  abort the connection. A stream always has such data once the client is
  gone: a heartbeat at the latest *h* seconds later. The writer thread
  (its selector reports the error), or a thread-mode stream's next write or
  disconnect probe, ends the stream; the handler's ``finally`` runs, its
  subscriptions close, and presence counts the member gone after its grace
  period. The bound is :func:`notice_within`: ``3 h + 5`` seconds after the
  client's last acknowledgement (50 s for the default 15 s heartbeat): a
  heartbeat, the user timeout, and up to a second more for the kernel's
  retransmission timer (with h = 1 s the suite measures 6.4 to 7.1 s). The user
  timeout is 2 heartbeats and a margin, so the server is never quicker to
  give up on a slow network than a client watching heartbeats (which waits
  about 2 heartbeats of silence).
* keepalive, first probe after ``h + 4`` seconds with nothing received,
  then one every *h*, for a stream that has nothing in flight (a long-poll
  waiting, a handler busy in its own code): the connection is aborted once
  a probe is out and nothing came for the user timeout. On a heartbeating
  stream no probe is ever sent (a thread-mode stream's heartbeats may come
  an idle tick late, hence the margin): the heartbeat's acknowledgement
  comes first. The cost per idle stream is the heartbeat.

A client that is alive but reads nothing, its receive window shut for the
whole user timeout, is aborted too (Linux applies the user timeout to
zero-window probes); the writer's ``max_buffer`` disconnects such slow
consumers anyway.

>>> import socket
>>> with socket.socket() as sock:
...     restore = watch_peer(sock, heartbeat=15)
...     sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
34000
>>> notice_within(15)
50.0
"""
from __future__ import annotations

import math
import socket
from typing import Callable

__all__ = ["watch_peer", "user_timeout", "notice_within", "MARGIN"]

#: Seconds added to two heartbeats before unacknowledged data aborts a
#: connection: a few retransmissions' worth on a slow but live network.
MARGIN = 4.0
#: Seconds the kernel may take past the user timeout to abort (its
#: retransmission timer fires on its own schedule).
KERNEL_SLACK = 1.0

_TCP = getattr(socket, "IPPROTO_TCP", 6)
# Linux names; elsewhere (macOS, Windows) some are missing and are skipped.
_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)
_KEEPIDLE = getattr(socket, "TCP_KEEPIDLE", None)
_KEEPINTVL = getattr(socket, "TCP_KEEPINTVL", None)
_KEEPCNT = getattr(socket, "TCP_KEEPCNT", None)


def user_timeout(heartbeat: float) -> float:
    """Seconds sent data may stay unacknowledged before the connection is
    aborted: two heartbeats and :data:`MARGIN`.

    >>> user_timeout(1)
    6.0
    """
    return 2 * heartbeat + MARGIN


def notice_within(heartbeat: float) -> float:
    """The bound: seconds after a client's last acknowledgement by which its
    stream has ended (a heartbeat goes out, then :func:`user_timeout`, then
    :data:`KERNEL_SLACK`): ``3 h + 5``.

    >>> notice_within(1)
    8.0
    """
    return heartbeat + user_timeout(heartbeat) + KERNEL_SLACK


def watch_peer(sock: socket.socket | None, heartbeat: float) -> Callable[[], None]:
    """Set the options above on a stream's TCP *sock* (``None``, a Unix
    socket or a platform without them: nothing happens; an error setting
    them never stops a stream). Returns what puts back the options the
    socket had before: a thread-mode stream's connection may serve more
    requests once it ends (HTTP keep-alive), and those must not inherit a
    stream's short user timeout.

    >>> with socket.socket() as sock:
    ...     restore = watch_peer(sock, heartbeat=1)
    ...     restore()
    ...     sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
    0
    """
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return _nothing
    timeout = user_timeout(heartbeat)
    idle = max(1, math.ceil(heartbeat + MARGIN))
    wanted = [
        (_TCP, _USER_TIMEOUT, min(int(timeout * 1000), 2**31 - 1)),
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (_TCP, _KEEPIDLE, min(idle, 32767)),
        (_TCP, _KEEPINTVL, min(max(1, math.ceil(heartbeat)), 32767)),
        # Where the user timeout is not honoured by keepalive (old kernels).
        (_TCP, _KEEPCNT, max(1, math.ceil(MARGIN / max(1.0, heartbeat))) + 1),
    ]
    before: list[tuple[int, int, int]] = []
    try:
        for level, name, value in wanted:
            if name is None:
                continue
            old = sock.getsockopt(level, name)
            sock.setsockopt(level, name, value)
            before.append((level, name, old))
    except OSError:
        pass

    def restore() -> None:
        # (In the reverse order: keepalive's timers are back before it is.)
        try:
            for level, name, old in reversed(before):
                sock.setsockopt(level, name, old)
        except OSError:  # the connection is gone: nothing left to restore
            pass
        before.clear()

    return restore


def _nothing() -> None:
    pass
