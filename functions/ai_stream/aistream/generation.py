"""Generates one assistant reply: claim, prompt, stream, coalesce, store, emit, finish.

Order of every chunk: stored in ``chunks/{seq}`` first, emitted second, so a
client that joins mid-stream gets a gap-free snapshot (PROTOCOL.md). From the
claim on, a watcher checkpoints the reply document at most once per
``checkpoint_interval`` (which renews the claim) and polls for
``stop_generation`` requests. The reply always ends in ``complete``,
``cancelled`` or ``error`` with an event to the room, whatever the model does:
it may fail, hang, or run past the maximum duration.

One exception: a reply that ended elsewhere while this worker had it (the
stale sweeper failed it, or a redelivery took over the claim) is left to
whoever ended it. The worker stops with no further chunk and no event, as
soon as its watcher sees the end, and before any chunk it sends after being
held up (``_ReplyRun._confirm_held``).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

from google.api_core import exceptions as gexc

from chatcore import protocol
from chatcore.ai_requests import AiRequest
from chatcore.errors import ChatError, TooLarge
from chatcore.store.conversations import Message
from chatcore.store.replies import ReplyState, ReplyStore

from .budget import GlobalBudget, estimate_tokens
from .coalescer import ChunkCoalescer
from .prompt import FileReader, build_turns, history_budget, message_chars, prompt_size, with_left_out_note
from .providers import Provider, ProviderError, Turn
from .settings import Settings

logger = logging.getLogger(__name__)

RECENT_CLAIMS = 10_000
# Messages read beyond the history limit, for those sent after the reply being answered.
RECENT_MARGIN = 20
_END = object()
SKIPPED = "skipped"
DELETED = "deleted"
SUPERSEDED = "superseded"  # the reply ended elsewhere, or was taken over, while this worker had it


class _EndedElsewhere(Exception):
    """The reply is no longer this worker's: say nothing more about it."""


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
                 files: FileReader | None, worker_id: str, budget: GlobalBudget | None = None):
        self.settings = settings
        self.budget = budget or GlobalBudget(None, 0)  # none: no global budget
        self.replies = replies
        self.bus = bus  # write-only GooglePubSubManager
        self.provider = provider
        self.files = files
        self.worker_id = worker_id
        self._handling: set[str] = set()
        self._claimed: OrderedDict[str, None] = OrderedDict()

    async def handle(self, request: AiRequest) -> str:
        """Returns the reply's final status, ``"skipped"`` for a duplicate request, or ``"superseded"``.

        Raises when this worker cannot tell that it holds the reply
        (``ReplyBusy``: another claim may be alive; a Firestore fault): Pub/Sub
        then delivers the request again, and that delivery finds out.
        """
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
            # duplicate request is wasted, which is rare and cheap. Each
            # attempt claims under its own id, so that a redelivery can take
            # over a claim whose worker is gone (ReplyStore.claim).
            claim_id = f"{self.worker_id}-{uuid.uuid4().hex[:8]}"
            reply, recent = await asyncio.gather(
                self.replies.claim(request.conversation_id, mid, claim_id, self.settings.claim_lease),
                self.replies.recent_messages(request.conversation_id,
                                             self.settings.history_max_messages + RECENT_MARGIN),
                return_exceptions=True)
            if isinstance(reply, BaseException):
                raise reply
            self._remember(mid)
        finally:
            self._handling.discard(mid)
        if reply is None:
            logger.info("reply %s is not pending; duplicate request ignored", mid)
            return SKIPPED
        if isinstance(recent, BaseException):
            # The reply is claimed: read the history again rather than leave the claim without a worker.
            logger.warning("reading the history for %s failed (%s); reading it again", mid, type(recent).__name__)
            recent = None
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
        self.system = self.settings.system_prompt  # with a note on the history left out, once the prompt is built
        # What the built prompt holds, charged to the global budget with the reply at the end.
        self.prompt_chars = 0
        self.prompt_images = 0
        self.poll_seconds = self.settings.stop_poll_interval_ms / 1000
        # When the reply was last known to be this worker's (the claim, then every poll of the watcher).
        self.held_confirmed_at = asyncio.get_running_loop().time()

    def _emit(self, event: str, payload: dict) -> None:
        self.gen.bus.emit(event, payload, room=self.room)

    async def execute(self) -> str:
        status, error = protocol.FAILED, None
        signals = _Signals(asyncio.get_running_loop())
        # Watched from the claim on: its heartbeat keeps the claim while the prompt is built, too.
        watcher = asyncio.create_task(self._watch(signals))
        try:
            await self.gen.budget.check()  # spent: the reply ends at once, with `unavailable`
            turns = await self._prompt()
            status, error = await self._stream(turns, signals)
        except ChatError as err:
            error = err.to_dict()
        except Exception:
            logger.exception("reply %s failed", self.reply.id)
            error = {"code": "internal", "message": "the reply failed; please retry"}
        finally:
            await _cancel(watcher)
            if self.prompt_chars:  # the prompt went to the model: billed whatever the outcome
                self.gen.budget.charge(estimate_tokens(self.prompt_chars + len(self.progress.content),
                                                       self.prompt_images))
        if self.gone:
            return await self._discard()
        if status == SUPERSEDED:
            return self._superseded()
        await self._paced()  # the closing event is a bus message of this reply too
        ended_elsewhere = False
        try:
            final = await self.gen.replies.finish(self.reply, status, self.progress.content, self.progress.seq,
                                                  error)
            ended_elsewhere = final is None
        except gexc.NotFound:
            return await self._discard()
        finally:
            # Tell the room even if the final write failed: the sweeper will
            # fail the stored reply later, the clients must not wait for it.
            if status == protocol.FAILED and not ended_elsewhere:
                self._emit(protocol.AI_RESPONSE_ERROR, protocol.ai_error_payload(
                    self.reply.conversation_id, self.reply.id, error["code"], error["message"]))
            await asyncio.to_thread(self.gen.bus.flush, 10, room=self.room)
        if ended_elsewhere:
            return self._superseded()
        if status != protocol.FAILED:
            self._emit(protocol.AI_RESPONSE_COMPLETE, final.to_wire())
            await asyncio.to_thread(self.gen.bus.flush, 10, room=self.room)
            await self._update_lists(final)
        logger.info("reply %s ended %s after %d chunks", self.reply.id, final.status, self.progress.seq)
        return final.status

    async def _update_lists(self, final: Message) -> None:
        """``conversation_updated`` (reason ``message``) to every participant's user room: the reply is the
        conversation's latest message. One read (the participants) and one bus message; a failure only
        leaves the lists to catch up with the next message (logged)."""
        try:
            conv = await self.gen.replies.store.get_conversation(final.conversation_id)
            rooms = conv.user_rooms()
            self.gen.bus.emit(protocol.CONVERSATION_UPDATED, protocol.conversation_updated_payload(
                conv.id, protocol.UPDATE_MESSAGE, conv.to_wire(), final.last_message()), room=rooms)
            await asyncio.to_thread(self.gen.bus.flush, 10, room=rooms)
        except Exception as exc:
            logger.warning("conversation_updated for reply %s not sent: %r", final.id, exc)

    async def _discard(self) -> str:
        """The conversation was deleted mid-reply: remove chunks written after the deletion."""
        logger.info("conversation of reply %s was deleted; reply discarded", self.reply.id)
        await self.gen.replies.discard(self.reply)
        return DELETED

    def _superseded(self) -> str:
        logger.info("reply %s ended elsewhere while this worker had it; the worker stopped", self.reply.id)
        return SUPERSEDED

    async def _prompt(self) -> list[Turn]:
        """The history that fits the budgets (files included), and the system prompt that says what did not."""
        files = self.gen.files
        history = await self.gen.replies.history(self.reply, history_budget(self.settings),
                                                 self.settings.history_max_messages, recent=self.recent,
                                                 cost=lambda message: message_chars(message, files))
        self.system = with_left_out_note(self.settings.system_prompt, history.left_out)
        turns = await build_turns(history.messages, files, self.gen.provider.supports_images)
        size = prompt_size(turns, self.system)
        if size > self.settings.prompt_max_chars:
            raise TooLarge(f"the prompt is larger than {self.settings.prompt_max_chars} characters")
        self.prompt_chars = size
        self.prompt_images = sum(a.data is not None for t in turns for a in t.attachments)
        return turns

    # -- streaming ---------------------------------------------------------
    async def _stream(self, turns: list[Turn], signals: _Signals) -> tuple[str, dict | None]:
        loop = asyncio.get_running_loop()
        signals.last_input = loop.time()  # the model's silence counts from here
        producer = asyncio.create_task(self._produce(turns, signals))
        deadline = loop.time() + self.settings.max_reply_seconds
        # A backstop behind the provider's own timeout (which reports the
        # cause more precisely), for providers that have none.
        idle_limit = self.settings.provider_timeout_seconds * 1.5 + 1
        try:
            while True:
                if signals.ended_elsewhere:
                    return SUPERSEDED, None
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
        except _EndedElsewhere:
            return SUPERSEDED, None
        finally:
            await _cancel(producer)

    async def _end_with(self, item) -> tuple[str, dict | None]:
        """The model finished (``_END``) or failed (``ProviderError``): send what is left."""
        await self._flush_rest()
        if item is _END:
            return protocol.COMPLETE, None
        # The endpoint's own words are for the logs only (ProviderError.detail); the room gets ours.
        logger.warning("provider %s failed for %s: %s%s", self.gen.provider.name, self.reply.id, item.message,
                       f"; the endpoint said: {item.detail}" if item.detail else "")
        return protocol.FAILED, {"code": item.code, "message": item.message}

    async def _produce(self, turns: list[Turn], signals: _Signals) -> None:
        """Feed the model's text straight into the coalescer; wake the streaming loop only when it must act.

        Per token this is an append and two comparisons: at model speeds of
        hundreds of tokens a second per reply, and dozens of replies per
        instance, a queue hand-off and a wake-up per token cost more CPU than
        everything else a reply does."""
        coalescer = self.coalescer
        stream = self.gen.provider.stream(turns, system=self.system)
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
        await self._confirm_held()
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

    async def _confirm_held(self) -> None:
        """Before a chunk goes out: make sure the reply is still this worker's, unless a poll just said so.

        The watcher confirms it at every poll. A worker with no confirmation
        for two polls was held up (a long pause, a starved CPU, an unreachable
        database) and may have been failed by the stale sweeper meanwhile, so
        it reads the reply's state first; ``_EndedElsewhere`` if it is no
        longer this worker's."""
        loop = asyncio.get_running_loop()
        if loop.time() - self.held_confirmed_at <= 2 * self.poll_seconds:
            return
        asked_at = loop.time()
        try:
            state = await self.gen.replies.state(self.reply.conversation_id, self.reply.id)
        except gexc.NotFound:
            self.gone = True
            raise _EndedElsewhere from None
        if not self._still_held(state, asked_at):
            raise _EndedElsewhere

    def _still_held(self, state: ReplyState, asked_at: float) -> bool:
        """Whether ``state`` (read from ``asked_at`` on) leaves the reply with this worker; notes when it does."""
        if not state.held_by(self.reply):
            logger.warning("reply %s is %s under claim %s; its worker %s stops", self.reply.id, state.status,
                           state.claim_id, self.reply.claim_id)
            return False
        self.held_confirmed_at = max(self.held_confirmed_at, asked_at)
        return True

    async def _watch(self, signals: _Signals) -> None:
        """At every poll, look for a stop request or an end elsewhere; checkpoint about once per interval.

        A checkpoint renews the reply's claim (its heartbeat). Every reply of
        the instance polls at the same instants (multiples of the poll
        interval on the loop's clock), so their reads share one Firestore
        request (``ReplyStore.state``)."""
        loop = asyncio.get_running_loop()
        every = self.settings.checkpoint_interval_ms / 1000
        last_checkpoint = loop.time()
        replies, reply = self.gen.replies, self.reply
        while True:
            await asyncio.sleep(self.poll_seconds - loop.time() % self.poll_seconds)
            asked_at = loop.time()
            try:
                if asked_at - last_checkpoint >= every:
                    last_checkpoint = asked_at
                    state = await replies.checkpoint(reply, self.progress.content, self.progress.seq)
                else:
                    state = await replies.state(reply.conversation_id, reply.id)
            except gexc.NotFound:
                self.gone = True
                signals.request_stop()
                return
            except Exception as exc:  # transient; the next tick tries again
                logger.warning("checkpoint of %s failed: %s", reply.id, type(exc).__name__)
                continue
            if not self._still_held(state, asked_at):
                signals.end_elsewhere()
                return
            if state.stop_requested:
                signals.request_stop()
                return


class _Signals:
    """What the producer and the watcher tell a reply's streaming loop, and the loop's one wait.

    The loop sleeps in ``wait`` until its timeout (the next chunk is due, or
    a deadline), or until ``wake``: the model finished or failed, a stop was
    requested, the reply ended elsewhere, or text arrived while the loop was
    waiting for text (``on_input``) or filled a chunk. Other text is picked up
    when the timer fires, without a wake-up per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._waiter: asyncio.Future | None = None
        self._wake_on_input = False
        self.last_input = loop.time()  # the start counts as input for the idle limit (reset when the model starts)
        self.end = None  # _END or a ProviderError, once the model is done
        self.stop_requested = False
        self.ended_elsewhere = False

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

    def end_elsewhere(self) -> None:
        self.ended_elsewhere = True
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
