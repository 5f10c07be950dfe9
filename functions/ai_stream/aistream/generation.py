"""Generates one assistant reply: claim, prompt, stream, coalesce, store, emit, finish.

Order of every chunk: stored in ``chunks/{seq}`` first, emitted second, so a
client that joins mid-stream gets a gap-free snapshot (PROTOCOL.md). The reply
document is checkpointed at most once per ``checkpoint_interval``; the same
watcher polls for ``stop_generation`` requests. The reply always ends in
``complete``, ``cancelled`` or ``error`` with an event to the room, whatever
the model does: it may fail, hang, or run past the maximum duration.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

from google.api_core import exceptions as gexc

from chatcore import protocol
from chatcore.ai_requests import AiRequest
from chatcore.errors import ChatError, TooLarge
from chatcore.replies import ReplyStore
from chatcore.store import Message

from .coalescer import ChunkCoalescer
from .prompt import FileReader, build_turns, prompt_size
from .providers import Provider, ProviderError, Turn
from .settings import Settings

logger = logging.getLogger(__name__)

RECENT_CLAIMS = 10_000
# Messages read beyond the history limit, for those sent after the reply being answered.
RECENT_MARGIN = 20
_END = object()
SKIPPED = "skipped"
DELETED = "deleted"


@dataclass
class _Progress:
    seq: int = 0
    parts: list[str] = field(default_factory=list)

    @property
    def content(self) -> str:
        return "".join(self.parts)


class ReplyGenerator:
    """Shared by all requests of a function instance; one ``handle`` call per AI request."""

    def __init__(self, settings: Settings, replies: ReplyStore, bus, provider: Provider,
                 files: FileReader | None, worker_id: str):
        self.settings = settings
        self.replies = replies
        self.bus = bus  # write-only GooglePubSubManager
        self.provider = provider
        self.files = files
        self.worker_id = worker_id
        self._handling: set[str] = set()
        self._claimed: OrderedDict[str, None] = OrderedDict()

    async def handle(self, request: AiRequest) -> str:
        """Returns the reply's final status, or ``"skipped"`` for a duplicate request."""
        mid = request.message_id
        # Copies of a request that reach this instance while (or after) it is
        # handled are dropped here, without a Firestore transaction each. The
        # claim stays the real guard across instances.
        if mid in self._handling or mid in self._claimed:
            return SKIPPED
        self._handling.add(mid)
        try:
            # The history is read while the reply is claimed: the first chunk
            # waits for one Firestore round trip instead of two. A read for a
            # duplicate request is wasted, which is rare and cheap.
            reply, recent = await asyncio.gather(
                self.replies.claim(request.conversation_id, mid, self.worker_id),
                self.replies.recent_messages(request.conversation_id,
                                             self.settings.history_max_messages + RECENT_MARGIN))
            self._remember(mid)
        finally:
            self._handling.discard(mid)
        if reply is None:
            logger.info("reply %s is not pending; duplicate request ignored", mid)
            return SKIPPED
        return await _ReplyRun(self, reply, recent).execute()

    def _remember(self, message_id: str) -> None:
        self._claimed[message_id] = None
        while len(self._claimed) > RECENT_CLAIMS:
            self._claimed.popitem(last=False)


