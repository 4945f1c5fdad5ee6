"""Event ids, epochs and the cursors of subscriptions to several channels.

An event id is ``"<epoch>-<seq>"`` (the shape of a Redis stream id); ids
compare as ``(epoch, seq)`` (:func:`parse_id`). A forgotten channel's
successor starts a later epoch, kept per :func:`bucket` of names so memory
stays bounded whatever names users choose.

A subscription to several channels has one cursor naming each channel and
its id (:func:`multi_cursor`, :func:`cursor_name`); :func:`split_cursor`
reads one back. Names are checked here too (:func:`check_channel`,
:func:`check_member`): every piece of text that becomes part of an id, a
cursor or a backend's key. Pure functions, no state: the hub, the channel
buffer and the backends all build on them.
"""
from __future__ import annotations

import base64
import hashlib
import re
import zlib
from typing import Any, Iterable
from urllib.parse import unquote_to_bytes

from .errors import InvalidEvent, InvalidEventId
from .framing import Event

__all__ = ["parse_id", "stored_id", "bucket", "EPOCH_BUCKETS", "MAX_PART", "MAX_NAME", "BEFORE_ALL", "MAX_CHANNELS",
           "MAX_CURSOR", "check_channel", "check_member", "channel_tag", "cursor_name", "multi_cursor",
           "is_multi_cursor", "split_cursor"]

_ID = re.compile(r"(\d{1,20})-(\d{1,20})")
#: Most channels one subscription may follow: its cursor (every channel's
#: name and id) must fit a ``Last-Event-ID`` header.
MAX_CHANNELS = 64
#: Longest name a channel keeps in a cursor (percent-encoded); a longer
#: one is named by a hash, so a cursor's size never depends on what users
#: call things (see :func:`cursor_name`).
_SHORT_NAME = 32
#: A channel's name in a cursor: UTF-8, %XX-encoded but for ASCII letters,
#: digits, ``-`` and ``:`` (so never ``.`` or ``_``, the separators, nor
#: ``~``), at most _SHORT_NAME characters; or ``~`` and 26 base32 letters.
_NAME = rf"(?:~[a-z2-7]{{26}}|(?=[A-Za-z0-9:%-]{{1,{_SHORT_NAME}}}\.)(?:[A-Za-z0-9:-]|%[0-9A-Fa-f]{{2}})+)"
_PIECE = rf"{_NAME}\.\d{{1,20}}-\d{{1,20}}"
_CURSOR = re.compile(rf"{_PIECE}(?:_{_PIECE}){{0,{MAX_CHANNELS * 2}}}")
#: Length of the longest cursor a subscription makes: :data:`MAX_CHANNELS`
#: pieces of a name (at most _SHORT_NAME characters), ``.`` and an id (two
#: 20-digit numbers), joined by ``_``: 4,799 characters. What a server takes
#: as ``Last-Event-ID``; it fits the 8 KB request heads of fast routes
#: (comet.internals.MAX_HEAD) and of proxies (nginx) with 3 KB left for the
#: request line and the other headers, whatever users name their channels.
MAX_CURSOR = MAX_CHANNELS * (_SHORT_NAME + 1 + 41) + MAX_CHANNELS - 1
_KEPT = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-:")
#: What a cursor of the first format (``<crc32 tag>.<id>`` pieces) named a channel by.
_OLD_TAG = re.compile(r"[0-9a-z]{1,7}")
#: Where a plain id puts each channel of a subscription to several: before
#: anything (even a backend's "0-0"), so each gets a gap.
BEFORE_ALL = (-1, -1)
#: Largest part of an id: Redis stream ids are two unsigned 64-bit integers.
MAX_PART = 2**64 - 1
#: Longest channel name, member name or latest-value key.
MAX_NAME = 200


#: Forgetting a channel moves the epoch of every channel hashed with it, so
#: ids of a later channel of the same name never meet a cursor from before.
#: Buckets, not one epoch per name ever used: memory stays bounded, and a
#: forget disturbs only cursors of never-published channels of its bucket.
EPOCH_BUCKETS = 4096


