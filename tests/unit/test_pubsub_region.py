"""PUBSUB_REGION: every publisher talks to one regional Pub/Sub endpoint (issue 14).

Pub/Sub keeps an ordering key's order only for messages published in the same
region. With ``PUBSUB_REGION`` set (and no emulator), each deployable's
publishers are built with ``client_options={"api_endpoint":
"<region>-pubsub.googleapis.com:443"}``; otherwise with the library's default.
The Google client constructors are the boundary: they are replaced by a
recorder that refuses to build anything, so each publish fails with that
refusal after the constructor was called, without any network.
"""

from __future__ import annotations

import secrets
from unittest import mock

import pytest

from chatcore.errors import ConfigError

SECRET = secrets.token_urlsafe(48)
BASE = {"GOOGLE_CLOUD_PROJECT": "chat-unit", "JWT_SECRET": SECRET}
REGIONAL = {"api_endpoint": "europe-west1-pubsub.googleapis.com:443"}


class NotBuilt(Exception):
    """What the recording constructors raise: the publish fails with it."""


@pytest.fixture
def constructors(monkeypatch):
    """Replaces the sync and asyncio publisher clients' constructors; records their keyword arguments."""
    built = {"PublisherClient": [], "PublisherAsyncClient": []}

    def recorder(name):
        def construct(*args, **kwargs):
            built[name].append(kwargs)
            raise NotBuilt(name)
        return construct

    from google.cloud import pubsub_v1
    from google.pubsub_v1.services import publisher as gapic_publisher

    monkeypatch.setattr(pubsub_v1, "PublisherClient", recorder("PublisherClient"))
    monkeypatch.setattr(gapic_publisher, "PublisherAsyncClient", recorder("PublisherAsyncClient"))
    monkeypatch.setattr("google.auth.default", lambda *a, **k: (mock.Mock(name="credentials"), "chat-unit"))
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    return built


def endpoint(kwargs: dict):
    options = kwargs.get("client_options")
    if options is None:
        return None
    return options["api_endpoint"] if isinstance(options, dict) else options.api_endpoint


def publish_from_socket_service(env: dict) -> None:
    from socket_service.app import create_app
    from socket_service.settings import Settings

    app = create_app(Settings.from_env({**BASE, **env}), firestore_client=mock.Mock(), storage_client=mock.Mock(),
                     signer=mock.Mock())
    from socket_service import http_api

    bus = app[http_api.STATE]["bus"]
    future = bus.transport.publisher.publish(bus.transport.topic_path, b"{}", ordering_key="conv:a")
    assert isinstance(future.exception(timeout=10), NotBuilt)


def publish_from_upload_function(env: dict) -> None:
    from uploads.handler import Runtime
    from uploads.settings import Settings

    runtime = Runtime(Settings.from_env({**BASE, **env}), firestore_client=mock.Mock(), storage_client=mock.Mock(),
                      signer=mock.Mock())
    transport = runtime.finalizer.bus.transport
    future = transport.publisher.publish(transport.topic_path, b"{}", ordering_key="conv:a")
    assert isinstance(future.exception(timeout=10), NotBuilt)
    runtime.runner.close()


def publish_from_ai_function(env: dict) -> None:
    from aistream.handler import build_runtime
    from aistream.settings import Settings

    runtime = build_runtime(Settings.from_env({**BASE, **env}), firestore_client=mock.Mock(),
                            storage_client=mock.Mock(), provider=mock.Mock())
    try:
        transport = runtime.generator.bus.transport
        future = transport.publisher.publish(transport.topic_path, b"{}", ordering_key="conv:a")
        assert isinstance(future.exception(timeout=10), NotBuilt)
        with pytest.raises(NotBuilt):  # the readiness call (get_topic) goes through the sync client
            transport.check()
    finally:
        runtime.runner.close()


PUBLISHERS = {"socket_service": publish_from_socket_service, "upload": publish_from_upload_function,
              "ai_stream": publish_from_ai_function}


@pytest.mark.parametrize("deployable", PUBLISHERS)
def test_publishers_use_the_regional_endpoint(constructors, deployable):
    PUBLISHERS[deployable]({"PUBSUB_REGION": "europe-west1"})
    made = constructors["PublisherClient"] + constructors["PublisherAsyncClient"]
    assert made, "a publisher client was built"
    assert [endpoint(kwargs) for kwargs in made] == ["europe-west1-pubsub.googleapis.com:443"] * len(made)
    if deployable == "ai_stream":
        assert constructors["PublisherAsyncClient"], "the asyncio publisher's channel too"


@pytest.mark.parametrize("deployable", PUBLISHERS)
@pytest.mark.parametrize("env", [{}, {"PUBSUB_REGION": ""}], ids=["unset", "empty"])
def test_publishers_use_the_global_endpoint_without_a_region(constructors, deployable, env):
    PUBLISHERS[deployable](env)
    made = constructors["PublisherClient"] + constructors["PublisherAsyncClient"]
    assert made and [endpoint(kwargs) for kwargs in made] == [None] * len(made)


@pytest.mark.parametrize("deployable", ["socket_service", "upload"])
def test_the_emulator_wins_over_the_region(constructors, monkeypatch, deployable):
    # The emulator host is read by google-cloud-pubsub itself, from the process environment.
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:1")
    PUBLISHERS[deployable]({"PUBSUB_REGION": "europe-west1", "PUBSUB_EMULATOR_HOST": "127.0.0.1:1"})
    made = constructors["PublisherClient"]
    assert made and [endpoint(kwargs) for kwargs in made] == [None] * len(made)


@pytest.mark.parametrize("region", ["europe-west1", "us-central1", "northamerica-northeast2", "me-central2",
                                    "asia-southeast1", "africa-south1"])
def test_region_ids_are_accepted(region):
    from socket_service.settings import Settings

    assert Settings.from_env({**BASE, "PUBSUB_REGION": f" {region} "}).gcp.pubsub_region == region


@pytest.mark.parametrize("region", ["Europe-West1", "europe west1", "europe-west1.evil.example", "evil.example/x",
                                    "us-central1:443", "https://europe-west1", "global", "europe", "-west1",
                                    "europe-west1-pubsub.googleapis.com"])
@pytest.mark.parametrize("module", ["socket_service.settings", "uploads.settings", "aistream.settings"])
def test_garbage_regions_are_refused(region, module):
    import importlib

    settings_class = importlib.import_module(module).Settings
    with pytest.raises(ConfigError, match="PUBSUB_REGION"):
        settings_class.from_env({**BASE, "PUBSUB_REGION": region})
