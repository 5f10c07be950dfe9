"""Upload benchmark: our processes' memory must not grow with the file size.

Run: ``.venv/bin/python bench/upload_memory.py`` (about 2 minutes). It is a
benchmark, not a test: it prints figures (and a Markdown table for
docs/PERFORMANCE.md) and writes them as JSON under bench/results/.

It starts the local stack (emulators, fake-gcs-server, both upload functions
under functions-framework, the socket service), creates a conversation,
joins it with a Socket.IO client, and for each size (default 1 MB and
200 MB, ``--repeat`` times each):

1. asks ``request_upload`` for a signed URL (HTTP);
2. streams the file from disk to fake-gcs-server with exactly the returned
   headers (the bytes never touch our processes);
3. waits for ``file_uploaded`` at the client, then reads the history (the
   socket service signs a download URL) and downloads the file once through
   its signed URL, checking the byte count.

Meanwhile the resident memory (RSS) of the socket service, ``request_upload``
and ``on_upload_finalized`` (each process with its children: gunicorn's
worker) is sampled every ``--sample-ms``. Reported per process: RSS before,
peak during the upload, and the growth. Latency: from the moment the PUT's
response arrives (upload complete) to ``file_uploaded`` at the client.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import psutil  # noqa: E402
import socketio  # noqa: E402

from bench.machine import machine_info  # noqa: E402
from chatcore.identity.auth import issue_token  # noqa: E402
from devstack.processes import free_port  # noqa: E402
from devstack.stack import Ports, Stack, check_prerequisites  # noqa: E402

RESULTS = ROOT / "bench" / "results"
MB = 1024 * 1024
PNG_HEAD = b"\x89PNG\r\n\x1a\n"


def tree_rss(pid: int) -> int:
    """RSS of a process and all its children, in bytes (0 if gone)."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


class Sampler:
    def __init__(self, pids: dict[str, int], interval: float):
        self.pids = pids
        self.interval = interval
        self.peak = {name: 0 for name in pids}
        self._task: asyncio.Task | None = None

    def snapshot(self) -> dict[str, int]:
        return {name: tree_rss(pid) for name, pid in self.pids.items()}

    async def _run(self) -> None:
        while True:
            for name, rss in self.snapshot().items():
                self.peak[name] = max(self.peak[name], rss)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self.peak = self.snapshot()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> dict[str, int]:
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        for name, rss in self.snapshot().items():
            self.peak[name] = max(self.peak[name], rss)
        return self.peak


def make_file(folder: Path, size: int) -> Path:
    """A file of ``size`` bytes that passes the image/png check (signature, then filler), written in 1 MB blocks."""
    path = folder / f"upload-{size}.png"
    block = os.urandom(MB)
    with open(path, "wb") as handle:
        handle.write(PNG_HEAD)
        left = size - len(PNG_HEAD)
        while left > 0:
            handle.write(block[:min(left, MB)])
            left -= MB
    return path


async def file_chunks(path: Path, chunk: int = MB):
    with open(path, "rb") as handle:
        while data := handle.read(chunk):
            yield data


async def one_upload(http: aiohttp.ClientSession, sio_events: dict, upload_url: str, chat_url: str, token: str,
                     conversation_id: str, path: Path, size: int, sampler: Sampler) -> dict:
    sampler.start()
    async with http.post(upload_url, json={"conversation_id": conversation_id, "filename": path.name,
                                           "content_type": "image/png", "size": size},
                         headers={"Authorization": f"Bearer {token}"}) as r:
        grant = await r.json()
        assert r.status == 201, grant
    message_id = f"f{grant['upload_id']}"
    arrived = asyncio.get_running_loop().create_future()
    sio_events[message_id] = arrived
    t_start = time.perf_counter()
    async with http.put(grant["url"], data=file_chunks(path),
                        headers={**grant["headers"], "Content-Length": str(size)}) as r:
        await r.read()
        assert r.status == 200, r.status
    t_put_done = time.perf_counter()
    event = await asyncio.wait_for(arrived, 120)
    t_event = time.perf_counter()
    async with http.get(f"{chat_url}/api/conversations/{conversation_id}/messages?limit=5",
                        headers={"Authorization": f"Bearer {token}"}) as r:
        page = await r.json()
    (item,) = [m for m in page["items"] if m["message_id"] == message_id]
    received = 0
    async with http.get(item["files"][0]["url"]) as r:
        assert r.status == 200
        async for chunk in r.content.iter_chunked(MB):
            received += len(chunk)
    assert received == size == event["files"][0]["size"], (received, size)
    peak = await sampler.stop()
    return {"put_seconds": round(t_put_done - t_start, 3),
            "finalize_to_event_ms": round((t_event - t_put_done) * 1000, 1), "peak_rss": peak}


