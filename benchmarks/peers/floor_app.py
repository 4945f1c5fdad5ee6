"""The floor of benchmarks/idle_streams.py: idle SSE streams kept alive by the
least any server must do, one ``send()`` of comet's heartbeat bytes (chunk
framed, as comet sends them) per stream per interval, from a plain Python
loop over the sockets. No framework, no timers per stream, no socket
options. `python -m benchmarks.peers.floor_app PORT` (heartbeat:
BENCH_HEARTBEAT seconds, environment; 15 when unset).

``GET /`` answers ``ok``; any other GET opens a stream. Stream sockets stay
registered for reading only to notice a client that closes."""
import os
import selectors
import socket
import sys
import time

from comet.framing import heartbeat, preamble

HEARTBEAT = float(os.environ.get("BENCH_HEARTBEAT", "15"))


def _chunk(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(body), body)


HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-cache\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + _chunk(preamble("sse", heartbeat=HEARTBEAT)))
BEAT = _chunk(heartbeat("sse", HEARTBEAT))
PAGE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
STREAM = b"stream"  # selector data of an open stream (a request head being read: the bytes so far)


def main() -> None:
    listener = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=4096)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, None)
    streams: set[socket.socket] = set()
    next_beat = time.monotonic() + HEARTBEAT

    def close(conn: socket.socket) -> None:
        selector.unregister(conn)
        streams.discard(conn)
        conn.close()

    while True:
        for key, _ in selector.select(max(0.0, next_beat - time.monotonic())):
            if key.data is None:
                while True:
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    selector.register(conn, selectors.EVENT_READ, b"")
                continue
            conn = key.fileobj
            try:
                data = conn.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data or key.data is STREAM:  # a stream's client sends nothing but its close
                if not data:
                    close(conn)
                continue
            head = key.data + data
            if b"\r\n\r\n" not in head:
                selector.modify(conn, selectors.EVENT_READ, head)
                continue
            if head.split(b" ", 2)[1] == b"/":
                conn.send(PAGE)
                close(conn)
            else:
                conn.send(HEAD)
                streams.add(conn)
                selector.modify(conn, selectors.EVENT_READ, STREAM)
        if time.monotonic() >= next_beat:
            for conn in streams:  # the floor: one send per stream per heartbeat
                try:
                    conn.send(BEAT)
                except OSError:
                    pass  # closed: its EOF unregisters it
            next_beat += HEARTBEAT
            if next_beat < time.monotonic():  # fell behind: no burst of beats to catch up
                next_beat = time.monotonic() + HEARTBEAT


if __name__ == "__main__":
    main()
