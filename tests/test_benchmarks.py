"""The benchmark scripts keep working: a tiny run of each comet server in
``benchmarks.capacity``, of ``benchmarks.idle_streams``, of
``benchmarks.redis_publish``, of ``benchmarks.many_streams`` (processes
sharing a port) and of ``benchmarks.scaleout`` on its three shared
backends (timings are not checked, only that every event arrived once, in
order, and every process was stopped); the load client's parser."""
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import cheroot.server
import pytest

from benchmarks.capacity import Dechunk, one_stream_burst
from comet.processes import AppProcess, NginxServer

ROOT = Path(__file__).resolve().parents[1]


def test_capacity_benchmark_runs_on_comet_servers():
    env, tag = _tagged()
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.capacity", "--n", "40", "--servers", "comet-fast", "comet-parked",
         "comet-thread", "--broadcasts", "3", "--seconds", "1", "--rate", "3", "--idle", "0.5", "--burst", "5000"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    rows = {row["server"]: row for row in summary["rows"]}
    assert set(rows) == {"comet-fast", "comet-parked", "comet-thread"}
    for name, row in rows.items():
        assert "error" not in row, (name, row)
        assert row["lost"] == 0 and row["duplicate_or_out_of_order"] == 0, (name, row)
        assert row["status"] == 0, (name, row)  # exited cleanly on SIGTERM
    assert all(b.get("one_stream_events_per_s", 0) > 0 for b in summary["bursts"]), summary["bursts"]
    _nothing_left(tag, "the benchmark left a server running")


def test_idle_streams_benchmark_runs(tmp_path):
    env, tag = _tagged()
    servers = ["floor", "comet-parked", "comet-parked-nowatch", "comet-fast"]
    if importlib.util.find_spec("aiohttp"):
        servers.append("aiohttp")
    if importlib.util.find_spec("sse_starlette") and importlib.util.find_spec("uvicorn"):
        servers.append("starlette-asyncio")
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.idle_streams", "--n", "20", "--heartbeat", "0.5", "--window", "1.5",
         "--out", str(tmp_path), "--servers", *servers],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == [f"idle-streams-{summary['date']}.json", f"idle-streams-{summary['date']}.md"]
    assert json.loads((tmp_path / written[0]).read_text()) == summary
    rows = {row["server"]: row for row in summary["rows"]}
    assert list(rows) == servers
    for name, row in rows.items():
        assert "error" not in row, (name, row)
        # every stream stayed open and heard heartbeats all through the window
        assert row["bad_status"] == row["silent"] == row["dropped"] == 0, (name, row)
        assert row["sockets"] == 20 and row["min_beats"] >= 1, (name, row)
        assert row["cpu_us_per_stream_beat"] >= 0 and row["payload_bytes_per_beat"] > 0, (name, row)
    for name in ("comet-parked", "comet-parked-nowatch", "comet-fast"):
        assert rows[name]["announced_heartbeat"] == 0.5, rows[name]
        assert rows[name]["bare_segs_out"] == 0, rows[name]  # nothing on the wire but the heartbeat
    # comet.liveness's options are on as comet runs, and the benchmark's switch turns them off
    assert rows["comet-parked"]["keepalive_sockets"] >= 10 and rows["comet-fast"]["keepalive_sockets"] >= 10, rows
    assert rows["comet-parked-nowatch"]["keepalive_sockets"] == rows["floor"]["keepalive_sockets"] == 0, rows
    assert set(summary["ratios_to_floor"]) == set(servers)
    assert set(summary["watchdog"]) == {"comet-parked"}
    assert "watchdog of comet-parked" in (tmp_path / written[1]).read_text()
    _nothing_left(tag, "the benchmark left a server running")


