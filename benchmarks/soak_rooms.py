"""Soak: rooms that come and go beside open streams.

    .venv/bin/python -m benchmarks.soak_rooms [--seconds 600] [--streams 2000] [--rooms 1000] [--redis --room-threads 8]

One comet server process (CherryPy, parked SSE streams) holds ``--streams``
open streams on a lobby channel. After a ``--baseline`` period, a thread in
the server creates ``--rooms`` rooms per second: each gets a start event, a
player who joins (subscribes from the start) and leaves, a move, and after
``--room-life`` seconds a final event; then half are forgotten
(``hub.forget``) and half are left to ``max_idle`` (``--max-idle``). Once a
second the driver broadcasts on the lobby and times how long until the last
of the streams has it (the fan-out time).

Every ``--window`` seconds it prints the server's RSS, its channel count,
the rooms made and finished so far, how far the room thread is behind its
schedule, and the fan-out times of the window (p50 and max). The verdict
compares the baseline (streams only) with the last window: memory flat and
fan-out unchanged, with every broadcast received once, in order, by every
stream. Prints one JSON line at the end. Talks to 127.0.0.1 only; every
process it starts is stopped.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import threading
import time

from benchmarks.capacity import ROOT, _free_port, _pct, _request, _rss_kb, _wait_up, start_clients, stop_clients

LOBBY = "lobby"


# -- the server (its own process) ------------------------------------------------


class _Rooms:
    """Creates and finishes rooms at a steady rate, on threads of the server
    (as request threads would: with Redis, one thread's round trips in a row
    would bound the rate long before Redis does)."""

    def __init__(self, hub, rate: int, life: float, threads: int) -> None:
        self.hub, self.rate, self.life = hub, rate / threads, life
        self.made = self.finished = 0
        self.behind = 0.0  # seconds the slowest thread is behind its schedule (now)
        self.lock = threading.Lock()
        self.on = threading.Event()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i, threads), name=f"rooms-{i}", daemon=True)
                        for i in range(threads)]
        for thread in self.threads:
            thread.start()

    def _make(self, n: int) -> None:
        room = f"room:{n}"
        first = self.hub.publish(room, {"players": 2}, event="start")
        player = self.hub.subscribe(room, last_id=self.hub.before(first))  # joins, sees the start, leaves
        player.take()
        player.close()
        self.hub.publish(room, {"move": n})

    def _finish(self, n: int) -> None:
        room = f"room:{n}"
        self.hub.publish(room, "over", event="over")
        if n % 2 == 0:
            self.hub.forget(room)  # the other half is left to max_idle
        with self.lock:
            self.finished += 1

    def _run(self, first: int, step: int) -> None:
        live: collections.deque[tuple[float, int]] = collections.deque()
        tick = 0.01
        n = first
        self.on.wait()
        due = time.monotonic()
        while not self.stop.is_set():
            now = time.monotonic()
            while live and live[0][0] <= now - self.life:
                self._finish(live.popleft()[1])
            for _ in range(max(1, round(self.rate * tick))):
                self._make(n)
                live.append((now, n))
                n += step
                with self.lock:
                    self.made += 1
            due += tick
            behind = max(0.0, time.monotonic() - due)
            if first == 0 or behind > self.behind:
                self.behind = behind
            self.stop.wait(max(0.0, due - time.monotonic()))


def serve(port: int, rate: int, life: float, max_idle: float, redis_url: str | None, threads: int) -> None:
    import cherrypy

    from comet import Hub, comet

    if redis_url:
        from comet.backends.redis import RedisHub

        hub: Hub = RedisHub(redis_url, maxlen=1000, prefix="soak:", max_idle=max_idle)
    else:
        hub = Hub(max_idle=max_idle)
    rooms = _Rooms(hub, rate, life, threads)

    class Root:
        @cherrypy.expose
        def index(self):
            return "ok"

        @cherrypy.expose
        @comet(transport="sse")
        def events(self, last_event_id=None):
            return hub.subscribe(LOBBY, last_id=last_event_id)

        @cherrypy.expose
        def publish(self, seq, ts):
            hub.publish(LOBBY, f"{seq} {ts}")
            return "ok"

        @cherrypy.expose
        def rooms(self):
            rooms.on.set()
            return "ok"

        @cherrypy.expose
        @cherrypy.tools.json_out()
        def stats(self):
            return {"channels": len(hub.channels()), "made": rooms.made, "finished": rooms.finished,
                    "forgotten": hub.counters["forgotten"], "behind_s": round(rooms.behind, 3),
                    "subscriptions": hub.subscriptions}

    cherrypy.config.update({"server.socket_host": "127.0.0.1", "server.socket_port": port, "server.thread_pool": 8,
                            "server.socket_queue_size": 4096, "engine.autoreload.on": False, "log.screen": False,
                            "comet.max_streams": 100_000, "server.shutdown_timeout": 1})
    try:
        cherrypy.quickstart(Root(), "/", {"/": {"log.access_file": ""}})
    finally:
        rooms.stop.set()
        hub.close()


# -- the driver --------------------------------------------------------------------


def _stats(port: int) -> dict:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/stats")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def _collect(pipes: list, seq: int, timeout: float) -> tuple[float, dict]:
    """Seconds until the last stream of every client had broadcast *seq*."""
    worst, bad = 0.0, {}
    pending = set(range(len(pipes)))
    end = time.monotonic() + timeout
    while pending and time.monotonic() < end:
        for i in list(pending):
            while pipes[i].poll(0.001):
                kind, got, last, _median, counts = pipes[i].recv()
                if got == seq:
                    pending.discard(i)
                    worst = max(worst, last)
                    for key, value in counts.items():
                        bad[key] = bad.get(key, 0) + value
    if pending:
        raise TimeoutError(f"broadcast {seq} never reached {len(pending)} clients")
    return worst, bad


def run(args) -> dict:
    redis_server = None
    redis_url = None
    if args.redis:
        from comet.processes import RedisServer

        redis_server = RedisServer().start()
        redis_url = redis_server.url
    port = _free_port()
    argv = [sys.executable, "-m", "benchmarks.soak_rooms", "--serve", str(port), "--rooms", str(args.rooms),
            "--room-life", str(args.room_life), "--max-idle", str(args.max_idle), "--room-threads", str(args.room_threads)] + (["--redis-url", redis_url] if redis_url else [])
    server = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pipes: list = []
    procs: list = []
    windows: list[dict] = []
    result: dict = {"bench": "soak_rooms", "streams": args.streams, "rooms_per_s": args.rooms, "room_threads": args.room_threads,
                    "seconds": args.seconds,
                    "baseline_s": args.baseline, "hub": "redis" if args.redis else "memory"}
    bad_total: dict = {}
    try:
        _wait_up("soak server", server, port)
        result["connect_s"] = round(start_clients(port, args.streams, args.clients, pipes, procs), 2)
        seq = 0

        def window(name: str, seconds: float) -> dict:
            nonlocal seq
            times = []
            started = time.monotonic()
            while time.monotonic() - started < seconds:
                tick = time.monotonic()
                _request(port, "POST", f"/publish?seq={seq}&ts={time.time():.6f}")
                worst, bad = _collect(pipes, seq, 60)
                for key, value in bad.items():
                    bad_total[key] = max(bad_total.get(key, 0), value)
                times.append(worst)
                seq += 1
                time.sleep(max(0.0, tick + 1.0 - time.monotonic()))
            stats = _stats(port)
            row = {"window": name, "at_s": round(time.monotonic() - t0, 1), "rss_mb": round(_rss_kb(server.pid) / 1024, 1),
                   "fanout_p50_ms": round(_pct(times, 50) * 1000, 1), "fanout_max_ms": round(max(times) * 1000, 1),
                   **stats}
            print(" | ".join(f"{k}={v}" for k, v in row.items()), flush=True)
            return row

        t0 = time.monotonic()
        for i in range(max(1, round(args.baseline / args.window))):
            windows.append(window(f"baseline{i}", args.window))
        _request(port, "POST", "/rooms")
        for i in range(max(1, round(args.seconds / args.window))):
            windows.append(window(f"rooms{i}", args.window))
        base, churn = [w for w in windows if w["window"].startswith("baseline")], [w for w in windows if w["window"].startswith("rooms")]
        first, last = churn[0], churn[-1]
        elapsed = last["at_s"] - first["at_s"] + args.window
        result.update({
            "windows": windows, "rooms_made": last["made"], "rooms_finished": last["finished"],
            "rooms_per_s_achieved": round(last["made"] / (last["at_s"] - base[-1]["at_s"]), 1),
            "rss_baseline_mb": base[-1]["rss_mb"], "rss_first_window_mb": first["rss_mb"], "rss_last_window_mb": last["rss_mb"],
            "rss_max_mb": max(w["rss_mb"] for w in churn),
            "rss_growth_first_to_last_mb": round(last["rss_mb"] - first["rss_mb"], 1),
            "channels_max": max(w["channels"] for w in churn), "channels_last": last["channels"],
            "fanout_p50_baseline_ms": round(statistics.median(w["fanout_p50_ms"] for w in base), 1),
            "fanout_p50_churn_ms": round(statistics.median(w["fanout_p50_ms"] for w in churn), 1),
            "fanout_p50_last_ms": last["fanout_p50_ms"], "fanout_max_churn_ms": max(w["fanout_max_ms"] for w in churn),
            "broadcasts": seq, "churn_elapsed_s": round(elapsed, 1),
        })
    finally:
        stop_clients(pipes, procs)
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
        if redis_server is not None:
            redis_server.stop()
    result.update({k: bad_total.get(k, 0) for k in ("lost", "duplicate_or_out_of_order", "closed", "status")})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600, help="how long rooms come and go (default 600)")
    parser.add_argument("--baseline", type=float, default=30, help="seconds of streams alone first (default 30)")
    parser.add_argument("--window", type=float, default=30, help="seconds per reported window (default 30)")
    parser.add_argument("--streams", type=int, default=2000, help="open SSE streams (default 2000)")
    parser.add_argument("--rooms", type=int, default=1000, help="rooms created (and finished) per second (default 1000)")
    parser.add_argument("--room-life", type=float, default=1.0, help="seconds a room lives (default 1)")
    parser.add_argument("--max-idle", type=float, default=5.0, help="the hub's max_idle (default 5)")
    parser.add_argument("--room-threads", type=int, default=1, help="server threads making rooms (default 1)")
    parser.add_argument("--clients", type=int, default=2, help="load-client processes (default 2)")
    parser.add_argument("--redis", action="store_true", help="a RedisHub on a redis-server of its own")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.rooms, args.room_life, args.max_idle, args.redis_url, args.room_threads)
        return
    result = run(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
