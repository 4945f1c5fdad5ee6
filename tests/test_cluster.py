"""RedisHub on Redis Cluster, for real on loopback: three masters (and a
replica each for the failover), created with ``redis-cli --cluster create``.

Mid-stream, the channel's slot is resharded to another master (MIGRATE,
with publishes while the slot is half moved), or its master hands over to
its replica (``CLUSTER FAILOVER``). Counted: events acknowledged (publish
returned an id), delivered (on a parked SSE stream served by CherryPy),
duplicates, gaps, and acknowledged but lost, which must be 0."""
from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
import time

import cherrypy
import pytest

from comet import BackendUnavailable, comet
from comet.backends import hub_from_url, redis_client
from comet.backends.redis import RedisHub
from comet.backends.redis_cluster import slot_tag
from comet.hub import Idle
from comet.processes import RedisClusterNodes
from comet.testing import wait_until

from conftest import RawStream, no_cursor


@pytest.fixture
def cluster():
    with RedisClusterNodes() as nodes:
        yield nodes


@pytest.fixture
def cluster_with_replicas():
    with RedisClusterNodes(replicas=1) as nodes:
        yield nodes


def _reader_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("comet-redis-reader")]


def _next_event(sub, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    for item in sub:
        if not isinstance(item, Idle):
            return item
        if time.monotonic() > deadline:
            raise TimeoutError("no event")
    raise AssertionError("the subscription ended")


def _one_channel_per_master(cluster: RedisClusterNodes) -> list[str]:
    """Channel names whose streams land on three different masters."""
    names: dict[int, str] = {}
    n = 0
    while len(names) < 3:
        name = f"room{n}"
        names.setdefault(cluster.owner(cluster.slot_of("comet:" + name)).port, name)
        n += 1
    return list(names.values())


def test_cluster_urls_are_parsed_and_checked(cluster):
    hub = hub_from_url(cluster.url, idle=0.2)
    try:
        assert isinstance(hub, RedisHub) and "the cluster 127.0.0.1:" in repr(hub)
        for name in _one_channel_per_master(cluster):
            event_id = hub.publish(name, "hello")
            assert hub.history(name)[-1].id == event_id
        with redis_client(cluster.url, socket_timeout=5) as client:  # an app's own keys, routed by slot
            assert client.xlen("comet:room0") == 1
    finally:
        hub.close()
    for bad in ("redis+cluster://127.0.0.1", "redis+cluster://127.0.0.1:1/3", "redis+cluster://h:x"):
        with pytest.raises(ValueError):
            RedisHub(bad)
    with pytest.raises(ValueError, match="expected host:port"):  # a port with no host
        RedisHub("redis+cluster://127.0.0.1:7000,:7001")
    with pytest.raises(ValueError, match="replicas"):
        RedisHub(cluster.url, replicas=1)
    assert cluster.slot_of("{" + slot_tag(1234) + "}") == 1234


def test_channels_on_every_master_reach_another_process_exactly(cluster):
    writer = RedisHub(cluster.url, idle=0.2, block=1.0)
    reader = RedisHub(cluster.url, idle=0.2, block=1.0)
    try:
        names = _one_channel_per_master(cluster)
        subs = {name: reader.subscribe(name) for name in names}
        assert len({n for n in reader.store.follower.owner.values()}) == 3  # a reader per master
        sent = {name: [writer.publish(name, f"{name}-{i}") for i in range(5)] for name in names}
        for name, sub in subs.items():
            assert [_next_event(sub).id for _ in range(5)] == sent[name]
        # Resuming elsewhere from an id is exact, on every master.
        for name in names:
            again = reader.subscribe(name, last_id=sent[name][1])
            assert [_next_event(again).data for _ in range(3)] == [f"{name}-{i}" for i in (2, 3, 4)]
            again.close()
        # A forget in one process ends the others' subscriptions there.
        assert writer.forget(names[0])
        deadline = time.monotonic() + 10
        for _ in subs[names[0]]:  # idle ticks until it ends
            assert time.monotonic() < deadline, "the forget never reached the other process"
        for sub in subs.values():
            sub.close()
    finally:
        writer.close()
        reader.close()
    assert _reader_threads() == []


def test_concurrent_and_batched_publishes_on_every_master(cluster):
    """Group commit (a pipeline per master) and publish_many (MULTI/EXEC on
    the slot's master): every id once, in each channel's order."""
    writer = RedisHub(cluster.url, idle=0.2, block=1.0)
    reader = RedisHub(cluster.url, idle=0.2, block=1.0)
    try:
        names = _one_channel_per_master(cluster)
        subs = {name: reader.subscribe(name) for name in names}
        sent: dict[str, list[str]] = {name: [] for name in names}
        lock = threading.Lock()

        def publish(t: int) -> None:
            for i in range(20):
                name = names[(t + i) % 3]
                event_id = writer.publish(name, f"{t}-{i}")
                with lock:
                    sent[name].append(event_id)

        threads = [threading.Thread(target=publish, args=(t,)) for t in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        for name in names:
            sent[name] += writer.publish_many(name, ["a", "b", "c"])
        for name, sub in subs.items():
            got = [_next_event(sub).id for _ in range(len(sent[name]))]
            assert sorted(got) == sorted(sent[name]) and len(set(got)) == len(got)
            assert got == sorted(got, key=lambda i: tuple(map(int, i.split("-"))))  # Redis' order
            sub.close()
    finally:
        writer.close()
        reader.close()


def _stream_through(comet_cherrypy, cluster, hub, change) -> dict:
    """Publish every 20 ms to one channel while a parked SSE stream reads
    it; *change* (the channel's stream key) runs once 20 events are
    acknowledged. The counts."""

    class Root:
        @cherrypy.expose
        @comet(transport="sse", heartbeat=0.5)
        def events(self, last_event_id=None):
            return hub.subscribe("room", last_id=last_event_id)

    server = comet_cherrypy(Root(), thread_pool=4)
    hub.publish("room", "warm-up")  # the stream exists; the SSE stream starts after it
    acked: list[tuple[str, str]] = []
    refused: list[str] = []
    stop = threading.Event()

    def publish() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                acked.append((str(n), hub.publish("room", str(n))))
            except BackendUnavailable:
                refused.append(str(n))
            stop.wait(0.02)

    got: list[tuple[str | None, str]] = []
    with RawStream(server.url + "/events", timeout=10) as raw:
        assert no_cursor(raw.chunk()) == b":ok\n\nevent: comet.heartbeat\ndata: 0.5\n\n"

        def read() -> None:
            while True:
                try:
                    chunk = raw.chunk()
                except (TimeoutError, EOFError, OSError):
                    return
                for block in chunk.decode().split("\n\n"):
                    data = re.search(r"^data: (.*)$", block, re.M)
                    if data:
                        name = re.search(r"^event: (.*)$", block, re.M)
                        if name and name[1] == "comet.heartbeat":
                            continue  # a heartbeat, not an event
                        ident = re.search(r"^id: (.*)$", block, re.M)
                        got.append((ident[1] if ident else None, data[1] if not name else f"{name[1]}:{data[1]}"))

        reader = threading.Thread(target=read, daemon=True)
        publisher = threading.Thread(target=publish, daemon=True)
        reader.start()
        publisher.start()
        try:
            wait_until(lambda: len(acked) >= 20, timeout=20, what="20 publishes before the change")
            started = time.monotonic()
            change("comet:room")
            changed_s = time.monotonic() - started
            count = len(acked)
            wait_until(lambda: len(acked) >= count + 20, timeout=30, what="20 publishes after the change")
        finally:
            stop.set()
            publisher.join(10)
        wait_until(lambda: {i for _, i in acked} <= {i for i, _ in got}, timeout=20,
                   what=f"every acknowledged event delivered ({len(got)} events so far, {len(acked)} acknowledged)")
        raw.close()
        reader.join(5)
    delivered = [i for i, _ in got if i is not None]
    acked_ids = [i for _, i in acked]
    return {"change_s": changed_s, "acknowledged": len(acked), "refused": len(refused), "delivered": len(delivered),
            "duplicates": len(delivered) - len(set(delivered)), "gaps": [d for _, d in got if d.startswith("comet.gap:")],
            "lost": [i for i in acked_ids if i not in set(delivered)],
            "in_order": [i for i in delivered if i in set(acked_ids)] == acked_ids}


def test_a_resharding_mid_stream_loses_nothing(comet_cherrypy, cluster, caplog):
    """... and is an expected event, not a failure: the readers follow the
    slot with no error in the log (MOVED, ASK and TRYAGAIN on a reader's
    plain connection are recognised as a move)."""
    caplog.set_level(logging.INFO, logger="comet")
    hub = RedisHub(cluster.url, idle=0.2, block=1.0, backoff=(0.05, 0.5))

    def reshard(key: str) -> None:
        slot = cluster.slot_of(key)
        source = cluster.owner(slot)
        target = next(m for m in cluster.masters if m is not source)
        # Publishes keep coming while the slot is half moved (ASK, TRYAGAIN).
        cluster.move_slot(slot, target, batch=1, between=lambda: time.sleep(0.3))
        assert cluster.owner(slot) is target

    try:
        counts = _stream_through(comet_cherrypy, cluster, hub, reshard)
        regroups = hub.store.follower.regroups
    finally:
        hub.close()
    print(f"\nresharding in {counts['change_s']:.2f} s: acknowledged {counts['acknowledged']}, refused {counts['refused']}, "
          f"delivered {counts['delivered']}, duplicates {counts['duplicates']}, gaps {len(counts['gaps'])}, "
          f"acknowledged but lost {len(counts['lost'])}, reader regroups {regroups}")
    assert counts["lost"] == [] and counts["duplicates"] == 0 and counts["gaps"] == [] and counts["in_order"]
    assert regroups >= 1  # the reader noticed the move
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and r.name == "comet"] == []
    assert _reader_threads() == []


def test_a_master_failover_mid_stream_loses_nothing(comet_cherrypy, cluster_with_replicas):
    cluster = cluster_with_replicas
    hub = RedisHub(cluster.url, idle=0.2, block=1.0, backoff=(0.05, 0.5))

    def failover(key: str) -> None:
        old = cluster.owner(cluster.slot_of(key))
        new = cluster.failover(old)
        wait_until(lambda: cluster.owner(cluster.slot_of(key)) is new, timeout=30, what="the replica serving the slot")

    try:
        counts = _stream_through(comet_cherrypy, cluster, hub, failover)
        regroups = hub.store.follower.regroups
    finally:
        hub.close()
    print(f"\nfailover in {counts['change_s']:.2f} s: acknowledged {counts['acknowledged']}, refused {counts['refused']}, "
          f"delivered {counts['delivered']}, duplicates {counts['duplicates']}, gaps {len(counts['gaps'])}, "
          f"acknowledged but lost {len(counts['lost'])}, reader regroups {regroups}")
    assert counts["lost"] == [] and counts["duplicates"] == 0 and counts["gaps"] == [] and counts["in_order"]
    assert regroups >= 1
    assert _reader_threads() == []


def _flush_scripts(cluster: RedisClusterNodes) -> None:
    """Every master forgets its scripts, as a replica promoted by a failover
    never had them (Redis does not replicate its script cache)."""
    for node in cluster.masters:
        with cluster._client(node) as r:
            r.script_flush()


def test_every_script_recovers_on_masters_that_lost_it(cluster):
    hub = RedisHub(cluster.url, idle=0.2, block=1.0)
    other = RedisHub(cluster.url, idle=0.2, block=1.0)
    try:
        names = _one_channel_per_master(cluster)
        for name in names:
            hub.publish(name, "before")
        sub = other.subscribe(names[0], member="ann")  # presence scripts loaded too
        wait_until(lambda: hub.members(names[0]) == {"ann": 1}, what="ann")
        _flush_scripts(cluster)
        # one publish (EVALSHA through the cluster client), then one batch
        # spread over every master (a pipeline per master), then MULTI/EXEC
        ids = [hub.publish(names[0], "single")]
        batch = [(hub.store._key(name), hub.store._fields(hub._prepare(name, f"batch-{name}", None, None, None))) for name in names]
        results = hub.store.publisher.send_batch(batch)
        assert all(isinstance(r, bytes) for r in results), results
        ids += [r.decode() for r in results]
        ids += hub.publish_many(names[1], ["many-1", "many-2"])
        assert len(ids) == 6
        assert [e.data for e in other.history(names[0]) if e.name is None] == ["before", "single", f"batch-{names[0]}"]
        assert [e.data for e in other.history(names[1])] == ["before", f"batch-{names[1]}", "many-1", "many-2"]
        _flush_scripts(cluster)
        assert other.subscribe("newroom").take() is not None  # the load script, on a new channel
        sub.close()  # presence pushes again (its pipeline on the channel's master)
        wait_until(lambda: hub.members(names[0]) == {}, what="ann left")
        # forget's script: the stream's slot, the channel's presence with it
        assert hub.forget(names[2])
        assert hub.history(names[2]) == []
    finally:
        hub.close()
        other.close()
    assert _reader_threads() == []


_VICTIM = """
import sys, time
from comet.backends.redis import RedisHub
hub = RedisHub(sys.argv[1], presence_lease=1.0, presence_grace=0.3, idle=0.2, block=1.0)
sub = hub.subscribe("room", member="zed")
while hub.members("room").get("zed") != 1:
    time.sleep(0.02)
print("ready", flush=True)
time.sleep(60)
"""


def test_presence_across_processes_on_a_cluster(cluster):
    from comet.presence import JOIN, LEAVE

    a = RedisHub(cluster.url, idle=0.2, block=1.0, presence_grace=0.3, presence_lease=1.0)
    b = RedisHub(cluster.url, idle=0.2, block=1.0, presence_grace=0.3, presence_lease=1.0)
    victim = None
    try:
        # A channel's presence lives on its stream's slot (one script moves a
        # count and appends its join or leave); the hub's shared keys on one.
        from comet.backends.redis_presence import presence_keys

        stream = a.store._key("room")
        keys = [stream, a.store._forgotten_for(stream), *presence_keys(a.prefix, True, stream, "room")]
        assert {cluster.slot_of(key.encode()) for key in keys} == {cluster.slot_of(stream.encode())}
        base = b.presence._base.encode()
        assert cluster.slot_of(base + b"leases") == cluster.slot_of(base + b"leaving") == cluster.slot_of(base + b"p:x")
        seen = b.subscribe("room")

        def changes() -> list[tuple[str, str]]:
            changes.got += [(e.name, e.data) for e in seen.take() if e and e.name in (JOIN, LEAVE)]
            return changes.got
        changes.got = []
        ann, bob = a.subscribe("room", member="ann"), b.subscribe("room", member="bob")
        for hub in (a, b):
            wait_until(lambda: hub.members("room") == {"ann": 1, "bob": 1}, what="both members, seen from each")
        wait_until(lambda: sorted(changes()) == [(JOIN, "ann"), (JOIN, "bob")], what="both joins")
        # a disconnect in one process ends the member's streams in the other
        assert b.disconnect(member="ann") == 0
        wait_until(lambda: ann.take() is not None and ann.ended, what="ann's stream in the other process ended")
        ann.close()  # (the handler's finally, as on a single Redis)
        wait_until(lambda: (LEAVE, "ann") in changes() and a.members("room") == {"bob": 1}, what="ann left")
        # a process killed with SIGKILL stops counting within its lease
        victim = subprocess.Popen([sys.executable, "-c", _VICTIM, cluster.url], stdout=subprocess.PIPE, text=True)
        assert victim.stdout is not None and victim.stdout.readline().strip() == "ready"
        wait_until(lambda: (JOIN, "zed") in changes(), what="zed's join")
        victim.kill()
        victim.wait(10)
        wait_until(lambda: (LEAVE, "zed") in changes(), timeout=10, what="zed's leave after its lease")
        assert a.members("room") == {"bob": 1}
        assert sorted(changes()) == sorted([(JOIN, "ann"), (JOIN, "bob"), (LEAVE, "ann"), (JOIN, "zed"),
                                            (LEAVE, "zed")])  # each once
        # forgetting the channel forgets its members (in the stream's script)
        assert a.forget("room")
        wait_until(lambda: b.members("room") == {}, what="no members")
        assert not any(a.redis.exists(key) for key in keys[2:])  # members, counts, deadlines: gone
        bob.close()
        seen.close()
    finally:
        if victim is not None:
            victim.kill()
            victim.wait(10)
            victim.stdout.close()
        a.close()
        b.close()
    assert _reader_threads() == []


class RecordingSink:
    """The hub's side of ``comet.backends.redis_cluster.Sink``, recorded: a
    test drives a real ClusterFollower with cursors it chooses."""

    def __init__(self) -> None:
        self.cursors: dict[bytes, str] = {}
        self.got: list[tuple[bytes, bytes]] = []
        self.connects = 0

    def cursor(self, key):
        return self.cursors.get(key)

    def deliver(self, key, entries):
        for entry_id, _ in entries:
            self.got.append((key, entry_id))
            self.cursors[key] = entry_id.decode()

    def reader_changed(self, connected):
        self.connects += connected


def _follower(cluster, sink, block):
    from comet.backends.redis_cluster import ClusterFollower
    from comet.backends.redis_link import RedisLink

    link = RedisLink(cluster.url, {"socket_timeout": 5.0, "socket_connect_timeout": 2.0}, prefix="comet:", block=block,
                     maxlen=100, approximate=True, max_age=None, max_idle=None)
    return link, ClusterFollower(sink, link, block=block, backoff=(0.05, 0.5))


def test_a_reader_whose_keys_have_no_cursor_yet_keeps_following(cluster, caplog):
    """A master's reader can hold a key the hub has no cursor for (the hub
    dropped the channel a moment before the reader heard of it): its sweeps
    then read nothing there, and it goes on following, with no restart
    (before: a reader that crashed and reconnected on every sweep, logging
    a traceback each time, and delivering late)."""
    lonely, other, _ = (f"comet:{name}".encode() for name in _one_channel_per_master(cluster))
    sink = RecordingSink()
    sink.cursors[other] = "0-0"
    link, follower = _follower(cluster, sink, block=0.1)
    try:
        with caplog.at_level(logging.INFO, logger="comet"):
            follower.follow(lonely)  # no cursor: its master's reader has nothing to read
            follower.follow(other)
            wait_until(lambda: sink.connects == 2, 10, what="both readers connected")
            sent = link.redis.xadd(other, {"d": "x"})
            wait_until(lambda: (other, sent) in sink.got, 10, what="the other key's entry")
            time.sleep(1.0)  # ten sweeps of the lonely reader (block 0.1 s)
            assert sink.connects == 2, "a reader reconnected"
            beside = b"{" + lonely + b"}beside"  # (the hash tag puts it in the lonely key's slot)
            sink.cursors[beside] = "0-0"
            follower.follow(beside)  # a new channel on that master, while it holds the cursor-less key
            sent = link.redis.xadd(beside, {"d": "z"})
            wait_until(lambda: (beside, sent) in sink.got, 10, what="the new key's entry")
            sink.cursors[lonely] = "0-0"  # the hub follows it after all: read from now on
            sent = link.redis.xadd(lonely, {"d": "y"})
            wait_until(lambda: (lonely, sent) in sink.got, 10, what="the lonely key's entry")
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
        assert sink.connects == 2
    finally:
        follower.close()
        link.close()
    assert _reader_threads() == []


def test_channels_followed_in_a_burst_are_all_read_at_once(cluster):
    """A burst of new channels on one master (a page subscribing to many, a
    room filling up) is followed at once, not after the reader's next sweep
    (``block``, 30 s here): a change of its keys that arrives while it
    subscribes to the previous ones is not missed."""
    first = f"comet:{_one_channel_per_master(cluster)[0]}".encode()
    sink = RecordingSink()
    link, follower = _follower(cluster, sink, block=30.0)
    try:
        sink.cursors[first] = "0-0"
        sent = link.redis.xadd(first, {"d": "x"})
        follower.follow(first)
        wait_until(lambda: (first, sent) in sink.got, 10, what="the reader up")
        keys = [b"{" + first + b"}%d" % i for i in range(200)]  # (all in the first key's slot)
        expected = set()
        for key in keys:
            sink.cursors[key] = "0-0"
            expected.add((key, link.redis.xadd(key, {"d": "y"})))
        started = time.monotonic()
        for key in keys:
            follower.follow(key)
        wait_until(lambda: expected <= set(sink.got), 15, 0.05, what="every key of the burst read")
        assert sink.connects == 1
        assert time.monotonic() - started < 15  # far under the 30 s sweep
    finally:
        follower.close()
        link.close()
    assert _reader_threads() == []


def test_a_leave_lands_after_its_slot_moved(cluster):
    """ann's page closes; during her grace period her channel's slot moves
    to another master (a resharding), with no stream of this process on it
    any more to notice: her leave still lands, on the new master, instead
    of her staying online for good. (The push that meets MOVED reloads the
    slot map and goes again.)"""
    from comet.presence import LEAVE

    a = RedisHub(cluster.url, idle=0.2, block=1.0, presence_grace=2.0, presence_lease=6.0)
    b = RedisHub(cluster.url, idle=0.2, block=1.0)
    try:
        seen = b.subscribe("room")
        ann = a.subscribe("room", member="ann")
        wait_until(lambda: b.members("room") == {"ann": 1}, what="ann online")
        ann.close()  # a's last stream on the channel: a follows it no more; the grace period runs
        slot = cluster.slot_of(b"comet:room")
        target = next(m for m in cluster.masters if m is not cluster.owner(slot))
        cluster.move_slot(slot, target)
        assert cluster.owner(slot) is target
        wait_until(lambda: b.members("room") == {}, timeout=15, what="ann's leave on the slot's new master")
        wait_until(lambda: any(e and e.name == LEAVE and e.data == "ann" for e in seen.take()), timeout=10,
                   what="her comet.leave")
        seen.close()
    finally:
        a.close()
        b.close()
    assert _reader_threads() == []


def test_a_process_that_only_follows_keeps_up_with_a_resharding(cluster):
    """The resharding seen from a process that publishes nothing (its
    cluster client never meets MOVED on a command of its own, so only the
    readers' regroup reloads its slot map): its subscribers get every event
    published after the slot moved, from the new master."""
    writer = RedisHub(cluster.url, idle=0.2, block=1.0)
    # A 30 s sweep: the move must be noticed from Redis's SUNSUBSCRIBE, at once.
    follower = RedisHub(cluster.url, idle=0.2, block=30.0, backoff=(0.05, 0.5))
    try:
        sub = follower.subscribe("room")
        sent = [writer.publish("room", "before")]
        assert _next_event(sub).id == sent[0]
        slot = cluster.slot_of(b"comet:room")
        target = next(m for m in cluster.masters if m is not cluster.owner(slot))
        cluster.move_slot(slot, target)
        sent += [writer.publish("room", f"after {i}") for i in range(3)]
        assert [_next_event(sub, timeout=10).id for _ in range(3)] == sent[1:]
        sub.close()
    finally:
        writer.close()
        follower.close()
    assert _reader_threads() == []


def test_a_master_restart_counts_one_reconnect_and_closing_logs_nothing(cluster, caplog):
    """``hub.connects`` counts the readers' connections, not their failed
    attempts: a master that restarts makes it go up by one. And a hub
    closed with its readers connected says nothing."""
    caplog.set_level(logging.INFO, logger="comet")
    hub = RedisHub(cluster.url, idle=0.2, block=1.0, backoff=(0.05, 0.2))
    try:
        subs = [hub.subscribe(name) for name in _one_channel_per_master(cluster)]
        wait_until(lambda: hub.connected and hub.connects == 3, what="a reader per master, connected")
        master = cluster.owner(cluster.slot_of(b"comet:" + _one_channel_per_master(cluster)[0].encode()))
        master.stop()
        wait_until(lambda: not hub.connected, what="the lost master noticed")
        time.sleep(0.5)  # several failed attempts at 0.05-0.2 s
        master.start()
        wait_until(lambda: hub.connected, timeout=30, what="reconnected")
        assert hub.connects == 4
        for sub in subs:
            sub.close()
    finally:
        caplog.clear()
        hub.close()
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert _reader_threads() == []
