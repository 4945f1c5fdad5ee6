"""Publishing to :class:`~comet.backends.redis.RedisHub`'s streams.

Every publish runs the publish script (:mod:`comet.backends.redis_scripts`)
on the channel's stream. Publishing threads share round trips
(:class:`GroupCommit`): while one publish is on the wire, others that arrive
queue up, and the next of them sends the whole queue in one round trip: on
a single Redis (and Sentinel's master) as one call of the batch script
(:data:`~comet.backends.redis_scripts.PUBLISH_BATCH`, each publish as the
publish script runs it), on a cluster as a pipeline of publish scripts per
master (see :mod:`comet.backends.redis_cluster`), every master's at once.
Each caller still gets its own id or its own error, a thread's publishes
stay in its order, and a lone publisher pays nothing extra: a batch of one
is a plain call. ``replicas=N`` follows each batch with ``WAIT N`` on the
same connection, in the same round trip.

Nothing here retries a publish that may have run: ``XADD`` is not
idempotent. Only what provably never ran (``NOSCRIPT``, a redirection) is
sent again.

Speed: on a single Redis (and Sentinel's master) the commands are packed
here (hiredis' ``pack_command``) and written to a connection of the
client's pool in one write, and the replies read straight from it
(:func:`round_trip`): redis-py's pipeline and command machinery cost
several times the round trip itself in client CPU (issue 29: about 25 µs
more per command, 40 µs more per pipeline). The group commit, which sends
one batch at a time, keeps one such connection for itself (a pool's get
and release cost as much again). ``publish_many`` appends its events in
one script call (:data:`~comet.backends.redis_scripts.PUBLISH_MANY`, each
event as the publish script appends it), inside ``MULTI``/``EXEC``.
Connections, their settings (TLS, password, db, timeouts) and Sentinel's
master discovery stay redis-py's.
"""
from __future__ import annotations

import inspect
import os
import threading
from typing import Any, Callable, Generic, Sequence, TypeVar, cast

import redis
from redis._parsers import Encoder
from redis.cluster import RedisCluster
from redis.connection import PythonRespSerializer

from ..counters import Counters
from ..errors import BackendUnavailable
from .redis_link import RedisLink, moving
from .redis_scripts import PUBLISH, PUBLISH_BATCH, PUBLISH_CLUSTER, PUBLISH_MANY, PUBLISH_MANY_CLUSTER

__all__ = ["Publisher", "GroupCommit", "MAX_BATCH", "Publish", "pack", "round_trip", "round_trips"]

#: Most publishes one pipeline carries; the rest wait for the next one.
MAX_BATCH = 256

#: The publish script's key and arguments for one event.
Publish = tuple[str, list[str | int | bytes]]

_hiredis_pack: Callable[[Any], bytes] | None
try:
    import hiredis
    _hiredis_pack = hiredis.pack_command
except ImportError:  # (hiredis is in comet's "redis" extra; redis-py works without it)
    _hiredis_pack = None

# Text is UTF-8 whatever the client's encoding setting: the readers decode
# entries as UTF-8 (redis_store.event_of). (Encoder is untyped in redis-py.)
_python_pack: Any = PythonRespSerializer(6000, cast(Any, Encoder)("utf-8", "strict", False).encode)


def pack(args: Sequence[str | int | bytes]) -> bytes:
    """One command in Redis' protocol.

    >>> pack(["XADD", "s", "*", "n", 1])
    b'*5\\r\\n$4\\r\\nXADD\\r\\n$1\\r\\ns\\r\\n$1\\r\\n*\\r\\n$1\\r\\nn\\r\\n$1\\r\\n1\\r\\n'
    """
    if _hiredis_pack is not None:
        return _hiredis_pack(tuple(args))
    return b"".join(_python_pack.pack(*args))


# redis-py 5.3 deprecated get_connection's command name (a warning), 5.0-5.2
# require it: ask the signature once.
_NAMED_GET = inspect.signature(redis.ConnectionPool.get_connection).parameters["command_name"].default \
    is inspect.Parameter.empty


