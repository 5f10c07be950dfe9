"""Builds the socket service: ``create_app(settings, ...)`` returns an aiohttp app.

Google Cloud clients are created here, once, unless the caller injects them
(tests, benchmarks).

Start-up creates this instance's bus subscriptions before the port opens, as a
rule. If Pub/Sub refuses (or does not answer within BUS_FIRST_ATTEMPT_SECONDS),
the port opens anyway and the creation is retried in the background, with
jittered exponential backoff, for up to BUS_STARTUP_RETRY_SECONDS (a WARNING
per refusal). On a fresh deployment IAM
grants take minutes to apply, and until then Pub/Sub answers PermissionDenied
(or NotFound for a topic not yet visible); exiting would only crash-loop the
revision. Meanwhile liveness (``/health``) answers 200, so the startup and
liveness probes let the instance live; readiness (``/ready``) answers 503, and
Socket.IO connections are refused with 503 and ``Retry-After`` (a client
connected before the subscriptions exist would miss the other instances'
emits; clients retry by themselves). Past the bound the instance gives up:
``/health`` answers 503 and ``on_fatal`` is called (``python -m
socket_service`` stops with exit status 1, and Cloud Run starts a new one).

Once subscribed, the instance keeps a heartbeat in Firestore and deletes the
subscriptions that stopped instances left behind (chatcore/store/instances.py).

Shutdown (SIGTERM) marks the instance not ready, disconnects its clients so
they reconnect elsewhere, and deletes the subscriptions, then its heartbeat,
all within SHUTDOWN_GRACE_SECONDS even when the backends are unreachable (what
does not fit is abandoned, with a WARNING).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import timedelta

import socketio
from aiohttp import web
from google.cloud import firestore, storage
from socketio_pubsub_gcp import Publisher, backoff

from chatcore import protocol, topology
from chatcore.ai_requests import AiRequest
from chatcore.bus import wiring
from chatcore.errors import Unavailable
from chatcore.identity.auth import TokenVerifier
from chatcore.identity.signing import UrlSigner
from chatcore.runtime import tuning
from chatcore.store.conversations import ChatStore
from chatcore.store.instances import InstanceRegistry, sweep_abandoned
from chatcore.store.profiles import ProfileStore
from chatcore.store.replies import ABANDONED, ReplyStore

from . import http_api
from .frames import ChatServer
from .headers import security_headers, security_headers_middleware
from .lists import ListUpdates
from .realtime import ChatNamespace
from .settings import Settings
from .ui import add_ui_routes

logger = logging.getLogger(__name__)


class AiRequestPublisher:
    """Hands a reply request to the AI function through the ``ai-requests`` topic.

    The call returns once the request is queued; the publish (with the
    client's own retries, up to a minute) is settled in the background. If
    Pub/Sub refuses it, the reply is marked failed and the room is told, so
    nobody waits for it forever. ``send_message`` used to await the publish:
    with Pub/Sub frozen or down, its ack came at the request deadline as
    ``unavailable`` ("nothing was changed") although the message was stored
    and its reply followed later (tests/integration/test_bus_faults.py).
    """

    def __init__(self, publisher: Publisher, project_id: str, topic: str,
                 store: ChatStore, sio: socketio.AsyncServer):
        self.publisher = publisher
        self.topic_path = f"projects/{project_id}/topics/{topic}"
        self.store = store
        self.sio = sio
        self._in_flight: set[asyncio.Task] = set()

    async def __call__(self, request: AiRequest) -> None:
        try:
            future = self.publisher.publish(self.topic_path, request.encode(), **request.attributes())
        except Exception as exc:
            await self._failed(request, exc)
            return
        task = asyncio.ensure_future(self._settle(request, future))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _settle(self, request: AiRequest, future) -> None:
        # The publisher settles every future within its retry deadline plus one RPC;
        # the bound here only makes sure no request is waited for beyond that.
        bound = self.publisher.retry_deadline + self.publisher.rpc_timeout + 5
        try:
            await asyncio.wait_for(asyncio.wrap_future(future), bound)
        except Exception as exc:  # TimeoutError included
            await self._failed(request, exc)

    async def _failed(self, request: AiRequest, exc: BaseException) -> None:
        logger.error("could not publish AI request for %s: %s", request.message_id, exc)
        try:
            failed = await self.store.fail_reply(request.conversation_id, request.message_id, "unavailable",
                                                 "the AI service could not be reached")
        except Exception as error:  # the stale-reply sweeper fails it later
            logger.warning("could not mark reply %s failed: %r", request.message_id, error)
            return
        if failed:
            await self.sio.emit(protocol.AI_RESPONSE_ERROR, protocol.ai_error_payload(
                request.conversation_id, request.message_id, "unavailable",
                "the AI service could not be reached"), room=protocol.conversation_room(request.conversation_id))

    async def drain(self) -> None:
        """Wait for the requests still being published (at shutdown, within its deadline)."""
        while self._in_flight:
            await asyncio.wait(set(self._in_flight))  # unlike gather, a time-out here cancels none of them


# Left for on_cleanup (closing the Firestore client) when the bus closes at the deadline.
CLEANUP_RESERVE_SECONDS = 0.5
# Left for deleting the heartbeat once the subscriptions are gone.
HEARTBEAT_RESERVE_SECONDS = 0.5
# Subscribing at start-up: waits between attempts double from this, jittered, up to the maximum.
BUS_STARTUP_INITIAL_BACKOFF = 1.0
BUS_STARTUP_MAX_BACKOFF = 30.0
# Start-up waits this long at most for the first attempt to subscribe before the port opens: usually it
# succeeds at once, and the instance serves subscribed from the start; a refusal (or a hang) goes on in the
# background while the port serves. Well below Cloud Run's startup probe (60 s in infra/terraform/run.tf).
BUS_FIRST_ATTEMPT_SECONDS = 10.0
# The sweep of stopped instances' subscriptions at start-up takes at most this long.
INSTANCE_SWEEP_SECONDS = 60.0


def bus_gate_middleware(state: dict):
    """Socket.IO requests get 503 (``unavailable``, ``Retry-After``) until the bus is subscribed."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        if not state.get("bus_subscribed") and request.path.startswith("/socket.io"):
            raise Unavailable("this instance is not connected to the room bus yet; retry shortly", retry_after=2)
        return await handler(request)

    return middleware


async def _within(awaitable, seconds: float, what: str) -> None:
    """Await a shutdown step for at most ``seconds``; a step that overruns or fails is abandoned, with a WARNING."""
    try:
        await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        logger.warning("shutdown: %s took longer than %.1fs; abandoned", what, seconds)
    except Exception as exc:
        logger.warning("shutdown: %s failed (%r); going on", what, exc)


def create_app(settings: Settings, *, firestore_client=None, publisher=None, subscriber=None,
               verifier: TokenVerifier | None = None, storage_client=None,
               signer: UrlSigner | None = None, on_fatal: Callable[[], None] | None = None) -> web.Application:
    """The service. ``on_fatal`` is called if the bus cannot be subscribed within BUS_STARTUP_RETRY_SECONDS."""
    topo = topology.load()
    db = firestore_client or firestore.AsyncClient(project=settings.gcp.project_id,
                                                   database=settings.gcp.firestore_database)
    store = ChatStore(db)
    # Every publish goes to one region's endpoint when PUBSUB_REGION is set (ordering keys need one region).
    publisher = publisher or Publisher(client_options=settings.gcp.pubsub_client_options)
    bus = wiring.instance_manager(settings.gcp.project_id, pack_window=settings.bus_pack_window_ms / 1000,
                                  publisher=publisher, subscriber=subscriber, topo=topo)
    # A python-socketio AsyncServer that closes connections sending malformed frames,
    # and those not authenticated within AUTH_TIMEOUT_SECONDS (frames.py).
    sio = ChatServer(
        async_mode="aiohttp", client_manager=bus, cors_allowed_origins=list(settings.cors_allowed_origins)
        if "*" not in settings.cors_allowed_origins else "*",
        max_http_buffer_size=settings.max_http_buffer_size, logger=False, engineio_logger=False,
        malformed_warnings=settings.malformed_frame_warnings, malformed_window=settings.malformed_frame_window_seconds,
        auth_timeout=settings.auth_timeout_seconds)
    verifier = verifier or TokenVerifier(settings.auth)
    ai_requests = AiRequestPublisher(bus.transport.publisher, settings.gcp.project_id, topo.ai_requests_topic,
                                     store, sio)
    profiles = ProfileStore(db)
    lists = ListUpdates(sio, profiles)
    sio.register_namespace(ChatNamespace(settings, store, verifier, ai_requests, profiles=profiles, lists=lists))

    state = {"bus": bus, "shutting_down": False, "bus_subscribed": False, "bus_status": "not subscribed yet"}
    app = web.Application(middlewares=[security_headers_middleware(security_headers(settings)),
                                       http_api.cors_middleware(settings.cors_allowed_origins),
                                       http_api.error_middleware, bus_gate_middleware(state)],
                          client_max_size=1024 * 1024)
    app[http_api.SETTINGS] = settings
    app[http_api.STORE] = store
    app[http_api.VERIFIER] = verifier
    app[http_api.SIO] = sio
    app[http_api.STATE] = state
    app[http_api.PROFILES] = profiles
    app[http_api.LISTS] = lists
    # Files: signed download URLs in the history, and deletion with the conversation.
    app[http_api.STORAGE] = storage_client or storage.Client(project=settings.gcp.project_id)
    app[http_api.SIGNER] = signer or UrlSigner(settings.signing, settings.uploads_bucket)
    sio.attach(app)
    http_api.add_routes(app, settings)
    add_ui_routes(app, settings)

    replies = ReplyStore(store)
    registry = InstanceRegistry(db, bus.host_id)

    async def sweep_stale_replies() -> None:
        """Fail replies abandoned by a crashed worker, or never picked up, so no client waits forever."""
        stale_after = timedelta(seconds=settings.reply_stale_seconds)
        pending_after = timedelta(seconds=settings.reply_pending_stale_seconds)
        while True:
            await asyncio.sleep(settings.reply_sweep_seconds)
            try:
                for reply in await replies.fail_stale(stale_after, pending_after):
                    if reply.status == protocol.PENDING:
                        logger.warning("reply %s was not picked up by the AI function within %ss; marked failed",
                                       reply.id, settings.reply_pending_stale_seconds)
                    else:
                        logger.warning("reply %s had no heartbeat for %ss; marked failed", reply.id,
                                       settings.reply_stale_seconds)
                    await sio.emit(protocol.AI_RESPONSE_ERROR, protocol.ai_error_payload(
                        reply.conversation_id, reply.id, ABANDONED["code"], ABANDONED["message"]),
                        room=protocol.conversation_room(reply.conversation_id))
            except Exception:
                logger.exception("stale reply sweep failed; will retry")

    async def subscribe(first_attempt: asyncio.Event) -> None:
        """Heartbeat, then this instance's subscriptions; retried while refused, up to BUS_STARTUP_RETRY_SECONDS."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.bus_startup_retry_seconds
        attempt = 0
        while True:
            try:
                # The heartbeat first: a peer that can see the subscriptions can see it (instances.py).
                await registry.beat()
                await bus.start()
                break
            except Exception as exc:
                first_attempt.set()
                attempt += 1
                state["bus_status"] = f"not subscribed yet (attempt {attempt}: {type(exc).__name__})"
                left = deadline - loop.time()
                if left <= 0:
                    state["bus_failed"] = True
                    logger.error("room bus: could not subscribe within BUS_STARTUP_RETRY_SECONDS (%gs, %d attempts), "
                                 "giving up: %s: %s", settings.bus_startup_retry_seconds, attempt,
                                 type(exc).__name__, exc)
                    if on_fatal is not None:
                        on_fatal()
                    return
                delay = min(left, backoff(attempt - 1, BUS_STARTUP_INITIAL_BACKOFF, BUS_STARTUP_MAX_BACKOFF))
                logger.warning("room bus: could not subscribe (attempt %d: %s: %s); retrying in %.1fs, for %.0fs "
                               "more (a new deployment's IAM grants can take minutes to apply)", attempt,
                               type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "", delay, left)
                await asyncio.sleep(delay)
        state["bus_subscribed"], state["bus_status"] = True, "ok"
        first_attempt.set()
        logger.info("room bus subscribed (subscription %s) after %d refused attempts", bus.transport.subscription_path,
                    attempt)
        state["heartbeat"] = asyncio.create_task(keep_heartbeat())
        state["instance_sweep"] = asyncio.create_task(sweep_abandoned(
            bus.transport, registry, timedelta(seconds=settings.instance_stale_seconds), INSTANCE_SWEEP_SECONDS))

    async def keep_heartbeat() -> None:
        while True:
            await asyncio.sleep(settings.instance_heartbeat_seconds)
            try:
                await registry.beat(timeout=min(10.0, settings.instance_heartbeat_seconds))
            except Exception as exc:
                logger.warning("instance heartbeat not written: %s: %s", type(exc).__name__, exc)

    async def on_startup(app: web.Application) -> None:
        # The port opens once the first attempt is over (or after BUS_FIRST_ATTEMPT_SECONDS): subscribed
        # as a rule; if refused, serving liveness while the retries go on in the background.
        first_attempt = asyncio.Event()
        state["subscribing"] = asyncio.create_task(subscribe(first_attempt))
        try:
            await asyncio.wait_for(first_attempt.wait(), BUS_FIRST_ATTEMPT_SECONDS)
        except TimeoutError:
            logger.warning("room bus: no answer to the first subscription attempt within %gs; serving meanwhile "
                           "(not ready)", BUS_FIRST_ATTEMPT_SECONDS)
        state["sweeper"] = asyncio.create_task(sweep_stale_replies())
        tuning.tune(settings.gc_tuning)
        logger.info("socket service ready on %s:%s (bus: %s)", settings.host, settings.port, state["bus_status"])

    async def on_shutdown(app: web.Application) -> None:
        # Every step shares one deadline, SHUTDOWN_GRACE_SECONDS after SIGTERM,
        # and what does not fit is abandoned with a WARNING. With Pub/Sub
        # unreachable, the bus's flush and subscription deletion would
        # otherwise retry for a minute or more (Cloud Run SIGKILLs after 10 s).
        loop = asyncio.get_running_loop()
        grace = settings.shutdown_grace_seconds
        deadline = loop.time() + grace

        def left() -> float:
            return max(0.0, deadline - loop.time())

        state["shutting_down"] = True
        for name in ("subscribing", "sweeper", "heartbeat", "instance_sweep"):
            task = state.get(name)
            if task is not None:
                task.cancel()
        sids = [sid for sid, _ in bus.get_participants("/", None)]
        logger.info("shutting down: disconnecting %d clients", len(sids))
        # ignore_queue: these clients are ours; telling the bus would cost one
        # message per client for nothing. Local work: a quarter of the grace at most.
        disconnects = asyncio.gather(*(sio.disconnect(sid, ignore_queue=True) for sid in sids), return_exceptions=True)
        await _within(disconnects, min(grace / 4, left()), f"disconnecting {len(sids)} clients")
        await _within(sio.shutdown(), min(grace / 4, left()), "closing the Socket.IO server")
        # Requests of messages already stored: a lost one leaves its reply pending until the stale sweep.
        await _within(ai_requests.drain(), min(grace / 4, left()), "publishing AI requests")
        await _within(profiles.close(), min(1.0, left()), "stopping profile writes")
        # The bus gets the rest, less a moment for the heartbeat and for on_cleanup.
        gone = await bus.close(timeout=max(0.0, left() - CLEANUP_RESERVE_SECONDS - HEARTBEAT_RESERVE_SECONDS))
        if gone:
            # Only once the subscriptions are gone: a heartbeat left behind (stale soon) lets the next
            # instance that starts delete what this one could not (chatcore/store/instances.py).
            await _within(registry.forget(timeout=max(0.1, left() - CLEANUP_RESERVE_SECONDS)),
                          max(0.0, left() - CLEANUP_RESERVE_SECONDS), "removing the instance heartbeat")

    async def on_cleanup(app: web.Application) -> None:
        db.close()

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app
