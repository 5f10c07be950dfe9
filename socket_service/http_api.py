"""The HTTP API of PROTOCOL.md, on aiohttp.

Every ``/api/*`` route except the dev token needs ``Authorization: Bearer``,
and counts against its user's rate limit on this instance (``HTTP_REQUESTS_PER_SECOND``,
``HTTP_REQUEST_BURST``; over it: 429 ``rate_limited`` with ``Retry-After``).
Errors are ``{"error": {"code", "message"}}`` with the status of the
``ChatError`` raised; the mapping lives only in ``error_middleware``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from google.auth.exceptions import GoogleAuthError

from chatcore import protocol
from chatcore.errors import ChatError, InvalidArgument, NotFound, Unauthenticated, Unavailable
from chatcore.identity.auth import Identity, TokenVerifier, bearer_token, issue_token
from chatcore.identity.signing import SigningUnavailable, UrlSigner
from chatcore.store import conversations as store_mod
from chatcore.store import uploads as uploads_mod
from chatcore.store.profiles import UNSET, ProfileStore
from chatcore.store.transactions import is_transient, unavailable

from .lists import ListUpdates
from .ratelimit import UserBuckets
from .settings import Settings

logger = logging.getLogger(__name__)

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", store_mod.ChatStore)
VERIFIER = web.AppKey("verifier", TokenVerifier)
SIO = web.AppKey("sio", object)
STATE = web.AppKey("state", dict)
SIGNER = web.AppKey("signer", UrlSigner)
STORAGE = web.AppKey("storage", object)  # google.cloud.storage.Client of the uploads bucket
USER_LIMITS = web.AppKey("user_limits", UserBuckets)  # the HTTP API's per-user rate limits
PROFILES = web.AppKey("profiles", ProfileStore)
LISTS = web.AppKey("lists", ListUpdates)

MAX_JSON_BODY = 64 * 1024
# Bounds of the issue-16 additions: name look-ups, unread counts, contacts.
NAMES_SECONDS = 2.0
UNREAD_SECONDS = 3.0
CONTACT_CONVERSATIONS = 50
MAX_CONTACTS = 200
READY_CHECK_SECONDS = 2.5
# Readiness is public: its answer is reused this long, so probes cannot multiply backend calls.
READY_CACHE_SECONDS = 1.0


def _error_response(err: ChatError) -> web.Response:
    response = web.json_response({"error": err.to_dict()}, status=err.http_status)
    retry_after = getattr(err, "retry_after", None)
    if retry_after is not None:
        response.headers["Retry-After"] = str(retry_after)
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]):
    try:
        return await _within_deadline(request, handler)
    except ChatError as err:
        return _error_response(err)
    except web.HTTPException as exc:
        if exc.status == 404:
            return _error_response(NotFound("no such route"))
        if exc.status == 405:
            return web.json_response({"error": {"code": "invalid_argument", "message": "method not allowed"}},
                                     status=405)
        raise
    except Exception as exc:
        if is_transient(exc):  # a backend error the store did not translate
            return _error_response(unavailable())
        logger.exception("HTTP %s %s failed", request.method, request.path)
        return _error_response(ChatError("internal error"))


async def _within_deadline(request: web.Request, handler) -> web.StreamResponse:
    """The API handler's response, or ``Unavailable`` (503, ``Retry-After``) once the request deadline passes.

    The handler runs as a task of its own, so the answer is due at the
    deadline even when its clean-up after cancellation waits on a stalled
    backend. Only ``/api/`` routes: the Socket.IO transport's long-lived
    requests, the UI's files and the health checks are not API calls.
    """
    if not request.path.startswith("/api/"):
        return await handler(request)
    task = asyncio.ensure_future(handler(request))
    done, _ = await asyncio.wait({task}, timeout=request.app[SETTINGS].request_deadline_seconds)
    if not done:
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: nothing to report
        raise unavailable()
    return task.result()


def cors_middleware(allowed: tuple[str, ...]):
    allow_all = "*" in allowed

    @web.middleware
    async def middleware(request: web.Request, handler):
        origin = request.headers.get("Origin")
        ok = origin is not None and (allow_all or origin in allowed)
        if request.method == "OPTIONS" and request.path.startswith("/api/") and origin:
            if not ok:
                return web.Response(status=403)
            response = web.Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = "GET, POST, PUT, PATCH, DELETE, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            response.headers["Access-Control-Max-Age"] = "600"
        else:
            response = await handler(request)
        if ok and not request.path.startswith("/socket.io"):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        return response

    return middleware


async def identity(request: web.Request) -> Identity:
    """The caller, from its bearer token; each call counts one request against the caller's rate limit."""
    token = bearer_token(request.headers.get("Authorization"))
    if token is None:
        raise Unauthenticated("missing Authorization: Bearer token")
    verifier = request.app[VERIFIER]
    if verifier.uses_network(token):
        user = await asyncio.to_thread(verifier.verify, token)
    else:
        user = verifier.verify(token)
    request.app[USER_LIMITS].take(user.user_id)
    # The caller's profile: created or refreshed in the background, at most once per
    # PROFILE_REFRESH_SECONDS per user on this instance (chatcore/store/profiles.py).
    request.app[PROFILES].ensure_soon(user.user_id, user.name)
    return user


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, or ``InvalidArgument`` as soon as it is longer than ``limit`` bytes.

    ``content.read(n)`` returns what has arrived so far, not n bytes: a body
    that comes in pieces is read piece by piece until its end (or the limit).
    """
    if request.content_length is not None and request.content_length > limit:
        raise InvalidArgument("body too large")
    raw = bytearray()
    while chunk := await request.content.read(limit + 1 - len(raw)):
        raw += chunk
        if len(raw) > limit:
            raise InvalidArgument("body too large")
    return bytes(raw)


async def json_body(request: web.Request) -> dict:
    raw = await read_body(request, MAX_JSON_BODY)
    if not raw.strip():
        return {}
    return protocol.parse_json_object(raw)


def conversation_id(request: web.Request) -> str:
    return protocol.parse_conversation_id(request.match_info["conversation_id"])


# -- health ---------------------------------------------------------------
# Liveness and readiness. Cloud Run's frontend answers some paths ending in "z" itself
# (``/healthz`` gets Google's 404, never reaching the service), so the paths to use are
# ``/health`` and ``/ready``; ``/healthz`` and ``/readyz`` stay as aliases for local tools.
HEALTH_PATHS = ("/health", "/healthz")
READY_PATHS = ("/ready", "/readyz")


async def healthz(request: web.Request) -> web.Response:
    """Liveness: 200 while the process can serve, also while it waits for its bus subscriptions."""
    if request.app[STATE].get("bus_failed"):
        return web.json_response({"status": "bus failed to start"}, status=503)
    return web.json_response({"status": "ok"})


class CachedCheck:
    """The result of an async ``check``, reused for ``ttl`` seconds after it ends; callers meanwhile share one run.

    The shared run is shielded: a caller that goes away does not cancel it for the others.
    """

    def __init__(self, check: Callable[[], Awaitable], ttl: float, clock: Callable[[], float] = time.monotonic):
        self._check = check
        self._ttl = ttl
        self._clock = clock
        self._result = None
        self._expires = float("-inf")
        self._running: asyncio.Future | None = None

    async def get(self):
        if self._clock() < self._expires:
            return self._result
        if self._running is None:
            self._running = asyncio.ensure_future(self._refresh())
        return await asyncio.shield(self._running)

    async def _refresh(self):
        try:
            self._result = await self._check()
            self._expires = self._clock() + self._ttl
            return self._result
        finally:
            self._running = None


READINESS = web.AppKey("readiness", CachedCheck)


async def backend_checks(app: web.Application) -> dict[str, str]:
    """``{backend: "ok" or what is wrong}`` for Firestore and the room bus (one read, one Pub/Sub call)."""
    checks = {}
    # Each check has its own bound: a stalled backend must not stall the probe.
    try:
        await asyncio.wait_for(app[STORE].ping(), READY_CHECK_SECONDS)
        checks["firestore"] = "ok"
    except Exception as exc:  # any failure means not ready; say which
        checks["firestore"] = f"unreachable: {type(exc).__name__}"
    bus = app[STATE]["bus"]
    if not app[STATE].get("bus_subscribed", True):
        checks["bus"] = app[STATE].get("bus_status") or "not subscribed yet"  # still retrying at start-up
        return checks
    try:
        await asyncio.wait_for(bus.check(), READY_CHECK_SECONDS)
        checks["bus"] = "ok" if bus.healthy else "not listening"
    except Exception as exc:
        checks["bus"] = f"unreachable: {type(exc).__name__}"
    return checks


async def readyz(request: web.Request) -> web.Response:
    if request.app[STATE].get("shutting_down"):
        return web.json_response({"status": "shutting down"}, status=503)
    checks = await request.app[READINESS].get()
    ready = all(v == "ok" for v in checks.values())
    return web.json_response({"status": "ok" if ready else "unavailable", "checks": checks},
                             status=200 if ready else 503)


async def config_json(request: web.Request) -> web.Response:
    s = request.app[SETTINGS]
    return web.json_response({
        "upload_url": s.upload_url,
        "max_upload_bytes": s.upload_limits.max_upload_bytes,
        "allowed_content_types": list(s.upload_limits.allowed_content_types),
        "max_message_chars": s.max_message_chars,
        "auth_mode": "dev" if s.dev_tokens else "jwt",
        "ai_provider": s.ai_provider,
        "upload_stall_seconds": s.upload_stall_seconds,
    })


async def dev_token(request: web.Request) -> web.Response:
    s = request.app[SETTINGS]
    body = await json_body(request)
    user_id = protocol.parse_user_id(body.get("user_id"))
    name = protocol.parse_display_name(body.get("name"))
    token = issue_token(s.auth.secret, user_id, name=name or None, ttl_seconds=s.dev_token_ttl_seconds,
                        algorithm=next(a for a in s.auth.algorithms if a.startswith("HS")),
                        extra={k: v for k, v in (("iss", s.auth.issuer), ("aud", s.auth.audience)) if v})
    return web.json_response({"token": token})


# -- conversations -------------------------------------------------------
async def create_conversation(request: web.Request) -> web.Response:
    user = await identity(request)
    body = await json_body(request)
    title = store_mod.clean_title(protocol.parse_title(body.get("title")))
    name = await request.app[PROFILES].send_name(user.user_id, user.name)
    conv = await request.app[STORE].create_conversation(user.user_id, title, name)
    request.app[LISTS].send_soon(conv, protocol.UPDATE_CREATED)
    return web.json_response(conv.to_wire(), status=201)


async def _wire_conversations(app: web.Application, convs: list[store_mod.Conversation]) -> list[dict]:
    """Conversation objects; participants the conversations have no name of are named from their profiles."""
    missing = [u for c in convs for u in c.missing_names()]
    names: dict[str, str] = {}
    if missing:
        try:
            names = await asyncio.wait_for(app[PROFILES].names(missing), NAMES_SECONDS)
        except Exception as exc:  # names are a nicety: ids stand in
            logger.warning("participant names not read: %r", exc)
    return [c.to_wire(names) for c in convs]


def _unread_budget(app: web.Application) -> float:
    return min(UNREAD_SECONDS, app[SETTINGS].request_deadline_seconds / 3)


async def list_conversations(request: web.Request) -> web.Response:
    user = await identity(request)
    limit = store_mod.page_size(request.query.get("limit"))
    store = request.app[STORE]
    items, cursor = await store.list_conversations(user.user_id, limit, request.query.get("cursor"))
    return web.json_response({"items": await _list_items(request.app, items, user.user_id), "next_cursor": cursor})


async def _list_items(app: web.Application, convs: list, user_id: str) -> list[dict]:
    """Conversation objects as a list shows them: with ``unread_count`` and ``last_message`` (None when
    there is none, or when it could not be read within the budget)."""
    store = app[STORE]
    budget = _unread_budget(app)
    wired, unread, latest = await asyncio.gather(_wire_conversations(app, convs),
                                                 store.unread_counts(convs, user_id, budget),
                                                 store.latest_messages(convs, budget))
    for item in wired:
        item["unread_count"] = unread.get(item["id"])
        item["last_message"] = latest.get(item["id"])
    return wired


async def get_conversation(request: web.Request) -> web.Response:
    user = await identity(request)
    store = request.app[STORE]
    conv = await store.require_participant(conversation_id(request), user.user_id)
    [wired] = await _list_items(request.app, [conv], user.user_id)
    return web.json_response(wired)


async def rename_conversation(request: web.Request) -> web.Response:
    """PATCH: ``{title?, ai_mode?}``, at least one; owner only."""
    user = await identity(request)
    body = await json_body(request)
    if "title" not in body and "ai_mode" not in body:
        raise InvalidArgument("title is required (or ai_mode)")
    title = store_mod.clean_title(protocol.parse_title(body["title"])) if "title" in body else None
    ai_mode = protocol.parse_ai_mode(body["ai_mode"]) if "ai_mode" in body else None
    conv = await request.app[STORE].update_conversation(conversation_id(request), user.user_id, title=title,
                                                        ai_mode=ai_mode)
    request.app[LISTS].send_soon(conv, protocol.UPDATE_RENAMED if title is not None else protocol.UPDATE_AI_MODE)
    [wired] = await _wire_conversations(request.app, [conv])
    return web.json_response(wired)


async def delete_conversation(request: web.Request) -> web.Response:
    user = await identity(request)
    cid = conversation_id(request)
    store = request.app[STORE]
    await store.require_owner(cid, user.user_id)
    # Files first: if that fails the owner can retry, since the conversation still exists.
    await _delete_objects(request.app, cid, strict=True)
    conv = await store.delete_conversation(cid, user.user_id)
    request.app[LISTS].send_soon(conv, protocol.UPDATE_DELETED, with_conversation=False)
    await request.app[SIO].close_room(protocol.conversation_room(cid))
    # A file accepted between the two passes; later uploads are refused by the finalize function.
    await _delete_objects(request.app, cid, strict=False)
    return web.Response(status=204)


async def _delete_objects(app: web.Application, cid: str, *, strict: bool) -> None:
    settings = app[SETTINGS]
    try:
        await asyncio.to_thread(uploads_mod.delete_conversation_objects, app[STORAGE], settings.uploads_bucket, cid)
    except Exception as exc:
        logger.error("could not delete the files of conversation %s: %s", cid, type(exc).__name__)
        if strict:
            raise Unavailable("could not delete the conversation's files; please retry") from None


async def _file_urls(app: web.Application, messages: list[store_mod.Message]) -> dict[str, str | None]:
    """Fresh signed download URLs (``{file_id: url}``) for the files of these messages; no object is public."""
    files = [f for m in messages for f in m.files]
    if not files:
        return {}
    try:
        return await asyncio.to_thread(app[SIGNER].download_urls, files)
    except (SigningUnavailable, GoogleAuthError) as exc:  # the history still answers, with null URLs
        logger.error("cannot sign download URLs: %s", type(exc).__name__)
        return {}


async def add_participant(request: web.Request) -> web.Response:
    """``{user_id}`` (any user id, as the contract has it) or ``{handle}`` (which must exist)."""
    user = await identity(request)
    body = await json_body(request)
    profiles = request.app[PROFILES]
    if "handle" in body:
        if "user_id" in body:
            raise InvalidArgument("give user_id or handle, not both")
        handle = protocol.parse_handle(body["handle"])
        new_user = await profiles.user_id_of(handle)
        if new_user is None:
            raise NotFound(f"nobody has the handle @{handle}")
    else:
        new_user = protocol.parse_user_id(body.get("user_id"))
    profile = await profiles.get(new_user)
    conv = await request.app[STORE].add_participant(conversation_id(request), user.user_id, new_user,
                                                    profile.name if profile else None)
    request.app[LISTS].send_soon(conv, protocol.UPDATE_PARTICIPANTS)
    return web.json_response({"participants": list(conv.participants)})


async def remove_participant(request: web.Request) -> web.Response:
    user = await identity(request)
    cid = conversation_id(request)
    removed = protocol.parse_user_id(request.match_info["user_id"])
    conv = await request.app[STORE].remove_participant(cid, user.user_id, removed)
    # The removed user's open connections, on every instance, leave the room
    # and are told so; they would otherwise keep receiving its events.
    room = protocol.conversation_room(cid)
    await request.app[STATE]["bus"].leave_room_members(protocol.user_room(removed), room)
    await request.app[SIO].emit(protocol.LEFT_ROOM, {"conversation_id": cid, "message": "removed from the conversation"},
                                room=protocol.user_room(removed))
    lists = request.app[LISTS]
    lists.send_soon(conv, protocol.UPDATE_REMOVED, rooms=[protocol.user_room(removed)], with_conversation=False)
    lists.send_soon(conv, protocol.UPDATE_PARTICIPANTS)
    return web.json_response({"participants": list(conv.participants)})


async def mark_read(request: web.Request) -> web.Response:
    """PUT or POST ``/api/conversations/{id}/read`` ``{message_id?}``: read up to that message (or now)."""
    user = await identity(request)
    cid = conversation_id(request)
    body = await json_body(request)
    message_id = protocol.parse_message_id(body.get("message_id"))
    store = request.app[STORE]
    marker = await store.mark_read(cid, user.user_id, message_id)
    try:
        unread = await asyncio.wait_for(store.unread_count(cid, marker), _unread_budget(request.app))
    except Exception as exc:  # the marker is stored; the count is a nicety
        logger.warning("unread count of %s not read: %r", cid, exc)
        unread = None
    answer = {"conversation_id": cid, "unread_count": unread}
    # The user's other devices clear their badge.
    await request.app[SIO].emit(protocol.CONVERSATION_UPDATED, protocol.conversation_updated_payload(
        cid, protocol.UPDATE_READ, unread_count=unread), room=protocol.user_room(user.user_id))
    return web.json_response(answer)


# -- people (issue 16) -----------------------------------------------------
async def get_me(request: web.Request) -> web.Response:
    user = await identity(request)
    profile = await request.app[PROFILES].ensure(user.user_id, user.name)
    return web.json_response(profile.to_wire())


async def patch_me(request: web.Request) -> web.Response:
    """``{name?, handle?}``: a chosen display name; a unique handle (``null`` removes it)."""
    user = await identity(request)
    body = await json_body(request)
    if "name" not in body and "handle" not in body:
        raise InvalidArgument("name or handle is required")
    name = protocol.parse_profile_name(body["name"]) if "name" in body else UNSET
    handle = UNSET
    if "handle" in body:
        handle = None if body["handle"] is None else protocol.parse_handle(body["handle"])
    profile = await request.app[PROFILES].update(user.user_id, user.name, name=name, handle=handle)
    return web.json_response(profile.to_wire())


async def lookup_user(request: web.Request) -> web.Response:
    """``?q=`` an exact handle (``@`` optional) or user id; never a search."""
    await identity(request)
    raw = request.query.get("q")
    if raw is None or not raw.strip():
        raise InvalidArgument("q (a handle or a user id) is required")
    query = protocol.parse_user_id(raw.strip())
    try:
        handle = protocol.parse_handle(query)
    except InvalidArgument:
        handle = None
    profile = await request.app[PROFILES].lookup(query, handle)
    if profile is None:
        raise NotFound("no user with that handle or id")
    return web.json_response(profile.to_wire())


async def list_contacts(request: web.Request) -> web.Response:
    """People who share one of the caller's most recent conversations (bounded), with names and handles."""
    user = await identity(request)
    convs, _ = await request.app[STORE].list_conversations(user.user_id, CONTACT_CONVERSATIONS, None)
    ids = list(dict.fromkeys(u for c in convs for u in c.participants if u != user.user_id))[:MAX_CONTACTS]
    profiles = request.app[PROFILES]
    names = await asyncio.wait_for(profiles.names(ids), NAMES_SECONDS) if ids else {}
    items = []
    for uid in ids:
        profile = await profiles.get(uid) if uid in names else None  # cached by names()
        items.append({"user_id": uid, "name": names.get(uid) or next(
            (c.names[uid] for c in convs if c.names.get(uid)), uid), "handle": profile.handle if profile else None})
    return web.json_response({"items": items})