def pooled_connection(pool: Any) -> Any:
    """A connection from redis-py connection *pool*, on every redis-py comet allows."""
    return pool.get_connection("_") if _NAMED_GET else pool.get_connection()


def round_trip(client: redis.Redis, commands: list[bytes], conn: Any = None) -> list[Any]:
    """Send packed *commands* on one of *client*'s pooled connections (or
    on *conn*, one of them its caller holds), in one write; their replies in
    order, an error reply as its :class:`redis.ResponseError` in its place.
    Anything else (the connection lost, a timeout) is raised, and that
    connection dropped: it may have replies left unread (a held one
    reconnects at its next use)."""
    pool = client.connection_pool
    held = conn is not None
    if not held:
        conn = pooled_connection(pool)  # (its methods are untyped in redis-py)
    try:
        conn.send_packed_command([b"".join(commands)])
        return _replies(conn, len(commands))
    except BaseException:
        conn.disconnect()
        raise
    finally:
        if not held:
            pool.release(conn)


def _replies(conn: Any, count: int) -> list[Any]:
    """*count* replies read from *conn*, an error reply as its
    :class:`redis.ResponseError` in its place; anything else is raised."""
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(conn.read_response())
        except redis.ResponseError as exc:
            replies.append(exc)
    return replies


def round_trips(sends: list[tuple[redis.Redis, list[bytes]]]) -> list[list[Any] | Exception]:
    """:func:`round_trip` to several servers at once (a cluster's masters):
    every client's commands are written before any reply is read, so the
    servers work side by side. Replies per client, as round_trip gives them,
    or what failed that client's round trip (its connection then dropped):
    one master down fails only its own commands."""
    taken: list[tuple[Any, Any]] = []  # (pool, connection) to give back
    sent: list[Any | Exception] = []  # per client: its connection, or why not
    try:
        for client, commands in sends:
            pool = client.connection_pool
            try:
                conn = pooled_connection(pool)  # (it connects: may fail)
            except Exception as exc:
                sent.append(exc)
                continue
            taken.append((pool, conn))
            try:
                conn.send_packed_command([b"".join(commands)])
                sent.append(conn)
            except Exception as exc:
                conn.disconnect()
                sent.append(exc)
        out: list[list[Any] | Exception] = []
        for conn, (_, commands) in zip(sent, sends):
            if isinstance(conn, Exception):
                out.append(conn)
                continue
            try:
                out.append(_replies(conn, len(commands)))
            except Exception as exc:
                conn.disconnect()
                out.append(exc)
        return out
    except BaseException:
        for _, conn in taken:
            conn.disconnect()
        raise
    finally:
        for pool, conn in taken:
            pool.release(conn)


_MULTI, _EXEC = pack(["MULTI"]), pack(["EXEC"])

# Forks so far in this process's line: a connection held across a fork is
# the parent's. (Counted at fork, not asked per publish: os.getpid() is a
# system call.)
_forks = [0]
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _forks.__setitem__(0, _forks[0] + 1))


