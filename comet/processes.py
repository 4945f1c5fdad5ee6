"""Real servers for tests and benchmarks: redis-server, nginx, and app
processes, each on a free 127.0.0.1 port with its files in a temp dir,
stopped (and waited for) by ``stop()``/``close()`` or the ``with`` block.

Example: the deployment that docs/deployment.md describes, for real::

    with RedisServer() as redis_server:
        apps = [AppProcess(["-m", "examples.shoutbox", "--redis", redis_server.url]) for _ in range(3)]
        for app in apps:
            app.start()
        with NginxServer("deploy/nginx-comet.conf", [app.port for app in apps]) as nginx:
            ...   # talk to nginx.url
        for app in apps:
            app.stop()

Debian packages: redis-server (with redis-cli), nginx (``./run test`` installs them).
"""
from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["RedisServer", "RedisSentinels", "RedisClusterNodes", "NginxServer", "AppProcess", "free_port"]


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _terminate(process: subprocess.Popen[bytes] | None, timeout: float) -> int | None:
    """SIGTERM, wait up to *timeout*, then SIGKILL; the exit code."""
    if process is None:
        return None
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    return process.returncode


# Ports handed out lately, not yet bound by whoever asked: the kernel may
# offer one again at the next bind to port 0 (nginx once got the same port
# for its two listeners, and refused to start).
_handed: collections.deque[int] = collections.deque(maxlen=1024)
_handing = threading.Lock()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for servers that need a
    number up front, such as redis-server or nginx), and none of the last
    1,024 this process handed out."""
    with _handing:
        while True:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port: int = sock.getsockname()[1]  # (host, port) for AF_INET
            if port not in _handed:
                _handed.append(port)
                return port


class RedisServer:
    """A real ``redis-server`` on a free 127.0.0.1 port, data in a temp dir.

    Append-only persistence is on, so :meth:`restart` keeps every stream (a
    graceful restart, as a deploy or ``systemctl restart`` does).

    Example::

        with RedisServer() as server:
            hub = RedisHub(server.url)

    ``password`` turns on ``requirepass``; ``tls=(certfile, keyfile)`` serves
    TLS only (``rediss://``); extra ``args`` go to redis-server.
    """

    def __init__(self, *, password: str | None = None, tls: tuple[str, str] | None = None,
                 args: tuple[str, ...] = (), binary: str = "redis-server") -> None:
        path = shutil.which(binary)
        if path is None:
            raise RuntimeError(f"{binary} not found: install Debian's redis-server (./run test does)")
        self.binary = path
        self.password = password
        self.tls = tls
        self.args = tuple(args)
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="comet-redis-")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
               "--save", "", "--appendonly", "yes", "--daemonize", "no", "--protected-mode", "no",
               "--logfile", os.path.join(self.dir, "redis.log"), *self.args]
        if self.password:
            cmd += ["--requirepass", self.password]
        if self.tls:
            cmd += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", self.tls[0],
                    "--tls-key-file", self.tls[1], "--tls-auth-clients", "no"]
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(self._answers, timeout, f"redis-server on port {self.port}")
        return self

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            log = os.path.join(self.dir, "redis.log")
            tail = open(log).read()[-2000:] if os.path.exists(log) else ""
            raise RuntimeError(f"redis-server exited with {self.process.returncode}: {tail}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as raw:
                sock = raw
                if self.tls:
                    import ssl

                    context = ssl.create_default_context()
                    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # only "is it up?"
                    sock = context.wrap_socket(raw)
                try:
                    sock.sendall(b"PING\r\n")
                    return sock.recv(64).startswith((b"+PONG", b"-NOAUTH"))
                finally:
                    sock.close()
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (redis flushes its append-only file), then wait."""
        _terminate(self.process, timeout)
        self.process = None

    def restart(self) -> None:
        """Stop and start again on the same port with the same data."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RedisSentinels:
    """Redis Sentinel on loopback: a master, a replica and three sentinels
    watching them as *service*, ready for a failover when ``start()``
    returns (the replica in sync, each sentinel knowing the replica and its
    two peers).

    Example::

        with RedisSentinels() as group:
            hub = RedisHub(group.url, replicas=1)   # redis+sentinel://.../comet
            group.master.process.kill()             # a crash: the sentinels promote the replica
    """

    def __init__(self, service: str = "comet", *, down_after_ms: int = 1000, failover_timeout_ms: int = 5000) -> None:
        self.service = service
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.dir = tempfile.mkdtemp(prefix="comet-sentinel-")
        self.ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self.master = RedisServer()
        self.replica = RedisServer(args=("--replicaof", "127.0.0.1", str(self.master.port)))

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{p}" for p in self.ports) + f"/{self.service}"

    def start(self, timeout: float = 30.0) -> "RedisSentinels":
        try:
            self.master.start()
            self.replica.start()
            for port in self.ports:
                conf = os.path.join(self.dir, f"sentinel-{port}.conf")
                with open(conf, "w") as f:
                    f.write(f"port {port}\nbind 127.0.0.1\ndaemonize no\ndir {self.dir}\n"
                            f"logfile {self.dir}/sentinel-{port}.log\n"
                            f"sentinel monitor {self.service} 127.0.0.1 {self.master.port} 2\n"
                            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                            f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
                            f"sentinel parallel-syncs {self.service} 1\n")
                self.sentinels.append(subprocess.Popen([self.master.binary, conf, "--sentinel"], stdin=subprocess.DEVNULL,
                                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            import redis

            with redis.Redis(port=self.master.port) as master:
                _wait(lambda: master.info("replication").get("slave0", {}).get("state") == "online", timeout,
                      "the replica in sync")

            def ready(port: int) -> bool:
                try:
                    with redis.Redis(port=port, socket_timeout=1) as s:
                        return (len(s.execute_command("SENTINEL", "REPLICAS", self.service)) == 1
                                and len(s.execute_command("SENTINEL", "SENTINELS", self.service)) == 2)
                except redis.RedisError:
                    return False

            for port in self.ports:  # each knows the replica and its two peers: a failover can be agreed
                _wait(lambda: ready(port), timeout, f"sentinel {port} ready")
        except BaseException:
            self.close()
            raise
        return self

    def master_port(self) -> int:
        """The master's port, as the first sentinel names it now."""
        import redis

        with redis.Redis(port=self.ports[0], socket_timeout=1) as s:
            return int(s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)[1])

    def close(self) -> None:
        for process in self.sentinels:
            _terminate(process, 10)
        self.sentinels = []
        self.replica.close()
        self.master.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RedisSentinels":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RedisClusterNodes:
    """A Redis Cluster on loopback: *masters* masters (3 at least, as
    ``redis-cli --cluster create`` asks), each with *replicas* replicas,
    every node on free ports (its cluster-bus port too), the hash slots
    spread evenly; ready when ``start()`` returns (every node says
    ``cluster_state:ok`` and knows every other).

    Example::

        with RedisClusterNodes() as cluster:
            hub = RedisHub(cluster.url)                  # redis+cluster://127.0.0.1:p1,...
            cluster.move_slot(cluster.slot_of("comet:room"), to=cluster.masters[1])  # a resharding
    """

    def __init__(self, masters: int = 3, replicas: int = 0, *, node_timeout_ms: int = 1000) -> None:
        if masters < 3:
            raise ValueError(f"a Redis Cluster needs at least 3 masters, got {masters}")
        self.dir = tempfile.mkdtemp(prefix="comet-cluster-")
        self.node_timeout_ms = node_timeout_ms
        self.nodes = [self._node() for _ in range(masters * (1 + replicas))]
        self.replicas = replicas
        self.cli = shutil.which("redis-cli")
        if self.cli is None:
            raise RuntimeError("redis-cli not found: install Debian's redis-server (./run test does)")

    def _node(self) -> RedisServer:
        bus = free_port()
        return RedisServer(args=("--cluster-enabled", "yes", "--cluster-port", str(bus),
                                 "--cluster-node-timeout", str(self.node_timeout_ms)))

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every node as a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 60.0) -> "RedisClusterNodes":
        try:
            for node in self.nodes:
                # the cluster config (node id, epochs) lives in the node's own dir
                node.args += ("--cluster-config-file", os.path.join(node.dir, "nodes.conf"))
                node.start()
            subprocess.run([str(self.cli), "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                            "--cluster-replicas", str(self.replicas), "--cluster-yes"],
                           check=True, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
            _wait(self._ready, timeout, "every cluster node to agree on the cluster")
        except BaseException:
            self.close()
            raise
        return self

    def _ready(self) -> bool:
        import redis

        for node in self.nodes:
            if node.process is None:
                continue
            try:
                with redis.Redis(port=node.port, socket_timeout=1) as r:
                    info = r.execute_command("CLUSTER", "INFO").decode()
                    if "cluster_state:ok" not in info or f"cluster_known_nodes:{len(self.nodes)}" not in info:
                        return False
                    if self.replicas and r.execute_command("ROLE")[0] == b"slave" and \
                            r.info("replication").get("master_link_status") != "up":
                        return False
            except redis.RedisError:
                return False
        return True

    def _client(self, node: RedisServer) -> Any:
        import redis

        return redis.Redis(port=node.port, socket_timeout=5)

    @property
    def masters(self) -> list[RedisServer]:
        """The nodes that are masters now (a failover changes them)."""
        import redis

        found = []
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                with self._client(node) as r:
                    if r.execute_command("ROLE")[0] == b"master":
                        found.append(node)
            except redis.ConnectionError:
                continue  # a node that is down is not a master
        return found

    def replicas_of(self, master: RedisServer) -> list[RedisServer]:
        with self._client(master) as r:
            ports = {int(entry["port"]) for key, entry in r.info("replication").items()
                     if key.startswith("slave") and isinstance(entry, dict)}
        return [n for n in self.nodes if n.port in ports]

    @staticmethod
    def slot_of(key: str | bytes) -> int:
        """The hash slot of *key* (hash tags included)."""
        from redis.crc import key_slot

        return int(key_slot(key.encode() if isinstance(key, str) else key))

    def owner(self, slot: int) -> RedisServer:
        """The master that serves *slot* now."""
        for node in self.masters:
            with self._client(node) as r:
                for start, end, master, *_ in r.execute_command("CLUSTER", "SLOTS"):
                    if start <= slot <= end:
                        port = int(master[1])
                        return next(n for n in self.nodes if n.port == port)
        raise LookupError(f"no master serves slot {slot}")

    def move_slot(self, slot: int, to: RedisServer, *, batch: int = 10, between: Callable[[], Any] | None = None) -> None:
        """Reshard one slot to master *to*, keys and all, as ``redis-cli
        --cluster reshard`` does (IMPORTING/MIGRATING, ``MIGRATE`` in
        batches of *batch* keys, then ``SETSLOT NODE`` everywhere); *between*
        runs after each batch (say, to publish while the slot is half moved)."""
        source = self.owner(slot)
        if source is to:
            return
        with self._client(source) as src, self._client(to) as dst:
            src_id, dst_id = src.execute_command("CLUSTER", "MYID"), dst.execute_command("CLUSTER", "MYID")
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            while True:
                keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
                if not keys:
                    break
                src.execute_command("MIGRATE", "127.0.0.1", to.port, "", 0, 5000, "KEYS", *keys)
                if between is not None:
                    between()
            dst.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        for node in self.masters:
            if node is not source and node is not to:
                with self._client(node) as r:
                    r.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)

    def failover(self, master: RedisServer, timeout: float = 30.0) -> RedisServer:
        """A planned failover: one of *master*'s replicas takes over with
        ``CLUSTER FAILOVER`` (it first catches up, so nothing acknowledged
        is lost); the new master once every node agrees."""
        replica = self.replicas_of(master)[0]
        with self._client(replica) as r:
            r.execute_command("CLUSTER", "FAILOVER")
            _wait(lambda: r.execute_command("ROLE")[0] == b"master", timeout, f"replica {replica.port} promoted")
        _wait(self._ready, timeout, "the cluster to agree after the failover")
        return replica

    def close(self) -> None:
        for node in self.nodes:
            node.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RedisClusterNodes":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


class NginxServer:
    """nginx on a free port in front of app processes, configured with a
    site file such as ``deploy/nginx-comet.conf`` used *as documented*: its
    ``upstream`` server lines are replaced by *ports* and its ``listen`` port
    by a free one; every directive is kept. A site that also listens with
    ``ssl`` gets a second free port (``https_url``) and a self-signed
    certificate for 127.0.0.1, made with ``openssl`` in its temp dir.
    With *main* (``deploy/nginx.conf``), nginx runs with that main
    configuration, as deployed, instead of a minimal one.
    """

    def __init__(self, site: str | os.PathLike[str], ports: Sequence[int], *, binary: str = "nginx",
                 worker_connections: int = 4096, main: str | os.PathLike[str] | None = None) -> None:
        path = shutil.which(binary) or (f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None)
        if path is None:
            raise RuntimeError(f"{binary} not found: install Debian's nginx (./run test does)")
        self.binary = path
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="comet-nginx-")
        text = Path(site).read_text()
        servers = "".join(f"    server 127.0.0.1:{p} max_fails=1 fail_timeout=2s;\n" for p in ports)
        text, n = re.subn(r"(upstream\s+\w+\s*\{\n)(?:\s*server\s[^;]*;[^\n]*\n)+", lambda m: m[1] + servers, text)
        if n != 1:
            raise ValueError(f"{site}: expected one upstream block with server lines")
        text, n = re.subn(r"(?m)^(\s*)listen\s+(?:127\.0\.0\.1:)?\d+((?:\s+backlog=\d+)?);",
                          f"\\1listen 127.0.0.1:{self.port}\\2;", text)  # not in comments
        if n != 1:
            raise ValueError(f"{site}: expected one 'listen [127.0.0.1:]<port>;'")
        self.tls_port: int | None = None
        self.certificate: str | None = None
        if re.search(r"(?m)^\s*listen\s+\d+\s+ssl\b", text):
            self.tls_port = free_port()
            text = re.sub(r"(?m)^(\s*)listen\s+\d+(\s+ssl\b[^;]*);", f"\\1listen 127.0.0.1:{self.tls_port}\\2;", text)
            self.certificate = self._self_signed()
            text = re.sub(r"(?m)^(\s*)ssl_certificate\s+[^;]+;", f"\\1ssl_certificate {self.certificate};", text)
            text = re.sub(r"(?m)^(\s*)ssl_certificate_key\s+[^;]+;", f"\\1ssl_certificate_key {self.dir}/key.pem;", text)
        Path(self.dir, "site.conf").write_text(text)
        temp = "".join(f"    {kind}_temp_path {self.dir}/{kind};\n" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        if main is not None:
            Path(self.dir, "nginx.conf").write_text(self._main(Path(main).read_text(), temp))
        else:
            Path(self.dir, "nginx.conf").write_text(
                f"user root;\nworker_processes 1;\nworker_rlimit_nofile {2 * worker_connections + 100};\n"
                f"pid {self.dir}/nginx.pid;\nerror_log {self.dir}/error.log warn;\n"
                f"events {{ worker_connections {worker_connections}; }}\n"
                f"http {{\n    access_log off;\n{temp}    include {self.dir}/site.conf;\n}}\n")
        self.process: subprocess.Popen[bytes] | None = None

    def _main(self, text: str, temp: str) -> str:
        """A main configuration such as ``deploy/nginx.conf``, every directive
        kept but where it would touch the host: pid, logs, the user, the
        sites (only this one), temp paths (in this server's dir)."""
        for pattern, replacement in ((r"(?m)^user\s+[^;]+;", "user root;"),
                                     (r"(?m)^pid\s+[^;]+;", f"pid {self.dir}/nginx.pid;"),
                                     (r"(?m)^error_log\s+[^;]+;", f"error_log {self.dir}/error.log warn;"),
                                     (r"(?m)^(\s*)access_log\s+[^;]+;", "\\1access_log off;"),
                                     (r"(?m)^\s*include\s+/etc/nginx/conf\.d/[^;]*;\n", ""),
                                     (r"(?m)^(\s*)include\s+/etc/nginx/sites-enabled/[^;]*;",
                                      f"{temp}\\1include {self.dir}/site.conf;")):
            text, n = re.subn(pattern, replacement, text)
            if n != 1:
                raise ValueError(f"main configuration: expected one match of {pattern!r}")
        return text

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def https_url(self) -> str:
        """The TLS listener (HTTP/2 if the site says ``http2``); its
        certificate is ``self.certificate``, self-signed for 127.0.0.1."""
        if self.tls_port is None:
            raise RuntimeError("this site has no 'listen ... ssl' line")
        return f"https://127.0.0.1:{self.tls_port}"

    def _self_signed(self) -> str:
        cert = f"{self.dir}/cert.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", f"{self.dir}/key.pem", "-out", cert],
                       check=True, capture_output=True, timeout=60)
        return cert

    def start(self, timeout: float = 10.0) -> "NginxServer":
        process = self.process = subprocess.Popen(
            [self.binary, "-p", self.dir, "-c", f"{self.dir}/nginx.conf", "-g", "daemon off;"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        stderr = process.stderr
        assert stderr is not None  # stderr=PIPE

        def up() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"nginx exited with {process.returncode}: {stderr.read().decode()[-2000:]}")
            return _port_open(self.port) and (self.tls_port is None or _port_open(self.tls_port))

        _wait(up, timeout, f"nginx on port {self.port}")
        return self

    def reload(self) -> None:
        """``nginx -s reload``: new workers start on the configuration read
        again; the old ones finish their connections, for at most the main
        configuration's ``worker_shutdown_timeout``."""
        subprocess.run([self.binary, "-p", self.dir, "-c", f"{self.dir}/nginx.conf", "-s", "reload"],
                       check=True, capture_output=True, timeout=30)

    def workers(self) -> list[tuple[int, str]]:
        """The master's worker processes now, as (pid, title): an old worker
        finishing its connections after a reload is titled ``nginx: worker
        process is shutting down``. Read from ``/proc`` (Linux)."""
        if self.process is None:
            return []
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
                if ppid != self.process.pid:
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    title = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
            if "worker process" in title:
                found.append((int(entry), title))
        return found

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            _terminate(self.process, timeout)
            if self.process.stderr is not None:  # always: start() asks for a pipe
                self.process.stderr.close()
            self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "NginxServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AppProcess:
    """A Python app in its own process on a free port: ``AppProcess(["-m",
    "examples.lobby_game", "--redis", url])`` runs ``python -m ... --port N``
    (an app that takes its port otherwise says where with ``"{port}"``).
    ``start()`` returns once the port accepts connections *and* ``ready``
    appears in the output (CherryPy's "Bus STARTED": a port answers before
    the engine has finished starting, and a SIGTERM then makes CherryPy exit
    with 70); ``ready=None`` for apps that log nothing.
    Its output goes to a log file (``log()`` reads it), not to a pipe that
    could fill up and stall it."""

    def __init__(self, args: Sequence[str], *, port: int | None = None, env: dict[str, str] | None = None,
                 cwd: str | os.PathLike[str] | None = None, ready: str | None = "ENGINE Bus STARTED") -> None:
        self.port = port or free_port()
        if any("{port}" in a for a in args):
            self.args = [sys.executable, *(a.replace("{port}", str(self.port)) for a in args)]
        else:
            self.args = [sys.executable, *args, "--port", str(self.port)]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd
        self.ready = ready
        self.logfile = tempfile.NamedTemporaryFile(prefix="comet-app-", suffix=".log", delete=False)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> "AppProcess":
        seen = len(self.log())  # a restart must find "ready" anew
        process = self.process = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=self.logfile,
                                                  stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)

        def up() -> bool:
            if process.poll() is not None:
                raise RuntimeError(f"{' '.join(self.args)} exited with {process.returncode}:\n{self.log()[-3000:]}")
            return _port_open(self.port) and (self.ready is None or self.ready in self.log()[seen:])

        _wait(up, timeout, f"app on port {self.port}")
        return self

    def log(self) -> str:
        return Path(self.logfile.name).read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait: the exit code (None if it was not running)."""
        code = _terminate(self.process, timeout)
        self.process = None
        return code

    def kill(self) -> None:
        """SIGKILL, as a crash would: no cleanup runs in the app."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def close(self) -> None:
        self.stop()
        self.logfile.close()
        os.unlink(self.logfile.name)

    def __enter__(self) -> "AppProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()