async def list_messages(request: web.Request) -> web.Response:
    user = await identity(request)
    cid = conversation_id(request)
    store = request.app[STORE]
    await store.require_participant(cid, user.user_id)
    limit = store_mod.page_size(request.query.get("limit"))
    items, before = await store.list_messages(cid, limit, request.query.get("before"))
    urls = await _file_urls(request.app, items)
    return web.json_response({"items": [m.to_wire(with_status=True, file_urls=urls) for m in items],
                              "next_before": before})


def add_routes(app: web.Application, settings: Settings) -> None:
    app[USER_LIMITS] = UserBuckets(settings.http_requests_per_second, settings.http_request_burst)
    app[READINESS] = CachedCheck(lambda: backend_checks(app), READY_CACHE_SECONDS)
    for path in HEALTH_PATHS:
        app.router.add_get(path, healthz)
    for path in READY_PATHS:
        app.router.add_get(path, readyz)
    app.router.add_get("/config.json", config_json)
    if settings.dev_tokens:
        app.router.add_post("/api/dev/token", dev_token)
    app.router.add_post("/api/conversations", create_conversation)
    app.router.add_get("/api/conversations", list_conversations)
    app.router.add_get("/api/conversations/{conversation_id}", get_conversation)
    app.router.add_patch("/api/conversations/{conversation_id}", rename_conversation)
    app.router.add_delete("/api/conversations/{conversation_id}", delete_conversation)
    app.router.add_post("/api/conversations/{conversation_id}/participants", add_participant)
    app.router.add_delete("/api/conversations/{conversation_id}/participants/{user_id}", remove_participant)
    app.router.add_get("/api/conversations/{conversation_id}/messages", list_messages)
    app.router.add_put("/api/conversations/{conversation_id}/read", mark_read)
    app.router.add_post("/api/conversations/{conversation_id}/read", mark_read)
    app.router.add_get("/api/me", get_me)
    app.router.add_patch("/api/me", patch_me)
    app.router.add_get("/api/users/lookup", lookup_user)
    app.router.add_get("/api/contacts", list_contacts)
