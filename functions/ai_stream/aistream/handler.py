"""Controller of the AI function: decode the Pub/Sub push, run the generator.

Clients are created once per instance, lazily, on first use, and shared by
every request thread. Retry discipline: a malformed request is logged and
acknowledged (Pub/Sub must not redeliver poison forever); a transient fault
before the reply is claimed raises, so Pub/Sub redelivers; once claimed, the
reply always ends with an event, so a redelivery has nothing left to do.
"""

from __future__ import annotations

import base64
import binascii
import logging
import uuid
from dataclasses import dataclass

from socketio_pubsub_gcp.async_publisher import AsyncPublisher
from socketio_pubsub_gcp.loop_runner import LoopRunner

from chatcore import ai_requests
from chatcore.bus import wiring
from chatcore.errors import InvalidArgument
from chatcore.runtime import jsonlog, tuning
from chatcore.runtime.once import Once
from chatcore.store.conversations import ChatStore
from chatcore.store.replies import ReplyStore

from .budget import BudgetStore, GlobalBudget
from .generation import ReplyGenerator
from .prompt import FileReader
from .providers import create_provider
from .settings import Settings

logger = logging.getLogger(__name__)


@dataclass
class Runtime:
    settings: Settings
    runner: LoopRunner
    generator: ReplyGenerator


def build_runtime(settings: Settings, *, firestore_client=None, publisher=None, storage_client=None,
                  provider=None) -> Runtime:
    from google.cloud import firestore, storage

    runner = LoopRunner("ai-stream-loop")
    db = firestore_client or firestore.AsyncClient(project=settings.gcp.project_id,
                                                   database=settings.gcp.firestore_database)
    # Every emit comes from the runner's loop: its RPCs are made there too, without sender threads.
    bus = wiring.function_emitter(settings.gcp.project_id, publisher=publisher or AsyncPublisher(
        runner.loop, client_options=settings.gcp.pubsub_client_options))
    storage_client = storage_client or storage.Client(project=settings.gcp.project_id)
    files = FileReader(storage_client, settings.uploads_bucket, settings.file_text_max_chars,
                       settings.image_max_bytes)
    generator = ReplyGenerator(settings, ReplyStore(ChatStore(db)), bus, provider or create_provider(settings),
                               files, worker_id=uuid.uuid4().hex,
                               budget=GlobalBudget(BudgetStore(db), settings.global_tokens_per_hour))
    return Runtime(settings, runner, generator)


def _start() -> Runtime:
    settings = Settings.from_env()
    jsonlog.configure(settings.log_level, settings.gcp.project_id)
    started = build_runtime(settings)
    # After the clients exist, so they are frozen too.
    tuning.tune(settings.gc_tuning)
    return started


# The process's runtime, built on the first request.
runtime = Once(_start)


def decode_push(data: dict | None) -> ai_requests.AiRequest:
    """The AiRequest inside a Pub/Sub push body (``{"message": {"data": <base64>}}``)."""
    try:
        raw = base64.b64decode(data["message"]["data"], validate=True)
    except (KeyError, TypeError, binascii.Error):
        raise InvalidArgument("not a Pub/Sub push message with base64 data") from None
    return ai_requests.decode(raw)


def handle_event(cloud_event) -> str:
    rt = runtime()
    try:
        request = decode_push(cloud_event.data)
    except InvalidArgument as err:
        logger.warning("dropping a malformed AI request: %s", err.message)
        return "malformed"
    budget = rt.settings.max_reply_seconds + 60  # the reply enforces its own maximum first
    return rt.runner.run(rt.generator.handle(request), timeout=budget)
