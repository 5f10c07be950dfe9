"""CPU per streamed chunk of the OpenAI-compatible provider (the official SDK under our capped transport).

Streams ``--chunks`` pieces from the local OpenAI wire-format fake
(``tests/fakes/openai_server.py``, a process of its own) through
``OpenAICompatibleProvider``, and, as the floor, reads the same stream raw
with aiohttp; ``--runs`` runs after one warm-up, medians printed. The client
CPU per chunk times the replies an instance streams at once
(``ai_stream_concurrency``, 64) times the model's rate gives the share of a
core the provider costs (docs/PERFORMANCE.md, "AI streaming").

    .venv/bin/python bench/openai_provider.py [--chunks 5000] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "functions" / "ai_stream"), str(ROOT)]

import aiohttp  # noqa: E402

from aistream.providers.base import Turn  # noqa: E402
from aistream.providers.openai_compat import OpenAICompatibleProvider  # noqa: E402


async def through_provider(url: str) -> tuple[float, int]:
    provider = OpenAICompatibleProvider(url, None, "m", max_output_tokens=10**6, timeout=30)
    try:
        start, pieces = time.process_time(), 0
        async for _ in provider.stream([Turn("user", "hi")], system=""):
            pieces += 1
        return time.process_time() - start, pieces
    finally:
        await provider.aclose()


async def raw_read(url: str) -> tuple[float, int]:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with aiohttp.ClientSession() as session:
        start, lines = time.process_time(), 0
        async with session.post(url + "/chat/completions", json=body) as response:
            async for line in response.content:
                lines += line.startswith(b"data: {")
        return time.process_time() - start, lines


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=5000)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    fake = subprocess.Popen([sys.executable, "-m", "tests.fakes.openai_server", "--port", "0",
                             "--text", " w" * args.chunks], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        url = fake.stdout.readline().split()[1]
        for way in (through_provider, raw_read):
            await way(url)  # warm-up
        for name, way in (("provider (openai SDK)", through_provider), ("raw aiohttp read (floor)", raw_read)):
            cpus = []
            for _ in range(args.runs):
                cpu, count = await way(url)
                cpus.append(cpu)
            cpu = statistics.median(cpus)
            print(f"{name}: {count} chunks, median client CPU {cpu * 1000:.0f} ms, "
                  f"{cpu / count * 1e6:.1f} us per chunk (runs: {[round(c * 1000) for c in cpus]} ms)")
    finally:
        fake.terminate()
        fake.wait(10)


if __name__ == "__main__":
    asyncio.run(main())
