"""The pieces of a subscription to several channels (``hub.subscribe([...])``).

A :class:`~comet.hub.MultiSubscription` waits on a :class:`Mux`, a channel
that holds no events and moves whenever one of the followed channels does,
so threads, the parked writer and cooperative steps wait on it exactly as
on one channel. Each followed channel wakes its muxes through one
:class:`MuxFanout` (its one watcher for all of them, O(1) to join and
leave), and the subscription keeps one :class:`Slot` per channel: that
channel's cursor and its piece of the subscription's cursor. The
subscription itself lives beside :class:`~comet.hub.Subscription`, which it
extends, in :mod:`comet.hub`.
"""
from __future__ import annotations

from .channel import Channel
from .framing import Event

__all__ = ["Mux", "MuxFanout", "Slot"]


class Mux(Channel):
    """What a subscription to several channels waits on: a channel holding
    no events, whose ``seq`` moves (and whose watchers are called) whenever
    one of the followed channels does. So threads, the parked writer and
    cooperative steps wait on it exactly as on one channel."""

    __slots__ = ()

    def __init__(self) -> None:
        super().__init__(1, "0-0")

    def bump(self) -> None:
        """One of the followed channels moved: wake whoever waits on the mux."""
        with self.cond:
            self.seq += 1
            self.notify_all()
            watchers = self.watchers
        for wake in watchers:
            wake()


class MuxFanout:
    """A channel's one watcher for every subscription to several channels
    that follows it: joining and leaving are O(1), where a watcher each
    would make a channel's watcher tuple O(n) to leave (10,000 streams
    closing at shutdown: 10,000²)."""

    __slots__ = ("muxes",)

    def __init__(self) -> None:
        self.muxes: dict[Mux, None] = {}  # an insertion-ordered set

    def __call__(self) -> None:
        """The channel moved: bump every mux following it."""
        for mux in tuple(self.muxes):
            mux.bump()

    @classmethod
    def join(cls, fanouts: dict[Channel, MuxFanout], ch: Channel, mux: Mux) -> None:
        """*mux* follows *ch*: through *ch*'s one fan-out in *fanouts* (the
        hub's), made and added to *ch*'s watchers for its first mux."""
        with ch.cond:  # (a channel's watchers change under its lock)
            fan = fanouts.get(ch)
            if fan is None:
                fan = fanouts[ch] = cls()
                ch.watchers = ch.watchers + (fan,)
            fan.muxes[mux] = None

    @classmethod
    def leave(cls, fanouts: dict[Channel, MuxFanout], ch: Channel, mux: Mux) -> None:
        """*mux* no longer follows *ch*; *ch*'s fan-out goes with its last mux."""
        with ch.cond:
            fan = fanouts.get(ch)
            if fan is None:
                return
            fan.muxes.pop(mux, None)
            if not fan.muxes:
                del fanouts[ch]
                ch.watchers = tuple(w for w in ch.watchers if w is not fan)


class Slot:
    """One channel of a :class:`MultiSubscription`: its cursor (``cursor``
    seq, ``last`` id, what the subscription's id says), a gap not sent yet."""

    __slots__ = ("name", "key", "ch", "cursor", "last", "piece", "gap")

    def __init__(self, name: str, key: str, ch: Channel, cursor: int, last: str, gap: Event | None) -> None:
        self.name, self.key, self.ch, self.cursor, self.gap = name, key, ch, cursor, gap  # key: cursor_name(name)
        self.at(last)

    def at(self, last: str) -> None:
        """The channel's part of the subscription's cursor is now *last*."""
        self.last, self.piece = last, f"{self.key}.{last}"
