"""Controllers of the upload functions: decode the HTTP request or CloudEvent, call the service, map errors.

Clients are created once per instance, lazily, on first use, and shared by
every request thread; each target builds only what it needs (the HTTP
target never opens the room bus). ``ChatError`` becomes an HTTP status here
and nowhere else.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from flask import Request, Response, json
from google.api_core import exceptions as gexc
from socketio_pubsub_gcp.loop_runner import LoopRunner
from socketio_pubsub_gcp.publisher import Publisher
from socketio_pubsub_gcp.pubsub_manager import GooglePubSubManager

from chatcore.bus import wiring
from chatcore.errors import ChatError, InvalidArgument, Unavailable
from chatcore.identity.auth import TokenVerifier
from chatcore.identity.signing import UrlSigner
from chatcore.runtime import jsonlog
from chatcore.runtime.once import Once
from chatcore.store import uploads as uploads_mod
from chatcore.store.conversations import ChatStore

from .finalize import Finalizer, parse_event
from .requesting import MAX_BODY_BYTES, UploadRequester, error_body
from .settings import Settings

logger = logging.getLogger(__name__)

CORS_MAX_AGE = "600"
# Faults worth a retry by the client: 503, not 500.
TRANSIENT = (gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.Aborted, gexc.TooManyRequests, TimeoutError)


class Runtime:
    """Clients of one function instance, each built on first use (or injected by tests)."""

    def __init__(self, settings: Settings, *, firestore_client=None, storage_client=None, publisher=None,
                 signer: UrlSigner | None = None, verifier: TokenVerifier | None = None):
        self.settings = settings
        self._lock = threading.RLock()
        self._firestore = firestore_client
        self._storage = storage_client
        self._publisher = publisher
        self._signer = signer
        self._verifier = verifier
        self._runner: LoopRunner | None = None
        self._bus: GooglePubSubManager | None = None
        self._requester: UploadRequester | None = None
        self._finalizer: Finalizer | None = None

    @property
    def runner(self) -> LoopRunner:
        with self._lock:
            if self._runner is None:
                self._runner = LoopRunner("upload-loop")
            return self._runner

    def _stores(self) -> tuple[ChatStore, uploads_mod.UploadStore]:
        with self._lock:
            if self._firestore is None:
                from google.cloud import firestore

                self._firestore = firestore.AsyncClient(project=self.settings.gcp.project_id,
                                                        database=self.settings.gcp.firestore_database)
            chat = ChatStore(self._firestore)
            return chat, uploads_mod.UploadStore(chat)

    def _storage_client(self):
        with self._lock:
            if self._storage is None:
                from google.cloud import storage

                self._storage = storage.Client(project=self.settings.gcp.project_id)
            return self._storage

    @property
    def signer(self) -> UrlSigner:
        with self._lock:
            if self._signer is None:
                self._signer = UrlSigner(self.settings.signing, self.settings.bucket)
            return self._signer

    @property
    def requester(self) -> UploadRequester:
        with self._lock:
            if self._requester is None:
                chat, uploads = self._stores()
                self._requester = UploadRequester(self.settings, self._verifier or TokenVerifier(self.settings.auth),
                                                  chat, uploads, self.signer, self.runner)
            return self._requester

    @property
    def finalizer(self) -> Finalizer:
        with self._lock:
            if self._finalizer is None:
                _, uploads = self._stores()
                self._bus = wiring.function_emitter(self.settings.gcp.project_id, publisher=self._publisher or Publisher(
                    client_options=self.settings.gcp.pubsub_client_options))
                self._finalizer = Finalizer(self.settings, uploads, self._storage_client(), self._bus, self.signer,
                                            self.runner)
            return self._finalizer


def _start() -> Runtime:
    settings = Settings.from_env()
    jsonlog.configure(settings.log_level, settings.gcp.project_id)
    return Runtime(settings)


# The process's runtime, built on the first request.
runtime = Once(_start)


# -- request_upload (HTTP) ----------------------------------------------------
def _origin_allowed(settings: Settings, origin: str | None) -> bool:
    return origin is not None and ("*" in settings.cors_allowed_origins or origin in settings.cors_allowed_origins)


def _json_response(body: dict, status: int) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def handle_request_upload(request: Request, rt: Runtime | None = None) -> Response:
    rt = rt or runtime()
    origin = request.headers.get("Origin")
    allowed = _origin_allowed(rt.settings, origin)
    if request.method == "OPTIONS":
        if not allowed:
            return Response(status=403)
        response = Response(status=204)
        response.headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        response.headers["Access-Control-Max-Age"] = CORS_MAX_AGE
    else:
        response = _answer(request, rt)
    if allowed:
        response.headers["Access-Control-Allow-Origin"] = origin
    response.headers["Vary"] = "Origin"
    return response


def _answer(request: Request, rt: Runtime) -> Response:
    try:
        if request.method != "POST":
            return _json_response({"error": {"code": "invalid_argument", "message": "method not allowed"}}, 405)
        if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
            raise InvalidArgument("body too large")
        raw = request.stream.read(MAX_BODY_BYTES + 1)
        return _json_response(rt.requester.request(request.headers.get("Authorization"), raw), 201)
    except ChatError as err:
        return _json_response(error_body(err), err.http_status)
    except TRANSIENT as exc:
        logger.warning("request_upload: a dependency is unavailable: %s", type(exc).__name__)
        return _json_response(error_body(Unavailable("uploads are unavailable right now; please retry")), 503)
    except Exception:
        logger.exception("request_upload failed")
        return _json_response(error_body(ChatError("internal error")), 500)


# -- on_upload_finalized (CloudEvent) ---------------------------------------------
def handle_finalize_event(cloud_event: Any, rt: Runtime | None = None) -> str:
    rt = rt or runtime()
    try:
        obj = parse_event(cloud_event["type"], cloud_event.data)
    except InvalidArgument as err:
        logger.warning("dropping a malformed storage event: %s", err.message)
        return "malformed"
    if obj is None:
        return "ignored: not an object finalize event"
    return rt.finalizer.handle(obj)
