"""Idle streams: what keeping N idle SSE streams alive costs the server, comet
(with and without the socket options of comet.liveness) side by side with a
floor and with aiohttp and sse-starlette pinging at the same interval, in one
run.

    .venv/bin/pip install aiohttp sse-starlette uvicorn uvloop   # the peers (once)
    .venv/bin/python -m benchmarks.idle_streams                  # about 2.5 minutes

Defaults: ``--n 5000`` streams, ``--heartbeat 1`` second (short, so the cost
shows), ``--window 10`` seconds, load clients on ``--clients 2`` processes.
Run it on a quiet machine: other load inflates every number. Each server takes
about 15 to 25 s (start, connect, settle, window, stop); ``--servers`` picks
some. A server whose package is not installed gets a row with its error.

For each server: start it, open N SSE streams over loopback from the load
clients (asyncio, raw sockets, each reading everything), wait two heartbeats,
then measure over ``--window`` seconds, nothing published:

* server CPU per stream per heartbeat: utime + stime of the server process
  (``/proc/<pid>/stat``, clock ticks: 10 ms) over the window, divided by N and
  by window / heartbeat; ``sched_us_per_stream_beat``: the same from the scheduler's
  nanosecond count of its threads' time on a CPU (``/proc/<pid>/task/*/
  schedstat``), precise where a few ticks are all there is. Sending on
  loopback also runs the receiving side's TCP in the sender's context, so
  both include it (the floor too). Kernel timers (a keepalive timer
  re-arming) run in softirq context and are charged to no process;
* bytes per heartbeat on the wire, per stream, from the kernel's counters of
  the server's sockets (``ss -ti``): payload (chunk framing included),
  segments out (data and bare: a bare segment out is a keepalive probe or an
  ACK; an idle client sends nothing to ACK) and in (the client's ACKs), and
  ``wire``: payload plus 52 bytes of IPv4 and TCP headers (with timestamps) a
  segment, both ways. The load clients count the bytes they read too;
* server RSS per stream: VmRSS after the streams settled minus before
  connecting, over N (user space only: socket buffers are the kernel's; the
  floor keeps next to nothing, so its ratio is in the JSON, not the table);
* ``keepalive_sockets``: server sockets whose keepalive timer is armed
  (``ss -o``) at the start or the end of the window: about N for comet as it
  is (a socket with a heartbeat in flight shows its retransmission timer
  instead), 0 without its socket options (it shows the switch worked);
* ``min_beats``: the fewest data segments any stream got in the window, and
  ``silent``/``dropped``: streams that got nothing, or closed (both 0).

Servers (``benchmarks/peers/``, heartbeat from the environment, BENCH_HEARTBEAT):

* ``floor``: one ``send()`` of comet's heartbeat bytes per stream per
  interval from a plain Python loop over the sockets: the least any server
  can do (``peers/floor_app.py``);
* ``comet-parked`` (``@comet`` handler returning its subscription),
  ``comet-fast`` (a fast route), ``comet-thread`` (mode="thread": one thread a
  stream, not in the defaults): comet as it is, heartbeat event plus
  TCP_USER_TIMEOUT and keepalive; ``-nowatch``: the same server with
  ``BENCH_NO_WATCH_PEER=1``, which turns comet.liveness's socket options off
  in that process only;
* ``aiohttp`` (a queue per client, a comment when it waited a heartbeat),
  ``aiohttp-direct`` (a task per client writing a comment every heartbeat),
  ``starlette-uvloop`` / ``starlette-asyncio`` (sse-starlette's ``ping``).

Prints each server's row as JSON on stderr as it finishes; then on stdout a
table, one row per server with its ratios to the floor side by side, a line
on the watchdog's cost (each comet server against its ``-nowatch`` twin), and
one JSON line with everything; writes ``idle-streams-<date>.json`` and ``.md`` to ``--out``
(benchmarks/results). Talks to 127.0.0.1 only; every process it starts is
stopped.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing as mp
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.capacity import _cpu_s, _free_port, _rss_kb, _wait_up, stop_clients

ROOT = Path(__file__).resolve().parents[1]
COMET = ["-m", "benchmarks.peers.comet_app", "{port}"]
NO_WATCH = {"BENCH_NO_WATCH_PEER": "1"}
#: name: (argv after the interpreter, extra environment)
SERVERS: dict[str, tuple[list[str], dict[str, str]]] = {
    "floor": (["-m", "benchmarks.peers.floor_app", "{port}"], {}),
    "comet-parked": (COMET + ["parked"], {}),
    "comet-parked-nowatch": (COMET + ["parked"], NO_WATCH),
    "comet-fast": (COMET + ["fast"], {}),
    "comet-fast-nowatch": (COMET + ["fast"], NO_WATCH),
    "comet-thread": (COMET + ["thread", "{n}"], {}),
    "comet-thread-nowatch": (COMET + ["thread", "{n}"], NO_WATCH),
    "aiohttp": (["-m", "benchmarks.peers.aiohttp_app", "{port}"], {}),
    "aiohttp-direct": (["-m", "benchmarks.peers.aiohttp_direct_app", "{port}"], {}),
    "starlette-uvloop": (["-m", "benchmarks.peers.starlette_app", "{port}", "uvloop"], {}),
    "starlette-asyncio": (["-m", "benchmarks.peers.starlette_app", "{port}", "asyncio"], {}),
}
DEFAULT_SERVERS = ["floor", "comet-parked", "comet-parked-nowatch", "comet-fast", "aiohttp", "aiohttp-direct",
                   "starlette-uvloop"]
#: IPv4 (20) and TCP with the timestamps option (32) headers of one segment.
HEADERS = 52
REQUEST = b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"


# -- load client (runs in its own processes) ---------------------------------


class _Idle(asyncio.Protocol):
    """One idle stream: reads everything, counts the bytes."""

    def __init__(self, client: "_Client") -> None:
        self.client = client
        self.head = b""
        self.open = False
        self.received = 0
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if not self.open:
            self.head += data
            if b"\r\n\r\n" in self.head:
                self.open = True
                self.client.opened(self.head.partition(b"\r\n\r\n")[0])
                self.head = b""

    def connection_lost(self, exc) -> None:
        self.closed = True
        if not self.client.stopping:
            self.client.dropped += 1


class _Client:
    def __init__(self, port: int, n: int, pipe) -> None:
        self.port, self.n, self.pipe = port, n, pipe
        self.streams: list[_Idle] = []
        self.opened_count = 0
        self.bad_status = 0
        self.first_head = ""
        self.dropped = 0
        self.stopping = False
        self.all_open = asyncio.Event()

    def opened(self, head: bytes) -> None:
        if not head.startswith(b"HTTP/1.1 200"):
            self.bad_status += 1
        if not self.first_head:
            self.first_head = head.decode("latin-1")
        self.opened_count += 1
        if self.opened_count == self.n:
            self.all_open.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        gate = asyncio.Semaphore(256)

        async def connect() -> None:
            async with gate:
                for attempt in range(50):
                    try:
                        _, stream = await loop.create_connection(lambda: _Idle(self), "127.0.0.1", self.port)
                        self.streams.append(stream)
                        return
                    except OSError:
                        await asyncio.sleep(0.05 * (attempt + 1))
                raise RuntimeError("cannot connect")

        await asyncio.gather(*(connect() for _ in range(self.n)))
        await asyncio.wait_for(self.all_open.wait(), 180)
        self.pipe.send(("open", time.monotonic() - started, self.bad_status, self.first_head))
        while True:
            if await loop.run_in_executor(None, self.pipe.poll, 0.2):
                command = self.pipe.recv()
                if command[0] == "mark":
                    self.pipe.send(("mark", [s.received for s in self.streams]))
                elif command[0] == "stop":
                    break
        self.stopping = True
        for stream in self.streams:
            stream.transport.close()
        self.pipe.send(("bye", self.dropped))


def _client_main(port: int, n: int, pipe) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_Client(port, n, pipe).run())


def start_clients(port: int, n: int, clients: int, pipes: list, procs: list) -> tuple[float, int, str]:
    """Open *n* idle streams on *port* from up to *clients* processes (at most
    one per 500 streams), appending their pipes/processes as they start (the
    caller stops them). Returns (seconds until all were open, responses that
    were not 200, the first response head)."""
    k = max(1, min(clients, n // 500 or 1))
    for i in range(k):
        parent, child = mp.Pipe()
        proc = mp.Process(target=_client_main, args=(port, n // k + (1 if i < n % k else 0), child), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    seconds, bad, head = 0.0, 0, ""
    for pipe in pipes:
        if not pipe.poll(240):
            raise RuntimeError("clients did not connect")
        _, took, not_ok, first = pipe.recv()
        seconds, bad, head = max(seconds, took), bad + not_ok, head or first
    return seconds, bad, head


def _marks(pipes: list) -> list[int]:
    """Bytes each stream has read so far, over all clients."""
    for pipe in pipes:
        pipe.send(("mark",))
    counts: list[int] = []
    for pipe in pipes:
        if not pipe.poll(30):
            raise RuntimeError("a load client stopped answering")
        counts += pipe.recv()[1]
    return counts


def _sched_s(pid: int) -> float:
    """Seconds the threads of *pid* alive now have spent on a CPU."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            pass  # a thread that just ended
    return total / 1e9


