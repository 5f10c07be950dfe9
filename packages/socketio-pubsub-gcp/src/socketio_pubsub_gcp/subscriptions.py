"""What each listening manager subscribes to: ``SubscriptionTemplate`` and ``FilteredTopic``.

A listening manager creates its own subscriptions at start-up, named after its
host id, and deletes them when it closes. The template says how they are made;
the application's topology (names, filters, lifetimes) arrives here as
constructor arguments, never as a global.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class FilteredTopic:
    """Another topic an instance listens to, from which it obeys only what ``accept`` admits.

    Every manager message an instance receives is obeyed (an emit to any room,
    disconnect, enter_room, close_room...), so a topic that processes other than
    the servers may publish on should be listened to through a filter:
    ``accept(message) -> bool`` gets each decoded manager message (a dict with
    ``method``, ``event``, ``room``, ...) and returns True to obey it. What it
    refuses is dropped with a rate-limited WARNING.

    :param topic: the topic's id (not its path), in the manager's project.
    :param name_prefix: the subscription of an instance is ``name_prefix + host_id``.
    :param accept: the filter; it runs on a client thread and must not block.
    """

    topic: str
    name_prefix: str
    accept: Callable[[dict], bool] = field(compare=False)


@dataclass(frozen=True)
class SubscriptionTemplate:
    """How a listening manager creates its subscriptions.

    One subscription on the manager's own topic, named ``name_prefix + host_id``,
    from which everything is obeyed except this instance's own messages (a
    subscription filter drops them: they were delivered locally already), plus
    one on each of ``filtered_topics``. All have message ordering on and the
    same deadlines.

    :param name_prefix: prefix of the subscription on the manager's own topic.
    :param expiration_ttl_seconds: Pub/Sub deletes a subscription nobody pulled
                                   from for this long (a crashed instance's);
                                   at least 86400 (one day), Pub/Sub's minimum.
    :param message_retention_seconds: how long an unacknowledged message is kept
                                      (600 to 604800).
    :param ack_deadline_seconds: the subscriptions' acknowledgement deadline
                                 (10 to 600).
    :param filtered_topics: other topics to listen to, each through its filter.
    """

    name_prefix: str
    expiration_ttl_seconds: int = 86400
    message_retention_seconds: int = 600
    ack_deadline_seconds: int = 10
    filtered_topics: tuple[FilteredTopic, ...] = ()
