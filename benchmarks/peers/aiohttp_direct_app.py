"""Peer: aiohttp, broadcasting by writing straight to each StreamResponse from
the publishing handler (no queue, no task switch per client): the fastest
aiohttp shape we know. `python -m benchmarks.peers.aiohttp_direct_app PORT`.

A comment every BENCH_HEARTBEAT seconds (environment; 15 when unset) keeps an idle stream alive."""
import asyncio
import os
import sys

from aiohttp import web

HEARTBEAT = float(os.environ.get("BENCH_HEARTBEAT", "15"))
clients: set[web.StreamResponse] = set()


async def index(request):
    return web.Response(text="ok")


async def events(request):
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    await resp.write(b":ok\n\n")
    clients.add(resp)
    try:
        while not request.transport.is_closing():
            await asyncio.sleep(HEARTBEAT)
            await resp.write(b":\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        clients.discard(resp)
    return resp


async def broadcast(data: bytes) -> None:
    for resp in list(clients):
        try:
            await resp.write(data)
        except (ConnectionResetError, RuntimeError):
            clients.discard(resp)


async def publish(request):
    await broadcast(b"data: %s %s\n\n" % (request.query["seq"].encode(), request.query["ts"].encode()))
    return web.Response(text="ok")


async def burst(request):
    for i in range(int(request.query["n"])):
        await broadcast(b"data: b%d\n\n" % i)
    return web.Response(text="ok")


app = web.Application()
app.add_routes([web.get("/", index), web.get("/events", events), web.post("/publish", publish), web.post("/burst", burst)])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), backlog=4096, print=None, access_log=None)