class Publisher:
    """How one hub publishes over its *link* (see the module's docstring);
    round trips go to *counters* (``round_trips``)."""

    def __init__(self, link: RedisLink, counters: Counters, *, replicas: int, replica_timeout: float,
                 batch: bool) -> None:
        self.link = link
        self.counters = counters
        self.replicas = replicas
        self.replica_timeout = replica_timeout
        self.script = link.redis.register_script(PUBLISH_CLUSTER if link.cluster else PUBLISH)
        self._head = ("EVALSHA", self.script.sha, 2)
        many = PUBLISH_MANY_CLUSTER if link.cluster else PUBLISH_MANY
        self.many_script = link.redis.register_script(many)
        self._many_head = ("EVALSHA", self.many_script.sha, 2)
        self._load, self._load_many = (pack(["SCRIPT", "LOAD", PUBLISH_CLUSTER if link.cluster else PUBLISH]),
                                       pack(["SCRIPT", "LOAD", many]))
        # (Not on a cluster: a script's declared keys must share a slot, so
        # there each publish is a call of its own, see _cluster_pipeline.)
        self.batch_script = link.redis.register_script(PUBLISH_BATCH)
        self._load_batch = pack(["SCRIPT", "LOAD", PUBLISH_BATCH])
        self._wait = pack(["WAIT", replicas, int(replica_timeout * 1000)])
        self._batches: GroupCommit[Publish, bytes] | None = GroupCommit(self._send_grouped) if batch else None
        # The group commit sends one batch at a time: on a connection of its
        # own, taken from the pool once (a pool's get and release cost as
        # much as the round trip itself). Not across a fork: the pool
        # starts afresh in a child, and so does this.
        self._lane: Any = None
        self._lane_fork = 0

    def publish(self, key: str, args: list[str | int | bytes]) -> bytes:
        """Append one event (the publish script's *args*) to stream *key*; its id."""
        if self._batches is not None:
            return self._batches.submit((key, args))
        result = self.send_batch([(key, args)])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def publish_many(self, key: str, events: list[list[str | int | bytes]]) -> list[bytes]:
        """Append events (each the publish script's args) to stream *key*,
        all or none (``MULTI``/``EXEC``), in one script call
        (:data:`~comet.backends.redis_scripts.PUBLISH_MANY`; on a cluster on
        the master of the stream's slot); their ids."""
        maxlen, approx = events[0][:2]  # (the same for every event: see script_args)
        items: list[str | int | bytes] = [*self._many_head, key, self.link.forgotten_for(key), maxlen, approx,
                                          *self.link.retained(key, [])]
        for args in events:
            items.append(len(args) - 2)
            items += args[2:]
        # Inside MULTI/EXEC still: a connection cut before EXEC reaches
        # Redis stores nothing (the script alone would run once received).
        commands = [_MULTI, pack(items), _EXEC]
        if self.replicas:  # same connection, same round trip: WAIT covers exactly these writes
            commands.append(self._wait)
        redirected = False
        while True:
            replies = round_trip(self.link.client_of(key), commands)
            self.counters.add("round_trips")
            executed = replies[len(commands) - (2 if self.replicas else 1)]
            if isinstance(executed, BaseException):
                # EXECABORT: refused when queued, nothing ran; on a cluster
                # the slot may have moved (MOVED, ASK): once more, on the
                # master the refreshed slot map names.
                refused = next((r for r in replies if isinstance(r, BaseException) and moving(r)), None)
                if refused is None or redirected or not self.link.cluster:
                    raise executed if refused is None else refused
                redirected = True
                cast(RedisCluster, self.link.redis).nodes_manager.initialize()
                continue
            ids = executed[0]
            if isinstance(ids, redis.exceptions.NoScriptError) and commands[0] is not self._load_many:
                # A restarted Redis, a failover: the script never ran, so
                # nothing is stored twice. Loaded on the same connection
                # (another may reach another server after a failover).
                commands.insert(0, self._load_many)
                continue
            if isinstance(ids, BaseException):
                raise ids
            results: list[bytes | BaseException] = list(ids)
            if self.replicas:
                self._check_replicated(replies[-1], results)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            return cast("list[bytes]", results)

    def _send_grouped(self, batch: list[Publish]) -> list[bytes | BaseException]:
        return self.send_batch(batch, lane=True)

    def send_batch(self, batch: list[Publish], lane: bool = False) -> list[bytes | BaseException]:
        """One round trip for queued publishes: their ids, or the error of each
        that failed (a wrong-type key fails its own publish, not the batch).
        *lane*: on the group commit's own connection (one send at a time)."""
        self.counters.add("round_trips")
        if self.link.cluster:
            return self._cluster_pipeline(batch)  # (it recovers from NOSCRIPT per master)
        conn = self._connection() if lane else None
        results = self._pipeline(batch, conn)
        # After a Redis restart the script is gone: those publishes never
        # ran, so sending them again after loading it stores nothing twice.
        # (Loaded on the same connection, in the same round trip: after a
        # failover another connection may reach another server.)
        again = [i for i, r in enumerate(results) if isinstance(r, redis.exceptions.NoScriptError)]
        if again:
            for i, result in zip(again, self._pipeline([batch[i] for i in again], conn, load=True)):
                results[i] = result
        return results

    def _evalsha(self, key: str, args: list[str | int | bytes]) -> bytes:
        """The publish script's call for one event, packed."""
        return pack([*self._head, key, self.link.forgotten_for(key), *self.link.retained(key, args)])

    def _connection(self) -> Any:
        """The group commit's own connection (see __init__)."""
        if self._lane is None or self._lane_fork != _forks[0]:
            self._lane = pooled_connection(self.link.redis.connection_pool)
            self._lane_fork = _forks[0]
        elif getattr(self._lane, "_sock", None) is None:
            # Reconnects, if a failure dropped it, as the pool would: through
            # connect(), which on Sentinel asks for the master now (sending on
            # a dropped connection would reconnect to the old address). Only
            # then: connect() costs a retry wrapper's calls even when connected.
            self._lane.connect()
        return self._lane

    def _pipeline(self, batch: list[Publish], conn: Any = None, load: bool = False) -> list[bytes | BaseException]:
        """*batch* in one round trip (on *conn*, else a pooled connection), a
        publish alone as the publish script, more in one call of the batch
        script (:data:`~comet.backends.redis_scripts.PUBLISH_BATCH`); after
        ``SCRIPT LOAD`` if *load*."""
        commands, load_it = [self._command(batch)], self._load if len(batch) == 1 else self._load_batch
        if load:
            commands.insert(0, load_it)
        if self.replicas:  # same connection, same round trip: WAIT covers exactly these writes
            commands.append(self._wait)
        replies = round_trip(self.link.redis, commands, conn)
        if load:
            del replies[0]  # (had it failed, so would the EVALSHA after it)
        acked = replies.pop() if self.replicas else None
        results = self._results(batch, replies[0])
        if self.replicas:
            self._check_replicated(acked, results)
        return results

    def _command(self, batch: list[Publish]) -> bytes:
        """One publish as the publish script, more as one call of the batch
        script (:data:`~comet.backends.redis_scripts.PUBLISH_BATCH`)."""
        if len(batch) == 1:
            return self._evalsha(*batch[0])
        keys: list[str | int | bytes] = []
        argv: list[str | int | bytes] = []
        for key, args in batch:
            keys += (key, self.link.forgotten_for(key))
            full = self.link.retained(key, args)
            argv.append(len(full))
            argv += full
        return pack(["EVALSHA", self.batch_script.sha, len(keys), *keys, *argv])

    @staticmethod
    def _results(batch: list[Publish], reply: Any) -> list[bytes | BaseException]:
        """Each publish's result from the reply to :meth:`_command`. A refusal
        of the whole call (NOSCRIPT, READONLY after a failover) is every
        publish's: none of them ran."""
        if isinstance(reply, BaseException):
            return [reply] * len(batch)
        if len(batch) == 1:
            return [reply]
        return list(reply)

    def _check_replicated(self, acked: Any, results: list[bytes | BaseException]) -> None:
        """Turn the ids of writes fewer than ``replicas`` replicas acknowledged
        into errors: not lost, maybe, but not safe either."""
        if isinstance(acked, int) and acked >= self.replicas:
            return
        error = BackendUnavailable(f"{acked} of {self.replicas} replica(s) acknowledged within "
                                   f"{self.replica_timeout:g} s: the event is not acknowledged")
        for i, result in enumerate(results):
            if not isinstance(result, BaseException):
                results[i] = error

    def _cluster_pipeline(self, batch: list[Publish]) -> list[bytes | BaseException]:
        """:meth:`_pipeline` on a cluster: a pipeline per master, all masters
        at once (:func:`round_trips`); publishes redirected (MOVED, ASK: they
        never ran) once more one by one through the cluster client, which
        follows redirections."""
        results: list[bytes | BaseException] = [RuntimeError("not sent")] * len(batch)
        by_master: dict[int, tuple[redis.Redis, list[int]]] = {}
        for i, (key, _) in enumerate(batch):
            client = self.link.master(key)
            by_master.setdefault(id(client), (client, []))[1].append(i)
        groups = list(by_master.values())
        sends = [(client, [self._evalsha(*batch[i]) for i in indexes]) for client, indexes in groups]
        for (client, indexes), (_, commands), replies in zip(groups, sends, round_trips(sends)):
            if isinstance(replies, Exception):  # that master unreachable: its publishes fail, not the others'
                for i in indexes:
                    results[i] = replies
                continue
            # A failover's new master may lack the script (NOSCRIPT: those
            # never ran): loaded, and they go again, in one round trip.
            missing = [j for j, reply in enumerate(replies) if isinstance(reply, redis.exceptions.NoScriptError)]
            if missing:
                again = round_trip(client, [self._load, *(commands[j] for j in missing)])[1:]
                for j, reply in zip(missing, again):
                    replies[j] = reply
            for i, reply in zip(indexes, replies):
                results[i] = reply
        for i, result in enumerate(results):
            if isinstance(result, redis.ResponseError) and moving(result):
                key, args = batch[i]
                try:
                    results[i] = self.link.script(self.script, [key, self.link.forgotten_for(key)], self.link.retained(key, args))
                except redis.ResponseError as exc:
                    results[i] = exc
        return results


