"""comet in a Flask app: the stream is a WSGI app of its own, mounted next
to Flask's with werkzeug's DispatcherMiddleware.

    waitress-serve --listen 127.0.0.1:8080 flask_app:app
"""
from flask import Flask, request
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from comet import Hub
from comet.wsgi import comet_app

hub = Hub()
app = Flask(__name__)


@app.route("/")
def index():
    return "<!doctype html><title>feed</title><p>a Flask page"


@app.route("/say")
def say():
    return hub.publish("feed", request.args.get("text", ""))


@comet_app(transport="sse")
def events(environ):
    return hub.subscribe("feed", last_id=environ["comet.last_event_id"])


app.wsgi_app = DispatcherMiddleware(app.wsgi_app, {"/events": events})
