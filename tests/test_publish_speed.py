"""The publish path's fast lane (issue 29): RedisHub packs its commands and
reads the replies on a pooled connection (comet.backends.redis_publish's
``round_trip``), and ``benchmarks.redis_publish --ratios`` sets its rates
next to redis-benchmark's XADD. Timings are not checked here, only that the
benchmark runs and every event is stored once, in its thread's order."""
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from comet import Event, Part
from comet.backends.redis import RedisHub
from comet.backends.redis_publish import pack, round_trip, round_trips

ROOT = Path(__file__).resolve().parents[1]
_names = itertools.count()


@pytest.fixture
def prefix():
    """Keys of their own per test: the Redis server is shared by the session."""
    return f"speed{next(_names)}:"


def test_the_ratios_benchmark_runs_and_stores_every_event_once_in_order():
    result = subprocess.run([sys.executable, "-m", "benchmarks.redis_publish", "--ratios", "--events", "400",
                             "--xadd-requests", "2000"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert [(r["what"], r["threads"]) for r in summary["rows"]] == [("publish", 1), ("publish", 8),
                                                                    ("publish_many x100", 1)]
    for row in summary["rows"]:
        assert row["all_once_in_order"] and row["failures"] == 0, row
    assert summary["rows"][2]["round_trips"] == 4  # 400 events in batches of 100
    if shutil.which("redis-benchmark"):
        assert summary["xadd_c50_per_s"] > 0 and summary["publish_8_threads_to_xadd"] > 0
        assert summary["publish_many_to_xadd_p32"] > 0


def test_a_round_trip_answers_each_command_in_order_and_drops_a_broken_connection(comet_redis, prefix):
    """Replies come back in order, an error reply in its place; a connection
    that failed mid-reply is not handed out again with replies left unread
    (redis-py drops it on a read timeout; round_trip drops it on anything)."""
    client = redis.Redis.from_url(comet_redis.url, socket_timeout=0.5)
    client.set(prefix + "text", "not a stream")
    replies = round_trip(client, [pack(["XADD", prefix + "s", "*", "n", 1]), pack(["XADD", prefix + "text", "*", "n", 1]),
                                  pack(["XLEN", prefix + "s"])])
    assert isinstance(replies[0], bytes) and isinstance(replies[1], redis.ResponseError) and replies[2] == 1
    with pytest.raises(redis.TimeoutError):  # the second reply takes a second: the read times out
        round_trip(client, [pack(["PING"]), pack(["BLPOP", prefix + "empty", 1]), pack(["PING"])])
    assert round_trip(client, [pack(["ECHO", "next"])]) == [b"next"]  # not the PING left over
    client.close()


def test_round_trips_reach_servers_side_by_side_and_fail_one_alone(comet_redis, prefix):
    """A cluster batch goes to every master at once (round_trips): each
    server's replies come back to it, in order; a server that cannot be
    reached fails its own commands, not the others', and leaves no
    connection taken from any pool."""
    import socket

    with socket.socket() as spare:  # a port nothing listens on
        spare.bind(("127.0.0.1", 0))
        dead_port = spare.getsockname()[1]
    up = redis.Redis.from_url(comet_redis.url)
    other = redis.Redis.from_url(comet_redis.url)
    down = redis.Redis(port=dead_port, socket_connect_timeout=1)
    out = round_trips([(up, [pack(["XADD", prefix + "a", "*", "n", 1]), pack(["XLEN", prefix + "a"])]),
                       (down, [pack(["PING"])]),
                       (other, [pack(["ECHO", "other"])])])
    assert isinstance(out[0], list) and isinstance(out[0][0], bytes) and out[0][1] == 1
    assert isinstance(out[1], redis.ConnectionError)
    assert out[2] == [b"other"]
    for client in (up, other, down):
        pool = client.connection_pool
        assert len(pool._in_use_connections) == 0  # (redis-py's pool: every connection given back)
        client.close()


def test_a_forked_child_publishes_on_a_connection_of_its_own(comet_redis, prefix):
    """A hub made before a fork (gunicorn --preload) publishes in the child
    on its own connection: the group commit's held connection is the
    parent's, and sharing it would cross the replies of both processes."""
    import os
    import warnings

    hub = RedisHub(comet_redis.url, prefix=prefix)
    admin = redis.Redis.from_url(comet_redis.url)
    try:
        hub.publish("room", "before the fork")  # the held connection is taken here
        read, write = os.pipe()
        with warnings.catch_warnings():  # (3.12+ warns of fork with threads: the hub's reader is one, idle here)
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # the child: publish, report its ids, never return into pytest
            code = 1
            try:
                os.close(read)
                ids = [hub.publish("room", f"child {i}") for i in range(300)]
                os.write(write, json.dumps(ids).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write)
        mine = [hub.publish("room", f"parent {i}") for i in range(300)]
        with os.fdopen(read, "rb") as pipe:
            theirs = json.loads(pipe.read() or b"[]")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        stored = {i.decode(): f[b"d"].decode() for i, f in admin.xrange(prefix + "room")}
        assert len(stored) == 601
        assert [stored[i] for i in mine] == [f"parent {i}" for i in range(300)]
        assert [stored[i] for i in theirs] == [f"child {i}" for i in range(300)]
    finally:
        admin.close()
        hub.close()


def test_publish_many_after_a_script_flush_stores_each_event_once(comet_redis, prefix):
    """A restarted Redis forgets the script: every EVALSHA of the EXEC fails
    alike, nothing ran, and the batch goes again once loaded."""
    hub = RedisHub(comet_redis.url, prefix=prefix)
    admin = redis.Redis.from_url(comet_redis.url)
    try:
        hub.publish_many("room", ["a", "b"])
        admin.script_flush()
        ids = hub.publish_many("room", ["c", "d", "e"])
        assert len(ids) == 3 and admin.xlen(prefix + "room") == 5
        assert [fields[b"d"] for _, fields in admin.xrange(prefix + "room")] == [b"a", b"b", b"c", b"d", b"e"]
        admin.set(prefix + "text", "not a stream")
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
            hub.publish_many("text", ["x"])
    finally:
        admin.close()
        hub.close()


def test_publish_many_stores_each_kind_of_event_with_its_exact_predecessor(comet_redis, prefix):
    """One script call appends the batch: each entry names the one before it
    (``p``), and every kind of event (text, JSON, a named one with a retry,
    binary with headers, a latest-value key) reads back as it was sent."""
    hub = RedisHub(comet_redis.url, prefix=prefix)
    reader = RedisHub(comet_redis.url, prefix=prefix)
    admin = redis.Redis.from_url(comet_redis.url)
    try:
        first = hub.publish("mixed", "before")
        items = ["text", {"n": 1}, Event("named", name="tick", retry=1500),
                 Event(Part(b"\x00\xff", "application/octet-stream", (("X-A", "1"),)))]
        ids = hub.publish_many("mixed", items)
        entries = admin.xrange(prefix + "mixed")
        assert [i.decode() for i, _ in entries] == [first, *ids]
        assert [f[b"p"].decode() for _, f in entries[1:]] == [first, *ids[:-1]]
        got = list(itertools.islice(reader.subscribe("mixed", last_id=first), 4))
        assert [e.id for e in got] == ids
        assert [e.data for e in got[:3]] == ["text", {"n": 1}, "named"]
        assert (got[2].name, got[2].retry) == ("tick", 1500)
        assert got[3].data == Part(b"\x00\xff", "application/octet-stream", (("X-A", "1"),))
    finally:
        admin.close()
        reader.close()
        hub.close()
