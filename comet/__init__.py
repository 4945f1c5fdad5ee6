"""comet: real-time server push over plain HTTP for CherryPy and WSGI."""
from .errors import BackendUnavailable, CometError, Forbidden, HubClosed, InvalidEvent, InvalidEventId, StreamsExhausted, UnserializableData
from .framing import Event, Part
from .hub import GAP, SNAPSHOT, Hub
from .options import Options
# Importing the adapter registers cherrypy.tools.comet, so config-only users
# (tools.comet.on = True) need nothing but "import comet".
from .cherrypy_tool import comet
from .publish import publish_app
from .tokens import StreamTokens

__all__ = [
    "comet", "Hub", "Event", "Part", "Options", "GAP", "SNAPSHOT", "publish_app", "StreamTokens",
    "BackendUnavailable", "CometError", "Forbidden", "HubClosed", "InvalidEvent", "InvalidEventId", "StreamsExhausted", "UnserializableData",
]
__version__ = "0.1.0"
