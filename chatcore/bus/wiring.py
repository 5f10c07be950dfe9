"""The chat's managers of the room bus, made from the topology (``topology.json``) and the policy.

- the socket service: ``instance_manager`` publishes on ``chat-events`` and
  listens there and, through ``policy.is_function_emit``, on
  ``chat-events-functions``;
- the functions: ``function_emitter``, write-only on ``chat-events-functions``.
"""

from __future__ import annotations

import logging

from socketio_pubsub_gcp import AsyncGooglePubSubManager, FilteredTopic, GooglePubSubManager, SubscriptionTemplate

from .. import topology
from .policy import is_function_emit


def instance_template(topo: topology.Topology | None = None) -> SubscriptionTemplate:
    """Each instance's subscriptions: on its peers' topic, and on the functions' through the chat's filter."""
    sub = (topo or topology.load()).instance_subscription
    filtered = ()
    if sub.function_events_topic:
        filtered = (FilteredTopic(sub.function_events_topic, sub.function_events_name_prefix, is_function_emit),)
    return SubscriptionTemplate(name_prefix=sub.name_prefix, expiration_ttl_seconds=sub.expiration_ttl_seconds,
                                message_retention_seconds=sub.message_retention_seconds,
                                ack_deadline_seconds=sub.ack_deadline_seconds, filtered_topics=filtered)


def instance_manager(project_id: str, *, pack_window: float, publisher=None, subscriber=None,
                     topo: topology.Topology | None = None) -> AsyncGooglePubSubManager:
    """The socket service's manager (its subscriptions are created by ``start()``)."""
    topo = topo or topology.load()
    return AsyncGooglePubSubManager(project_id, topo.chat_events_topic, subscription=instance_template(topo),
                                    pack_window=pack_window, publisher=publisher, subscriber=subscriber,
                                    logger=logging.getLogger("chatcore.bus"))


def function_emitter(project_id: str, *, publisher=None) -> GooglePubSubManager:
    """A function's write-only manager, on the functions' own topic."""
    return GooglePubSubManager(project_id, topology.load().function_events_topic, write_only=True,
                               publisher=publisher)
