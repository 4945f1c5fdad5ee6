"""comet on any WSGI server: one stream, one way to publish, one page.

    waitress-serve --listen 127.0.0.1:8080 wsgi_app:app
    gunicorn -c python:comet.gunicorn_conf -b 127.0.0.1:8080 wsgi_app:app
"""
from urllib.parse import parse_qs

from comet import Hub
from comet.wsgi import comet_app

hub = Hub()


@comet_app(transport="sse")
def events(environ):
    return hub.subscribe("feed", last_id=environ["comet.last_event_id"])


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/events":
        return events(environ, start_response)
    if path == "/say":
        text = parse_qs(environ.get("QUERY_STRING", "")).get("text", [""])[0]
        body = hub.publish("feed", text).encode()
    else:
        body = b"<!doctype html><title>feed</title><p>a page, served while streams are open"
    start_response("200 OK", [("Content-Type", "text/html; charset=utf-8" if path == "/" else "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body]
