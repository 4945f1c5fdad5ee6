"""Many streams on one machine: several comet processes on one RedisHub, on
two fronts side by side in one run, up to 100,000 streams (issue #29, point 1).

    .venv/bin/python -m benchmarks.many_streams --n 10000 25000 50000 100000 --processes 6 --front reuseport nginx --save

(on a quiet machine: it opens every stream from load clients on the same
machine; ``--n 100000`` alone skips the curve). ``--n 10000 25000 50000
100000`` (the default) prints the curve;
a front stops at the largest N that fits this machine's limits (below) or
at its first failed N, and says why.

Fronts (each run starts its own redis-server on 127.0.0.1, ``--processes``
comet processes ``benchmarks/peers/comet_app.py`` with a RedisHub and the
channel on a fast route, which docs/capacity.md says is how to hold many
streams: parked, no thread, the cheapest connect):

* ``reuseport``: the processes share one port with SO_REUSEPORT (cheroot's
  ``reuse_port``, ``BENCH_REUSE_PORT=1``); the kernel spreads connections.
* ``nginx``: each process on its own port behind nginx, run with
  ``deploy/nginx.conf`` and ``deploy/nginx-comet.conf`` as deployed
  (``comet.processes.NginxServer``, as tests/test_deploy.py's Cluster).
  nginx holds two connections per stream (client side and upstream), so
  its capacity is workers x worker_connections / 2; N above that is run
  at 90 % of it (workers do not share accepts evenly) and marked capped.

For each front and N: open N SSE streams from load-client processes
(one epoll loop each; ``--per-client`` streams each, each from its own
loopback source address 127.R.x.y, fresh per run, so neither ephemeral
ports (about 28,000 per source address and destination) nor the previous
run's TIME_WAIT run short); then ``--broadcasts`` broadcasts, one at a time: POST /publish on
the front (it lands on one process, goes through Redis to all). Reported:

* ``connect_s``: from starting the load clients until all N streams have
  their response headers; ``connect_cpu_us``: server-side CPU per connect;
* ``last_p50_ms``/``last_p99_ms``: latency to the *last* stream of a
  broadcast, over the broadcasts; ``stream_p50_ms``/``stream_p99_ms``: over
  every (stream, broadcast);
* ``cpu_us_per_delivery``: CPU of every server-side process (comet
  processes, redis-server, nginx master and workers; /proc/<pid>/stat)
  during the broadcasts, over broadcasts x N;
* memory per stream, after the broadcasts: ``rss_kb`` (RSS of the server
  side processes, after minus before the streams, over N) and
  ``kernel_kb``: the kernel's socket memory for *both ends* of every
  connection on this machine: the slab caches a TCP socket lives in
  (/proc/slabinfo: TCP, sock_inode_cache, filp, dentry, eventpoll, skbuff,
  bind buckets: the socket structures, which /proc/net/sockstat does not
  count) plus /proc/net/sockstat's TCP "mem" pages (buffers: queued data
  and forward allocations). Both are system-wide (another job's churn is
  noise, small against 100,000 streams); ``ss -tm`` was not used: it shows
  only the buffers and walks every socket. ``kernel_buffers_kb`` is the
  sockstat part alone (what ``net.ipv4.tcp_mem`` limits). ``server_kb`` =
  ``rss_kb`` + the server's share of ``kernel_kb`` (1 of 2 sockets per
  stream with reuseport, 3 of 4 behind nginx): the figure for the goal of
  8 KB;
* ``lost`` (gaps and events missing at the end), ``duplicate_or_out_of_order``,
  ``closed`` (streams that closed early), ``status`` (non-200 answers);
* ``..._by_role``: the CPU and RSS above split into comet, redis and nginx;
  ``client_cpu_us_per_delivery`` and ``client_rss_kb``: the load clients'
  (not server side: they share the cores, which the latencies pay for;
  their RSS is for the memory estimate below);
* ``fds_max``/``fds_min``: descriptors of the busiest/idlest comet process
  (how evenly the front spread the streams), ``nginx_fds`` per worker;
  ``left_running``: server-side processes still alive after the run (0).

Limits of this machine, read before each run (``limits`` in the JSON): the
descriptor limit (``ulimit -n``; each comet process and load client must
stay under 90 % of it, so N / processes must: use more ``--processes``),
nginx's cap above, the ephemeral port range, and MemAvailable against an
estimate of 60 KB per stream for everything (clients included). An N that
does not fit is skipped with the reason. Read on the 2-core, 23 GB
machine of issue #29 (ulimit -n 20,000 hard, ports 32768-60999), for
100,000 streams:

* descriptors: 100,000 / 6 processes = about 16,700 per comet process
  (reuseport spreads within a few %), under 18,000; 5 processes would not
  fit (and comet.max_parked, 20,000, would refuse the rest);
* nginx as deployed (2 workers on 2 cores, worker_connections 65,536,
  worker_rlimit_nofile 131,072) holds about 65,000 streams where it may
  raise its descriptor limit; in this machine's container it may not
  (no CAP_SYS_RESOURCE: setrlimit fails, each worker keeps 20,000
  descriptors), so about 20,000: the nginx front is capped there.
  Given more connections, it would next meet the ephemeral ports of its
  upstream connections (from 127.0.0.1: 28,232 per comet process);
* ephemeral ports of the load clients: 10,000 per source address of
  28,232; fresh addresses per run leave TIME_WAIT behind;
* memory: about 7 KB per stream server side and 20-40 KB for the load
  clients: a few GB of 23; kernel buffers far below tcp_mem's pressure
  mark (1.5 GB); epoll watches (5.5 M per user), conntrack (262,144, not
  tracking loopback here) and somaxconn (4,096) do not bind;
* CPU: the load clients share the 2 cores with the servers, and parse
  every event in Python: ``client_cpu_us_per_delivery`` says how much of
  a broadcast's latency is theirs.

Options: ``--broadcasts`` (5), ``--per-client`` (10,000 streams per load
client), ``--connect-timeout`` (600 s), ``--nginx-workers N`` (nginx's
``worker_processes`` instead of the deployed ``auto``: where nginx may not
raise its descriptor limit, more workers hold more streams, each with its
inherited 20,000; the file saved gets ``-nginx-N-workers``), ``--save`` (write the table and
JSON to benchmarks/results/many-streams-<date>.{txt,json}; the lead saves
the full run). Prints a table and one JSON line. 127.0.0.0/8 only; every
process it starts is stopped.
"""
from __future__ import annotations

