"""The baseline of bench/fanout.py: a bare python-socketio AsyncServer on aiohttp.

No auth, no Firestore, no bus: the same library, web server and async mode as
the socket service, and nothing else. A client joins a room by naming it in
its handshake auth (``{"room": "room-7"}``); without one it stays idle.

The bare app has no way to receive emits from another process (python-socketio
only offers Redis/Kafka/AMQP/ZeroMQ managers, none of which runs here), so its
fan-out workload is a server-side emit loop, started by ``POST /bench/emit``:
the bare app gets its emits for free, and every cost of the socket service's
bus path counts against the service in the ratio.

Run: ``python bench/bare_app.py --port 8090 [--no-gc-tuning]``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import socketio
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.pacing import pace_async  # noqa: E402
from chatcore.runtime import tuning  # noqa: E402


def create_app(gc_tuning: bool = True) -> web.Application:
    sio = socketio.AsyncServer(async_mode="aiohttp", cors_allowed_origins="*", logger=False, engineio_logger=False)
    app = web.Application()
    sio.attach(app)
    state = {"emitted": 0, "running": None}

    @sio.event
    async def connect(sid, environ, auth=None):
        if isinstance(auth, dict) and isinstance(auth.get("room"), str):
            await sio.enter_room(sid, auth["room"])

    async def emit_loop(rate: float, duration: float, rooms: list[str], event: str) -> None:
        # Paced like bench/bus_emitter.py (bench/pacing.py), on a longer tick.
        async def emit(n: int) -> None:
            await sio.emit(event, {"t": time.time(), "n": n}, room=rooms[n % len(rooms)])
            state["emitted"] = n + 1

        await pace_async(rate, duration, emit, tick=0.005)

    async def start_emit(request: web.Request) -> web.Response:
        q = request.query
        rate, duration = float(q["rate"]), float(q["duration"])
        rooms = [f"{q.get('prefix', 'room-')}{i}" for i in range(int(q["rooms"]))]
        if state["running"] is not None and not state["running"].done():
            return web.json_response({"error": "already running"}, status=409)
        state["emitted"] = 0
        state["running"] = asyncio.get_running_loop().create_task(
            emit_loop(rate, duration, rooms, q.get("event", "bench")))
        return web.json_response({"ok": True})

    async def emit_status(request: web.Request) -> web.Response:
        running = state["running"] is not None and not state["running"].done()
        return web.json_response({"emitted": state["emitted"], "running": running})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def on_startup(app: web.Application) -> None:
        # The same interpreter settings as the socket service (GC_TUNING on
        # by default), so the ratio measures auth, persistence and the bus,
        # not a runtime setting.
        tuning.tune(gc_tuning)

    app.router.add_get("/healthz", healthz)
    app.router.add_post("/bench/emit", start_emit)
    app.router.add_get("/bench/emit", emit_status)
    app.on_startup.append(on_startup)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--no-gc-tuning", action="store_true")
    args = parser.parse_args()
    web.run_app(create_app(gc_tuning=not args.no_gc_tuning), host="127.0.0.1", port=args.port, print=None,
                access_log=None)


if __name__ == "__main__":
    main()
