"""Peer: sse-starlette on uvicorn. `python -m benchmarks.peers.starlette_app PORT asyncio|uvloop`.

sse-starlette's own ping every BENCH_HEARTBEAT seconds (environment; 15 when unset)."""
import asyncio
import os
import sys

import uvicorn
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

HEARTBEAT = float(os.environ.get("BENCH_HEARTBEAT", "15"))
clients: set[asyncio.Queue] = set()


async def index(request):
    return PlainTextResponse("ok")


async def events(request):
    queue: asyncio.Queue = asyncio.Queue()
    clients.add(queue)

    async def stream():
        try:
            while True:
                yield {"data": await queue.get()}
        finally:
            clients.discard(queue)

    return EventSourceResponse(stream(), ping=HEARTBEAT)


def broadcast(data: str) -> None:
    for queue in clients:
        queue.put_nowait(data)


async def publish(request):
    broadcast(f"{request.query_params['seq']} {request.query_params['ts']}")
    return PlainTextResponse("ok")


async def burst(request):
    for i in range(int(request.query_params["n"])):
        broadcast(f"b{i}")
        if i % 100 == 0:
            await asyncio.sleep(0)
    return PlainTextResponse("ok")


app = Starlette(routes=[Route("/", index), Route("/events", events), Route("/publish", publish, methods=["POST"]),
                        Route("/burst", burst, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), loop=sys.argv[2], log_level="warning", access_log=False,
            backlog=4096, timeout_graceful_shutdown=1)
