"""Peer: aiohttp StreamResponse, one queue per client. `python -m benchmarks.peers.aiohttp_app PORT`.

A comment every BENCH_HEARTBEAT seconds (environment; 15 when unset) keeps an idle stream alive."""
import asyncio
import os
import sys

from aiohttp import web

HEARTBEAT = float(os.environ.get("BENCH_HEARTBEAT", "15"))
clients: set[asyncio.Queue] = set()


async def index(request):
    return web.Response(text="ok")


async def events(request):
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    await resp.write(b":ok\n\n")
    queue: asyncio.Queue = asyncio.Queue()
    clients.add(queue)
    try:
        while True:
            try:
                data = await asyncio.wait_for(queue.get(), HEARTBEAT)
            except asyncio.TimeoutError:
                data = b":\n\n"
            await resp.write(data)
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        clients.discard(queue)
    return resp


def broadcast(data: bytes) -> None:
    for queue in clients:
        queue.put_nowait(data)


async def publish(request):
    broadcast(b"data: %s %s\n\n" % (request.query["seq"].encode(), request.query["ts"].encode()))
    return web.Response(text="ok")


async def burst(request):
    for i in range(int(request.query["n"])):
        broadcast(b"data: b%d\n\n" % i)
        if i % 100 == 0:
            await asyncio.sleep(0)
    return web.Response(text="ok")


app = web.Application()
app.add_routes([web.get("/", index), web.get("/events", events), web.post("/publish", publish), web.post("/burst", burst)])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), backlog=4096, print=None, access_log=None)
