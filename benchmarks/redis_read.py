"""The reading side of RedisHub: one process following many channels.

    .venv/bin/python -m benchmarks.redis_read [--channels 100 10000] [--rate 2000] [--seconds 10] [--save]

Issue #29, point 3: a process that follows 10,000 channels with one
subscriber each, while 2,000 events/s are published over them from another
process, must keep up without one round trip per channel per event. For each
channel count, in one run against the same redis-server (started here on
127.0.0.1):

* a *reader* process: one ``RedisHub``, one subscription per channel (each
  watched: its wake queues it for a consumer thread, which takes its events);
* a *publisher* process: ``RedisHub.publish`` from 4 threads, paced to
  ``--rate`` events/s in all, each event to the next channel round-robin,
  carrying its publish time and a per-channel sequence number.

It reports, per channel count: delivery latency (publish call to the
subscriber's take, across processes on one clock) p50/p99/max; events lost,
duplicated or out of order per channel; the reader process's CPU and
redis-server's CPU, each as a share of a core and per event; the reader's
``XREAD`` calls per second and the bytes the reader sent Redis per event
(``INFO commandstats`` / ``CLIENT LIST``: what following N channels costs per
round trip; the bytes are every client's, the publisher's included, so
their growth with the channel count is the reader's). The last row's ratios to the first show what the channel count
costs. Prints a table and one JSON line; ``--save`` writes
``benchmarks/results/redis-read-<date>.txt``. Not a test: numbers depend on
the machine (run it quiet).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import threading
import time
from datetime import date
from pathlib import Path

CLK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parents[1]


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _reader_main(url: str, channels: int, pipe) -> None:
    """Follow *channels* channels; report what arrived when told to stop."""
    from comet.backends.redis import RedisHub

    hub = RedisHub(url, prefix="bench:", maxlen=1000)
    ready: list = []
    cond = threading.Condition()
    received: dict[int, list[int]] = {}
    latencies: list[float] = []
    stop = threading.Event()
    subs = []
    for c in range(channels):
        sub = hub.subscribe(f"c{c}")

        def wake(sub=sub) -> None:
            with cond:
                ready.append(sub)
                cond.notify()

        sub.watch(wake)
        subs.append((c, sub))
    index = {id(sub): c for c, sub in subs}

    def consume() -> None:
        while not stop.is_set():
            with cond:
                while not ready and not stop.is_set():
                    cond.wait(0.1)
                batch, ready[:] = list(ready), []
            now = time.time()
            for sub in batch:
                for event in sub.take():
                    if event is None or not hasattr(event, "data") or not isinstance(event.data, dict):
                        continue  # idle ticks, gaps (none expected: counted as lost below)
                    latencies.append(now - event.data["t"])
                    received.setdefault(index[id(sub)], []).append(event.data["n"])

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    pipe.send(("ready", os.getpid()))
    pipe.recv()  # stop
    stop.set()
    consumer.join(10)
    pipe.send(("done", latencies, received))
    for _, sub in subs:
        sub.close()
    hub.close()


def _publisher_main(url: str, channels: int, rate: int, seconds: float, pipe) -> None:
    from comet.backends.redis import RedisHub

    hub = RedisHub(url, prefix="bench:", maxlen=1000)
    threads = 4
    per_thread = rate / threads
    sent: dict[int, int] = {}
    lock = threading.Lock()
    counter = [0]
    failures: list[str] = []
    start = time.monotonic() + 0.2

    def work(t: int) -> None:
        k = 0
        while True:
            due = start + k / per_thread
            if due - start > seconds:
                return
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            with lock:
                n = counter[0]
                counter[0] += 1
                c = n % channels
                seq = sent.get(c, 0)
                sent[c] = seq + 1
            try:
                hub.publish(f"c{c}", {"t": time.time(), "n": seq})
            except Exception as exc:  # reported, not lost in a thread
                failures.append(repr(exc))
            k += 1

    pipe.recv()  # go
    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(seconds + 60)
    pipe.send(("done", sent, failures, time.monotonic() - start))
    hub.close()


def _xread_calls(client) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_xread", {}).get("calls", 0))


def run(url: str, redis_pid: int, channels: int, rate: int, seconds: float) -> dict:
    import redis

    client = redis.Redis.from_url(url)
    client.flushall()
    ctx = mp.get_context("spawn")
    r_parent, r_child = ctx.Pipe()
    p_parent, p_child = ctx.Pipe()
    reader = ctx.Process(target=_reader_main, args=(url, channels, r_child), daemon=True)
    publisher = ctx.Process(target=_publisher_main, args=(url, channels, rate, seconds, p_child), daemon=True)
    reader.start()
    publisher.start()
    try:
        if not r_parent.poll(300):
            raise RuntimeError("the reader did not start")
        _, reader_pid = r_parent.recv()
        time.sleep(1.0)  # the first loads settle before the window
        calls0, cpu_r0, cpu_s0 = _xread_calls(client), _cpu_s(reader_pid), _cpu_s(redis_pid)
        net0 = int(client.info("stats")["total_net_input_bytes"])
        started = time.monotonic()
        p_parent.send("go")
        if not p_parent.poll(seconds + 120):
            raise RuntimeError("the publisher did not finish")
        _, sent, failures, elapsed = p_parent.recv()
        expected = sum(sent.values())
        deadline = time.monotonic() + 30
        time.sleep(0.5)
        window = time.monotonic() - started
        calls1, cpu_r1, cpu_s1 = _xread_calls(client), _cpu_s(reader_pid), _cpu_s(redis_pid)
        net1 = int(client.info("stats")["total_net_input_bytes"])
        r_parent.send("stop")
        if not r_parent.poll(max(1.0, deadline - time.monotonic())):
            raise RuntimeError("the reader did not report")
        _, latencies, received = r_parent.recv()
    finally:
        for proc in (reader, publisher):
            proc.join(30)
            if proc.is_alive():
                proc.kill()
        client.close()
    got = sum(len(v) for v in received.values())
    lost = sum(max(0, sent.get(c, 0) - len(set(received.get(c, [])))) for c in range(channels))
    duplicated = sum(len(v) - len(set(v)) for v in received.values())
    out_of_order = sum(1 for v in received.values() for a, b in zip(v, v[1:]) if b < a)
    return {
        "channels": channels, "rate": rate, "published": expected, "received": got, "failures": len(failures),
        "lost": lost, "duplicated": duplicated, "out_of_order": out_of_order,
        "p50_ms": round(statistics.median(latencies) * 1000, 2) if latencies else None,
        "p99_ms": round(_pct(latencies, 0.99) * 1000, 2) if latencies else None,
        "max_ms": round(max(latencies) * 1000, 2) if latencies else None,
        "reader_cpu_pct": round(100 * (cpu_r1 - cpu_r0) / window, 1),
        "redis_cpu_pct": round(100 * (cpu_s1 - cpu_s0) / window, 1),
        "reader_cpu_us_per_event": round(1e6 * (cpu_r1 - cpu_r0) / max(1, got), 1),
        "redis_cpu_us_per_event": round(1e6 * (cpu_s1 - cpu_s0) / max(1, got), 1),
        "xread_per_s": round((calls1 - calls0) / window, 1),
        "redis_bytes_in_per_event": round((net1 - net0) / max(1, got)),
        "publish_s": round(elapsed, 2),
    }


FIELDS = ("channels", "published", "received", "lost", "duplicated", "out_of_order", "p50_ms", "p99_ms", "max_ms",
          "reader_cpu_pct", "redis_cpu_pct", "reader_cpu_us_per_event", "redis_cpu_us_per_event", "xread_per_s",
          "redis_bytes_in_per_event")


def main(argv: list[str] | None = None) -> dict:
    from comet.processes import RedisServer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs="+", default=[100, 10_000])
    parser.add_argument("--rate", type=int, default=2000, help="events/s published, in all")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    with RedisServer() as server:
        assert server.process is not None
        for channels in args.channels:
            rows.append(run(server.url, server.process.pid, channels, args.rate, args.seconds))
    lines = [f"# .venv/bin/python -m benchmarks.redis_read --channels {' '.join(map(str, args.channels))} "
             f"--rate {args.rate} --seconds {args.seconds} ({date.today()}, {os.cpu_count()} cores)",
             " | ".join(FIELDS)]
    lines += [" | ".join(str(row[f]) for f in FIELDS) for row in rows]
    ratios = {}
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        for f in ("p99_ms", "reader_cpu_us_per_event", "redis_cpu_us_per_event", "redis_bytes_in_per_event"):
            # (None: the first row measured nothing to divide by, a window too short for CPU ticks)
            ratios[f] = round(last[f] / first[f], 2) if first[f] and last[f] is not None else None
    result = {"bench": "redis_read", "rows": rows, "ratios_last_to_first": ratios}
    lines.append(json.dumps(result))
    text = "\n".join(lines)
    print(text)
    if args.save:
        path = ROOT / "benchmarks" / "results" / f"redis-read-{date.today()}.txt"
        path.write_text(text + "\n")
        print(f"saved {path}")
    return result


if __name__ == "__main__":
    main()
