"""Reading a :class:`~comet.Hub`'s channels and what they keep: a
channel's buffered events (:meth:`~ChannelMethods.history`), its newest id
(:meth:`~ChannelMethods.last_id`), the channels there are
(:meth:`~ChannelMethods.channels`), whether a subscription would be served
from this process alone (:meth:`~ChannelMethods.is_local`); latest-value
channels (:meth:`~ChannelMethods.latest`) and retention applied now
(:meth:`~ChannelMethods.sweep`).

:class:`ChannelMethods` is written against :class:`ChannelParts`, what it
needs of the hub that inherits it (:class:`~comet.Hub` does): its store
(:mod:`comet.store`). This module does not import :mod:`comet.hub`.
"""
from __future__ import annotations

import time
from typing import Protocol, Sequence

from .cursors import BEFORE_ALL, MAX_PART, check_channel, parse_id, split_cursor
from .framing import Event
from .store import Channels, ChannelStore

__all__ = ["ChannelMethods", "ChannelParts"]


class ChannelParts(Protocol):
    """What :class:`ChannelMethods` needs of its hub."""

    @property
    def store(self) -> ChannelStore:
        """Where the hub's channels live."""
        ...


class ChannelMethods:
    """Reading a hub's channels, and what they keep; inherited by
    :class:`~comet.Hub`."""

    def is_local(self: ChannelParts, channel: str | Sequence[str], last_id: str | None) -> bool:
        """Would :meth:`subscribe` (one channel or several) at *last_id*
        answer without waiting on the network? ``comet.fastpath`` subscribes
        on cheroot's accepting thread only then. Always, for the memory hub.

        >>> from comet import Hub
        >>> Hub().is_local(["room", "dm:ann:bob"], None)
        True
        """
        if isinstance(channel, str):
            return self.store.is_local(channel, last_id)
        try:
            cursors = split_cursor(last_id, channel)
        except ValueError:
            return True  # subscribe refuses it without I/O
        # A plain id's BEFORE_ALL asks for everything held: never ahead of a mirror.
        return all(self.store.is_local(name, None if key in (None, BEFORE_ALL) else given)
                   for name, (given, key) in ((n, cursors.get(n, (None, None))) for n in channel))

    def history(self: ChannelParts, channel: str, limit: int | None = None) -> list[Event]:
        """The newest ``limit`` buffered events of *channel*, oldest first.

        Render them into a page, then subscribe with the last one's id: the
        stream resumes exactly after it, with no gap and no duplicate.
        """
        check_channel(channel)
        ch = self.store.current(channel)  # reading creates nothing (a backend's mirror: made and caught up)
        if ch is None:
            return []
        with ch.cond:
            ch.expire(time.monotonic())
            events = list(ch.events)
        return events if limit is None else events[-limit:] if limit > 0 else []

    def last_id(self: ChannelParts, channel: str) -> str:
        """Id of the newest event in *channel* (``"<epoch>-0"`` when none yet):
        a cursor for "everything after now"."""
        check_channel(channel)
        ch = self.store.current(channel)
        if ch is None:
            return f"{self.store.epoch_of(channel)}-0"
        with ch.cond:
            return ch.tail_id()

    @staticmethod
    def before(event_id: str) -> str:
        """The cursor just before *event_id* (to replay from that event on).

        >>> from comet import Hub
        >>> Hub.before("7-3"), Hub.before("7-0")
        ('7-2', '6-18446744073709551615')
        """
        epoch, seq = parse_id(event_id)
        if seq:
            return f"{epoch}-{seq - 1}"
        return f"{epoch - 1}-{MAX_PART}" if epoch else "0-0"

    def channels(self: ChannelParts) -> list[str]:
        """Names of the channels that exist: every channel published to and
        not forgotten since (:meth:`forget`, ``max_idle``), and those with an
        open subscription or watcher. (A channel nobody ever published to is
        forgotten when its last subscriber leaves, so clients asking for
        made-up channels cannot grow the hub.) With a backend such as
        :class:`~comet.backends.redis.RedisHub`: the channels this process
        mirrors (subscribed, watched, or read since), not every channel of
        the shared store."""
        return self.store.names()

    def latest(self: ChannelParts, channels: Channels) -> None:
        """Make *channels* latest-value channels: each event is the newest
        value of its key (``publish(..., key=)``, default: the event's name),
        and a subscriber is given, at each read, the newest event of every
        key changed since its previous read. One that falls behind (a slow
        client) thus catches up with the current state instead of a
        :data:`GAP`, and the parked writer pauses it rather than disconnect
        it: its memory stays bounded by the channel's number of keys.

        *channels* is a channel's name or a function of a name (channels
        made on the fly: ``lambda ch: ch.startswith("score:")``; called
        under the hub's lock, keep it quick). With :class:`RedisHub` every
        process declares the same.

        >>> from comet import Hub
        >>> hub = Hub(buffer_size=3)
        >>> hub.latest(lambda ch: ch.startswith("score:"))
        >>> sub = hub.subscribe("score:7")
        >>> for n in range(10):
        ...     _ = hub.publish("score:7", n, key="ann" if n % 2 else "bob")
        >>> [e.data for e in sub.take()]   # bob's newest, then ann's
        [8, 9]
        >>> sub.close()
        """
        if isinstance(channels, str):
            check_channel(channels)
        elif not callable(channels):
            raise TypeError(f"channels must be a channel name or a function of one, got {channels!r}")
        self.store.latest(channels)

    def sweep(self: ChannelParts) -> int:
        """Apply ``max_age`` and ``max_idle`` now (the sweeper thread calls
        this regularly); how many channels were forgotten."""
        return self.store.sweep()
