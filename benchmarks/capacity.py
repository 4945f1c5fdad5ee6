"""Capacity: comet (fast route, parked and thread mode) side by side with aiohttp and
sse-starlette on uvicorn, in one run.

    .venv/bin/python -m benchmarks.capacity [--n 100 1000 5000 10000] [--broadcasts 20] [--servers ...]

For each server and each N: start the server process, open N SSE streams from
load-client processes (asyncio, raw sockets, uvloop when present), then

* one broadcast at a time: POST /publish with a send timestamp in the payload,
  wait until every stream has it; latency to the *last* stream per broadcast
  (p50/p99/max) and the median per-stream latency;
* a fixed rate: ``--rate`` broadcasts per second for ``--seconds``;
* lost / duplicated / out-of-order events, counted per stream by sequence;
* server RSS per stream (VmRSS after connecting minus before, over N),
  connect time and server CPU per connect, server CPU per event per stream, idle CPU over ``--idle``
  seconds, a page request's time while all streams are open, and the time
  to exit on SIGTERM with every stream open.

The ``comet-3ch-*`` rows compare a client that follows three channels with
one stream (``hub.subscribe(["b", "c", "d"])``) against one that opens three
streams (b, c and d); broadcasts go to b. ``rss_per_stream_kb`` is then per
*client* (all its streams).

Then one stream: POST /burst?n=... and events/s received.

Prints a table and one JSON line (with the ratios of comet's last-stream p50,
fast route and parked handler, to each peer's).
Talks to 127.0.0.1 only; every process it starts is stopped.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing as mp
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SERVERS = {
    "comet-fast": ["-m", "benchmarks.peers.comet_app", "{port}", "fast"],
    "comet-parked": ["-m", "benchmarks.peers.comet_app", "{port}", "parked"],
    "comet-generator": ["-m", "benchmarks.peers.comet_app", "{port}", "generator"],
    "comet-thread": ["-m", "benchmarks.peers.comet_app", "{port}", "thread", "{n}"],
    # Three channels per client: one stream following all three, or three streams.
    "comet-3ch-1stream": ["-m", "benchmarks.peers.comet_app", "{port}", "multi3"],
    "comet-3ch-3streams": ["-m", "benchmarks.peers.comet_app", "{port}", "parked"],
    "aiohttp": ["-m", "benchmarks.peers.aiohttp_app", "{port}"],
    "aiohttp-direct": ["-m", "benchmarks.peers.aiohttp_direct_app", "{port}"],
    "starlette-uvloop": ["-m", "benchmarks.peers.starlette_app", "{port}", "uvloop"],
    "starlette-asyncio": ["-m", "benchmarks.peers.starlette_app", "{port}", "asyncio"],
}
# sse-starlette ends lines with CRLF; a stream of several channels wraps the data
EVENT = re.compile(rb'data: (?:\{"channel":"\w+","data":")?(\d+) ([\d.]+)"?\}?\r?\n')
#: Streams each client opens besides the measured one (which follows channel
#: "b", where the broadcasts go): counted in memory and connect time.
SILENT = {"comet-3ch-3streams": ["/events?ch=c", "/events?ch=d"]}
BURST = re.compile(rb'data: (?:\{"channel":"\w+","data":")?b(\d+)"?\}?\r?\n')
CLK = os.sysconf("SC_CLK_TCK")


# -- load client (runs in its own processes) ---------------------------------


class Dechunk:
    r"""The body of an HTTP/1.1 ``Transfer-Encoding: chunked`` response, fed
    as it arrives: ``feed(data)`` returns the body bytes in *data* (what it
    cannot decode yet it keeps). Events must be parsed from the body, not
    the raw bytes: a proxy re-chunks at its own read boundaries (nginx cuts
    a burst of events wherever its buffer fills), so a chunk header can fall
    in the middle of an event's line.

    >>> d = Dechunk()
    >>> d.feed(b"6\r\ndata: ") + d.feed(b"\r\n4\r\nb12\n\r") + d.feed(b"\n0\r\n\r\n")
    b'data: b12\n'
    """

    def __init__(self) -> None:
        self.raw = b""
        self.left = 0  # body bytes left in the current chunk; -1: its CRLF next; 0: a size line next
        self.done = False

    def feed(self, data: bytes) -> bytes:
        buf, pos, out = self.raw + data, 0, []
        while not self.done:
            if self.left > 0:
                piece = buf[pos:pos + self.left]
                out.append(piece)
                pos += len(piece)
                self.left -= len(piece)
                if self.left:
                    break
                self.left = -1
            if self.left < 0:
                if len(buf) - pos < 2:
                    break
                pos, self.left = pos + 2, 0
            end = buf.find(b"\r\n", pos)
            if end < 0:
                break
            self.left = int(buf[pos:end].split(b";")[0], 16)
            pos = end + 2
            self.done = self.left == 0  # the last chunk (trailers are not read)
        self.raw = buf[pos:]
        return b"".join(out)


class _Stream(asyncio.Protocol):
    def __init__(self, client: "_Client") -> None:
        self.client = client
        self.head = b""
        self.tail = b""
        self.chunks: Dechunk | None = None  # a chunked response's decoder
        self.open = False
        self.last = -1
        self.bursts = 0

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if not self.open:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            self.open = True
            if b"transfer-encoding: chunked" in head.lower():
                self.chunks = Dechunk()
            self.client.opened(self, head)
        if self.chunks is not None:
            data = self.chunks.feed(data)
        buf = self.tail + data
        end = buf.rfind(b"\n")  # every benchmark event is one data line: complete lines suffice
        if end < 0:
            self.tail = buf
            return
        complete, self.tail = buf[:end + 1], buf[end + 1:]
        for match in EVENT.finditer(complete):
            seq = int(match[1])
            if seq <= self.last:
                self.client.bad["duplicate_or_out_of_order"] += 1
                continue
            if seq > self.last + 1 and self.last >= 0:
                self.client.bad["lost"] += seq - self.last - 1
            self.last = seq
            self.client.received(seq, now - float(match[2]))
        if self.client.burst_mode:
            self.bursts += len(BURST.findall(complete))
            self.client.burst_progress(self, now)

    def connection_lost(self, exc) -> None:
        self.client.lost_connection(self)


class _Silent(asyncio.Protocol):
    """A stream that is open and read, but not measured."""

    def __init__(self, path: str, client: "_Client") -> None:
        self.path, self.client = path, client

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())

    def data_received(self, data: bytes) -> None:
        pass

    def connection_lost(self, exc) -> None:
        self.client.lost_connection(self)


class _Client:
    def __init__(self, port: int, n: int, pipe, silent: tuple[str, ...] = ()) -> None:
        self.port, self.n, self.pipe, self.silent = port, n, pipe, silent
        self.streams: list[_Stream] = []
        self.opened_count = 0
        self.latencies: dict[int, list[float]] = {}
        self.bad = {"lost": 0, "duplicate_or_out_of_order": 0, "closed": 0, "status": 0}
        self.burst_mode = False
        self.burst_target = 0
        self.burst_start = None
        self.loop = asyncio.get_event_loop()
        self.all_open = asyncio.Event()

    def opened(self, stream: _Stream, head: bytes) -> None:
        if not head.startswith(b"HTTP/1.1 200"):
            self.bad["status"] += 1
        self.opened_count += 1
        if self.opened_count == self.n:
            self.all_open.set()

    def received(self, seq: int, latency: float) -> None:
        got = self.latencies.setdefault(seq, [])
        got.append(latency)
        if len(got) == self.n:
            got.sort()
            self.pipe.send(("seq", seq, got[-1], got[len(got) // 2], dict(self.bad)))
            del self.latencies[seq]

    def burst_progress(self, stream: _Stream, now: float) -> None:
        if self.burst_start is None:
            self.burst_start = now
        if stream.bursts >= self.burst_target:
            self.pipe.send(("burst", stream.bursts, now - self.burst_start))
            self.burst_mode = False

    def lost_connection(self, stream: _Stream) -> None:
        self.bad["closed"] += 1

    async def run(self) -> None:
        started = time.monotonic()
        gate = asyncio.Semaphore(256)

        async def connect():
            async with gate:
                for attempt in range(50):
                    try:
                        _, stream = await self.loop.create_connection(lambda: _Stream(self), "127.0.0.1", self.port)
                        self.streams.append(stream)
                        return
                    except OSError:
                        await asyncio.sleep(0.05 * (attempt + 1))
                raise RuntimeError("cannot connect")

        async def connect_silent(path: str):
            async with gate:
                for attempt in range(50):
                    try:
                        _, stream = await self.loop.create_connection(lambda: _Silent(path, self), "127.0.0.1", self.port)
                        self.streams.append(stream)
                        return
                    except OSError:
                        await asyncio.sleep(0.05 * (attempt + 1))
                raise RuntimeError("cannot connect")

        await asyncio.gather(*(connect() for _ in range(self.n)),
                             *(connect_silent(path) for path in self.silent for _ in range(self.n)))
        await asyncio.wait_for(self.all_open.wait(), 120)
        self.pipe.send(("open", time.monotonic() - started))
        while True:
            if await self.loop.run_in_executor(None, self.pipe.poll, 0.2):
                command = self.pipe.recv()
                if command[0] == "stop":
                    break
                if command[0] == "burst":
                    self.burst_mode, self.burst_target, self.burst_start = True, command[1], None
        for stream in self.streams:
            stream.transport.close()
        self.pipe.send(("bye", dict(self.bad)))


def _client_main(port: int, n: int, pipe, silent: tuple[str, ...] = ()) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.run_until_complete(_Client(port, n, pipe, silent).run())


# -- the driver ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_kb(pid: int) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text)[1])


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def _request(port: int, method: str, path: str, timeout: float = 30) -> tuple[int, float]:
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.perf_counter() - started
    finally:
        conn.close()


def _pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))] if values else float("nan")


def _start_server(name: str, n: int) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    argv = [sys.executable] + [a.format(port=port, n=n) for a in SERVERS[name]]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), port


def _wait_up(name: str, server: subprocess.Popen, port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if _request(port, "GET", "/", 2)[0] == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline or server.poll() is not None:
            raise RuntimeError(f"{name} did not start")
        time.sleep(0.1)


def run_one(name: str, n: int, args) -> dict:
    server, port = _start_server(name, n)
    result: dict = {"server": name, "n": n}
    pipes, procs = [], []
    try:
        _wait_up(name, server, port)
        rss0, cpu0 = _rss_kb(server.pid), _cpu_s(server.pid)
        result["connect_s"] = round(start_clients(port, n, args.clients, pipes, procs, SILENT.get(name, ())), 3)
        # server CPU per stream connect (clock ticks: coarse below ~1,000 streams)
        result["connect_cpu_ms"] = round((_cpu_s(server.pid) - cpu0) * 1000 / n, 3)
        time.sleep(0.5)
        rss1 = _rss_kb(server.pid)
        result["rss_per_stream_kb"] = round((rss1 - rss0) / n, 1)
        result["page_ms"] = round(_request(port, "GET", "/")[1] * 1000, 2)

        def broadcast(seq: int, wait: bool) -> None:
            _request(port, "POST", f"/publish?seq={seq}&ts={time.time():.6f}")

        def collect(seq_set: set, timeout: float) -> tuple[dict, dict]:
            last, median, bad = {}, {}, {}
            pending = {(i, s) for i in range(len(pipes)) for s in seq_set}
            end = time.monotonic() + timeout
            while pending and time.monotonic() < end:
                for i, pipe in enumerate(pipes):
                    while pipe.poll(0.001):
                        kind, seq, worst, mid, counts = pipe.recv()
                        pending.discard((i, seq))
                        last[seq] = max(last.get(seq, 0.0), worst)
                        median.setdefault(seq, []).append(mid)
                        for key, value in counts.items():
                            bad[key] = max(bad.get(key, 0), value) if i == 0 else bad.get(key, 0) + 0
            if pending:
                raise TimeoutError(f"{len(pending)} (client, broadcast) pairs never arrived")
            return last, {s: statistics.median(v) for s, v in median.items()}

        cpu0 = _cpu_s(server.pid)
        lasts, mids = [], []
        for seq in range(args.broadcasts):
            broadcast(seq, True)
            last, median = collect({seq}, 60)
            lasts.append(last[seq])
            mids.append(median[seq])
        cpu1 = _cpu_s(server.pid)
        result.update({
            "last_p50_ms": round(_pct(lasts, 50) * 1000, 1), "last_p99_ms": round(_pct(lasts, 99) * 1000, 1),
            "last_max_ms": round(max(lasts) * 1000, 1), "stream_p50_ms": round(statistics.median(mids) * 1000, 1),
            "cpu_us_per_event_stream": round((cpu1 - cpu0) / (args.broadcasts * n) * 1e6, 2),
        })
        # a fixed rate, not waiting between broadcasts
        base = args.broadcasts
        count = int(args.rate * args.seconds)
        started = time.monotonic()
        for i in range(count):
            broadcast(base + i, False)
            time.sleep(max(0.0, started + (i + 1) / args.rate - time.monotonic()))
        last, _ = collect(set(range(base, base + count)), 120)
        values = list(last.values())
        result.update({"rate": args.rate, "rate_last_p50_ms": round(_pct(values, 50) * 1000, 1),
                       "rate_last_p99_ms": round(_pct(values, 99) * 1000, 1)})
        # idle cost
        cpu0 = _cpu_s(server.pid)
        time.sleep(args.idle)
        result["idle_cpu_pct"] = round((_cpu_s(server.pid) - cpu0) / args.idle * 100, 2)
        result["page_ms_loaded"] = round(_request(port, "GET", "/")[1] * 1000, 2)
        # SIGTERM with every stream open
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
            result["sigterm_exit_s"] = round(time.monotonic() - started, 3)
        except subprocess.TimeoutExpired:
            result["sigterm_exit_s"] = None
        bad_total = {"lost": 0, "duplicate_or_out_of_order": 0, "status": 0}
        for pipe in pipes:
            pipe.send(("stop",))
        for pipe in pipes:
            while pipe.poll(10):
                message = pipe.recv()
                if message[0] == "bye":
                    for key in bad_total:
                        bad_total[key] += message[1].get(key, 0)
                    break
        result.update(bad_total)
    except Exception as exc:  # a server that cannot take N streams is a result too
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        stop_clients(pipes, procs)
        if server.poll() is None:
            server.kill()
            server.wait(10)
    return result


def start_clients(port: int, n: int, clients: int, pipes: list, procs: list, silent: tuple[str, ...] = ()) -> float:
    """Open *n* streams on *port* from up to *clients* load-client processes
    (at most one per 500 streams), and *n* of each *silent* path. Their pipes
    and processes are appended to *pipes*/*procs* as they start, so the
    caller's ``finally`` can stop them. Returns the seconds until every
    stream was open."""
    k = max(1, min(clients, n // 500 or 1))
    for i in range(k):
        parent, child = mp.Pipe()
        proc = mp.Process(target=_client_main, args=(port, n // k + (1 if i < n % k else 0), child, tuple(silent)),
                          daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    opened = []
    for pipe in pipes:
        if not pipe.poll(180):
            raise RuntimeError("clients did not connect")
        opened.append(pipe.recv()[1])
    return max(opened)


def stop_clients(pipes: list, procs: list) -> None:
    """Tell load-client processes to stop, then make sure they did."""
    for pipe in pipes:
        try:
            pipe.send(("stop",))
        except OSError:
            pass
    for proc in procs:
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def one_stream_burst(stream_port: int, publish_port: int, n: int, timeout: float = 120,
                     batch: int = 1) -> tuple[float, float]:
    """One stream on *stream_port*; POST /burst?n=&batch= to *publish_port*:
    (events/s the stream received, events/s the publisher managed)."""
    parent, child = mp.Pipe()
    proc = mp.Process(target=_client_main, args=(stream_port, 1, child), daemon=True)
    proc.start()
    try:
        parent.recv()  # open
        parent.send(("burst", n))
        time.sleep(0.3)  # the client switches to burst counting (a pipe message, no reply to wait on)
        publish_s = _request(publish_port, "POST", f"/burst?n={n}&batch={batch}", timeout=timeout)[1]
        if not parent.poll(timeout):
            raise TimeoutError("burst never completed")
        _, got, seconds = parent.recv()
        if not seconds:
            raise ValueError(f"all {got} events arrived at once: use a larger burst to time it")
        return got / seconds, n / publish_s
    finally:
        stop_clients([parent], [proc])


def run_burst(name: str, args) -> dict:
    server, port = _start_server(name, 1)
    try:
        _wait_up(name, server, port)
        received, _ = one_stream_burst(port, port, args.burst)
        return {"server": name, "one_stream_events_per_s": round(received)}
    except Exception as exc:
        return {"server": name, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


COLUMNS = ["server", "n", "connect_s", "connect_cpu_ms", "last_p50_ms", "last_p99_ms", "stream_p50_ms", "rate_last_p50_ms",
           "cpu_us_per_event_stream", "rss_per_stream_kb", "idle_cpu_pct", "page_ms_loaded", "sigterm_exit_s",
           "lost", "duplicate_or_out_of_order", "error"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[100, 1000, 5000, 10000])
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=list(SERVERS))
    parser.add_argument("--broadcasts", type=int, default=20)
    parser.add_argument("--rate", type=float, default=5.0, help="broadcasts per second in the fixed-rate phase")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle CPU measurement")
    parser.add_argument("--clients", type=int, default=1, help="load-client processes (at most one per 500 streams)")
    parser.add_argument("--burst", type=int, default=20_000, help="events in the one-stream burst")
    parser.add_argument("--json", type=Path, help="also write all results here")
    args = parser.parse_args()
    rows = []
    for n in args.n:
        for name in args.servers:
            if name == "comet-thread" and n > 5000:
                rows.append({"server": name, "n": n, "error": "skipped: one thread per stream"})
                continue
            if name.startswith("comet-3ch") and n > 5000:
                rows.append({"server": name, "n": n, "error": "skipped: three streams per client"})
                continue
            row = run_one(name, n, args)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    bursts = [run_burst(name, args) for name in args.servers]
    print(" | ".join(COLUMNS))
    for row in rows:
        print(" | ".join(str(row.get(c, "")) for c in COLUMNS))
    print()
    for b in bursts:
        print(f"{b['server']}: one stream {b.get('one_stream_events_per_s', b.get('error'))} events/s")
    ratios = {}
    for ours_name in ("comet-fast", "comet-parked", "comet-generator"):
        for n in args.n:
            ours = next((r for r in rows if r["server"] == ours_name and r["n"] == n and "error" not in r), None)
            for row in rows:
                # the generator handler is also compared with the returned subscription (one model: same cost)
                if (ours and row["n"] == n and (not row["server"].startswith("comet") or (
                        ours_name == "comet-generator" and row["server"] == "comet-parked"))
                        and "error" not in row and row.get("last_p50_ms")):
                    ratios.setdefault(ours_name, {})[f"{n}:{row['server']}"] = round(ours["last_p50_ms"] / row["last_p50_ms"], 2)
    summary = {"bench": "capacity", "rows": rows, "bursts": bursts, "last_p50_ratio_to_peers": ratios}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
