"""comet in a Django project: the stream is a WSGI app of its own, in front
of Django's in the project's ``wsgi.py``. (One file here, so the recipe
runs as it is; in a project, the settings and URLs are where they always are.)

    waitress-serve --listen 127.0.0.1:8080 django_app:application
"""
from django.conf import settings

settings.configure(ROOT_URLCONF=__name__, ALLOWED_HOSTS=["127.0.0.1", "localhost"], SECRET_KEY="only-for-this-demo")

from django.core.wsgi import get_wsgi_application  # noqa: E402  (after settings)
from django.http import HttpResponse  # noqa: E402
from django.urls import path  # noqa: E402

from comet import Hub  # noqa: E402
from comet.wsgi import comet_app  # noqa: E402

hub = Hub()


def index(request):
    return HttpResponse("<!doctype html><title>feed</title><p>a Django page")


def say(request):
    return HttpResponse(hub.publish("feed", request.GET.get("text", "")), content_type="text/plain")


urlpatterns = [path("", index), path("say", say)]


@comet_app(transport="sse")
def events(environ):
    return hub.subscribe("feed", last_id=environ["comet.last_event_id"])


django = get_wsgi_application()


def application(environ, start_response):
    """wsgi.py: streams to comet, everything else to Django."""
    if environ.get("PATH_INFO") == "/events":
        return events(environ, start_response)
    return django(environ, start_response)
