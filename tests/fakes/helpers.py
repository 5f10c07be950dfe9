"""Helpers for the tests of code that talks to the fakes, and of the fakes themselves.

- ``server_fixture(fake_class)``: a pytest ``server`` fixture, the fake started for one test;
- ``running_fake(module, ...)``: the fake as its own process, as end-to-end runs use it;
- ``configure_fake(root_url, ...)``: its control endpoints, when it runs as a process;
- ``post_to_fake(url, body)``: one raw request, to check the bytes of the wire format.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .base import CONTROL, FakeServer

ROOT = Path(__file__).resolve().parents[2]


def server_fixture(fake_class: type[FakeServer]):
    """A ``server`` fixture: a ``fake_class`` started for each test and stopped after it."""

    async def server() -> AsyncIterator[FakeServer]:
        async with fake_class() as fake:
            yield fake

    return pytest.fixture(server, name="server")


@contextlib.asynccontextmanager
async def running_fake(module: str, *args: str) -> AsyncIterator[str]:
    """``python -m <module> --port 0 ...``; yields the base URL of its ``READY`` line.

    On exit the process is asked to stop (SIGTERM), and it must exit with status 0."""
    process = subprocess.Popen([sys.executable, "-m", module, "--port", "0", *args], cwd=ROOT,
                               stdout=subprocess.PIPE, text=True)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(process.stdout.readline), 20)
        assert line.startswith("READY http://127.0.0.1:")
        yield line.split()[1]
    finally:
        process.stdout.close()
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode == 0


async def configure_fake(root_url: str, **config: Any) -> dict:
    """``POST /_fake/config`` to a fake running as a process; returns its ``GET /_fake/requests``."""
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{root_url}{CONTROL}/config", json=config) as response:
            assert response.status == 200
        async with session.get(f"{root_url}{CONTROL}/requests") as response:
            return await response.json()


async def post_to_fake(url: str, body: dict) -> tuple[str, bytes]:
    """``body`` POSTed to a fake; the answer's Content-Type and raw bytes."""
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body) as response:
            return response.headers["Content-Type"], await response.read()
