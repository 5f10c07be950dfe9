"""Names of every topic, subscription and bucket, loaded from ``topology.json``.

The same JSON file is read by Terraform (``jsondecode(file(...))``), so the
local stack and production cannot disagree about a name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

TOPOLOGY_FILE = Path(__file__).with_name("topology.json")


@dataclass(frozen=True)
class PushSubscription:
    name: str
    topic: str
    target: str  # the functions-framework target this subscription feeds
    ack_deadline_seconds: int
    dead_letter_topic: str
    max_delivery_attempts: int


@dataclass(frozen=True)
class PullSubscription:
    name: str
    topic: str


@dataclass(frozen=True)
class InstanceSubscription:
    """Template of the subscriptions each socket-service instance creates for itself.

    One on ``topic`` (its peers' topic: the other instances' emits and manager
    commands) and, when ``function_events_topic`` is set, one on the functions'
    topic, from which only the functions' emits are obeyed (bus/policy.py; bus/wiring.py turns
    this template into the bus library's ``SubscriptionTemplate``).
    """

    topic: str
    name_prefix: str
    expiration_ttl_seconds: int
    message_retention_seconds: int
    ack_deadline_seconds: int
    function_events_topic: str | None = None
    function_events_name_prefix: str | None = None


@dataclass(frozen=True)
class Topology:
    chat_events_topic: str  # the socket-service instances' bus: only they publish on it
    function_events_topic: str  # the functions' emits to rooms: only the functions publish on it
    ai_requests_topic: str
    gcs_uploads_topic: str
    topics: tuple[str, ...]
    push_subscriptions: tuple[PushSubscription, ...]
    pull_subscriptions: tuple[PullSubscription, ...]
    instance_subscription: InstanceSubscription
    uploads_bucket: str


@lru_cache(maxsize=1)
def load() -> Topology:
    raw = json.loads(TOPOLOGY_FILE.read_text())
    topics = raw["topics"]
    return Topology(
        chat_events_topic=topics["chat_events"],
        function_events_topic=topics["function_events"],
        ai_requests_topic=topics["ai_requests"],
        gcs_uploads_topic=topics["gcs_uploads"],
        topics=tuple(topics.values()),
        push_subscriptions=tuple(PushSubscription(**s) for s in raw["push_subscriptions"]),
        pull_subscriptions=tuple(PullSubscription(**s) for s in raw["pull_subscriptions"]),
        instance_subscription=InstanceSubscription(**_fields(raw["instance_subscription"])),
        uploads_bucket=raw["buckets"]["uploads"],
    )


def _fields(entry: dict) -> dict:
    """An entry of the file without its ``_comment``s."""
    return {key: value for key, value in entry.items() if not key.startswith("_")}
