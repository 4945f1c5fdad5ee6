"""Publishes per second through a RedisHub, with and without group commit.

    .venv/bin/python -m benchmarks.redis_publish [--events N] [--threads 1 8 32]
    .venv/bin/python -m benchmarks.redis_publish --sentinel   # the cost of Sentinel and of durable publishing
    .venv/bin/python -m benchmarks.redis_publish --ratios     # next to redis-benchmark XADD (issue 29)
    .venv/bin/python -m benchmarks.redis_publish --ratios --on sentinel [--replicas 1] | --on cluster

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

``--ratios`` puts RedisHub next to what Redis itself takes, in one run on
one redis-server: ``redis-benchmark`` XADD with 50 clients, unpipelined
and with ``-P 32`` (Debian's redis-tools ships it), then acknowledged
``publish`` from 1 and 8 threads over 100 channels and ``publish_many`` from
1 thread in batches of 100, and prints publish(8 threads) / XADD and
publish_many / pipelined XADD (issue 29's goal: at least 0.5 each). Python's
floor runs beside them: redis-benchmark's XADD from this process, from 8
threads and pipelined by 100, on raw sockets with hiredis and nothing else,
the fastest any Python client publishes here (see python_floor). No
subscriber runs while publishing (its reader would share this process's
CPU); afterwards every stream is read back to check each event is there
once, in its thread's order. ``client_cpu_us`` is this process's CPU per
event, ``redis_cpu_us`` redis-server's (the masters'). ``--on sentinel`` (with
``--replicas 1``: durable) and ``--on cluster`` (3 masters; XADD measured on
one of them, so the ratios there are all masters against one) run the same
against those.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import shutil
import subprocess
import threading
import time
from typing import Any, Iterator

import redis

from comet.backends.redis import RedisHub
from comet.backends.redis_link import client_for, slot_tag
from comet.processes import RedisClusterNodes, RedisSentinels, RedisServer


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
    parser.add_argument("--ratios", action="store_true", help="next to redis-benchmark XADD, in one run")
    parser.add_argument("--xadd-requests", type=int, default=100000, help="redis-benchmark -n (with --ratios)")
    parser.add_argument("--on", choices=["single", "sentinel", "cluster"], default="single",
                        help="with --ratios: one redis-server, a Sentinel group, a 3-master cluster")
    parser.add_argument("--replicas", type=int, default=0, help="with --ratios --on sentinel: durable (WAIT)")
    args = parser.parse_args()
    if args.sentinel:
        return sentinel(args)
    if args.ratios:
        return against_xadd(args.events, args.xadd_requests, args.on, args.replicas)
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


def redis_benchmark(port: int, requests: int, pipeline: int, key: str = "bench") -> float | None:
    """redis-benchmark's XADD requests/s with 50 clients (None: not installed)."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return None
    node = redis.Redis(port=port)
    before = node.xlen(key)
    out = subprocess.run([binary, "-h", "127.0.0.1", "-p", str(port), "-n", str(requests), "-c", "50",
                          "-P", str(pipeline), "--csv", "XADD", key, "*", "f", "v"],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    added = node.xlen(key) - before
    node.close()
    if added < requests:  # (errors count as requests too: MOVED on a cluster; pipelined, it may send a few more)
        raise RuntimeError(f"redis-benchmark added {added} entries for {requests} XADDs")
    rows = list(csv.DictReader(out.splitlines()))
    return float(rows[-1]["rps"])


def python_floor(port: int, key: str, threads: int, events: int, pipeline: int = 1) -> float:
    """The same XADD as redis-benchmark's, from this Python process: *threads*
    threads, each on its own socket, *pipeline* commands per round trip,
    packed and parsed by hiredis and nothing else (no redis-py, no comet).
    No Python client can publish faster on this machine: what is left
    between it and redis-benchmark (C, epoll, no GIL) is CPython's."""
    import socket

    import hiredis

    per = events // threads
    command = hiredis.pack_command(("XADD", key, "*", "f", "v"))

    def work() -> None:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader = hiredis.Reader()
            for _ in range(per // pipeline):
                sock.sendall(command * pipeline)
                got = 0
                while got < pipeline:
                    reply = reader.gets()
                    if reply is False:
                        reader.feed(sock.recv(1 << 16))
                    elif isinstance(reply, Exception):
                        raise reply
                    else:
                        got += 1

    workers = [threading.Thread(target=work) for _ in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join(600)
    return round(per // pipeline * pipeline * threads / (time.perf_counter() - start), 2)


def local_key(node: redis.Redis, port: int) -> str:
    """A key whose slot is on the cluster master at *port* ("bench" outside a cluster)."""
    if not node.info("cluster").get("cluster_enabled"):
        return "bench"
    for first, _last, master, *_ in node.execute_command("CLUSTER", "SLOTS"):
        if int(master[1]) == port:
            return "bench{" + slot_tag(int(first)) + "}"
    raise RuntimeError(f"no slots on the master at port {port}")


def redis_cpu(masters: list[redis.Redis]) -> float:
    """CPU seconds the masters' redis-servers used so far."""
    total = 0.0
    for node in masters:
        info: dict[str, Any] = node.info("cpu")
        total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return total


def hub_rate(url: str, admin: redis.Redis, masters: list[redis.Redis], prefix: str, threads: int, events: int,
             many: int = 0, replicas: int = 0) -> dict:
    """Acknowledged publishes from *threads* threads over 100 channels (with
    *many*: publish_many batches of that size), then every stream read back."""
    hub = RedisHub(url, prefix=prefix, maxlen=events + 1000, replicas=replicas, replica_timeout=5.0)
    channels = [f"c{n}" for n in range(100)]
    per = events // threads
    failures: list[BaseException] = []
    for channel in channels:  # (not timed: a channel's first publish makes its stream, loads the script)
        if many:
            hub.publish_many(channel, [{"t": -1, "i": -1}])
        else:
            hub.publish(channel, {"t": -1, "i": -1})

    def work(t: int) -> None:
        try:
            if many:
                for start in range(0, per, many):
                    hub.publish_many(channels[(t + start // many) % 100],
                                     [{"t": t, "i": i} for i in range(start, min(start + many, per))])
            else:
                for i in range(per):
                    hub.publish(channels[(t + i) % 100], {"t": t, "i": i})
        except BaseException as exc:  # reported below, not lost in a thread
            failures.append(exc)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    warm = hub.counters["round_trips"]
    server0, cpu0, start = redis_cpu(masters), time.process_time(), time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join(600)
    elapsed, cpu, server = time.perf_counter() - start, time.process_time() - cpu0, redis_cpu(masters) - server0
    round_trips = hub.counters["round_trips"] - warm
    hub.close()
    total = per * threads
    seen: dict[int, list[int]] = {}
    for channel in channels:
        for _, fields in admin.xrange(prefix + channel):
            data = json.loads(fields[b"d"])
            if data["t"] >= 0:
                seen.setdefault(data["t"], []).append(data["i"])
    received = sum(len(v) for v in seen.values())
    # in each channel a thread's events are in its order; across channels,
    # each thread's set is exactly what it published, once
    in_order = all(sorted(v) == list(range(per)) for v in seen.values()) and len(seen) == threads
    for channel in channels:
        order: dict[int, list[int]] = {}
        for _, fields in admin.xrange(prefix + channel):
            data = json.loads(fields[b"d"])
            order.setdefault(data["t"], []).append(data["i"])
        in_order = in_order and all(v == sorted(v) for v in order.values())
    what = f"publish_many x{many}" if many else "publish"
    return {"what": what, "threads": threads, "events": total, "per_s": round(total / elapsed),
            "round_trips": round_trips, "client_cpu_us": round(cpu / total * 1e6, 1),
            "redis_cpu_us": round(server / total * 1e6, 1), "all_once_in_order": received == total and in_order,
            "failures": len(failures)}


@contextlib.contextmanager
def topology(on: str) -> Iterator[tuple[str, list[int]]]:
    """A Redis to publish to: its URL and its masters' ports."""
    if on == "sentinel":
        with RedisSentinels() as group:
            yield group.url, [group.master.port]
    elif on == "cluster":
        with RedisClusterNodes() as cluster:
            yield cluster.url, [node.port for node in cluster.masters]
    else:
        with RedisServer() as server:
            yield server.url, [server.port]


def against_xadd(events: int, xadd_requests: int, on: str = "single", replicas: int = 0) -> None:
    with topology(on) as (url, ports):
        admin = client_for(url, {})
        masters = [redis.Redis(port=port) for port in ports]
        # XADD on one master (a stream key lives on one): the reference per master
        key = local_key(masters[0], ports[0])
        xadd = redis_benchmark(ports[0], xadd_requests, 1, key)
        xadd_p32 = redis_benchmark(ports[0], xadd_requests, 32, key)
        floor8 = python_floor(ports[0], key, 8, xadd_requests)
        floor_p100 = python_floor(ports[0], key, 1, xadd_requests * 2, pipeline=100)
        rows = [hub_rate(url, admin, masters, "r1:", 1, events, replicas=replicas),
                hub_rate(url, admin, masters, "r8:", 8, events, replicas=replicas),
                hub_rate(url, admin, masters, "rm:", 1, events, many=100, replicas=replicas)]
        admin.close()
        for node in masters:
            node.close()
    print(f"on {on} ({len(ports)} master(s)){f', replicas={replicas}' if replicas else ''}")
    print(f"redis-benchmark XADD on one master, 50 clients: {xadd} /s; pipeline 32: {xadd_p32} /s"
          if xadd is not None else "redis-benchmark not found (Debian package redis-tools): no XADD reference")
    print(f"Python's floor, the same XADD from this process (hiredis on raw sockets): 8 threads {floor8} /s; "
          f"1 thread, 100 per round trip: {floor_p100} /s")
    cols = ["what", "threads", "per_s", "round_trips", "client_cpu_us", "redis_cpu_us", "all_once_in_order", "failures"]
    print(" | ".join(cols))
    for row in rows:
        print(" | ".join(str(row[c]) for c in cols))
    publish8, many = rows[1], rows[2]
    summary = {"bench": "redis_publish --ratios", "on": on, "masters": len(ports), "replicas": replicas,
               "xadd_c50_per_s": xadd, "xadd_c50_p32_per_s": xadd_p32, "rows": rows,
               "publish_8_threads_to_xadd": round(publish8["per_s"] / xadd, 3) if xadd else None,
               "publish_many_to_xadd_p32": round(many["per_s"] / xadd_p32, 3) if xadd_p32 else None, "goal": 0.5,
               "python_floor_8_threads_per_s": floor8, "python_floor_p100_per_s": floor_p100,
               "python_floor_8_threads_to_xadd": round(floor8 / xadd, 3) if xadd else None,
               "python_floor_p100_to_xadd_p32": round(floor_p100 / xadd_p32, 3) if xadd_p32 else None,
               "publish_8_threads_to_floor": round(publish8["per_s"] / floor8, 3),
               "publish_many_to_floor_p100": round(many["per_s"] / floor_p100, 3)}
    print(f"publish, 8 threads / XADD: {summary['publish_8_threads_to_xadd']}; "
          f"publish_many / pipelined XADD: {summary['publish_many_to_xadd_p32']} (goal: 0.5 each"
          f"{'; all masters together against one' if len(ports) > 1 else ''})")
    print(f"Python's floor / redis-benchmark: 8 threads {summary['python_floor_8_threads_to_xadd']}, "
          f"pipelined {summary['python_floor_p100_to_xadd_p32']}; comet / Python's floor: publish, 8 threads "
          f"{summary['publish_8_threads_to_floor']}, publish_many {summary['publish_many_to_floor_p100']}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
