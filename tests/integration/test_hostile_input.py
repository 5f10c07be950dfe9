"""Hostile input: every client event and every HTTP body or query the API takes.

Property-based (hypothesis) against the real socket-service process: wrong
types, missing and extra fields, deep nesting, huge integers, NaN and
infinities, binary values, lone surrogates, NUL and other control
characters, right-to-left marks, 4-byte characters. Whatever the payload,
the answer is a well-formed ack (or HTTP error) with a code of PROTOCOL.md,
never ``internal`` and never a 5xx, and the connection stays usable: a valid
call after it succeeds. Explicit cases pin the Unicode rules
(``chatcore.protocol.client_text``) and the length limit, counted in
characters, with 4-byte characters and combining sequences exactly at it.

Integers stop at 100 digits in Socket.IO payloads: python-engineio's JSON
decoder refuses longer ones, and such a frame is malformed, closing the
connection (tests/integration/test_malformed_frames.py). The HTTP API takes
integers up to Python's own 4300-digit limit.

Hypothesis runs derandomized with no example database (its cache of
constants goes to test-artifacts/), so CI sees the same examples every run;
``max_examples`` keeps the file well under two minutes, and a failure is
reported as found, unshrunk: every example is a round trip to real processes.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp
import hypothesis
import pytest
import socketio
import yarl
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from tests.conftest import ARTIFACTS, Api, ChatClient, new_user

# Read when hypothesis first writes (as the first example runs): its cache of
# constants goes with the other test artifacts, not into the work tree.
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(ARTIFACTS / "hypothesis"))

CODES = {"unauthenticated", "forbidden", "not_found", "invalid_argument", "rate_limited", "too_large",
         "unavailable", "internal"}
HTTP_STATUS = {"invalid_argument": 400, "unauthenticated": 401, "forbidden": 403, "not_found": 404,
               "too_large": 413, "rate_limited": 429, "unavailable": 503}
EVENTS = ("join_room", "leave_room", "send_message", "typing", "stop_generation")
RESERVED = {"connect", "connect_error", "disconnect", "disconnecting", "newListener", "removeListener"}
MAX_MESSAGE_CHARS = 8000

HOSTILE = settings(max_examples=100, derandomize=True, database=None, deadline=None, print_blob=False,
                   phases=[Phase.explicit, Phase.generate],
                   suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                          HealthCheck.data_too_large, HealthCheck.large_base_example])

# -- strategies -------------------------------------------------------------
def mostly(common, other, percent: int):
    """``common`` in about ``percent`` % of the examples, else ``other`` (``one_of`` would flatten and even out)."""
    return st.integers(0, 99).flatmap(lambda n: common if n < percent else other)


EDGE_CHARS = ["\ud800", "\udfff", "\udc00", "\x00", "\x01", "\x1b", "\x7f", "\x85", "\x9f", "\t", "\n", "\r",
              "\u200f", "\u200e", "\u202e", "\u2066", "\u2069", "\ufeff", "\u200d", "\u0301", "\U0001f600",
              "\U0010ffff", "\uffff", "/", "%", ".", " "]
chars = st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from(EDGE_CHARS))
hostile_text = st.one_of(
    st.text(chars, max_size=40),
    st.sampled_from(["", " ", "\ud800", "a\x00b", "\u202eevil", "\U0001f600" * 3, "e\u0301", "\U0001f469\u200d\U0001f4bb",
                     "x" * 300, "conv:1", "../..", "__proto__", "__name__", "constructor", ".", ".."]),
)
# The largest integers python-engineio's JSON decoder takes (100 characters, sign included).
huge_ints = st.one_of(st.sampled_from([2 ** 63, -(2 ** 63) - 1, 2 ** 64 + 1, 10 ** 99, -(10 ** 98)]),
                      st.integers(-(10 ** 98), 10 ** 99))
# Text a chat accepts, so that examples also get past validation: RTL, joiners, combining marks, 4-byte characters.
fine_text = st.text(st.one_of(st.characters(exclude_categories=("Cs", "Cc")),
                              st.sampled_from(["\u200f", "\u202e", "\u2066", "\u200d", "\u0301", "\U0001f600",
                                               "\U0001f469", "\U0001f4bb", "\n", "\t"])), min_size=1, max_size=40)
# Fine text with one character the chat refuses, so that it is the only thing wrong.
BAD_CHARS = ["\ud800", "\udbff", "\udc00", "\udfff", "\x00", "\x1b", "\x7f", "\x85"]
one_bad = st.builds(lambda text, bad, at: text[:at] + bad + text[at:], fine_text, st.sampled_from(BAD_CHARS),
                    st.integers(0, 40))
texts = mostly(fine_text, st.one_of(one_bad, hostile_text), 60)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70), huge_ints,
                    st.floats(allow_nan=True, allow_infinity=True), hostile_text)


def nested(depth: int, as_dict: bool):
    value: object = "x"
    for _ in range(depth):
        value = {"a": value} if as_dict else [value]
    return value


deep = st.builds(nested, st.integers(50, 400), st.booleans())
json_values = st.one_of(
    st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(hostile_text, inner, max_size=4),
                 max_leaves=8),
    deep,
)
# Event payloads may also carry binary values (python-socketio sends them as attachments).
event_values = st.one_of(json_values, st.binary(max_size=32))

OWN = "<own conversation>"  # replaced by the test's own conversation id, to get past the participant check
conversation_ids = st.one_of(st.just(OWN), hostile_text, st.integers(), huge_ints, event_values,
                             st.from_regex(r"[A-Za-z0-9_-]{1,128}", fullmatch=True))


def objects(required: dict, optional: dict, extra_values):
    """``required`` and some of ``optional`` fields, plus extra keys; or some of all of them (missing fields)."""
    def merge(known, extra):
        return {**extra, **known}

    extras = st.dictionaries(hostile_text, extra_values, max_size=3)
    full = st.builds(merge, st.fixed_dictionaries(required, optional=optional), extras)
    partial = st.builds(merge, st.fixed_dictionaries({}, optional={**required, **optional}), extras)
    return mostly(full, partial, 80)


def payloads(required: dict | None = None, optional: dict | None = None):
    """Mostly objects aimed at the own conversation (to reach the handler's deeper checks), else anything."""
    required = {"conversation_id": mostly(st.just(OWN), conversation_ids, 75), **(required or {})}
    return mostly(objects(required, optional or {}, event_values), event_values, 85)


EVENT_PAYLOADS = {
    "join_room": payloads(),
    "leave_room": payloads(),
    "send_message": payloads({"message": mostly(texts, event_values, 85)},
                             {"client_message_id": mostly(texts, event_values, 85), "user_id": event_values}),
    "typing": payloads({"is_typing": mostly(st.booleans(), event_values, 70)}),
    "stop_generation": payloads(optional={"message_id": st.one_of(
        hostile_text, event_values, st.from_regex(r"[A-Za-z0-9_-]{1,30}", fullmatch=True))}),
}
unknown_events = hostile_text.filter(lambda name: name not in EVENTS and name not in RESERVED)


# -- checks -----------------------------------------------------------------
def note(outcome: str) -> None:
    """Count outcomes per test (``--hypothesis-show-statistics``), to see that examples get past validation."""
    if hypothesis.currently_in_test_context():
        hypothesis.event(outcome)


def check_ack(ack) -> None:
    """A well-formed ack: ``{ok: true, ...}`` or ``{ok: false, error: {code, message}}`` with a protocol code."""
    assert isinstance(ack, dict), ack
    if ack.get("ok") is True:
        return
    assert ack.get("ok") is False and set(ack) == {"ok", "error"}, ack
    assert isinstance(ack["error"], dict) and isinstance(ack["error"].get("message"), str), ack
    assert ack["error"].get("code") in CODES, ack
    assert ack["error"]["code"] != "internal", ack


def check_http(status: int, body) -> None:
    assert status < 500, (status, body)
    if status >= 400:
        assert isinstance(body, dict) and set(body) == {"error"}, (status, body)
        code = body["error"].get("code")
        assert code in CODES and code != "internal", (status, body)
        assert HTTP_STATUS[code] == status, (status, body)
        assert isinstance(body["error"].get("message"), str), body


def with_own(payload, conversation_id: str):
    if isinstance(payload, dict) and payload.get("conversation_id") == OWN:
        return {**payload, "conversation_id": conversation_id}
    return payload


@dataclass
class Target:
    url: str
    user: str
    token: str
    conversation_id: str


@pytest.fixture(scope="module")
async def target(service, make_token):
    user = new_user("hostile")
    token = make_token(user, name="Hostile")
    async with aiohttp.ClientSession() as session:
        conv = await Api(service, session).create_conversation(token, "hostile input")
    return Target(service, user, token, conv["id"])


async def exercise(target: Target, event: str, payload) -> dict:
    """Connect, join the own conversation, send ``event``, then check the connection still serves."""
    client = ChatClient(target.url, target.token)
    try:
        await client.connect()
        joined = await client.call("join_room", {"conversation_id": target.conversation_id})
        assert joined["ok"] is True, joined
        ack = await client.call(event, with_own(payload, target.conversation_id), timeout=5)
        check_ack(ack)
        note("ok" if ack["ok"] else ack["error"]["code"])
        if ack["ok"] is False:
            error = await client.wait_for("error", lambda e: e.get("code") == ack["error"]["code"])
            assert error["message"] == ack["error"]["message"]
        again = await client.call("join_room", {"conversation_id": target.conversation_id})
        assert again["ok"] is True, ("connection unusable after the hostile event", again)
        assert client.sio.connected
        return ack
    finally:
        await client.close()


async def check_refused_unauthenticated(url: str, token: str | None = None, **kwargs) -> None:
    """A handshake with these credentials is refused with a ``connect_error`` of code ``unauthenticated``."""
    client = ChatClient(url, token, **kwargs)
    try:
        with pytest.raises(socketio.exceptions.ConnectionError):
            await client.connect()
        assert isinstance(client.connect_error, dict), client.connect_error
        assert client.connect_error.get("code") == "unauthenticated", client.connect_error
    finally:
        await client.close()


# -- Socket.IO events ---------------------------------------------------------
@HOSTILE
@given(payload=EVENT_PAYLOADS["join_room"])
@example(payload={"conversation_id": "__proto__"})  # explicit examples: the defects the issue found
@example(payload={"conversation_id": "abc\n"})
async def test_join_room_survives_hostile_payloads(target, payload):
    await exercise(target, "join_room", payload)


@HOSTILE
@given(payload=EVENT_PAYLOADS["leave_room"])
async def test_leave_room_survives_hostile_payloads(target, payload):
    await exercise(target, "leave_room", payload)


@settings(HOSTILE, max_examples=150)
@given(payload=EVENT_PAYLOADS["send_message"])
@example(payload={"conversation_id": OWN, "message": "\ud800"})
@example(payload={"conversation_id": OWN, "message": "hi", "client_message_id": "\udfff"})
async def test_send_message_survives_hostile_payloads(target, payload):
    await exercise(target, "send_message", payload)


@HOSTILE
@given(payload=EVENT_PAYLOADS["typing"])
async def test_typing_survives_hostile_payloads(target, payload):
    await exercise(target, "typing", payload)


@HOSTILE
@given(payload=EVENT_PAYLOADS["stop_generation"])
@example(payload={"conversation_id": OWN, "message_id": "\ud800"})
@example(payload={"conversation_id": OWN, "message_id": "__name__"})
async def test_stop_generation_survives_hostile_payloads(target, payload):
    await exercise(target, "stop_generation", payload)


@HOSTILE
@given(event=unknown_events, payload=event_values)
async def test_unknown_events_survive_hostile_payloads(target, event, payload):
    ack = await exercise(target, event, payload)
    assert ack["ok"] is False and ack["error"]["code"] == "invalid_argument"


@HOSTILE
@given(auth=st.one_of(
    st.fixed_dictionaries({"token": st.one_of(hostile_text, json_values)},
                          optional={"user_id": hostile_text, "extra": json_values}),
    st.dictionaries(hostile_text, json_values, max_size=3)))
@example(auth={"token": "\ud800"})
async def test_handshake_with_hostile_auth_is_refused_cleanly(target, auth):
    await check_refused_unauthenticated(target.url, auth=auth)
    # The server is unharmed: a valid handshake still works.
    ack = await exercise(target, "leave_room", {"conversation_id": target.conversation_id})
    assert ack["ok"] is True


# -- HTTP API ---------------------------------------------------------------
def encode(text: str) -> str:
    """A path segment or query value, percent-encoded from its UTF-8 bytes (lone surrogates included).

    Dots too: ``..`` as the last segment of a DELETE must not become the conversation itself.
    """
    return quote(text.encode("utf-8", "surrogatepass"), safe="").replace(".", "%2E")


def as_body(value) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


raw_bodies = st.one_of(st.binary(max_size=64), st.sampled_from([
    b"{", b"[" * 5000, b'{"title":' + b"[" * 3000 + b"]" * 3000 + b"}", b'{"title": "\xed\xa0\x80"}',
    b'{"title": "\\ud800"}', b'{"title": NaN}', b'{"title": ' + b"9" * 4000 + b"}", b'{"user_id": ' + b"9" * 5000 + b"}",
    b"\xff\xfe{}", b"null",
]))


def bodies(required: dict | None = None, optional: dict | None = None):
    return mostly(objects(required or {}, optional or {}, json_values), st.one_of(json_values, raw_bodies), 75)


path_ids = mostly(st.just(OWN), hostile_text, 75)
query_values = st.one_of(st.none(), hostile_text, st.integers().map(str), huge_ints.map(str), st.just("9" * 3000),
                         st.sampled_from(["", "0", "-1", "201", "1e3", "NaN", "\u0663", "%", "=="]))


async def call_http(session: aiohttp.ClientSession, target: Target, method: str, path: str, body: bytes | None = None,
                    query: dict | None = None, token: str | None = "default"):
    url = target.url + path
    if query:
        url += "?" + "&".join(f"{k}={encode(v)}" for k, v in query.items() if v is not None)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {target.token if token == 'default' else token}"
    async with session.request(method, yarl.URL(url, encoded=True), data=body, headers=headers) as response:
        payload = await response.json() if response.content_type == "application/json" else await response.text()
        check_http(response.status, payload)
        note(f"{method} {response.status}")
        return response.status, payload


async def still_serves(session: aiohttp.ClientSession, target: Target) -> None:
    status, body = await call_http(session, target, "GET", "/api/conversations", query={"limit": "1"})
    assert status == 200, body


def own_path(conversation_id: str, target: Target) -> str:
    return target.conversation_id if conversation_id == OWN else encode(conversation_id)


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


@HOSTILE
@given(body=bodies(optional={"title": mostly(texts, json_values, 80)}))
@example(body={"title": "\ud800"})
@example(body=b"[" * 5000)
async def test_create_conversation_survives_hostile_bodies(target, http, body):
    await call_http(http, target, "POST", "/api/conversations", as_body(body))
    await still_serves(http, target)


@HOSTILE
@given(conversation_id=path_ids, body=bodies({"title": mostly(texts, json_values, 80)}))
@example(conversation_id=OWN, body={"title": "x\udc00"})
@example(conversation_id="__proto__", body={"title": "x"})
async def test_rename_conversation_survives_hostile_bodies(target, http, conversation_id, body):
    await call_http(http, target, "PATCH", f"/api/conversations/{own_path(conversation_id, target)}", as_body(body))
    await still_serves(http, target)


@HOSTILE
@given(conversation_id=path_ids, body=bodies({"user_id": mostly(texts, json_values, 80)}))
@example(conversation_id=OWN, body={"user_id": "\ud800"})
async def test_add_participant_survives_hostile_bodies(target, http, conversation_id, body):
    path = f"/api/conversations/{own_path(conversation_id, target)}/participants"
    await call_http(http, target, "POST", path, as_body(body))
    await still_serves(http, target)


@HOSTILE
@given(conversation_id=path_ids, user_id=hostile_text.filter(lambda u: u.strip(".")))
@example(conversation_id="__proto__", user_id="__proto__")
async def test_remove_participant_survives_hostile_paths(target, http, conversation_id, user_id):
    path = f"/api/conversations/{own_path(conversation_id, target)}/participants/{encode(user_id)}"
    await call_http(http, target, "DELETE", path)
    await still_serves(http, target)


@HOSTILE
@given(conversation_id=path_ids, limit=query_values, before=query_values)
async def test_message_history_survives_hostile_paging(target, http, conversation_id, limit, before):
    path = f"/api/conversations/{own_path(conversation_id, target)}/messages"
    await call_http(http, target, "GET", path, query={"limit": limit, "before": before})
    await still_serves(http, target)


@HOSTILE
@given(limit=query_values, cursor=query_values)
async def test_conversation_list_survives_hostile_paging(target, http, limit, cursor):
    await call_http(http, target, "GET", "/api/conversations", query={"limit": limit, "cursor": cursor})
    await still_serves(http, target)


@HOSTILE
@given(body=bodies({"user_id": mostly(texts, json_values, 80)}, {"name": mostly(texts, json_values, 80)}))
@example(body={"user_id": "\ud800"})
@example(body={"user_id": "ada-" + "\U0001f600", "name": "\udfff"})
@example(body={"user_id": "__proto__"})
async def test_dev_token_survives_hostile_bodies(target, http, body):
    status, answer = await call_http(http, target, "POST", "/api/dev/token", as_body(body), token=None)
    if status == 200:
        await token_works(http, target, answer["token"])
    await still_serves(http, target)


async def token_works(http: aiohttp.ClientSession, target: Target, token: str) -> None:
    """A token the server issued is usable: a conversation, a message (the per-user quota documents), typing."""
    status, conv = await call_http(http, target, "POST", "/api/conversations", b"{}", token=token)
    assert status == 201, conv
    client = ChatClient(target.url, token)
    try:
        await client.connect()
        assert (await client.call("join_room", {"conversation_id": conv["id"]}, timeout=5))["ok"] is True
        ack = await client.call("send_message", {"conversation_id": conv["id"], "message": "hi"}, timeout=5)
        assert ack["ok"] is True, ack
        assert (await client.call("typing", {"conversation_id": conv["id"], "is_typing": True}, timeout=5))["ok"]
    finally:
        await client.close()


@HOSTILE
@given(authorization=st.one_of(
    st.text(st.characters(codec="latin-1", categories=["L", "N", "P", "S", "Zs"]), max_size=60),
    st.text(st.characters(codec="latin-1", categories=["L", "N", "P", "S", "Zs"]), max_size=60).map("Bearer {}".format)))
async def test_hostile_authorization_headers_are_unauthenticated(target, http, authorization):
    async with http.get(target.url + "/api/conversations", headers={"Authorization": authorization}) as response:
        body = await response.json()
        check_http(response.status, body)
        assert response.status == 401, body
    await still_serves(http, target)


# -- the Unicode rules, case by case ------------------------------------------------------
@pytest.fixture
async def joined(target):
    client = ChatClient(target.url, target.token)
    await client.connect()
    ack = await client.call("join_room", {"conversation_id": target.conversation_id})
    assert ack["ok"] is True
    yield client
    await client.close()


@pytest.mark.parametrize("field, payload", [
    ("message", {"message": "hello \ud800 world"}),
    ("message", {"message": "\udfff"}),
    ("client_message_id", {"message": "hi", "client_message_id": "id-\ud800"}),
])
async def test_lone_surrogates_are_invalid_argument(target, joined, field, payload):
    ack = await joined.call("send_message", {"conversation_id": target.conversation_id, **payload})
    assert ack["ok"] is False and ack["error"]["code"] == "invalid_argument", ack
    assert field in ack["error"]["message"] and "lone surrogate" in ack["error"]["message"], ack
    assert (await joined.call("send_message", {"conversation_id": target.conversation_id, "message": "ok"}))["ok"]


@pytest.mark.parametrize("event, payload", [
    ("join_room", {"conversation_id": "abc\ud800"}),
    ("join_room", {"conversation_id": "abc\n"}),
    ("join_room", {"conversation_id": "__proto__"}),  # Firestore reserves ids of the form __name__
    ("stop_generation", {"message_id": "__name__"}),
    ("stop_generation", {"message_id": "\ud800"}),
    ("stop_generation", {"message_id": "m\x00"}),
])
async def test_odd_ids_are_invalid_argument(target, joined, event, payload):
    ack = await joined.call(event, {"conversation_id": target.conversation_id, **payload})
    assert ack["ok"] is False and ack["error"]["code"] == "invalid_argument", ack


@pytest.mark.parametrize("payload", [
    {"message": "nul \x00 inside"},
    {"message": "escape \x1b[31m red"},
    {"message": "c1 \x85 control"},
    {"message": "ok", "client_message_id": "tab\tid"},
])
async def test_control_characters_are_invalid_argument(target, joined, payload):
    ack = await joined.call("send_message", {"conversation_id": target.conversation_id, **payload})
    assert ack["ok"] is False and ack["error"]["code"] == "invalid_argument", ack
    assert "control characters" in ack["error"]["message"], ack


@pytest.mark.parametrize("text", [
    "line one\nline two\r\n\tindented",
    "\u05e9\u05dc\u05d5\u05dd \u200fRTL mark, \u202eoverride\u202c, \u2066isolate\u2069",
    "zero width joiner \U0001f469\u200d\U0001f4bb and BOM \ufeff",
    "astral \U0001f600 \U00010348 \U0010fffd",
])
async def test_ordinary_unicode_is_stored_verbatim(target, joined, text):
    ack = await joined.call("send_message", {"conversation_id": target.conversation_id, "message": text})
    assert ack["ok"] is True, ack
    message = await joined.wait_for("new_message", lambda m: m["message_id"] == ack["message_id"])
    assert message["content"] == text.strip()


@pytest.mark.parametrize("unit, count, ok", [
    ("\U0001f600", MAX_MESSAGE_CHARS, True),  # 4 bytes in UTF-8, 2 UTF-16 units: still one character
    ("\U0001f600", MAX_MESSAGE_CHARS + 1, False),
    ("e\u0301", MAX_MESSAGE_CHARS // 2, True),  # letter + combining acute: two characters
    ("e\u0301", MAX_MESSAGE_CHARS // 2 + 1, False),
])
async def test_length_limit_counts_characters(target, joined, unit, count, ok):
    text = unit * count
    ack = await joined.call("send_message", {"conversation_id": target.conversation_id,
                                             "message": "  \n" + text + "\t "})
    if ok:
        assert ack["ok"] is True, ack
        message = await joined.wait_for("new_message", lambda m: m["message_id"] == ack["message_id"])
        assert message["content"] == text and len(message["content"]) == MAX_MESSAGE_CHARS
    else:
        assert ack["ok"] is False and ack["error"]["code"] == "too_large", ack


async def test_combining_sequence_cut_by_the_limit_counts_code_points(target, joined):
    text = "a" * (MAX_MESSAGE_CHARS - 1) + "e\u0301"  # 8001 characters: the accent is one too many
    ack = await joined.call("send_message", {"conversation_id": target.conversation_id, "message": text})
    assert ack["ok"] is False and ack["error"]["code"] == "too_large", ack


@pytest.mark.parametrize("method, path, body, code", [
    ("POST", "/api/conversations", {"title": "\ud800"}, "invalid_argument"),
    ("POST", "/api/conversations", {"title": "a\x00b"}, "invalid_argument"),
    ("PATCH", "/api/conversations/{cid}", {"title": "x\udc00"}, "invalid_argument"),
    ("POST", "/api/conversations/{cid}/participants", {"user_id": "\ud800"}, "invalid_argument"),
    ("POST", "/api/conversations/{cid}/participants", {"user_id": "bob\x00"}, "invalid_argument"),
    ("POST", "/api/dev/token", {"user_id": "\ud800"}, "invalid_argument"),
    ("POST", "/api/dev/token", {"user_id": "ada", "name": "\ud800"}, "invalid_argument"),
    ("POST", "/api/dev/token", {"user_id": "ada", "name": "Ada\nLovelace"}, "invalid_argument"),
])
async def test_http_bodies_with_odd_text_are_400(target, http, method, path, body, code):
    status, answer = await call_http(http, target, method, path.format(cid=target.conversation_id),
                                     json.dumps(body).encode(), token=None if "dev" in path else "default")
    assert status == 400 and answer["error"]["code"] == code, answer
    assert "Unicode" in answer["error"]["message"] or "control" in answer["error"]["message"], answer


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/api/dev/token", {"user_id": "__proto__"}),
    ("POST", "/api/dev/token", {"user_id": ".."}),
    ("POST", "/api/conversations/{cid}/participants", {"user_id": "__name__"}),
    ("PATCH", "/api/conversations/__proto__", {"title": "x"}),
    ("DELETE", "/api/conversations/__proto__/participants/bob", None),
])
async def test_ids_the_database_reserves_are_400(target, http, method, path, body):
    status, answer = await call_http(http, target, method, path.format(cid=target.conversation_id),
                                     None if body is None else json.dumps(body).encode(),
                                     token=None if "dev" in path else "default")
    assert status == 400 and answer["error"]["code"] == "invalid_argument", answer


@pytest.mark.parametrize("body", [b"[" * 5000, b'{"title": ' + b"[" * 5000 + b"]" * 5000 + b"}"])
async def test_deeply_nested_http_body_is_400(target, http, body):
    status, answer = await call_http(http, target, "POST", "/api/conversations", body)
    assert status == 400 and answer["error"]["code"] == "invalid_argument", answer


async def test_odd_path_segments_are_400(target, http):
    # (A lone surrogate cannot reach a path: its UTF-8-like bytes are not UTF-8, and stay percent-encoded.)
    for user_id in ("bob\x00", "bob\x1b[2J", "bob\n"):
        path = f"/api/conversations/{target.conversation_id}/participants/{encode(user_id)}"
        status, answer = await call_http(http, target, "DELETE", path)
        assert status == 400 and answer["error"]["code"] == "invalid_argument", answer


async def test_rtl_and_astral_titles_are_kept(target, http):
    title = "\u05e9\u05dc\u05d5\u05dd \u200f\U0001f600 e\u0301"
    status, conv = await call_http(http, target, "POST", "/api/conversations", json.dumps({"title": title}).encode())
    assert status == 201 and conv["title"] == title, conv


async def test_token_name_the_chat_cannot_store_falls_back_to_the_user_id(target, make_token, http):
    """A name from the identity provider with a lone surrogate or NUL must not break sending."""
    for name in ("Ada \ud800", "Ada\x00"):
        user = new_user("odd-name")
        token = make_token(user, name=name)
        status, conv = await call_http(http, target, "POST", "/api/conversations",
                                       json.dumps({"title": "t"}).encode(), token=token)
        assert status == 201, conv
        client = ChatClient(target.url, token)
        try:
            await client.connect()
            assert (await client.call("join_room", {"conversation_id": conv["id"]}))["ok"] is True
            ack = await client.call("send_message", {"conversation_id": conv["id"], "message": "hello"})
            assert ack["ok"] is True, ack
            await client.call("typing", {"conversation_id": conv["id"], "is_typing": True})
        finally:
            await client.close()


@pytest.mark.parametrize("auth", [{"token": "\ud800"}, {"token": "é" * 20}, {"token": "eyJ\x00.a.b"}])
async def test_non_ascii_handshake_token_is_unauthenticated(target, auth):
    await check_refused_unauthenticated(target.url, auth=auth)


async def test_token_subject_with_a_control_character_is_refused(target, make_token):
    await check_refused_unauthenticated(target.url, make_token("user\x00" + uuid.uuid4().hex[:6]))

