"""Which socket-service instances are alive, and the bus subscriptions of those that are not.

Each instance creates two subscriptions at start-up (``chat-events-instance-<host id>``
and ``chat-events-functions-instance-<host id>``) and deletes them on SIGTERM.
An instance that crashes (SIGKILL, out of memory, a host failure) leaves them
behind, and they receive every bus message until their 24 h expiration policy
removes them: a cost per message and per leftover, for a day.

To tell a crashed instance's subscriptions from a live peer's, each instance
keeps a heartbeat, the Firestore document ``instances/{host id}`` with
``heartbeat_at`` (the server's time), written:

- *before* its subscriptions are created, so a peer that can see them can see the heartbeat;
- every ``INSTANCE_HEARTBEAT_SECONDS`` while it runs;
- and deleted on shutdown only *after* its subscriptions were deleted.

So a subscription whose instance has no heartbeat document, or one older than
``INSTANCE_STALE_SECONDS`` (many heartbeats missed), belongs to no live
instance. At start-up each instance lists the project's subscriptions and
deletes those (``sweep_abandoned``), then their heartbeat document. A peer
that was only stalled for that long (its event loop or Firestore stuck) loses
its subscriptions, sees them vanish, creates them again and has its clients
re-join (async_pubsub_manager.py), as after any lost subscription: no message
of the bus is ever obeyed twice, and the clients re-sync.

The sweep is bounded in time, and its failures (Pub/Sub or Firestore refusing,
``pubsub.subscriptions.list`` not granted yet) are logged and never stop the
instance: the leftovers then expire on their own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from google.api_core import exceptions as gexc
from google.cloud import firestore
from socketio_pubsub_gcp.pubsub_transport import PubSubTransport

from .conversations import utcnow

logger = logging.getLogger(__name__)

INSTANCES = "instances"


class InstanceRegistry:
    """This instance's heartbeat document, and what the others' say."""

    def __init__(self, db: firestore.AsyncClient, host_id: str):
        self.db = db
        self.host_id = host_id

    def _ref(self, host_id: str):
        return self.db.collection(INSTANCES).document(host_id)

    async def beat(self, timeout: float = 10.0) -> None:
        await self._ref(self.host_id).set({"heartbeat_at": firestore.SERVER_TIMESTAMP}, timeout=timeout)

    async def forget(self, timeout: float = 5.0) -> None:
        """Delete this instance's heartbeat (once its subscriptions are gone)."""
        await self._ref(self.host_id).delete(timeout=timeout)

    async def heartbeat_of(self, host_id: str, timeout: float = 10.0):
        """The peer's heartbeat document (a snapshot; ``exists`` False when there is none)."""
        return await self._ref(host_id).get(timeout=timeout)

    async def forget_peer(self, snapshot, timeout: float = 10.0) -> None:
        """Delete a peer's stale heartbeat, unless it beat again since ``snapshot`` was read."""
        try:
            await snapshot.reference.delete(option=self.db.write_option(last_update_time=snapshot.update_time),
                                            timeout=timeout)
        except (gexc.FailedPrecondition, gexc.NotFound):
            pass  # it beat again (or was deleted meanwhile): not ours to remove


@dataclass
class SweepResult:
    deleted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # live peers'
    failed: list[str] = field(default_factory=list)


def _last_beat(snapshot) -> datetime | None:
    if not snapshot.exists:
        return None
    beat = (snapshot.to_dict() or {}).get("heartbeat_at")
    return beat if isinstance(beat, datetime) else None


async def sweep_abandoned(transport: PubSubTransport, registry: InstanceRegistry, stale_after: timedelta,
                          timeout: float = 60.0) -> SweepResult:
    """Delete the subscriptions of instances with no heartbeat, or none for ``stale_after``; never raises.

    Everything happens within ``timeout`` seconds; what does not fit is left
    for the next instance that starts (or for the expiration policy).
    """
    deadline = time.monotonic() + timeout
    result = SweepResult()

    def left() -> float:
        return max(0.0, deadline - time.monotonic())

    try:
        peers = await asyncio.to_thread(transport.peer_subscriptions, min(30.0, left()))
    except Exception as exc:
        logger.warning("could not list the bus subscriptions to remove those of stopped instances: %s; "
                       "they expire on their own", _summary(exc))
        return result
    for host_id, paths in sorted(peers.items()):
        if left() <= 0:
            logger.warning("sweep of stopped instances' subscriptions out of time; %d instances left for later",
                           len(peers))
            break
        try:
            snapshot = await registry.heartbeat_of(host_id, timeout=min(10.0, left()))
            beat = _last_beat(snapshot)
            if beat is not None and beat > utcnow() - stale_after:
                result.kept.extend(paths)
                continue
            gone = True
            for path in paths:
                if await asyncio.to_thread(transport.delete_peer_subscription, path, min(10.0, left())):
                    result.deleted.append(path)
                    logger.warning("deleted subscription %s of instance %s (%s)", path, host_id,
                                   "no heartbeat" if beat is None else f"last heartbeat {beat.isoformat()}")
                else:
                    gone = False
                    result.failed.append(path)
            if gone and snapshot.exists:
                await registry.forget_peer(snapshot, timeout=min(10.0, left()) or 0.1)
        except Exception as exc:
            result.failed.extend(p for p in paths if p not in result.deleted)
            logger.warning("could not check or remove the subscriptions of instance %s: %s", host_id, _summary(exc))
    logger.info("bus subscriptions of stopped instances: %d deleted, %d of live instances kept, %d left",
                len(result.deleted), len(result.kept), len(result.failed))
    return result


def _summary(error: BaseException) -> str:
    text = str(error).splitlines()[0][:200] if str(error) else ""
    return f"{type(error).__name__}: {text}"
