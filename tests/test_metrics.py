"""Prometheus metrics: ``/comet/stats/metrics`` (CherryPy) and
``metrics_wsgi`` answer the stats page's numbers in the text format, parsed
here by prometheus_client's own parser, behind the same password; and
comet's log records reach ``cherrypy.log`` under CherryPy."""
from __future__ import annotations

import base64
import json

import cherrypy
import pytest
from prometheus_client.parser import text_string_to_metric_families

from comet import Event, Hub, comet
from comet.stats import metrics_wsgi, mount, prometheus_text, snapshot
from comet.stream import StreamPool
from comet.testing import StreamClient, http_get, wait_until
from comet.wsgi import comet_app

AUTH = {"Authorization": "Basic " + base64.b64encode(b"comet:s3cret").decode()}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, labels): value}, through prometheus_client's parser
    (which raises on anything malformed)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture
def server(comet_cherrypy):
    hub = Hub()

    class Root:
        @cherrypy.expose
        @comet(transport="sse")
        def events(self, channel="news"):
            return hub.subscribe(channel)

    root = Root()
    mount(root, password="s3cret", hubs=[hub])
    return comet_cherrypy(root), hub


def test_metrics_are_the_stats_numbers(server):
    server, hub = server
    with StreamClient(server.url + "/events") as reader:
        hub.publish("news", "extra!")
        reader.wait_for(1)
        wait_until(lambda: json.loads(http_get(server.url + "/comet/stats/json", headers=AUTH)[2])["events"]["delivered"] >= 1,
                   what="delivery counted")
        status, headers, body = http_get(server.url + "/comet/stats/metrics", headers=AUTH)
        stats = json.loads(http_get(server.url + "/comet/stats/json", headers=AUTH)[2])
    assert status == 200
    # (CherryPy's encode tool respells it without spaces; Prometheus reads both.)
    assert headers["content-type"].replace(" ", "") == "text/plain;version=0.0.4;charset=utf-8"
    got = samples(body.decode())
    assert got[("comet_streams_open", ())] == stats["streams"]["open"] == 1
    assert got[("comet_streams_parked", ())] == stats["streams"]["parked"] == 1
    assert got[("comet_streams_by_transport", (("transport", "sse"),))] == 1
    assert got[("comet_streams_by_channel", (("channel", "news"),))] == 1
    # Process-wide totals (earlier tests' hubs may still count): as the JSON says.
    assert got[("comet_events_published_total", ())] == stats["events"]["published"] >= 1
    assert got[("comet_events_delivered_total", ())] == stats["events"]["delivered"] >= 1
    assert got[("comet_streams_opened_total", ())] == stats["opened"]
    assert got[("comet_hub_subscriptions", (("hub", "0"), ("type", "Hub")))] == 1
    assert got[("comet_hub_published_total", (("hub", "0"), ("type", "Hub")))] == 1
    # Every number of the snapshot has its series.
    assert len({name for name, _ in got}) >= 20


def test_metrics_ask_for_the_stats_password(server):
    server, _ = server
    status, headers, body = http_get(server.url + "/comet/stats/metrics")
    assert status == 401 and "basic" in headers["www-authenticate"].lower()
    assert b"comet_" not in body


def test_metrics_wsgi_behind_a_password(comet_wsgi):
    hub = Hub()
    events = comet_app(lambda environ: hub.subscribe("room"), transport="chunked")
    metrics = metrics_wsgi(events.pool, [hub], password="s3cret")

    def app(environ, start_response):
        return (metrics if environ["PATH_INFO"] == "/metrics" else events)(environ, start_response)

    server = comet_wsgi(app, pools=[events.pool])
    with StreamClient(server.url + "/events", transport="chunked"):
        assert http_get(server.url + "/metrics")[0] == 401
        assert http_get(server.url + "/metrics", method="POST", headers=AUTH)[0] == 405
        status, headers, body = http_get(server.url + "/metrics", headers=AUTH)
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    got = samples(body.decode())
    assert got[("comet_streams_open", ())] == 1
    assert got[("comet_streams_by_transport", (("transport", "chunked"),))] == 1


def test_channel_names_are_escaped_and_can_be_left_out():
    hub = Hub()
    pool = StreamPool()
    snap = snapshot(pool, [hub])
    snap["streams"]["by_channel"] = {'room "a"\\b\nc': 2}
    got = samples(prometheus_text(snap))
    assert got[("comet_streams_by_channel", (("channel", 'room "a"\\b\nc'),))] == 2
    assert not any(name == "comet_streams_by_channel" for name, _ in samples(prometheus_text(snap, channels=False)))


def test_comet_log_records_reach_cherrypy_log(comet_cherrypy, tmp_path):
    class Root:
        @cherrypy.expose
        @comet(transport="sse", mode="thread")
        def events(self):
            yield Event("fine")
            yield object()  # not encodable: comet logs an error and ends the stream

    error_file = tmp_path / "error.log"
    server = comet_cherrypy(Root(), global_config={"log.error_file": str(error_file)})
    try:
        with StreamClient(server.url + "/events") as reader:
            reader.wait_for(1)
            reader.wait_closed()
        text = wait_until(lambda: "COMET" in error_file.read_text() and error_file.read_text(), what="the record in error.log")
    finally:
        cherrypy.log.error_file = ""  # the log manager outlives this test's config
    assert "COMET comet: ending sse stream, cannot encode 'object'" in text