_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


class _Pending(Generic[_Item, _Result]):
    __slots__ = ("item", "wake", "done", "result")

    def __init__(self, item: _Item) -> None:
        self.item = item
        # Only a caller that waits needs one: a lock it holds, released once
        # to wake it. (A bare lock: threading.Event's Condition costs
        # several times as much per hand-off.)
        self.wake: threading.Lock | None = None
        self.done = False
        self.result: _Result | BaseException | None = None  # set when done


class GroupCommit(Generic[_Item, _Result]):
    """Callers of :meth:`submit` share calls of ``send(items) -> results``:
    one caller sends, those arriving meanwhile queue, and when the send
    returns the first of them sends the whole queue. Every caller gets its
    own result (an exception in it is raised to that caller alone)."""

    def __init__(self, send: Callable[[list[_Item]], list[_Result | BaseException]], max_batch: int = MAX_BATCH) -> None:
        self._send = send
        self._max = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Pending[_Item, _Result]] = []
        self._busy = False  # a caller is sending; invariant: queue non-empty => busy

    def submit(self, item: _Item) -> _Result:
        mine: _Pending[_Item, _Result] = _Pending(item)
        with self._lock:
            lead, self._busy = not self._busy, True
            if not lead:
                mine.wake = threading.Lock()
                mine.wake.acquire()
            self._queue.append(mine)
        if mine.wake is not None:  # not the lead
            mine.wake.acquire()  # released when done by a sender, or chosen to send next
        if not mine.done:
            self._lead()
        if isinstance(mine.result, BaseException):
            raise mine.result
        return cast(_Result, mine.result)  # done: what send() returned for it

    def _lead(self) -> None:
        with self._lock:
            batch, self._queue = self._queue[:self._max], self._queue[self._max:]
        results: list[_Result | BaseException]
        try:
            results = self._send([p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for {len(batch)} publishes")
        except BaseException as exc:  # the waiters must never hang on a failed send
            results = [exc] * len(batch)
        for pending, result in zip(batch, results):
            pending.result, pending.done = result, True
            if pending.wake is not None:
                pending.wake.release()
        with self._lock:
            if self._queue:
                wake = self._queue[0].wake
                assert wake is not None  # queued while another sent, so it waits
                wake.release()  # not done: it sends next
            else:
                self._busy = False
