"""comet: real-time server push over plain HTTP for CherryPy and WSGI."""
from .errors import CometError, HubClosed, InvalidEvent, InvalidEventId, StreamsExhausted, UnserializableData
from .framing import Event, Part
from .hub import GAP, Hub
from .options import Options

__all__ = [
    "comet", "Hub", "Event", "Part", "Options", "GAP",
    "CometError", "HubClosed", "InvalidEvent", "InvalidEventId", "StreamsExhausted", "UnserializableData",
]
__version__ = "0.1.0"


def __getattr__(name):
    # The CherryPy adapter imports cherrypy; load it only when asked so that
    # plain-WSGI users and the framing/hub layers never pay for it.
    if name == "comet":
        from .cherrypy_tool import comet
        return comet
    raise AttributeError(f"module 'comet' has no attribute {name!r}")
