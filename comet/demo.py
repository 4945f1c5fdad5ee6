"""A small live demo on the in-memory hub: ``python -m comet.demo``.

Open http://127.0.0.1:8080/ in two tabs and type: every tab sees every line
at once. Or watch the raw stream: ``curl -N http://127.0.0.1:8080/events``.
"""
from __future__ import annotations

import argparse
import html

import cherrypy

from comet import Hub, comet
from comet.cherrypy_tool import engine_plugin
from comet.hub import Subscription

PAGE = """<!doctype html>
<meta charset="utf-8"><title>comet demo</title>
<style>body{font:16px system-ui;max-width:40em;margin:2em auto}#log{border:1px solid #ccc;min-height:12em;padding:.5em}</style>
<h1>comet demo</h1>
<p>Open this page in two tabs. Status: <b id="status">connecting</b></p>
<form id="f"><input id="t" name="text" maxlength="500" autofocus placeholder="say something"> <button>Send</button></form>
<div id="log"></div>
<script>
const log = document.getElementById("log"), status = document.getElementById("status");
const es = new EventSource("events");
es.onopen = () => status.textContent = "open";
es.onerror = () => status.textContent = "reconnecting";
es.onmessage = (e) => { const p = document.createElement("div"); p.textContent = e.data; log.prepend(p); };
document.getElementById("f").onsubmit = (e) => {
  e.preventDefault();
  const t = document.getElementById("t");
  fetch("say", {method: "POST", body: new URLSearchParams({text: t.value})});
  t.value = "";
};
</script>
"""


class Demo:
    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    @cherrypy.expose
    def index(self) -> str:
        return PAGE

    @cherrypy.expose
    @comet(transport="sse")
    def events(self, last_event_id: str | None = None) -> Subscription:
        return self.hub.subscribe("demo", last_id=last_event_id)

    @cherrypy.expose
    @cherrypy.tools.allow(methods=["POST"])
    def say(self, text: str = "") -> str:
        text = text.strip()
        if not 1 <= len(text) <= 500:
            raise cherrypy.HTTPError(400, "text must be 1-500 characters")
        return self.hub.publish("demo", text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--threads", type=int, default=120,
                        help="server worker threads; each open stream holds one (default 120)")
    args = parser.parse_args(argv)
    hub = engine_plugin().add_hub(Hub())
    cherrypy.config.update({"server.socket_host": args.host, "server.socket_port": args.port,
                            "server.thread_pool": args.threads, "engine.autoreload.on": False})
    print(f"comet demo on http://{html.escape(args.host)}:{args.port}/  (curl -N http://{args.host}:{args.port}/events)")
    cherrypy.quickstart(Demo(hub), "/")


if __name__ == "__main__":
    main()
