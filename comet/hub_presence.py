"""The presence part of :class:`~comet.Hub`'s API: who is on a channel
(:meth:`~PresenceMethods.members`), ending a member's streams
(:meth:`~PresenceMethods.disconnect`), hearing of joins and leaves
(:meth:`~PresenceMethods.on_presence`), and the two calls
:mod:`comet.presence` makes of its hub (:class:`comet.presence.Host`):
:meth:`~PresenceMethods.has_channel` and :meth:`~PresenceMethods.announce`.

:class:`PresenceMethods` is written against :class:`PresenceParts`, what
it needs of the hub that inherits it (:class:`~comet.Hub` does); it knows
nothing else of it, so this module does not import :mod:`comet.hub`.
"""
from __future__ import annotations

from typing import Callable, Protocol

from .counters import Counters
from .cursors import check_channel, check_member
from .framing import Event
from .presence import Presence
from .store import ChannelStore

__all__ = ["PresenceMethods", "PresenceParts"]


class PresenceParts(Protocol):
    """What :class:`PresenceMethods` needs of its hub."""

    @property
    def store(self) -> ChannelStore:
        """Where the hub's channels live."""
        ...

    @property
    def presence(self) -> Presence:
        """The hub's presence registry."""
        ...

    @property
    def counters(self) -> Counters:
        """The hub's counters (``published`` among them)."""
        ...

    @property
    def closed(self) -> bool:
        """True once the hub was closed."""
        ...


class PresenceMethods:
    """Presence on a hub's channels (:mod:`comet.presence`); inherited by
    :class:`~comet.Hub`."""

    def has_channel(self: PresenceParts, channel: str) -> bool:
        """Whether this process holds *channel* now, not forgotten (what
        presence asks before it counts a stream: :class:`comet.presence.Host`).

        >>> from comet import Hub
        >>> hub = Hub()
        >>> hub.has_channel("room"), hub.publish("room", "hi") != "", hub.has_channel("room")
        (False, True, True)
        """
        ch = self.store.get(channel)
        return ch is not None and not ch.dead

    def announce(self: PresenceParts, channel: str, name: str, data: str, *,
                 create: bool) -> tuple[Callable[[], None], ...] | None:
        """Append event *name* with *data* to *channel* in this process, as
        :meth:`publish` does, but wake nobody: presence appends a join or a
        leave under its own lock and wakes the watchers returned after it.
        Only to a channel held here, unless *create*. None if nothing was
        appended (not held, forgotten meanwhile, or the hub is closed).

        >>> from comet import Hub
        >>> hub = Hub()
        >>> hub.announce("room", "comet.join", "ann", create=False) is None
        True
        >>> hub.announce("room", "comet.join", "ann", create=True)
        ()
        >>> [(e.name, e.data) for e in hub.history("room")]
        [('comet.join', 'ann')]
        """
        if self.closed:
            return None
        while True:
            ch = self.store.channel(channel) if create else self.store.get(channel)
            if ch is None:
                return None
            with ch.cond:
                if ch.dead:
                    if not create:
                        return None  # forgotten meanwhile: the join goes with it
                    continue
                ch.append(Event(data, id=f"{ch.epoch}-{ch.seq + 1}", name=name, channel=channel))
                ch.notify_all()
                watchers = ch.watchers
            break
        self.counters.add("published")
        return watchers

    def members(self: PresenceParts, channel: str) -> dict[str, int]:
        """Who is on *channel*: member -> open streams, for every member who
        joined (``subscribe(..., member=...)``) and has not left. A member
        whose last stream closed counts ``0`` for ``presence_grace`` seconds,
        then leaves (a :data:`~comet.presence.LEAVE` event), unless a stream
        of theirs opens again meanwhile.

        >>> from comet import Hub
        >>> hub = Hub()
        >>> sub = hub.subscribe("room", member="ann")
        >>> hub.members("room")
        {'ann': 1}
        >>> sub.close()
        """
        check_channel(channel)
        return self.presence.members(channel)

    def disconnect(self: PresenceParts, *, member: str) -> int:
        """End *member*'s open streams, on every channel (with a backend: on
        every process). Each ends as at shutdown: its response finishes
        cleanly and the handler's ``finally`` runs. How many were open here.

        >>> from comet import Hub
        >>> hub = Hub()
        >>> sub = hub.subscribe("room", member="ann")
        >>> hub.disconnect(member="ann"), sub.ended
        (1, True)
        >>> sub.close()
        """
        check_member(member)
        return self.presence.disconnect(member)

    def on_presence(self: PresenceParts, callback: Callable[[str, str, str], None]) -> Callable[[], None]:
        """Call ``callback(channel, event, member)`` after this process
        published a join or leave (``event`` is :data:`~comet.presence.JOIN`
        or :data:`~comet.presence.LEAVE`): exactly one process hears of each.
        Returns the function that stops it."""
        return self.presence.on_change(callback)