def test_redis_publish_benchmark_runs():
    env, tag = _tagged()
    result = subprocess.run([sys.executable, "-m", "benchmarks.redis_publish", "--events", "400", "--threads", "1", "8"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert [(r["threads"], r["batched"]) for r in summary["rows"]] == [(1, False), (1, True), (8, False), (8, True)]
    for row in summary["rows"]:
        assert row["all_once"] and row["failures"] == 0, row
    assert summary["rows"][0]["round_trips"] == 400  # unbatched: one each
    assert set(summary["batched_to_plain_per_s"]) == {"1", "8"}
    _nothing_left(tag, "the benchmark left processes running")


def test_redis_read_benchmark_runs():
    """benchmarks/redis_read.py, small: every event arrives once, in order,
    and the Redis figures it reports are there."""
    env, tag = _tagged()
    result = subprocess.run([sys.executable, "-m", "benchmarks.redis_read", "--channels", "10", "100", "--rate", "200",
                             "--seconds", "1"], cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert [row["channels"] for row in summary["rows"]] == [10, 100]
    for row in summary["rows"]:
        assert row["published"] >= 150 and row["received"] == row["published"], row
        assert row["lost"] == row["duplicated"] == row["out_of_order"] == row["failures"] == 0, row
        assert row["xread_per_s"] > 0 and row["redis_cpu_us_per_event"] >= 0 and row["p99_ms"] > 0, row
    assert set(summary["ratios_last_to_first"]) >= {"p99_ms", "redis_cpu_us_per_event"}
    _nothing_left(tag, "the benchmark left processes running")


def test_connect_ports_benchmark_runs():
    """benchmarks/connect_ports.py, small: a row per step, and its holder
    process stopped."""
    env, tag = _tagged()
    result = subprocess.run([sys.executable, "-m", "benchmarks.connect_ports", "--upto", "600", "--step", "200"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line[:1].isdigit()]
    assert [int(row[0]) for row in rows] == [200, 400, 600], result.stdout
    assert all(float(row[3]) > 0 for row in rows), result.stdout
    _nothing_left(tag, "the benchmark left its holder running")


@pytest.mark.skipif("reuse_port" not in inspect.signature(cheroot.server.HTTPServer.__init__).parameters,
                    reason="this cheroot has no reuse_port (SO_REUSEPORT), which the benchmark's shared port needs")
def test_many_streams_benchmark_runs_on_a_shared_port():
    result = subprocess.run([sys.executable, "-m", "benchmarks.many_streams", "--n", "400", "--processes", "2",
                             "--front", "reuseport", "--broadcasts", "2", "--pause", "0.1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["bench"] == "many_streams" and summary["limits"]["nginx"]["streams"] > 0, summary
    (row,) = summary["rows"]
    fields = {"front", "n", "processes", "clients", "connect_s", "connect_cpu_us", "last_p50_ms", "last_p99_ms",
              "stream_p50_ms", "stream_p99_ms", "cpu_us_per_delivery", "cpu_us_per_delivery_by_role",
              "client_cpu_us_per_delivery", "rss_kb",
              "rss_kb_by_role", "kernel_kb", "kernel_buffers_kb", "server_kb", "client_rss_kb", "fds_max", "fds_min", "nginx_fds", "lost", "duplicate_or_out_of_order", "closed", "status",
              "left_running"}
    assert set(row) == fields, row  # and no "error"
    assert (row["front"], row["n"], row["clients"]) == ("reuseport", 400, 2), row
    assert row["lost"] == row["duplicate_or_out_of_order"] == row["closed"] == row["status"] == 0, row
    # Both processes serve on the shared port: the kernel spread the 400 streams.
    assert row["fds_min"] > 100, row
    assert row["left_running"] == 0, "the benchmark left a server, nginx or redis-server running"


def test_the_load_client_decodes_chunks_cut_anywhere():
    body = b"".join(b"id: 17-%d\r\ndata: b%d\r\n\r\n" % (i, i) for i in range(40))
    # Chunks of odd sizes, as a proxy cuts them: headers land mid-line.
    wire, start = b"", 0
    for size in (1, 7, 33, 2, 120, 5, 1000):
        piece = body[start:start + size]
        wire += b"%x;ext=1\r\n%s\r\n" % (len(piece), piece)
        start += size
    wire += b"0\r\n\r\n"
    for step in (1, 2, 3, 64, len(wire)):
        decoder = Dechunk()
        assert b"".join(decoder.feed(wire[i:i + step]) for i in range(0, len(wire), step)) == body, step
        assert decoder.done


@pytest.fixture
def app_behind_nginx():
    with AppProcess(["-m", "benchmarks.peers.comet_app", "{port}", "parked", "100"], cwd=ROOT, ready=None) as app, \
            NginxServer(ROOT / "deploy" / "nginx-comet.conf", [app.port]) as nginx:
        yield app, nginx


def test_a_burst_through_nginx_is_counted_whole(app_behind_nginx):
    # nginx re-chunks a burst of publish_many() events at its read
    # boundaries; the load client counted events in the raw bytes, missed
    # the lines a chunk header cut, and waited forever (the scaleout "stall").
    app, nginx = app_behind_nginx
    received, published = one_stream_burst(nginx.port, app.port, 2000, timeout=30, batch=100)
    assert received > 0 and published > 0


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_scaleout_benchmark_has_sentinel_and_cluster_rows():
    env, tag = _tagged()
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.scaleout", "--processes", "2", "--n", "10", "--broadcasts", "2",
         "--burst", "2000", "--backends", "redis", "--sentinel", "--cluster"],
        cwd=ROOT, capture_output=True, text=True, timeout=380, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    names = ["memory-direct", "redis-2p-nginx", "sentinel-2p-nginx", "cluster-2p-nginx"]
    assert [row["setup"] for row in summary["rows"]] == names
    for row in summary["rows"]:
        assert "error" not in row and row["lost"] == 0 and row["duplicate_or_out_of_order"] == 0, row
    # Every burst completed, on every backend (the cluster's used to "stall": see the load client's Dechunk).
    # (The in-memory reference may deliver a burst this small in one read, which the
    # load client cannot time: that is not a stall.)
    assert [b["setup"] for b in summary["bursts"]] == names, summary["bursts"]
    assert all("error" not in b or (b["setup"] == "memory-direct" and "at once" in b["error"])
               for b in summary["bursts"]), summary["bursts"]
    assert set(summary["last_p50_ratio_to_single_redis"]) == {"10:sentinel-2p-nginx", "10:cluster-2p-nginx"}
    assert set(summary["burst_ratio_to_single_redis"]) == {"sentinel-2p-nginx", "cluster-2p-nginx"}
    _nothing_left(tag, "the benchmark left a server running")


def _tagged() -> tuple[dict[str, str], str]:
    """An environment for a benchmark's subprocess whose every descendant
    carries a tag, and the tag: what the benchmark leaves running is found by
    it, whatever other tests (another pytest worker) run meanwhile."""
    tag = f"COMET_BENCH_TAG={uuid.uuid4().hex}"
    env = dict(os.environ)
    env["COMET_BENCH_TAG"] = tag.split("=", 1)[1]
    return env, tag


def _nothing_left(tag: str, what: str) -> None:
    """Every process the benchmark started is gone, or goes within 10 s
    (one it stopped may still be exiting as the benchmark returns)."""
    deadline = time.monotonic() + 10
    while (left := _left_by(tag)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], f"{what}: {left}"


def _left_by(tag: str) -> list[str]:
    """Processes still running with *tag* in their environment."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or proc.name == str(os.getpid()):
            continue
        try:
            if tag.encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return found


def _running(needle: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and needle in cmdline:
            found.append(cmdline)
    return found
