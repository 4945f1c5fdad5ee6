"""Publishes per second through a RedisHub, with and without group commit.

    .venv/bin/python -m benchmarks.redis_publish [--events N] [--threads 1 8 32]
    .venv/bin/python -m benchmarks.redis_publish --sentinel   # the cost of Sentinel and of durable publishing

Starts its own redis-server on 127.0.0.1. For each number of publishing
threads (think CherryPy worker threads handling "send" requests), publishes
N small events spread over four channels, once with ``batch_publishes=False``
(one round trip per publish) and once with the default group commit, in the
same run; a subscriber in a second hub checks every event arrived once.
Prints a table and one JSON line with the ratios. Not a test: numbers depend
on the machine.

``--sentinel`` compares, batched, in one run: one redis-server, the master of
a Sentinel group through ``redis+sentinel://`` (``RedisSentinels``: a
master, a replica, three sentinels), and the same with ``replicas=1`` (each
batch waits for the replica: durable publishing).
"""
from __future__ import annotations

import argparse
import json
import threading
import time

from comet.backends.redis import RedisHub
from comet.processes import RedisSentinels, RedisServer


def run(url: str, prefix: str, threads: int, events: int, batch: bool, replicas: int = 0) -> dict:
    hub = RedisHub(url, prefix=prefix, batch_publishes=batch, maxlen=events + 1000, replicas=replicas,
                   replica_timeout=5.0)
    reader = RedisHub(url, prefix=prefix, maxlen=events + 1000)
    channels = [f"c{n}" for n in range(4)]
    subs = [reader.subscribe(c) for c in channels]
    per = events // threads
    failures: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(per):
                hub.publish(channels[(t + i) % 4], {"t": t, "i": i})
        except BaseException as exc:  # reported below, not lost in a thread
            failures.append(exc)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    cpu0, start = time.process_time(), time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    # every event arrives once, and each thread's in its order
    seen: dict[int, list[int]] = {}
    deadline = time.monotonic() + 30
    total = per * threads
    while sum(len(v) for v in seen.values()) < total and time.monotonic() < deadline:
        for sub in subs:
            for event in sub.take():
                if event:
                    seen.setdefault(event.data["t"], []).append(event.data["i"])
        time.sleep(0.01)
    received = sum(len(v) for v in seen.values())
    in_order = all(sorted(v) == list(range(per)) and len(set(v)) == per for v in seen.values())
    for sub in subs:
        sub.close()
    round_trips = hub.counters["round_trips"]
    hub.close()
    reader.close()
    return {"threads": threads, "batched": batch, "events": total, "per_s": round(total / elapsed),
            "round_trips": round_trips, "client_cpu_us_per_publish": round(cpu / total * 1e6, 1),
            "received": received, "all_once": received == total and in_order, "failures": len(failures)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=8000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--sentinel", action="store_true", help="single Redis vs Sentinel vs Sentinel durable")
    args = parser.parse_args()
    if args.sentinel:
        return sentinel(args)
    rows = []
    with RedisServer() as server:
        for threads in args.threads:
            for batch in (False, True):
                rows.append(run(server.url, f"bench{len(rows)}:", threads, args.events, batch))
    cols = ["threads", "batched", "per_s", "round_trips", "client_cpu_us_per_publish", "received", "all_once", "failures"]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row[c]) for c in cols))
    ratios = {}
    for threads in args.threads:
        plain, grouped = [r for r in rows if r["threads"] == threads]
        ratios[str(threads)] = round(grouped["per_s"] / plain["per_s"], 2)
    print(json.dumps({"bench": "redis_publish", "rows": rows, "batched_to_plain_per_s": ratios}))


def sentinel(args: argparse.Namespace) -> None:
    rows = []
    with RedisServer() as server, RedisSentinels() as group:
        for threads in args.threads:
            for topology, url, replicas in (("single", server.url, 0), ("sentinel", group.url, 0),
                                            ("sentinel durable", group.url, 1)):
                row = run(url, f"bench{len(rows)}:", threads, args.events, True, replicas)
                rows.append({"topology": topology, **row})
    cols = ["topology", "threads", "per_s", "round_trips", "client_cpu_us_per_publish", "received", "all_once", "failures"]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row[c]) for c in cols))
    ratios = {}
    for threads in args.threads:
        single, plain, durable = [r for r in rows if r["threads"] == threads]
        ratios[str(threads)] = {"sentinel_to_single": round(plain["per_s"] / single["per_s"], 2),
                                "durable_to_single": round(durable["per_s"] / single["per_s"], 2)}
    print(json.dumps({"bench": "redis_publish --sentinel", "rows": rows, "per_s_ratios": ratios}))


if __name__ == "__main__":
    main()
