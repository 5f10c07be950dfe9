"""Receiving clients for bench/ai_stream.py, in a process of their own.

They play the browsers: light Socket.IO clients (bench/wsclient.py, WebSocket
transport) connected to a real socket-service process, each joined to one
conversation. Every ``ai_response_chunk`` / ``ai_response_complete`` / probe
(an ``ai_response_chunk`` marked ``ai_bench_probe``) is stamped with ``time.time()`` at receipt, on the same
machine clock as the emitter's stamps. Running them apart from the emitting
process keeps the emitter's CPU (and GIL) out of the receipt stamps, as on
real machines.

Protocol with bench/ai_stream.py (one line each way):

- stdin, first line: ``{"url": ..., "clients": [{"token": ..., "conversation_id": ...}, ...]}``;
- stdout: ``READY`` once every client is connected and joined;
- stdin ``DUMP``: stdout gets one JSON line with every record since the last
  ``DUMP``, then they are forgotten; stdin ``QUIT`` (or EOF): close and exit.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import wsclient  # noqa: E402

PROBE_EVENT = "ai_bench_probe"  # the key that marks an ai_response_chunk as a probe


class Records:
    def __init__(self) -> None:
        self.chunks: list[list] = []     # [message_id, seq, t_recv, chars]
        self.completes: list[list] = []  # [message_id, t_recv, status, chars]
        self.errors: list[list] = []     # [message_id, t_recv, code]
        self.probes: list[list] = []     # [key, n, t_emit, t_recv]

    def on_event(self, conn, name: str, raw: str) -> None:
        now = time.time()
        if name == "ai_response_chunk":
            data = json.loads(raw)[1]
            if PROBE_EVENT in data:
                self.probes.append([data["k"], data["n"], data["t"], now])
            else:
                self.chunks.append([data["message_id"], data["seq"], now, len(data["chunk"])])
        elif name == "ai_response_complete":
            data = json.loads(raw)[1]
            self.completes.append([data["message_id"], now, data.get("status"), len(data.get("content") or "")])
        elif name == "ai_response_error":
            data = json.loads(raw)[1]
            self.errors.append([data["message_id"], now, data.get("error", {}).get("code")])

    def take(self) -> dict:
        out = {"chunks": self.chunks, "completes": self.completes, "errors": self.errors, "probes": self.probes}
        self.__init__()
        return out


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    config = json.loads(await reader.readline())
    records = Records()
    session = wsclient.new_session()
    conns: list[wsclient.SioConnection] = []
    try:
        sem = asyncio.Semaphore(20)

        async def one(spec: dict) -> None:
            async with sem:
                conn = await wsclient.connect(session, config["url"], {"token": spec["token"]}, records.on_event)
                conns.append(conn)
                ack = await conn.call("join_room", {"conversation_id": spec["conversation_id"]}, timeout=30)
                if not ack or not ack.get("ok"):
                    raise RuntimeError(f"join_room refused: {ack}")

        await asyncio.gather(*(one(spec) for spec in config["clients"]))
        print("READY", flush=True)
        while True:
            line = (await reader.readline()).decode().strip()
            if line == "DUMP":
                dropped = sum(1 for c in conns if c.closed)
                print(json.dumps({**records.take(), "dropped_connections": dropped}), flush=True)
            elif line in ("QUIT", ""):
                break
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
        await session.close()


if __name__ == "__main__":
    asyncio.run(main())
