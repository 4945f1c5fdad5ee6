"""Scale-out: comet on 1, 2 and 4 processes behind nginx, sharing one Redis,
side by side with one process on the in-memory hub, in one run.

    .venv/bin/python -m benchmarks.scaleout [--processes 1 2 4] [--n 1000 5000] [--broadcasts 30] [--sentinel] [--cluster]

For each setup: start redis-server, the comet processes
(``benchmarks/peers/comet_app.py`` with a RedisHub, parked streams) and
nginx with ``deploy/nginx-comet.conf`` (the documented config), open N SSE
streams *through nginx* (round-robin spreads them over the processes), then

* one broadcast at a time: POST /publish through nginx (it lands on any
  process, goes through Redis to every process): latency to the *last*
  stream, p50/p99/max, and lost/duplicated/out-of-order counts;
* CPU of all comet processes, nginx and redis-server per event per stream;
* events/s through Redis: one stream, one process publishing a burst of
  ``--burst`` events (each one an XADD), time until the stream has them all;
  then the same with ``publish_many`` in batches of 100 (one round trip each).

``--sentinel`` adds rows ``sentinel-Np-nginx`` beside the single Redis
ones: the processes follow the master of a Sentinel group through
``redis+sentinel://`` (``comet.processes.RedisSentinels``: a master, a
replica, three sentinels). ``--cluster`` adds rows ``cluster-Np-nginx``: a
3-master Redis Cluster on loopback (``comet.processes.RedisClusterNodes``).
``--backends`` picks the shared backends outright (``--backends cluster``:
the cluster rows only). Each row beside single Redis also gets its ratio to
the single Redis row of as many processes.

The reference row "memory-direct" is one process on the in-memory hub with
no nginx and no Redis: the ratios say what the shared backend and the proxy
cost. Prints a table and one JSON line. 127.0.0.1 only; every process it
starts is stopped.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from benchmarks.capacity import _cpu_s, _pct, _request, one_stream_burst, start_clients, stop_clients
from comet.processes import AppProcess, NginxServer, RedisClusterNodes, RedisSentinels, RedisServer

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "deploy" / "nginx-comet.conf"


BACKENDS = ("redis", "sentinel", "cluster")


class Setup:
    """``processes`` comet apps (RedisHub) behind nginx, or with
    ``processes=0`` one app on the in-memory hub, no proxy. *backend* is
    what the RedisHubs share: one redis-server ("redis"), a Sentinel group
    ("sentinel") or a 3-master Redis Cluster ("cluster")."""

    def __init__(self, processes: int, backend: str = "redis") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.name = f"{backend}-{processes}p-nginx" if processes else "memory-direct"
        self.redis = self.sentinels = self.cluster = None
        self.apps: list[AppProcess] = []
        self.nginx: NginxServer | None = None
        try:
            if processes:
                if backend == "redis":
                    self.redis = RedisServer().start()
                elif backend == "sentinel":
                    self.sentinels = RedisSentinels().start()
                else:
                    self.cluster = RedisClusterNodes().start()
            shared = self.redis or self.sentinels or self.cluster
            extra = [shared.url] if shared else []
            for _ in range(processes or 1):
                app = AppProcess(["-m", "benchmarks.peers.comet_app", "{port}", "parked", "100", *extra], cwd=ROOT,
                                 ready=None)
                self.apps.append(app)
                app.start()
            if processes:
                self.nginx = NginxServer(SITE, [a.port for a in self.apps], worker_connections=30_000)
                self.nginx.start()
        except BaseException:  # what started so far stops too: a failed setup leaves nothing running
            self.close()
            raise
        self.port = self.nginx.port if self.nginx else self.apps[0].port

    def pids(self) -> list[int]:
        pids = [a.process.pid for a in self.apps]
        if self.nginx:
            pids.append(self.nginx.process.pid)
            pids += _children(self.nginx.process.pid)
        if self.redis:
            pids.append(self.redis.process.pid)
        if self.sentinels:  # the replica and the sentinels work for every event too
            pids += [self.sentinels.master.process.pid, self.sentinels.replica.process.pid]
            pids += [p.pid for p in self.sentinels.sentinels]
        if self.cluster:
            pids += [node.process.pid for node in self.cluster.nodes]
        return pids

    def cpu(self) -> float:
        return sum(_cpu_s(pid) for pid in self.pids())

    def close(self) -> None:
        if self.nginx:
            self.nginx.close()
        for app in self.apps:
            app.close()
        for shared in (self.redis, self.sentinels, self.cluster):
            if shared:
                shared.close()


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def run_broadcasts(setup: Setup, n: int, args) -> dict:
    result: dict = {"setup": setup.name, "processes": len(setup.apps), "n": n}
    pipes, procs = [], []
    try:
        result["connect_s"] = round(start_clients(setup.port, n, args.clients, pipes, procs), 2)
        time.sleep(0.5)
        cpu0 = setup.cpu()
        lasts, mids, bad = [], [], {}
        for seq in range(args.broadcasts):
            _request(setup.port, "POST", f"/publish?seq={seq}&ts={time.time():.6f}")
            pending, worst, mid = set(range(len(pipes))), 0.0, []
            deadline = time.monotonic() + 60
            while pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"broadcast {seq} never reached every stream")
                for i in list(pending):
                    if pipes[i].poll(0.001):
                        _, got_seq, last, median, counts = pipes[i].recv()
                        if got_seq == seq:
                            pending.discard(i)
                            worst = max(worst, last)
                            mid.append(median)
                            for key, value in counts.items():
                                bad[(i, key)] = value
            lasts.append(worst)
            mids.append(statistics.median(mid))
        cpu1 = setup.cpu()
        result.update({
            "last_p50_ms": round(_pct(lasts, 50) * 1000, 1), "last_p99_ms": round(_pct(lasts, 99) * 1000, 1),
            "last_max_ms": round(max(lasts) * 1000, 1), "stream_p50_ms": round(statistics.median(mids) * 1000, 1),
            "cpu_us_per_event_stream": round((cpu1 - cpu0) / (args.broadcasts * n) * 1e6, 2),
        })
        for key in ("lost", "duplicate_or_out_of_order", "closed", "status"):
            result[key] = sum(v for (i, k2), v in bad.items() if k2 == key)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        stop_clients(pipes, procs)
    return result


def run_burst(setup: Setup, args) -> dict:
    """One event per publish(), then batches of 100 with publish_many()."""
    try:
        received, published = one_stream_burst(setup.port, setup.apps[-1].port, args.burst, timeout=300)
        batched, _ = one_stream_burst(setup.port, setup.apps[-1].port, args.burst, timeout=300, batch=100)
        return {"setup": setup.name, "burst_events_per_s": round(received), "publish_events_per_s": round(published),
                "batched_events_per_s": round(batched)}
    except Exception as exc:
        return {"setup": setup.name, "error": f"{type(exc).__name__}: {exc}"}


def _ratios_to_single_redis(rows: list[dict], bursts: list[dict]) -> dict:
    """Sentinel and Cluster rows against the single-Redis row of as many
    processes: broadcast latency to the last stream, and burst rates."""
    def single(name: str) -> str:
        return "redis-" + name.split("-", 1)[1]

    latency = {}
    for row in rows:
        base = next((r for r in rows if r["setup"] == single(row["setup"]) and r["n"] == row["n"]), None)
        if row["setup"].startswith(("sentinel-", "cluster-")) and base and "error" not in row and "error" not in base:
            latency[f"{row['n']}:{row['setup']}"] = round(row["last_p50_ms"] / base["last_p50_ms"], 2)
    rates = {}
    for burst in bursts:
        base = next((b for b in bursts if b["setup"] == single(burst["setup"])), None)
        if burst["setup"].startswith(("sentinel-", "cluster-")) and base and "error" not in burst and "error" not in base:
            rates[burst["setup"]] = {key: round(burst[key] / base[key], 2) for key in
                                     ("burst_events_per_s", "publish_events_per_s", "batched_events_per_s")}
    return {"last_p50_ratio_to_single_redis": latency, "burst_ratio_to_single_redis": rates}


COLUMNS = ["setup", "n", "connect_s", "last_p50_ms", "last_p99_ms", "last_max_ms", "stream_p50_ms",
           "cpu_us_per_event_stream", "lost", "duplicate_or_out_of_order", "error"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--n", type=int, nargs="+", default=[1000, 5000])
    parser.add_argument("--broadcasts", type=int, default=30)
    parser.add_argument("--clients", type=int, default=1, help="load-client processes (at most one per 500 streams)")
    parser.add_argument("--burst", type=int, default=20_000)
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=["redis"],
                        help="what the processes share (rows of each, in this order)")
    parser.add_argument("--sentinel", action="store_true", help="add rows on a Sentinel group (master, replica, 3 sentinels)")
    parser.add_argument("--cluster", action="store_true", help="add rows on a 3-master Redis Cluster")
    parser.add_argument("--json", type=Path, help="also write all results here")
    args = parser.parse_args()
    backends = [*args.backends, *(["sentinel"] if args.sentinel else []), *(["cluster"] if args.cluster else [])]
    backends = list(dict.fromkeys(backends))  # once each, in order
    rows, bursts = [], []
    # ("redis", 0): the reference row, memory-direct (no Redis at all)
    for backend, processes in [("redis", 0), *((b, p) for b in backends for p in args.processes)]:
        setup = Setup(processes, backend)
        try:
            for n in args.n:
                row = run_broadcasts(setup, n, args)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
            bursts.append(run_burst(setup, args))
            print(json.dumps(bursts[-1]), file=sys.stderr, flush=True)
        finally:
            setup.close()
    print(" | ".join(COLUMNS))
    for row in rows:
        print(" | ".join(str(row.get(c, "")) for c in COLUMNS))
    print()
    for b in bursts:
        print(f"{b['setup']}: one stream {b.get('burst_events_per_s', b.get('error'))} events/s delivered, "
              f"{b.get('publish_events_per_s')} events/s published by one process; "
              f"{b.get('batched_events_per_s')} events/s delivered with publish_many (batches of 100)")
    ratios = {}
    for n in args.n:
        base = next((r for r in rows if r["setup"] == "memory-direct" and r["n"] == n and "error" not in r), None)
        for row in rows:
            if base and row["n"] == n and row is not base and "error" not in row:
                ratios[f"{n}:{row['setup']}"] = round(row["last_p50_ms"] / base["last_p50_ms"], 2)
    summary = {"bench": "scaleout", "rows": rows, "bursts": bursts, "last_p50_ratio_to_memory_direct": ratios,
               **_ratios_to_single_redis(rows, bursts)}
    print(json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