# -- the server's sockets, as the kernel counts them --------------------------

_COUNTER = re.compile(r"\b(bytes_sent|segs_out|segs_in|data_segs_out):(\d+)")


def _sockets(port: int) -> dict[str, dict[str, int]] | None:
    """The server's established sockets on *port*, by peer address: the
    kernel's counters, and ``keepalive`` 1 when its keepalive timer is armed.
    ``None`` without ``ss``."""
    if shutil.which("ss") is None:
        return None
    out = subprocess.run(["ss", "-tinoH", "state", "established", "sport", "=", f":{port}"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    found: dict[str, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in out.splitlines():
        if line and not line[0].isspace():  # "Recv-Q Send-Q local peer [timer:(...)]"
            fields = line.split()
            current = found[fields[3]] = {"keepalive": int("timer:(keepalive" in line)}
        elif current is not None:
            for name, value in _COUNTER.findall(line):
                current[name] = int(value)
    return found


def _kernel_counts(before: dict, after: dict) -> dict[str, float]:
    """Sums of the counters' growth over the sockets present at both ends."""
    keys = before.keys() & after.keys()
    total = {"sockets": len(keys), "bytes_sent": 0, "segs_out": 0, "segs_in": 0, "data_segs_out": 0, "min_beats": None,
             "keepalive_sockets": sum(1 for k in keys if before[k]["keepalive"] or after[k]["keepalive"])}
    for key in keys:
        for name in ("bytes_sent", "segs_out", "segs_in", "data_segs_out"):
            total[name] += after[key].get(name, 0) - before[key].get(name, 0)
        data = after[key].get("data_segs_out", 0) - before[key].get("data_segs_out", 0)
        total["min_beats"] = data if total["min_beats"] is None else min(total["min_beats"], data)
    return total


# -- the driver ----------------------------------------------------------------


def run_one(name: str, args) -> dict:
    n, h = args.n, args.heartbeat
    argv, extra = SERVERS[name]
    port = _free_port()
    env = dict(os.environ, BENCH_HEARTBEAT=repr(h), **extra)
    errors = tempfile.TemporaryFile()  # a file, not a pipe: a chatty server never blocks on it
    server = subprocess.Popen([sys.executable] + [a.format(port=port, n=n) for a in argv], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=errors)
    row: dict = {"server": name, "n": n}
    pipes: list = []
    procs: list = []
    try:
        try:
            _wait_up(name, server, port)
        except RuntimeError:
            if server.poll() is not None:  # died: say why (a peer's package missing, say)
                errors.seek(0)
                said = errors.read().decode(errors="replace").strip().splitlines()
                raise RuntimeError(said[-1] if said else f"{name} exited {server.returncode}") from None
            raise
        rss0 = _rss_kb(server.pid)
        row["connect_s"], row["bad_status"], head = start_clients(port, n, args.clients, pipes, procs)
        row["connect_s"] = round(row["connect_s"], 2)
        announced = re.search(r"(?im)^comet-heartbeat:\s*(\S+)", head)
        row["announced_heartbeat"] = float(announced[1]) if announced else None
        time.sleep(max(2 * h, 1.0))  # preambles out, the first heartbeats by
        row["rss_per_stream_kb"] = round((_rss_kb(server.pid) - rss0) / n, 2)

        ss0, ts0 = _sockets(port), time.monotonic()
        bytes0, tc0 = _marks(pipes), time.monotonic()
        sched0, cpu0, t0 = _sched_s(server.pid), _cpu_s(server.pid), time.monotonic()
        time.sleep(args.window)
        cpu1, sched1, t1 = _cpu_s(server.pid), _sched_s(server.pid), time.monotonic()
        bytes1, tc1 = _marks(pipes), time.monotonic()
        ss1, ts1 = _sockets(port), time.monotonic()

        beats = (t1 - t0) / h
        row["window_s"] = round(t1 - t0, 2)
        row["cpu_s"] = round(cpu1 - cpu0, 3)
        row["cpu_us_per_stream_beat"] = round((cpu1 - cpu0) / (n * beats) * 1e6, 3)
        row["sched_us_per_stream_beat"] = round((sched1 - sched0) / (n * beats) * 1e6, 3)
        row["idle_cpu_pct"] = round((cpu1 - cpu0) / (t1 - t0) * 100, 2)
        deltas = [b - a for a, b in zip(bytes0, bytes1)]
        row["client_bytes_per_beat"] = round(sum(deltas) / (len(deltas) * (tc1 - tc0) / h), 2)
        row["silent"] = sum(1 for d in deltas if d == 0)
        if ss0 is not None and ss1 is not None:
            k = _kernel_counts(ss0, ss1)
            per = k["sockets"] * (ts1 - ts0) / h or float("nan")
            row.update({
                "payload_bytes_per_beat": round(k["bytes_sent"] / per, 2),
                "segs_out_per_beat": round(k["segs_out"] / per, 3),
                "segs_in_per_beat": round(k["segs_in"] / per, 3),
                "wire_bytes_per_beat": round((k["bytes_sent"] + HEADERS * (k["segs_out"] + k["segs_in"])) / per, 2),
                "bare_segs_out": k["segs_out"] - k["data_segs_out"],
                "min_beats": k["min_beats"],
                "expected_beats": round((ts1 - ts0) / h, 1),
                "keepalive_sockets": k["keepalive_sockets"],
                "sockets": k["sockets"],
            })
        for pipe in pipes:
            pipe.send(("stop",))
        dropped = 0
        for pipe in pipes:
            if pipe.poll(30):
                dropped += pipe.recv()[1]
        row["dropped"] = dropped
    except Exception as exc:  # a server that cannot keep N streams (or is not installed) is a result too
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        stop_clients(pipes, procs)
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        errors.close()
    return row


def ratios(rows: list[dict]) -> tuple[dict, dict]:
    """Each row to the floor (CPU, wire bytes, RSS per stream), and each comet
    server to its ``-nowatch`` twin (CPU): the watchdog's cost."""
    good = {r["server"]: r for r in rows if "error" not in r}
    floor = good.get("floor")
    to_floor: dict = {}
    if floor:
        for name, row in good.items():
            to_floor[name] = {key: _ratio(row.get(key), floor.get(key)) for key in
                              ("cpu_us_per_stream_beat", "sched_us_per_stream_beat", "wire_bytes_per_beat",
                               "rss_per_stream_kb")}
    watchdog: dict = {}
    for name, row in good.items():
        twin = good.get(name + "-nowatch")
        if twin:
            watchdog[name] = {"cpu_ratio": _ratio(row["cpu_us_per_stream_beat"], twin["cpu_us_per_stream_beat"]),
                              "cpu_us_more": round(row["cpu_us_per_stream_beat"] - twin["cpu_us_per_stream_beat"], 3),
                              "sched_ratio": _ratio(row["sched_us_per_stream_beat"], twin["sched_us_per_stream_beat"]),
                              "sched_us_more": round(row["sched_us_per_stream_beat"]
                                                     - twin["sched_us_per_stream_beat"], 3),
                              "wire_ratio": _ratio(row.get("wire_bytes_per_beat"), twin.get("wire_bytes_per_beat")),
                              "bare_segs_out": row.get("bare_segs_out")}
    return to_floor, watchdog


def _ratio(a, b):
    return round(a / b, 2) if a is not None and b else None


COLUMNS = ["server", "n", "connect_s", "cpu_us_per_stream_beat", "x_floor_cpu", "sched_us_per_stream_beat",
           "x_floor_sched", "wire_bytes_per_beat", "x_floor_wire",
           "payload_bytes_per_beat", "segs_out_per_beat", "segs_in_per_beat", "bare_segs_out", "keepalive_sockets",
           "min_beats", "rss_per_stream_kb", "idle_cpu_pct", "silent", "dropped", "error"]
LABELS = {"server": "server", "n": "N", "connect_s": "connect s", "cpu_us_per_stream_beat": "CPU us/stream/beat",
          "x_floor_cpu": "x floor", "sched_us_per_stream_beat": "schedstat us", "x_floor_sched": "x floor",
          "wire_bytes_per_beat": "wire B/beat", "x_floor_wire": "x floor",
          "payload_bytes_per_beat": "payload B/beat", "segs_out_per_beat": "segs out/beat",
          "segs_in_per_beat": "segs in/beat", "bare_segs_out": "bare segs out", "keepalive_sockets": "keepalive socks",
          "min_beats": "min beats", "rss_per_stream_kb": "RSS KB/stream", "x_floor_rss": "x floor",
          "idle_cpu_pct": "CPU %", "silent": "silent", "dropped": "dropped", "error": "error"}


def _cells(row: dict, to_floor: dict) -> list[str]:
    mine = to_floor.get(row["server"], {})
    merged = dict(row, x_floor_cpu=mine.get("cpu_us_per_stream_beat"),
                  x_floor_sched=mine.get("sched_us_per_stream_beat"), x_floor_wire=mine.get("wire_bytes_per_beat"),
                  x_floor_rss=mine.get("rss_per_stream_kb"))
    return ["" if merged.get(c) is None else str(merged[c]) for c in COLUMNS]


def watchdog_line(name: str, w: dict) -> str:
    """One sentence: what comet.liveness's socket options cost *name*."""
    def x(ratio) -> str:
        return "n/a" if ratio is None else f"{ratio}x"
    return (f"watchdog of {name}: CPU per stream per heartbeat {x(w['cpu_ratio'])} {name}-nowatch's "
            f"({w['cpu_us_more']:+} us; schedstat {x(w['sched_ratio'])}, {w['sched_us_more']:+} us), "
            f"wire bytes {x(w['wire_ratio'])}, {w['bare_segs_out']} bare segments (keepalive probes) out")


def markdown(summary: dict, command: str) -> str:
    s = summary
    lines = [f"# Idle streams ({s['date']})", "",
             f"{s['n']} idle SSE streams, heartbeat {s['heartbeat']} s, measured over {s['window']} s; "
             f"{s['machine']}.", "", f"    {command}", "",
             "| " + " | ".join(LABELS[c] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(row, s["ratios_to_floor"])) + " |" for row in s["rows"]]
    lines.append("")
    lines += [f"- {watchdog_line(name, w)}" for name, w in s["watchdog"].items()]
    lines += ["", "CPU: utime + stime of the server process; wire: payload plus 52 B of IPv4/TCP headers per "
              "segment, both ways; see the docstring of benchmarks/idle_streams.py.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="idle streams per server")
    parser.add_argument("--heartbeat", type=float, default=1.0, help="seconds between heartbeats, every server")
    parser.add_argument("--window", type=float, default=10.0, help="seconds measured, once all are connected")
    parser.add_argument("--clients", type=int, default=2, help="load-client processes (at most one per 500 streams)")
    parser.add_argument("--servers", nargs="+", default=DEFAULT_SERVERS, choices=list(SERVERS))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="folder for idle-streams-<date>.json and .md")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # every process started here inherits it
    except (ValueError, OSError):
        pass  # (an unlimited hard limit): the soft one stays
    rows = []
    for name in args.servers:
        row = run_one(name, args)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    to_floor, watchdog = ratios(rows)
    today = datetime.date.today().isoformat()
    summary = {"bench": "idle_streams", "date": today, "n": args.n, "heartbeat": args.heartbeat,
               "window": args.window, "machine": f"{os.cpu_count()} cores, Linux {platform.release()}, "
                                                 f"Python {platform.python_version()}",
               "rows": rows, "ratios_to_floor": to_floor, "watchdog": watchdog}
    print(" | ".join(LABELS[c] for c in COLUMNS))
    for row in rows:
        print(" | ".join(_cells(row, to_floor)))
    print()
    for name, w in watchdog.items():
        print(watchdog_line(name, w))
    command = "python -m benchmarks.idle_streams " + " ".join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"idle-streams-{today}.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    (args.out / f"idle-streams-{today}.md").write_text(markdown(summary, command.strip()), encoding="utf-8")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
