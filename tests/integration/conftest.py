"""Fixtures shared by the integration tests of the room bus on the Pub/Sub emulator."""

from __future__ import annotations

import uuid

import pytest
from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1


@pytest.fixture(scope="module")
def admin(stack):
    publisher = pubsub_v1.PublisherClient()
    subscriber = pubsub_v1.SubscriberClient()
    yield publisher, subscriber
    subscriber.close()


@pytest.fixture
def topic(stack, admin):
    publisher, _ = admin
    name = f"bus-test-{uuid.uuid4().hex[:12]}"
    path = publisher.topic_path(stack.project_id, name)
    publisher.create_topic(name=path)
    yield name
    try:
        publisher.delete_topic(topic=path)
    except gexc.NotFound:
        pass