def bucket(channel: str) -> int:
    """The epoch bucket of *channel* (the Redis backend keeps the same buckets).

    >>> bucket("room:main") == bucket("room:main") < EPOCH_BUCKETS
    True
    """
    return zlib.crc32(channel.encode("utf-8", "surrogatepass")) % EPOCH_BUCKETS


def parse_id(value: str) -> tuple[int, int]:
    """``"<epoch>-<seq>"`` to a comparable tuple, or :class:`InvalidEventId`.

    >>> parse_id("1700000000000-42")
    (1700000000000, 42)
    """
    if not isinstance(value, str):
        raise InvalidEventId(f"event id must be a str, got {type(value).__name__}")
    match = _ID.fullmatch(value)
    if not match or int(match[1]) > MAX_PART or int(match[2]) > MAX_PART:
        raise InvalidEventId(f"malformed event id {value[:80]!r}: expected '<epoch>-<seq>' digits")
    return int(match[1]), int(match[2])


def stored_id(event: Event) -> str:
    """The id of an event a channel holds (every stored event has one)."""
    event_id = event.id
    assert event_id is not None
    return event_id


def check_channel(channel: str) -> None:
    """A channel is a non-empty str of at most 200 characters without CR, LF
    or NUL (it travels in events, cursors and backends' keys).

    >>> check_channel("room:1")
    >>> check_channel("")
    Traceback (most recent call last):
    ...
    comet.errors.InvalidEvent: channel must be a non-empty str, got ''
    """
    if not isinstance(channel, str) or not channel:
        raise InvalidEvent(f"channel must be a non-empty str, got {channel!r}")
    if len(channel) > MAX_NAME or "\r" in channel or "\n" in channel or "\x00" in channel:
        raise InvalidEvent(f"channel must be at most {MAX_NAME} characters without CR, LF or NUL: {channel[:80]!r}")


def check_member(member: Any) -> None:
    """A member is a non-empty str of at most 200 characters without CR,
    LF or NUL (it travels as event data and in backends' keys)."""
    if not isinstance(member, str) or not member:
        raise InvalidEvent(f"member must be a non-empty str, got {member!r}")
    if len(member) > MAX_NAME or any(c in member for c in "\r\n\x00"):
        raise InvalidEvent(f"member must be at most {MAX_NAME} characters without CR, LF or NUL: {member[:80]!r}")