class _ReplyRun:
    def __init__(self, gen: ReplyGenerator, reply: Message, recent: list[Message] | None = None):
        self.gen = gen
        self.recent = recent
        self.settings = gen.settings
        self.reply = reply
        self.room = protocol.conversation_room(reply.conversation_id)
        self.progress = _Progress()
        self.gone = False  # the conversation was deleted while the reply streamed
        self.coalescer = ChunkCoalescer(self.settings.chunk_interval_ms / 1000, self.settings.chunk_max_chars)

    def _emit(self, event: str, payload: dict) -> None:
        self.gen.bus.emit(event, payload, room=self.room)

    async def execute(self) -> str:
        status, error = protocol.FAILED, None
        try:
            turns = await self._prompt()
            status, error = await self._stream(turns)
        except ChatError as err:
            error = err.to_dict()
        except Exception:
            logger.exception("reply %s failed", self.reply.id)
            error = {"code": "internal", "message": "the reply failed; please retry"}
        if self.gone:
            return await self._discard()
        await self._paced()  # the closing event is a bus message of this reply too
        try:
            final = await self.gen.replies.finish(self.reply, status, self.progress.content, self.progress.seq,
                                                  error)
        except gexc.NotFound:
            return await self._discard()
        finally:
            # Tell the room even if the final write failed: the sweeper will
            # fail the stored reply later, the clients must not wait for it.
            if status == protocol.FAILED:
                self._emit(protocol.AI_RESPONSE_ERROR, protocol.ai_error_payload(
                    self.reply.conversation_id, self.reply.id, error["code"], error["message"]))
            await asyncio.to_thread(self.gen.bus.flush, 10)
        if status != protocol.FAILED:
            self._emit(protocol.AI_RESPONSE_COMPLETE, final.to_wire())
            await asyncio.to_thread(self.gen.bus.flush, 10)
        logger.info("reply %s ended %s after %d chunks", self.reply.id, final.status, self.progress.seq)
        return final.status

    async def _discard(self) -> str:
        """The conversation was deleted mid-reply: remove chunks written after the deletion."""
        logger.info("conversation of reply %s was deleted; reply discarded", self.reply.id)
        await self.gen.replies.discard(self.reply)
        return DELETED

    async def _prompt(self) -> list[Turn]:
        history = await self.gen.replies.history(self.reply, self.settings.history_budget_chars,
                                                 self.settings.history_max_messages, recent=self.recent)
        turns = await build_turns(history, self.gen.files, self.gen.provider.supports_images)
        if prompt_size(turns, self.settings.system_prompt) > self.settings.prompt_max_chars:
            raise TooLarge(f"the prompt is larger than {self.settings.prompt_max_chars} characters")
        return turns

    # -- streaming ---------------------------------------------------------
    async def _stream(self, turns: list[Turn]) -> tuple[str, dict | None]:
        loop = asyncio.get_running_loop()
        signals = _Signals(loop)
        producer = asyncio.create_task(self._produce(turns, signals))
        watcher = asyncio.create_task(self._watch(signals))
        deadline = loop.time() + self.settings.max_reply_seconds
        # A backstop behind the provider's own timeout (which reports the
        # cause more precisely), for providers that have none.
        idle_limit = self.settings.provider_timeout_seconds * 1.5 + 1
        try:
            while True:
                if signals.stop_requested:
                    await _cancel(producer)  # closes the provider's stream
                    await self._flush_rest()
                    return protocol.CANCELLED, None
                due = self.coalescer.seconds_until_due()
                if due == 0:
                    # Everything the model produced meanwhile joins this chunk.
                    await self._flush()
                    continue
                if signals.end is not None:
                    return await self._end_with(signals.end)
                now = loop.time()
                if now >= deadline:
                    await self._flush_rest()
                    return protocol.FAILED, {"code": "unavailable", "message":
                                             f"the reply took longer than {self.settings.max_reply_seconds:g} s"}
                idle_deadline = signals.last_input + idle_limit
                if now >= idle_deadline:
                    await self._flush_rest()
                    return protocol.FAILED, {"code": "unavailable", "message":
                                             f"the model sent nothing for {idle_limit:g} s"}
                wait = min(deadline, idle_deadline) - now
                if due is not None:
                    wait = min(wait, due)
                # With text buffered, new text need not wake us: the timer will.
                await signals.wait(wait, on_input=due is None)
        finally:
            await _cancel(producer, watcher)

    async def _end_with(self, item) -> tuple[str, dict | None]:
        """The model finished (``_END``) or failed (``ProviderError``): send what is left."""
        await self._flush_rest()
        if item is _END:
            return protocol.COMPLETE, None
        logger.warning("provider %s failed for %s: %s", self.gen.provider.name, self.reply.id, item.message)
        return protocol.FAILED, {"code": item.code, "message": item.message}

    async def _produce(self, turns: list[Turn], signals: _Signals) -> None:
        """Feed the model's text straight into the coalescer; wake the streaming loop only when it must act.

        Per token this is an append and two comparisons: at model speeds of
        hundreds of tokens a second per reply, and dozens of replies per
        instance, a queue hand-off and a wake-up per token cost more CPU than
        everything else a reply does."""
        coalescer = self.coalescer
        stream = self.gen.provider.stream(turns, system=self.settings.system_prompt)
        end = _END
        try:
            async for piece in stream:
                if piece:
                    coalescer.add(piece)
                    signals.input_arrived(wake=coalescer.full)
        except ProviderError as err:
            end = err
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("provider %s raised", self.gen.provider.name)
            end = ProviderError(f"the model call failed ({type(exc).__name__})")
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                try:
                    await aclose()
                except RuntimeError:
                    pass  # already closed by the cancellation
        signals.finish(end)

    async def _flush(self) -> None:
        text = self.coalescer.take()
        seq = self.progress.seq + 1
        # Stored before emitted: the gap-free snapshot depends on this order.
        await self.gen.replies.save_chunk(self.reply.conversation_id, self.reply.id, seq, text)
        self.progress.seq = seq
        self.progress.parts.append(text)
        self._emit(protocol.AI_RESPONSE_CHUNK,
                   protocol.chunk_payload(self.reply.conversation_id, self.reply.id, seq, text))
        self.coalescer.sent()

    async def _flush_rest(self) -> None:
        if self.coalescer.pending:
            await self._paced()
            await self._flush()

    async def _paced(self) -> None:
        """Keep the chunk interval before the last chunk and the closing event too."""
        wait = self.coalescer.seconds_until_interval()
        if wait > 0:
            await asyncio.sleep(wait)

    async def _watch(self, signals: _Signals) -> None:
        """Look for a stop request at every poll and checkpoint about once per interval.

        Every reply of the instance polls at the same instants (multiples of
        the poll interval on the loop's clock), so their reads share one
        Firestore request (``ReplyStore.stop_requested``)."""
        loop = asyncio.get_running_loop()
        poll = self.settings.stop_poll_interval_ms / 1000
        every = self.settings.checkpoint_interval_ms / 1000
        last_checkpoint = loop.time()
        replies, conversation_id, reply_id = self.gen.replies, self.reply.conversation_id, self.reply.id
        while True:
            await asyncio.sleep(poll - loop.time() % poll)
            try:
                if loop.time() - last_checkpoint >= every:
                    last_checkpoint = loop.time()
                    requested, _ = await asyncio.gather(
                        replies.stop_requested(conversation_id, reply_id),
                        replies.checkpoint(conversation_id, reply_id, self.progress.content, self.progress.seq))
                else:
                    requested = await replies.stop_requested(conversation_id, reply_id)
            except gexc.NotFound:
                self.gone = True
                signals.request_stop()
                return
            except Exception as exc:  # transient; the next tick tries again
                logger.warning("checkpoint of %s failed: %s", reply_id, type(exc).__name__)
                continue
            if requested:
                signals.request_stop()
                return


class _Signals:
    """What the producer and the watcher tell a reply's streaming loop, and the loop's one wait.

    The loop sleeps in ``wait`` until its timeout (the next chunk is due, or
    a deadline), or until ``wake``: the model finished or failed, a stop was
    requested, or text arrived while the loop was waiting for text
    (``on_input``) or filled a chunk. Other text is picked up when the timer
    fires, without a wake-up per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._waiter: asyncio.Future | None = None
        self._wake_on_input = False
        self.last_input = loop.time()  # the start counts as input for the idle limit
        self.end = None  # _END or a ProviderError, once the model is done
        self.stop_requested = False

    def input_arrived(self, wake: bool) -> None:
        self.last_input = self._loop.time()
        if wake or self._wake_on_input:
            self._wake()

    def finish(self, end) -> None:
        self.end = end
        self._wake()

    def request_stop(self) -> None:
        self.stop_requested = True
        self._wake()

    async def wait(self, timeout: float, on_input: bool) -> None:
        self._waiter = waiter = self._loop.create_future()
        self._wake_on_input = on_input
        timer = self._loop.call_later(timeout, self._wake)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
            self._wake_on_input = False

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


async def _cancel(*tasks: asyncio.Task) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