import argparse
import atexit
import datetime
import errno
import heapq
import json
import math
import multiprocessing as mp
import os
import re
import resource
import select
import shutil
import socket
import statistics
import sys
import tempfile
import time
from array import array
from pathlib import Path

from benchmarks.capacity import EVENT, Dechunk, _cpu_s, _pct, _request, _rss_kb
from comet.processes import AppProcess, NginxServer, RedisServer, free_port

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "deploy" / "nginx-comet.conf"
MAIN = ROOT / "deploy" / "nginx.conf"
RESULTS = ROOT / "benchmarks" / "results"
FRONTS = ("reuseport", "nginx")
#: Slab caches a TCP socket's structures live in (both ends of a loopback connection).
SOCKET_SLABS = ("TCP", "request_sock_TCP", "tcp_bind_bucket", "tcp_bind2_bucket", "sock_inode_cache", "filp",
                "dentry", "eventpoll_epi", "eventpoll_pwq", "skbuff_head_cache", "skbuff_fclone_cache")
#: Everything per stream, for the memory check before a run: comet, kernel and the load clients.
ESTIMATED_KB_PER_STREAM = 60
PAGE = os.sysconf("SC_PAGE_SIZE")
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux


# -- load client (its own process) ----------------------------------------------


class _Streams:
    """The load client: *n* SSE streams from source address *source*, on
    one epoll loop in plain Python (no asyncio: a third of the CPU per
    event, and the clients share the cores with the servers). The parsing
    is capacity's (its ``EVENT`` pattern, ``Dechunk`` for a chunked body);
    per stream it counts gaps and repeats by sequence number, and reports
    every stream's latency of each broadcast once all *n* have it."""

    GATE = 128  # connects in flight

    def __init__(self, port: int, n: int, pipe, source: str, timeout: float) -> None:
        self.port, self.n, self.pipe, self.source, self.timeout = port, n, pipe, source, timeout
        self.epoll = select.epoll()
        self.socks: list[socket.socket | None] = [None] * n
        self.by_fd: dict[int, int] = {}
        self.state = [0] * n  # 0 waiting, 1 connecting, 2 reading the head, 3 streaming, 4 closed
        self.head = [b""] * n
        self.tail = [b""] * n
        self.chunks: list[Dechunk | None] = [None] * n
        self.last = [-1] * n
        self.attempts = [0] * n
        self.latencies: dict[int, list[float]] = {}
        self.bad = {"lost": 0, "duplicate_or_out_of_order": 0, "closed": 0, "status": 0}
        self.opened = self.connecting = 0
        self.retry: list[tuple[float, int]] = []  # (when, stream)
        self.failed: list[str] = []

    def _connect(self, i: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)  # the port is picked per destination at connect
        sock.bind((self.source, 0))
        sock.setblocking(False)
        error = sock.connect_ex(("127.0.0.1", self.port))
        self.socks[i], self.by_fd[sock.fileno()], self.state[i] = sock, i, 1
        self.connecting += 1
        self.epoll.register(sock.fileno(), select.EPOLLOUT)
        if error not in (0, errno.EINPROGRESS):
            self._give_up_or_retry(i, os.strerror(error))

    def _give_up_or_retry(self, i: int, why: str) -> None:
        sock = self.socks[i]
        if sock is not None:
            del self.by_fd[sock.fileno()]
            self.epoll.unregister(sock.fileno())
            sock.close()
            self.socks[i] = None
        self.connecting -= 1
        self.attempts[i] += 1
        if self.attempts[i] >= 30:
            self.state[i] = 4
            self.failed.append(why)
        else:
            self.state[i] = 0
            heapq.heappush(self.retry, (time.monotonic() + 0.05 * self.attempts[i], i))

    def _writable(self, i: int) -> None:
        sock = self.socks[i]
        error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._give_up_or_retry(i, os.strerror(error))
            return
        try:
            sock.send(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
        except OSError as exc:
            self._give_up_or_retry(i, str(exc))
            return
        self.state[i] = 2
        self.epoll.modify(sock.fileno(), select.EPOLLIN)

    def _readable(self, i: int) -> None:
        try:
            data = self.socks[i].recv(65536)
        except OSError:
            data = b""
        now = time.time()
        if not data:
            if self.state[i] == 2:
                self._give_up_or_retry(i, "closed before its headers")
            else:
                self.bad["closed"] += 1
                self.epoll.unregister(self.socks[i].fileno())
                self.state[i] = 4
            return
        if self.state[i] == 2:
            self.head[i] += data
            if b"\r\n\r\n" not in self.head[i]:
                return
            head, _, data = self.head[i].partition(b"\r\n\r\n")
            self.head[i], self.state[i] = b"", 3
            self.connecting -= 1
            self.opened += 1
            if not head.startswith(b"HTTP/1.1 200"):
                self.bad["status"] += 1
            if b"transfer-encoding: chunked" in head.lower():
                self.chunks[i] = Dechunk()
        chunks = self.chunks[i]
        if chunks is not None:
            data = chunks.feed(data)
        buf = self.tail[i] + data if self.tail[i] else data
        end = buf.rfind(b"\n")  # every benchmark event is one data line: complete lines suffice
        if end < 0:
            self.tail[i] = buf
            return
        self.tail[i] = buf[end + 1:]
        for match in EVENT.finditer(buf, 0, end + 1):
            seq = int(match[1])
            last = self.last[i]
            if seq <= last:
                self.bad["duplicate_or_out_of_order"] += 1
                continue
            if seq > last + 1 and last >= 0:
                self.bad["lost"] += seq - last - 1
            self.last[i] = seq
            got = self.latencies.setdefault(seq, [])
            got.append(now - float(match[2]))
            if len(got) == self.n:
                self.pipe.send(("seq", seq, array("d", got).tobytes()))
                del self.latencies[seq]

    def _step(self, wait: float) -> None:
        now = time.monotonic()
        while self.retry and self.retry[0][0] <= now and self.connecting < self.GATE:
            self._connect(heapq.heappop(self.retry)[1])
        for fd, events in self.epoll.poll(wait):
            i = self.by_fd.get(fd)
            if i is None:
                continue
            if self.state[i] == 1:
                self._writable(i)
            elif self.state[i] in (2, 3):
                self._readable(i)

    def run(self) -> None:
        started = time.monotonic()
        deadline = started + self.timeout
        self.retry = [(0.0, i) for i in range(self.n)]  # every stream, in order (a heap already)
        while self.opened + len(self.failed) < self.n and time.monotonic() < deadline:
            self._step(0.05)
        if self.failed:
            self.pipe.send(("error", f"{len(self.failed)} of {self.n} streams from {self.source} "
                                     f"never connected: {self.failed[0]}"))
        elif self.opened < self.n:
            self.pipe.send(("error", f"{self.opened} of {self.n} streams from {self.source} had headers"))
        else:
            self.pipe.send(("open", time.monotonic() - started))
        self.epoll.register(self.pipe.fileno(), select.EPOLLIN)
        while True:
            self._step(1.0)
            if self.pipe.poll():
                command = self.pipe.recv()
                if command[0] == "stop":
                    break
        bad = dict(self.bad)
        bad["lost"] += sum(max(0, command[1] - last) for last, state in zip(self.last, self.state) if state == 3)
        for sock in self.socks:
            if sock is not None:
                sock.close()
        self.pipe.send(("bye", bad))


def _client_main(port: int, n: int, pipe, source: str, timeout: float) -> None:
    _Streams(port, n, pipe, source, timeout).run()


# -- limits of this machine -------------------------------------------------------------


def _may_raise_nofile() -> bool:
    """Whether a process started here may raise its descriptor limit above
    the hard limit (CAP_SYS_RESOURCE, bit 24 of CapEff): root in a container
    often may not, and nginx's worker_rlimit_nofile then fails with EPERM."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> 24 & 1)
    return False


def _nginx_capacity(text: str) -> dict:
    """Streams nginx can hold as main configuration *text* (deploy/nginx.conf)
    configures it: two connections per stream, worker_connections per
    worker, the descriptor limit it sets (worker_rlimit_nofile; above the
    hard limit only with CAP_SYS_RESOURCE)."""
    workers_set = re.search(r"(?m)^worker_processes\s+(\w+);", text)[1]
    workers = (os.cpu_count() or 1) if workers_set == "auto" else int(workers_set)
    connections = int(re.search(r"(?m)^\s*worker_connections\s+(\d+);", text)[1])
    rlimit_match = re.search(r"(?m)^worker_rlimit_nofile\s+(\d+);", text)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    rlimit = int(rlimit_match[1]) if rlimit_match else resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if not _may_raise_nofile():  # nginx's setrlimit fails (EPERM): it keeps the hard limit it inherits
        rlimit = min(rlimit, hard)
    per_worker = min(connections, rlimit) - 64  # listeners, upstream keepalive, the publishes
    return {"workers": workers, "worker_connections": connections, "worker_rlimit_nofile": rlimit,
            "streams": workers * per_worker // 2, "run_at": int(0.9 * workers * per_worker // 2)}


def machine_limits(main_text: str) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    meminfo = Path("/proc/meminfo").read_text()
    available_kb = int(re.search(r"MemAvailable:\s+(\d+)", meminfo)[1])
    tcp_mem = [int(v) for v in Path("/proc/sys/net/ipv4/tcp_mem").read_text().split()]
    conntrack = Path("/proc/sys/net/netfilter/nf_conntrack_max")
    watches = Path("/proc/sys/fs/epoll/max_user_watches")
    return {"nofile_soft": soft, "nofile_hard": hard, "fds_per_process": int(0.9 * soft),
            "ephemeral_ports": high - low + 1, "mem_available_mb": available_kb // 1024,
            "somaxconn": int(Path("/proc/sys/net/core/somaxconn").read_text()),
            "tcp_mem_pressure_mb": tcp_mem[1] * PAGE // 2**20,
            "conntrack_max": int(conntrack.read_text()) if conntrack.exists() else None,
            "epoll_max_user_watches": int(watches.read_text()) if watches.exists() else None,
            "nginx": _nginx_capacity(main_text)}


def does_not_fit(front: str, n: int, args, limits: dict) -> str | None:
    """Why *n* streams on *front* would exceed a limit of this machine, or None."""
    per_process = math.ceil(n / args.processes * 1.05) + 100  # reuseport spreads by hash: a margin
    if per_process > limits["fds_per_process"]:
        return (f"about {per_process} descriptors per comet process, over 90 % of ulimit -n "
                f"({limits['nofile_soft']}): use --processes {math.ceil(n * 1.05 / (limits['fds_per_process'] - 100))}")
    if args.per_client + 100 > limits["fds_per_process"]:
        return f"--per-client {args.per_client} is over 90 % of ulimit -n ({limits['nofile_soft']})"
    if args.per_client > 0.9 * limits["ephemeral_ports"]:
        return f"--per-client {args.per_client}: over 90 % of the {limits['ephemeral_ports']} ephemeral ports of a source address"
    if front == "nginx" and n > limits["nginx"]["streams"]:
        return f"over nginx's {limits['nginx']['streams']} streams"
    if front == "nginx" and n / args.processes > 0.9 * limits["ephemeral_ports"]:
        return "nginx's upstream connections to one process would run out of ephemeral ports"
    need_mb = n * ESTIMATED_KB_PER_STREAM // 1024
    if need_mb > 0.8 * limits["mem_available_mb"]:
        return f"an estimated {need_mb} MB, over 80 % of MemAvailable ({limits['mem_available_mb']} MB)"
    return None


# -- one run ------------------------------------------------------------------------------


class Front:
    """redis-server, *processes* comet processes (fast route on a RedisHub)
    and, for ``nginx``, nginx as deployed in front of them."""

    def __init__(self, front: str, processes: int, main: Path = MAIN) -> None:
        self.front, self.nginx, self.apps = front, None, []
        self.redis = RedisServer().start()
        shared = free_port() if front == "reuseport" else None
        env = {"BENCH_REUSE_PORT": "1"} if shared else {}
        try:
            for _ in range(processes):
                app = AppProcess(["-m", "benchmarks.peers.comet_app", "{port}", "fast", "100", self.redis.url],
                                 port=shared, env=env, cwd=ROOT, ready="comet_app: serving")
                self.apps.append(app)
                app.start()
            if front == "nginx":
                self.nginx = NginxServer(SITE, [a.port for a in self.apps], main=main).start()
        except BaseException:
            self.close()
            raise
        self.port = self.nginx.port if self.nginx else shared

    def nginx_workers(self) -> list[int]:
        return [pid for pid, _ in self.nginx.workers()] if self.nginx else []

    def roles(self) -> dict[str, list[int]]:
        """The server-side processes by role."""
        roles = {"comet": [a.process.pid for a in self.apps], "redis": [self.redis.process.pid]}
        if self.nginx:
            roles["nginx"] = [self.nginx.process.pid, *self.nginx_workers()]
        return roles

    def pids(self) -> list[int]:
        return [pid for pids in self.roles().values() for pid in pids]

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far by role, and in all ("all")."""
        by_role = {role: sum(_cpu_s(pid) for pid in pids) for role, pids in self.roles().items()}
        return {**by_role, "all": sum(by_role.values())}

    def rss_kb(self) -> dict[str, int]:
        """RSS by role, and in all ("all")."""
        by_role = {role: sum(_rss_kb(pid) for pid in pids) for role, pids in self.roles().items()}
        return {**by_role, "all": sum(by_role.values())}

    def close(self) -> None:
        if self.nginx:
            self.nginx.close()
        for app in self.apps:
            app.close()
        self.redis.close()


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def kernel_socket_bytes() -> tuple[int, int]:
    """Socket slab caches, and TCP buffer pages (what tcp_mem limits), system-wide."""
    slabs = 0
    for line in Path("/proc/slabinfo").read_text().splitlines()[2:]:
        fields = line.split()
        if fields[0] in SOCKET_SLABS:
            slabs += int(fields[1]) * int(fields[3])  # active objects x object size
    sockstat = Path("/proc/net/sockstat").read_text()
    return slabs, int(re.search(r"TCP:.* mem (\d+)", sockstat)[1]) * PAGE


def _sources(run: int, clients: int) -> list[str]:
    """Fresh loopback source addresses for run *run*: 127.<run+1>.x.y."""
    return [f"127.{run % 250 + 1}.{i // 250}.{i % 250 + 2}" for i in range(clients)]


def run_one(front: str, n: int, run: int, args) -> dict:
    row: dict = {"front": front, "n": n, "processes": args.processes}
    ctx = mp.get_context("fork")
    pipes, procs, setup = [], [], None
    try:
        setup = Front(front, args.processes, args.main)
        time.sleep(0.5)
        rss0, kernel0, cpu0 = setup.rss_kb(), kernel_socket_bytes(), setup.cpu()
        clients = max(2, math.ceil(n / args.per_client))
        started = time.monotonic()
        for i, source in enumerate(_sources(run, clients)):
            parent, child = ctx.Pipe()
            count = n // clients + (1 if i < n % clients else 0)
            proc = ctx.Process(target=_client_main, args=(setup.port, count, child, source, args.connect_timeout),
                               daemon=True)
            proc.start()
            pipes.append(parent)
            procs.append(proc)
        for pipe in pipes:
            if not pipe.poll(args.connect_timeout + 30):
                raise TimeoutError("a load client never reported")
            message = pipe.recv()
            if message[0] == "error":
                raise RuntimeError(message[1])
        row["connect_s"] = round(time.monotonic() - started, 2)
        row["connect_cpu_us"] = round((setup.cpu()["all"] - cpu0["all"]) / n * 1e6, 1)
        row["clients"] = clients
        client_rss = sum(_rss_kb(proc.pid) for proc in procs)
        lasts, everyone = [], []
        cpu1, client_cpu1 = setup.cpu(), sum(_cpu_s(proc.pid) for proc in procs)
        for seq in range(args.broadcasts):
            _request(setup.port, "POST", f"/publish?seq={seq}&ts={time.time():.6f}")
            pending, latencies = set(range(len(pipes))), array("d")
            deadline = time.monotonic() + 120
            while pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"broadcast {seq} reached {len(latencies)} of {n} streams in 120 s")
                for i in list(pending):
                    if pipes[i].poll(0.002):
                        kind, got_seq, data = pipes[i].recv()
                        if got_seq == seq:
                            pending.discard(i)
                            latencies.frombytes(data)
            lasts.append(max(latencies))
            everyone.extend(latencies)
            time.sleep(args.pause)
        cpu2, client_cpu2 = setup.cpu(), sum(_cpu_s(proc.pid) for proc in procs)
        time.sleep(1.0)
        rss1, kernel1 = setup.rss_kb(), kernel_socket_bytes()
        fds = [_fds(a.process.pid) for a in setup.apps]
        server_share = 3 / 4 if front == "nginx" else 1 / 2
        kernel_kb = (sum(kernel1) - sum(kernel0)) / 1024 / n
        rss_kb = (rss1["all"] - rss0["all"]) / n
        row.update({
            "last_p50_ms": round(_pct(lasts, 50) * 1000, 1), "last_p99_ms": round(_pct(lasts, 99) * 1000, 1),
            "stream_p50_ms": round(statistics.median(everyone) * 1000, 1),
            "stream_p99_ms": round(_pct(everyone, 99) * 1000, 1),
            "cpu_us_per_delivery": round((cpu2["all"] - cpu1["all"]) / (args.broadcasts * n) * 1e6, 2),
            "cpu_us_per_delivery_by_role": {role: round((cpu2[role] - cpu1[role]) / (args.broadcasts * n) * 1e6, 2)
                                            for role in cpu2 if role != "all"},
            "client_cpu_us_per_delivery": round((client_cpu2 - client_cpu1) / (args.broadcasts * n) * 1e6, 2),
            "rss_kb": round(rss_kb, 2), "kernel_kb": round(kernel_kb, 2),
            "kernel_buffers_kb": round((kernel1[1] - kernel0[1]) / 1024 / n, 2),
            "server_kb": round(rss_kb + server_share * kernel_kb, 2),
            "rss_kb_by_role": {role: round((rss1[role] - rss0[role]) / n, 2) for role in rss1 if role != "all"},
            "client_rss_kb": round(client_rss / n, 2),
            "fds_max": max(fds), "fds_min": min(fds),
            "nginx_fds": [_fds(pid) for pid in setup.nginx_workers()],
        })
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        bad = {"lost": 0, "duplicate_or_out_of_order": 0, "closed": 0, "status": 0}
        for pipe in pipes:
            try:
                pipe.send(("stop", args.broadcasts - 1))
            except OSError:
                pass
        for pipe in pipes:
            try:
                while pipe.poll(20):
                    message = pipe.recv()
                    if message[0] == "bye":
                        for key in bad:
                            bad[key] += message[1][key]
                        break
                else:
                    row.setdefault("error", "a load client did not say bye")
            except (OSError, EOFError):
                row.setdefault("error", "a load client died")
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        started_pids = setup.pids() if setup else []
        if setup:
            setup.close()
    row.update(bad)
    row["left_running"] = sum(_alive(pid) for pid in started_pids)
    return row


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- the driver ---------------------------------------------------------------------------