async def run(args) -> dict:
    missing = check_prerequisites()
    if missing:
        raise SystemExit("cannot run: " + "; ".join(missing))
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    stack = Stack(ports=Ports(firestore=free_port(), pubsub=free_port(), gcs=free_port(), chat=free_port(),
                              ai=free_port()),
                  log_dir=RESULTS / f"logs-upload-{stamp}", project_id="chat-bench")
    limit = str(max(args.sizes) * MB + MB)
    results: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "sizes_mb": args.sizes,
                     "repeat": args.repeat, "started": stamp, "machine": machine_info(), "runs": []}
    try:
        stack.start_emulators()
        os.environ.update(stack.emulator_env)
        request_proc, finalize_proc = stack.start_upload_functions(MAX_UPLOAD_BYTES=limit, LOG_LEVEL="warning")
        chat_proc = stack.start_socket_service(MAX_UPLOAD_BYTES=limit, LOG_LEVEL="warning")
        pids = {"socket_service": chat_proc.proc.pid, "request_upload": request_proc.proc.pid,
                "on_upload_finalized": finalize_proc.proc.pid}
        sampler = Sampler(pids, args.sample_ms / 1000)
        token = issue_token(stack.jwt_secret, f"bench-{uuid.uuid4().hex[:8]}")
        chat_url = stack.chat_url()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
            async with http.post(f"{chat_url}/api/conversations", json={"title": "bench"},
                                 headers={"Authorization": f"Bearer {token}"}) as r:
                conversation_id = (await r.json())["id"]
            sio = socketio.AsyncClient(reconnection=False)
            waiting: dict[str, asyncio.Future] = {}

            @sio.on("file_uploaded")
            async def on_file(data):
                future = waiting.pop(data["message_id"], None)
                if future is not None and not future.done():
                    future.set_result(data)

            await sio.connect(chat_url, auth={"token": token}, transports=["websocket"])
            assert (await sio.call("join_room", {"conversation_id": conversation_id}))["ok"]
            # Warm-up: the first upload builds each function's clients.
            with tempfile.TemporaryDirectory(prefix="upload-bench-") as folder:
                warm = make_file(Path(folder), 1024)
                await one_upload(http, waiting, stack.upload_url, chat_url, token, conversation_id, warm, 1024,
                                 sampler)
                for size_mb in args.sizes:
                    path = make_file(Path(folder), size_mb * MB)
                    for attempt in range(args.repeat):
                        before = sampler.snapshot()
                        run_ = await one_upload(http, waiting, stack.upload_url, chat_url, token, conversation_id,
                                                path, size_mb * MB, sampler)
                        run_.update(size_mb=size_mb, attempt=attempt, rss_before=before,
                                    growth={k: run_["peak_rss"][k] - before[k] for k in before})
                        results["runs"].append(run_)
                        print(f"{size_mb:>4} MB #{attempt}: PUT {run_['put_seconds']:.2f} s, finalize->event "
                              f"{run_['finalize_to_event_ms']:.0f} ms, growth "
                              + ", ".join(f"{k} {v / MB:+.1f} MB" for k, v in run_["growth"].items()), flush=True)
                    path.unlink()
            await sio.disconnect()
    finally:
        stack.stop()
    return results


def summary(results: dict) -> str:
    lines = ["| file | process | RSS before (MB) | peak RSS during upload (MB) | growth (MB) |",
             "|---|---|---|---|---|"]
    by_size: dict[int, list[dict]] = {}
    for run_ in results["runs"]:
        by_size.setdefault(run_["size_mb"], []).append(run_)
    for size_mb, runs in by_size.items():
        for name in runs[0]["peak_rss"]:
            before = max(r["rss_before"][name] for r in runs) / MB
            peak = max(r["peak_rss"][name] for r in runs) / MB
            growth = max(r["growth"][name] for r in runs) / MB
            lines.append(f"| {size_mb} MB | {name} | {before:.1f} | {peak:.1f} | {growth:+.1f} |")
    lines += ["", "| file | upload complete -> `file_uploaded` at the client (ms), each run | PUT (s), each run |",
              "|---|---|---|"]
    for size_mb, runs in by_size.items():
        lines.append(f"| {size_mb} MB | {', '.join(str(r['finalize_to_event_ms']) for r in runs)} | "
                     f"{', '.join(str(r['put_seconds']) for r in runs)} |")
    return "\n".join(lines)


def verdict(results: dict, tolerance_mb: float) -> list[str]:
    """Peak RSS of the largest file may not exceed the smallest file's by more than ``tolerance_mb``."""
    sizes = sorted({r["size_mb"] for r in results["runs"]})
    small = [r for r in results["runs"] if r["size_mb"] == sizes[0]]
    large = [r for r in results["runs"] if r["size_mb"] == sizes[-1]]
    problems = []
    for name in small[0]["peak_rss"]:
        grew = (max(r["peak_rss"][name] for r in large) - max(r["peak_rss"][name] for r in small)) / MB
        if grew > tolerance_mb:
            problems.append(f"{name}: peak RSS with {sizes[-1]} MB files is {grew:.1f} MB above {sizes[0]} MB files")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 200], help="file sizes in MB")
    parser.add_argument("--repeat", type=int, default=5, help="uploads per size")
    parser.add_argument("--sample-ms", type=float, default=20, help="RSS sampling interval")
    parser.add_argument("--tolerance-mb", type=float, default=10, help="allowed peak RSS difference, large vs small")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    results["problems"] = verdict(results, args.tolerance_mb)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"upload-memory-{results['started']}.json"
    out.write_text(json.dumps(results, indent=2))
    print()
    print(summary(results))
    print()
    print(f"results: {out}")
    for problem in results["problems"]:
        print(f"FAIL {problem}")
    print("OK: memory does not grow with the file size" if not results["problems"] else "", flush=True)
    return 1 if results["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
