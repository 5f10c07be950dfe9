"""Pub/Sub publishing from one asyncio event loop, with no thread at all.

``publisher.Publisher`` makes its ``Publish`` RPCs from sender
threads. In a process whose emits all come from one busy event loop (the AI
function streams dozens of replies on one loop), every message then crosses
to a thread and back, and each sender waits for the GIL behind the loop, both
before its RPC and after it; at most ``max_in_flight`` RPCs run at once.
``AsyncPublisher`` keeps the same contract and the same per-key rules
(``KeyedBatches``: one RPC in flight per ordering key, what arrives meanwhile
goes in the key's next RPC, transient errors retried with backoff until
``retry_deadline``) and makes the RPCs with gRPC's asyncio API on that loop.
With 50 replies streaming in one process (bench/ai_stream.py) the p99 from
emit to publish acknowledged fell from 59-79 ms to 20-38 ms and the process
used 54-70% of a core instead of 72-76% (docs/PERFORMANCE.md).

``publish`` returns a ``concurrent.futures.Future`` like ``Publisher``'s, so
callers need not know which one they have. It may be called from the loop's
thread (the RPC starts at once) or from any other thread (it is handed to the
loop). The gRPC channel is created on the loop, on first use: the emulator's
when ``PUBSUB_EMULATOR_HOST`` is set, as google-cloud-pubsub does, else
Pub/Sub's with Application Default Credentials.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import Future

import grpc

from .publisher import _REQUEST, _RESPONSE, PUBLISH_METHOD, KeyedBatches, PublisherClientOwner


async def default_channel(client_options: dict | None = None) -> grpc.aio.Channel:
    """The emulator's channel if ``PUBSUB_EMULATOR_HOST`` is set, else Pub/Sub's, authenticated.

    ``client_options`` (a regional endpoint) are given to Pub/Sub's client.
    Finding the credentials may ask the metadata server over HTTP: that runs
    in a thread, so the replies already streaming on the loop do not stall."""
    host = os.environ.get("PUBSUB_EMULATOR_HOST")
    if host:
        return grpc.aio.insecure_channel(host)
    import google.auth
    from google.pubsub_v1.services import publisher as gapic_publisher
    credentials, _ = await asyncio.to_thread(google.auth.default)
    if client_options:
        client = gapic_publisher.PublisherAsyncClient(credentials=credentials, client_options=client_options)
    else:
        client = gapic_publisher.PublisherAsyncClient(credentials=credentials)
    return client.transport.grpc_channel


class AsyncPublisher(KeyedBatches, PublisherClientOwner):
    """``Publisher``'s contract on one event loop: ``loop`` is where the RPCs run and the futures settle.

    ``channel_factory`` (a coroutine function, awaited on the loop before the
    first RPC) replaces ``default_channel``; tests point it at a local server.
    The synchronous ``PublisherClient`` serves only ``get_topic`` (readiness
    checks, rare and synchronous). Both get ``client_options`` (a regional
    endpoint, ``GcpConfig.pubsub_client_options``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *,
                 channel_factory: Callable[[], Awaitable[grpc.aio.Channel]] | None = None,
                 rpc_timeout: float = 60.0, retry_deadline: float = 60.0, initial_backoff: float = 0.1,
                 max_backoff: float = 5.0, client_options: dict | None = None):
        KeyedBatches.__init__(self, rpc_timeout, retry_deadline, initial_backoff, max_backoff)
        PublisherClientOwner.__init__(self, client_options=client_options)
        self.loop = loop
        self._channel_factory = channel_factory or (lambda: default_channel(client_options))
        self._aio_channel: grpc.aio.Channel | None = None
        self._publish_rpc = None
        self._connecting: asyncio.Task | None = None  # the first RPCs all wait for one channel
        self._senders: set[asyncio.Task] = set()  # strong references: the loop keeps only weak ones

    def publish(self, topic: str, data: bytes, ordering_key: str = "", **attributes: str) -> Future:
        if not isinstance(data, bytes):
            raise TypeError("data must be bytes")
        future: Future = Future()
        item = (data, attributes, future)
        if self._on_loop():
            self._queue((topic, ordering_key), item)
        elif self.loop.is_running():
            self.loop.call_soon_threadsafe(self._queue, (topic, ordering_key), item)
        else:  # nothing would ever send it
            future.set_exception(RuntimeError("the publisher's event loop is not running"))
        return future

    async def aclose(self) -> None:
        """Wait for the RPCs in flight, then close the channel (on the loop)."""
        while self._senders:
            await asyncio.gather(*self._senders, return_exceptions=True)
        if self._aio_channel is not None:
            channel, self._aio_channel, self._publish_rpc = self._aio_channel, None, None
            await channel.close()

    # -- on the loop ---------------------------------------------------
    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self.loop
        except RuntimeError:
            return False

    def _queue(self, key: tuple[str, str], item: tuple) -> None:
        if self._enqueue(key, item):
            task = self.loop.create_task(self._send_key(key))
            self._senders.add(task)
            task.add_done_callback(self._senders.discard)

    async def _send_key(self, key: tuple[str, str]) -> None:
        """Send the key's batches one RPC at a time until nothing is waiting."""
        while True:
            batch = self._next_batch(key)
            try:
                message_ids, error = await self._send(key, batch)
            except BaseException as exc:  # the loop is closing, or a bug: never leave the key busy and unsent
                closing = isinstance(exc, asyncio.CancelledError)
                self._abandon(key, batch, RuntimeError("the publisher's event loop closed") if closing else exc)
                raise
            more = self._key_done(key)
            self._settle(batch, message_ids, error)
            if not more:
                return

    async def _rpc(self):
        """The Publish stub, once the channel exists; the first RPCs all wait for one connection."""
        if self._publish_rpc is None:
            connecting = self._connecting
            if connecting is None or (connecting.done() and (connecting.cancelled() or connecting.exception())):
                connecting = self._connecting = self.loop.create_task(self._channel_factory())
            channel = await asyncio.shield(connecting)  # a failure reaches every waiter; the next RPC retries
            if self._publish_rpc is None:
                self._aio_channel = channel
                self._publish_rpc = channel.unary_unary(PUBLISH_METHOD, request_serializer=_REQUEST.SerializeToString,
                                                        response_deserializer=_RESPONSE.FromString)
        return self._publish_rpc

    async def _send(self, key: tuple[str, str], batch: list) -> tuple[list[str], BaseException | None]:
        """One batch, retried while the error is transient: ``(message_ids, error)``."""
        try:
            request, metadata, deadline = self._prepared(key, batch)
        except Exception as exc:
            return [], exc
        attempt = 0
        while True:
            try:  # CancelledError is not an Exception: it goes through
                rpc = await self._rpc()
                return list((await rpc(request, timeout=self.rpc_timeout, metadata=metadata)).message_ids), None
            except Exception as exc:  # grpc.aio.AioRpcError is a grpc.RpcError
                outcome = self._after_error(exc, attempt, deadline)
            if isinstance(outcome, BaseException):
                return [], outcome
            await asyncio.sleep(outcome)
            attempt += 1