COLUMNS = ["front", "n", "processes", "connect_s", "connect_cpu_us", "last_p50_ms", "last_p99_ms", "stream_p50_ms",
           "stream_p99_ms", "cpu_us_per_delivery", "cpu_us_per_delivery_by_role",
           "client_cpu_us_per_delivery", "rss_kb", "rss_kb_by_role", "kernel_kb",
           "kernel_buffers_kb", "server_kb", "client_rss_kb", "fds_max", "fds_min", "nginx_fds", "lost", "duplicate_or_out_of_order", "closed", "status", "left_running", "note", "error"]


def plan(front: str, ns: list[int], limits: dict) -> list[tuple[int, str]]:
    """The Ns to run on *front*, with a note: nginx's Ns above its cap
    become one run at 90 % of the cap."""
    if front != "nginx":
        return [(n, "") for n in sorted(set(ns))]
    cap = limits["nginx"]["run_at"]
    runs = [(n, "") for n in sorted(set(ns)) if n <= cap]
    if any(n > cap for n in ns) and cap not in {n for n, _ in runs}:
        runs.append((cap, f"capped: nginx holds {limits['nginx']['streams']} streams as deployed"))
    return runs


def table(rows: list[dict]) -> str:
    lines = [" | ".join(COLUMNS)]
    lines += [" | ".join(str(row.get(c, "")) for c in COLUMNS) for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10_000, 25_000, 50_000, 100_000])
    parser.add_argument("--processes", type=int, default=6)
    parser.add_argument("--front", nargs="+", choices=FRONTS, default=list(FRONTS))
    parser.add_argument("--broadcasts", type=int, default=5)
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between broadcasts")
    parser.add_argument("--per-client", type=int, default=10_000, help="streams per load-client process")
    parser.add_argument("--connect-timeout", type=float, default=600.0)
    parser.add_argument("--nginx-workers", type=int, default=0,
                        help="nginx's worker_processes instead of deploy/nginx.conf's (auto): more workers, more "
                             "descriptors where nginx may not raise its limit")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/many-streams-<date>.{txt,json}")
    args = parser.parse_args()
    main_text = MAIN.read_text()
    args.main = MAIN
    if args.nginx_workers:
        main_text, n = re.subn(r"(?m)^worker_processes\s+\w+;", f"worker_processes {args.nginx_workers};", main_text)
        assert n == 1, "deploy/nginx.conf: one worker_processes line"
        scratch = tempfile.mkdtemp(prefix="many-streams-")
        atexit.register(shutil.rmtree, scratch, True)
        args.main = Path(scratch) / "nginx.conf"
        args.main.write_text(main_text)
    limits = machine_limits(main_text)
    print(json.dumps({"limits": limits}), file=sys.stderr, flush=True)
    rows, run = [], 0
    for front in args.front:
        stopped = None
        for n, note in plan(front, args.n, limits):
            why = stopped or does_not_fit(front, n, args, limits)
            if why:
                rows.append({"front": front, "n": n, "processes": args.processes, "note": f"skipped: {why}"})
            else:
                row = run_one(front, n, run, args)
                run += 1
                if note:
                    row["note"] = note
                rows.append(row)
                if "error" in row:
                    stopped = f"{front} failed at {n}"
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    summary = {"bench": "many_streams", "date": datetime.date.today().isoformat(),
               "argv": sys.argv[1:], "limits": limits, "rows": rows}
    line = json.dumps(summary)
    print(line)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        stem = RESULTS / f"many-streams-{summary['date']}{f'-nginx-{args.nginx_workers}-workers' if args.nginx_workers else ''}"
        stem.with_suffix(".txt").write_text(f"$ .venv/bin/python -m benchmarks.many_streams {' '.join(sys.argv[1:])}\n\n"
                                            f"{text}\n\nlimits: {json.dumps(limits)}\n")
        stem.with_suffix(".json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
