"""Fixtures of the package's unit tests: a fake Pub/Sub Pull server (fake_pubsub_server.py) and a channel to it.

Modules with a ``server`` fixture of their own (other fake servers) override this one.
"""

from __future__ import annotations

import grpc
import pytest
from fake_pubsub_server import FakePullServer


@pytest.fixture
def server():
    fake = FakePullServer().start()
    yield fake
    fake.stop()


@pytest.fixture
def channel(server):
    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield ch
    ch.close()