def channel_tag(channel: str) -> str:
    """The tag that named *channel* in the first format of the cursor of a
    subscription to several channels (CRC-32 in base 36). Such cursors are
    still resumed where a tag matches one followed channel; new cursors name
    channels by :func:`cursor_name`, which no one can make collide.

    >>> channel_tag("room:main")
    '13ecrb1'
    """
    n = zlib.crc32(channel.encode("utf-8", "surrogatepass"))
    digits = ""
    while True:
        n, r = divmod(n, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[r] + digits
        if not n:
            return digits


def cursor_name(channel: str) -> str:
    """*channel* as it is named in the cursor of a subscription to several
    channels: UTF-8, percent-encoded but for ASCII letters, digits, ``-``
    and ``:``, if that takes at most 32 characters; else ``~`` and the
    first 128 bits of the SHA-256 of its UTF-8 name in lowercase base32.
    Two channels never share one, whatever they are called (``~`` is
    always encoded in a name; forging a 128-bit collision is out of
    reach), and a cursor stays short whatever the names.

    >>> cursor_name("dm:ann:bob"), cursor_name("room.1"), cursor_name("café_2")
    ('dm:ann:bob', 'room%2E1', 'caf%C3%A9%5F2')
    >>> cursor_name("a channel name longer than 32 characters")
    '~ynciz62e7xmesihkzfuegrio5m'
    """
    if len(channel) <= _SHORT_NAME and all(c in _KEPT for c in channel):
        return channel
    encoded = channel.encode("utf-8", "surrogatepass")
    if len(channel) <= _SHORT_NAME:
        name = "".join(c if c in _KEPT else "".join([f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass")])
                       for c in channel)
        if len(name) <= _SHORT_NAME:
            return name
    return "~" + base64.b32encode(hashlib.sha256(encoded).digest()[:16]).decode("ascii").rstrip("=").lower()


def multi_cursor(ids: dict[str, str]) -> str:
    """The cursor of a subscription to several channels that stands at
    ``ids[channel]`` on each channel: for a page that renders some state
    and hands its stream the cursor to resume right after it.

    >>> multi_cursor({"shouts": "1700000000000-3", "dm:ann:bob": "1700000000000-5"})
    'shouts.1700000000000-3_dm:ann:bob.1700000000000-5'
    """
    for event_id in ids.values():
        parse_id(event_id)
    return "_".join([f"{cursor_name(channel)}.{event_id}" for channel, event_id in ids.items()])


def _channel_of(name: str) -> str | None:
    """The channel a cursor's (validated) *name* stands for; None if it is
    no channel's (its bytes are not UTF-8)."""
    if "%" not in name:
        return name
    try:
        return unquote_to_bytes(name).decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        return None


def is_multi_cursor(value: str) -> bool:
    """Is *value* the cursor (an event id) of a subscription to several channels?

    >>> is_multi_cursor("room:main.1700000000000-4_dm%2E1.1700000000000-0"), is_multi_cursor("1700000000000-4")
    (True, False)
    """
    return _CURSOR.fullmatch(value) is not None


def split_cursor(last_id: str | None, channels: Iterable[str]) -> dict[str, tuple[str | None, tuple[int, int] | None]]:
    """Each channel's cursor (its id, parsed) in the cursor *last_id* of a
    subscription to *channels*. Channels it does not name start from now;
    channels it names that are not followed are ignored (the page follows
    other channels than before). A plain id (of a stream of one channel)
    cannot say where each channel stands: every channel gets a gap.

    A cursor of the first format names channels by :func:`channel_tag`: as
    long as none of its pieces names a followed channel, a tag resumes the
    one followed channel it is the tag of (a tag of two is ignored)."""
    if last_id is None or last_id == "":
        return {}
    if not isinstance(last_id, str):
        raise InvalidEventId(f"event id must be a str, got {type(last_id).__name__}")
    if _ID.fullmatch(last_id):
        parse_id(last_id)
        return {name: (last_id, BEFORE_ALL) for name in channels}
    if not _CURSOR.fullmatch(last_id):
        raise InvalidEventId(f"malformed event id {last_id[:80]!r}: expected '<channel>.<epoch>-<seq>' pieces "
                             "joined by '_'")
    followed = set(channels)
    pieces = [piece.rpartition(".") for piece in last_id.split("_")]
    found: dict[str, tuple[str | None, tuple[int, int] | None]] = {}
    named: dict[str, str] | None = None  # each followed channel's name in a cursor: the channel
    for name, _, event_id in pieces:
        if name[0] == "~":  # named by a hash: hash the followed channels (once) to find it
            if named is None:
                named = {cursor_name(c): c for c in followed}
            channel = named.get(name)
        else:  # (a name piece is at most 32 characters: never a channel named by a hash)
            channel = _channel_of(name)
        if channel in followed:
            assert channel is not None
            found[channel] = (event_id, parse_id(event_id))
    if found:
        return found
    tags: dict[str, str | None] = {}
    for channel in followed:
        tag = channel_tag(channel)
        tags[tag] = None if tag in tags else channel  # a tag two channels share resumes neither
    for name, _, event_id in pieces:
        channel = tags.get(name) if _OLD_TAG.fullmatch(name) else None
        if channel is not None:
            found[channel] = (event_id, parse_id(event_id))
    return found
