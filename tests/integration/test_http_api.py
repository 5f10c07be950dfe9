"""PROTOCOL.md "HTTP API (socket service)" against the running service."""

import asyncio

import pytest

from tests.conftest import new_user


@pytest.mark.parametrize("health, ready", [("/health", "/ready"), ("/healthz", "/readyz")])
async def test_health_and_readiness(api, health, ready):
    assert await api.request("GET", health) == (200, {"status": "ok"})
    status, body = await api.request("GET", ready)
    assert status == 200
    assert body == {"status": "ok", "checks": {"firestore": "ok", "bus": "ok"}}


async def test_config_json(api):
    status, body = await api.request("GET", "/config.json")
    assert status == 200
    assert set(body) == {"upload_url", "max_upload_bytes", "allowed_content_types", "max_message_chars",
                         "auth_mode", "ai_provider", "upload_stall_seconds"}
    assert body["upload_url"].startswith("http://")
    assert body["auth_mode"] == "dev" and body["ai_provider"] == "offline"
    assert body["max_message_chars"] == 8000 and body["max_upload_bytes"] == 25 * 1024 * 1024
    assert "image/png" in body["allowed_content_types"]
    assert body["upload_stall_seconds"] == 30


async def test_dev_token_connects(api, service, clients):
    status, body = await api.request("POST", "/api/dev/token", json={"user_id": "ada", "name": "Ada"})
    assert status == 200
    client = await clients(service, body["token"])
    assert (await client.wait_for("connected"))["user_id"] == "ada"


@pytest.mark.parametrize("body", [{}, {"user_id": ""}, {"user_id": 5}, {"user_id": "a/b"},
                                  {"user_id": "ok", "name": 3}])
async def test_dev_token_validates(api, body):
    status, answer = await api.request("POST", "/api/dev/token", json=body)
    assert status == 400 and answer["error"]["code"] == "invalid_argument"


@pytest.mark.parametrize("method, path", [
    ("GET", "/api/conversations"), ("POST", "/api/conversations"),
    ("PATCH", "/api/conversations/abc"), ("DELETE", "/api/conversations/abc"),
    ("GET", "/api/conversations/abc/messages"), ("POST", "/api/conversations/abc/participants"),
    ("DELETE", "/api/conversations/abc/participants/u")])
async def test_api_requires_a_valid_bearer_token(api, method, path):
    status, body = await api.request(method, path)
    assert status == 401 and body["error"]["code"] == "unauthenticated"
    status, body = await api.request(method, path, token="garbage")
    assert status == 401 and body["error"]["code"] == "unauthenticated"


async def test_create_conversation(api, make_token):
    owner = new_user()
    status, body = await api.request("POST", "/api/conversations", make_token(owner), json={"title": "  Trip  plans "})
    assert status == 201
    assert set(body) == {"id", "title", "owner_id", "participants", "created_at", "updated_at", "ai_mode",
                         "participants_info"}
    assert body["title"] == "Trip plans" and body["owner_id"] == owner and body["participants"] == [owner]
    status, body = await api.request("POST", "/api/conversations", make_token(owner))
    assert status == 201 and body["title"] == "New conversation"


@pytest.mark.parametrize("payload", [{"title": 5}, {"title": "   "}, {"title": "t" * 201}])
async def test_create_conversation_validates_title(api, make_token, payload):
    status, body = await api.request("POST", "/api/conversations", make_token(), json=payload)
    assert status == 400 and body["error"]["code"] == "invalid_argument"


async def test_malformed_json_body_is_400(api, make_token):
    status, body = await api.request("POST", "/api/conversations", make_token(), data=b"{not json",
                                     headers={"Content-Type": "application/json"})
    assert status == 400 and body["error"]["code"] == "invalid_argument"
    status, body = await api.request("POST", "/api/conversations", make_token(), json=[1, 2])
    assert status == 400


async def test_list_conversations_pages_most_recent_first(api, make_token):
    token = make_token()
    created = []
    for i in range(7):
        created.append((await api.create_conversation(token, f"c{i}"))["id"])
        await asyncio.sleep(0.002)
    seen, cursor = [], None
    while True:
        path = "/api/conversations?limit=3" + (f"&cursor={cursor}" if cursor else "")
        status, body = await api.request("GET", path, token)
        assert status == 200 and len(body["items"]) <= 3
        seen.extend(c["id"] for c in body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(created))


async def test_other_users_conversations_are_not_listed(api, make_token):
    mine = await api.create_conversation(make_token(new_user()))
    status, body = await api.request("GET", "/api/conversations", make_token())
    assert status == 200 and mine["id"] not in [c["id"] for c in body["items"]]


@pytest.mark.parametrize("query", ["limit=0", "limit=201", "limit=abc", "cursor=%%%", "cursor=bm90LWEta2V5"])
async def test_bad_paging_parameters(api, make_token, query):
    token = make_token()
    conv = await api.create_conversation(token)
    for path in (f"/api/conversations?{query}", f"/api/conversations/{conv['id']}/messages?"
                 + query.replace("cursor", "before")):
        status, body = await api.request("GET", path, token)
        assert status == 400 and body["error"]["code"] == "invalid_argument", path


async def test_rename_is_owner_only(api, make_token):
    owner, guest = new_user(), new_user()
    conv = await api.create_conversation(make_token(owner))
    await api.add_participant(make_token(owner), conv["id"], guest)
    status, body = await api.request("PATCH", f"/api/conversations/{conv['id']}", make_token(guest),
                                     json={"title": "mine now"})
    assert status == 403 and body["error"]["code"] == "forbidden"
    status, body = await api.request("PATCH", f"/api/conversations/{conv['id']}", make_token(owner),
                                     json={"title": "Renamed"})
    assert status == 200 and body["title"] == "Renamed" and body["updated_at"] >= conv["updated_at"]
    status, body = await api.request("PATCH", "/api/conversations/missing", make_token(owner), json={"title": "x"})
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = await api.request("PATCH", f"/api/conversations/{conv['id']}", make_token(owner), json={})
    assert status == 400


async def test_participants_rules(api, make_token):
    owner, a, b = new_user(), new_user(), new_user()
    conv = await api.create_conversation(make_token(owner))
    cid = conv["id"]
    assert (await api.add_participant(make_token(owner), cid, a))["participants"] == [owner, a]
    assert (await api.add_participant(make_token(owner), cid, a))["participants"] == [owner, a]  # idempotent
    status, body = await api.request("POST", f"/api/conversations/{cid}/participants", make_token(a),
                                     json={"user_id": b})
    assert status == 403
    await api.add_participant(make_token(owner), cid, b)
    status, _ = await api.request("DELETE", f"/api/conversations/{cid}/participants/{b}", make_token(a))
    assert status == 403, "a participant cannot remove another"
    status, body = await api.request("DELETE", f"/api/conversations/{cid}/participants/{b}", make_token(b))
    assert (status, body) == (200, {"participants": [owner, a]}), "a participant may leave"
    status, body = await api.request("DELETE", f"/api/conversations/{cid}/participants/{owner}", make_token(owner))
    assert status == 400
    status, body = await api.request("POST", f"/api/conversations/{cid}/participants", make_token(owner),
                                     json={"user_id": ""})
    assert status == 400
    status, _ = await api.request("GET", f"/api/conversations/{cid}/messages", make_token(b))
    assert status == 403


async def test_delete_conversation_removes_messages(api, make_token, service, clients, firestore_db):
    owner, guest = new_user(), new_user()
    conv = await api.create_conversation(make_token(owner))
    await api.add_participant(make_token(owner), conv["id"], guest)
    client = await clients(service, make_token(owner))
    await client.call("join_room", {"conversation_id": conv["id"]})
    for i in range(3):
        assert (await client.call("send_message", {"conversation_id": conv["id"], "message": f"m{i}"}))["ok"]
    ref = firestore_db.collection("conversations").document(conv["id"])
    assert len(ref.collection("messages").get()) == 6
    status, _ = await api.request("DELETE", f"/api/conversations/{conv['id']}", make_token(guest))
    assert status == 403
    status, body = await api.request("DELETE", f"/api/conversations/{conv['id']}", make_token(owner))
    assert status == 204
    assert not ref.get().exists and ref.collection("messages").get() == []
    status, body = await api.request("GET", f"/api/conversations/{conv['id']}/messages", make_token(owner))
    assert status == 404
    status, _ = await api.request("DELETE", f"/api/conversations/{conv['id']}", make_token(owner))
    assert status == 404


async def test_history_pagination_returns_every_message_once(api, make_token, service, clients):
    owner = new_user()
    token = make_token(owner)
    conv = await api.create_conversation(token)
    client = await clients(service, token)
    sent = []
    for i in range(30):
        ack = await client.call("send_message", {"conversation_id": conv["id"], "message": f"n{i}"})
        assert ack["ok"], ack
        sent.append(ack["message_id"])
    pages, before = [], None
    while True:
        path = f"/api/conversations/{conv['id']}/messages?limit=7" + (f"&before={before}" if before else "")
        status, body = await api.request("GET", path, token)
        assert status == 200 and 0 < len(body["items"]) <= 7
        pages.append(body["items"])
        before = body["next_before"]
        if before is None:
            break
    # Pages go back in time; within a page, oldest first.
    history = [m for page in reversed(pages) for m in page]
    ids = [m["message_id"] for m in history]
    assert len(ids) == len(set(ids)) == 60
    assert [m["message_id"] for m in history if m["role"] == "user"] == sent
    assert [m["content"] for m in history if m["role"] == "user"] == [f"n{i}" for i in range(30)]
    # Every user message is followed by its own assistant reply (streamed by the AI function meanwhile).
    assert [m["role"] for m in history] == ["user", "assistant"] * 30
    assert {m["status"] for m in history} <= {"complete", "pending", "streaming"}, history
    timestamps = [m["timestamp"] for m in history]
    assert timestamps == sorted(timestamps)


async def test_unknown_route_is_json_404(api):
    status, body = await api.request("GET", "/api/nope")
    assert status == 404 and body["error"]["code"] == "not_found"


async def test_cors_preflight_in_local_mode(api):
    status, _ = await api.request("OPTIONS", "/api/conversations", headers={
        "Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST"})
    assert status == 204
