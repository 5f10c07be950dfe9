"""Issue 16, server side, over Socket.IO: names on messages, the live conversation list
(``conversation_updated``), unread counts, AI modes, who stopped a reply, and ``regenerate``.

Real service processes (two instances), the AI function, and the emulators.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from tests.conftest import new_user

QUIET = 1.5  # how long "nothing arrives" is watched for


async def joined_room(api, service, make_token, clients, *, name="Olivia", mode=None):
    owner = new_user()
    token = make_token(owner, name=name)
    conv = await api.create_conversation(token)
    if mode is not None:
        status, body = await api.request("PATCH", f"/api/conversations/{conv['id']}", token, json={"ai_mode": mode})
        assert status == 200, body
    client = await clients(service, token)
    assert (await client.call("join_room", {"conversation_id": conv["id"]}))["ok"]
    return owner, token, conv, client


def updates(client, conversation_id, reason=None):
    return [u for u in client.received("conversation_updated")
            if u["conversation_id"] == conversation_id and (reason is None or u["reason"] == reason)]


async def everyone_hears(listeners, conversation_id, reason) -> list[dict]:
    """The ``conversation_updated`` of ``reason`` about the conversation, as each of ``listeners`` receives it."""
    return [await client.wait_for("conversation_updated", lambda u: u["conversation_id"] == conversation_id
                                  and u["reason"] == reason) for client in listeners]


# -- names -------------------------------------------------------------------------
async def test_messages_carry_the_senders_name(api, service, make_token, clients):
    owner, token, conv, client = await joined_room(api, service, make_token, clients, name="Olivia")
    ack = await client.call("send_message", {"conversation_id": conv["id"], "message": "hello"})
    msg = await client.wait_for("new_message", lambda m: m["message_id"] == ack["message_id"])
    assert msg["username"] == "Olivia" and msg["user_id"] == owner
    status, page = await api.request("GET", f"/api/conversations/{conv['id']}/messages", token)
    [item] = [m for m in page["items"] if m["message_id"] == ack["message_id"]]
    assert item["username"] == "Olivia"


async def test_a_chosen_name_is_used_for_new_messages(api, service, make_token, clients):
    owner = new_user()
    token = make_token(owner, name="Token Name")
    status, _ = await api.request("PATCH", "/api/me", token, json={"name": "Chosen"})
    assert status == 200
    conv = await api.create_conversation(token)
    client = await clients(service, token)
    await client.call("join_room", {"conversation_id": conv["id"]})
    ack = await client.call("send_message", {"conversation_id": conv["id"], "message": "hi"})
    msg = await client.wait_for("new_message", lambda m: m["message_id"] == ack["message_id"])
    assert msg["username"] == "Chosen"


# -- the live conversation list ----------------------------------------------------------
async def test_conversation_updated_reaches_every_participant_on_any_instance(
        api, service, service_b, make_token, clients):
    owner, guest, later = new_user(), new_user(), new_user()
    owner_token = make_token(owner, name="Olivia")
    guest_token = make_token(guest, name="Gus")
    # Nobody joins the conversation's room: the list is fed through the user rooms.
    owner_list = await clients(service, owner_token)
    guest_list = await clients(service_b, guest_token)
    later_list = await clients(service_b, make_token(later, name="Lea"))
    await api.request("GET", "/api/me", guest_token)  # Gus has a profile: his name is known

    conv = await api.create_conversation(owner_token, title="Plans")
    created = await owner_list.wait_for("conversation_updated", lambda u: u["conversation_id"] == conv["id"])
    assert created["reason"] == "created" and created["conversation"]["id"] == conv["id"]
    assert created["conversation"]["title"] == "Plans" and "updated_at" in created["conversation"]

    await api.add_participant(owner_token, conv["id"], guest)
    for update in await everyone_hears((owner_list, guest_list), conv["id"], "participants"):
        assert update["conversation"]["participants"] == [owner, guest]
        assert {"user_id": guest, "name": "Gus"} in update["conversation"]["participants_info"]

    status, _ = await api.request("PATCH", f"/api/conversations/{conv['id']}", owner_token, json={"title": "Trip"})
    assert status == 200
    for update in await everyone_hears((owner_list, guest_list), conv["id"], "renamed"):
        assert update["conversation"]["title"] == "Trip"

    status, _ = await api.request("PATCH", f"/api/conversations/{conv['id']}", owner_token, json={"ai_mode": "off"})
    assert status == 200
    for update in await everyone_hears((owner_list, guest_list), conv["id"], "ai_mode"):
        assert update["conversation"]["ai_mode"] == "off"

    # A message from a connection that did not join the room either.
    text = "A long message " + "x" * 300
    ack = await guest_list.call("send_message", {"conversation_id": conv["id"], "message": text})
    assert ack["ok"], ack
    for update in await everyone_hears((owner_list, guest_list), conv["id"], "message"):
        last = update["last_message"]
        assert last["message_id"] == ack["message_id"] and last["role"] == "user"
        assert last["user_id"] == guest and last["username"] == "Gus"
        assert last["preview"] == text[:120] and last["timestamp"].endswith("Z")
        assert update["conversation"]["id"] == conv["id"]

    # Removing: the removed user hears "removed", the others "participants".
    status, _ = await api.request("DELETE", f"/api/conversations/{conv['id']}/participants/{guest}", owner_token)
    assert status == 200
    removed = await guest_list.wait_for("conversation_updated", lambda u: u["conversation_id"] == conv["id"]
                                        and u["reason"] == "removed")
    assert "conversation" not in removed and "last_message" not in removed
    update = await owner_list.wait_for("conversation_updated", lambda u: u["conversation_id"] == conv["id"]
                                       and u["reason"] == "participants" and u["conversation"]["participants"]
                                       == [owner])
    assert update["conversation"]["participants"] == [owner]

    # Deleting: every participant hears it; outsiders hear nothing of it.
    status, _ = await api.request("DELETE", f"/api/conversations/{conv['id']}", owner_token)
    assert status == 204
    deleted = await owner_list.wait_for("conversation_updated", lambda u: u["conversation_id"] == conv["id"]
                                        and u["reason"] == "deleted")
    assert deleted == {"conversation_id": conv["id"], "reason": "deleted"}
    await asyncio.sleep(QUIET)
    assert not updates(later_list, conv["id"])
    assert not updates(guest_list, conv["id"], "deleted"), "a removed participant is not told any more"
    assert not [u for u in updates(guest_list, conv["id"], "message") if u["last_message"]["message_id"]
                != ack["message_id"]]


async def test_a_reply_completion_updates_the_list(api, service, make_token, clients):
    owner, token, conv, client = await joined_room(api, service, make_token, clients)
    watcher = await clients(service, token)  # the same user's other tab, not in the room
    ack = await client.call("send_message", {"conversation_id": conv["id"], "message": "tell me"})
    reply_id = (await client.wait_for("ai_thinking"))["message_id"]
    done = await client.wait_for("ai_response_complete", lambda m: m["message_id"] == reply_id, timeout=30)
    update = await watcher.wait_for("conversation_updated", lambda u: u["conversation_id"] == conv["id"]
                                    and u["reason"] == "message" and u["last_message"]["message_id"] == reply_id,
                                    timeout=15)
    last = update["last_message"]
    assert last["role"] == "assistant" and last["preview"] == done["content"][:120]
    assert last["timestamp"] == done["timestamp"]
    assert ack["ok"]


# -- unread counts -------------------------------------------------------------------
async def test_unread_counts_and_read_markers(api, service, make_token, clients):
    owner, guest = new_user(), new_user()
    owner_token, guest_token = make_token(owner), make_token(guest)
    conv = await api.create_conversation(owner_token)
    status, _ = await api.request("PATCH", f"/api/conversations/{conv['id']}", owner_token, json={"ai_mode": "off"})
    await api.add_participant(owner_token, conv["id"], guest)
    owner_client = await clients(service, owner_token)
    await owner_client.call("join_room", {"conversation_id": conv["id"]})
    ids = []
    for i in range(3):
        ack = await owner_client.call("send_message", {"conversation_id": conv["id"], "message": f"m{i}"})
        ids.append(ack["message_id"])

    async def unread(token):
        status, body = await api.request("GET", "/api/conversations", token)
        assert status == 200
        [item] = [c for c in body["items"] if c["id"] == conv["id"]]
        return item["unread_count"]

    assert await unread(guest_token) == 3
    assert await unread(owner_token) == 0, "one's own messages are never unread"
    guest_tab = await clients(service, guest_token)
    # Read up to the second message, then everything.
    status, body = await api.request("POST", f"/api/conversations/{conv['id']}/read", guest_token,
                                     json={"message_id": ids[1]})
    assert status == 200 and body["conversation_id"] == conv["id"] and body["unread_count"] == 1
    assert await unread(guest_token) == 1
    read = await guest_tab.wait_for("conversation_updated", lambda u: u["conversation_id"] == conv["id"]
                                    and u["reason"] == "read")
    assert read["unread_count"] == 1
    # An older marker does not move it back.
    status, body = await api.request("PUT", f"/api/conversations/{conv['id']}/read", guest_token,
                                     json={"message_id": ids[0]})
    assert status == 200 and body["unread_count"] == 1
    status, body = await api.request("PUT", f"/api/conversations/{conv['id']}/read", guest_token)
    assert status == 200 and body["unread_count"] == 0
    assert await unread(guest_token) == 0
    # Sending marks everything before it read, for the sender.
    guest_client = await clients(service, guest_token)
    await owner_client.call("send_message", {"conversation_id": conv["id"], "message": "one more"})
    assert await unread(guest_token) == 1
    await guest_client.call("send_message", {"conversation_id": conv["id"], "message": "answer"})
    assert await unread(guest_token) == 0
    assert await unread(owner_token) == 1
    # Errors.
    status, body = await api.request("POST", f"/api/conversations/{conv['id']}/read", guest_token,
                                     json={"message_id": "nope"})
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = await api.request("POST", f"/api/conversations/{conv['id']}/read", make_token(new_user()))
    assert status == 403 and body["error"]["code"] == "forbidden"


async def test_unread_count_is_capped(api, service, make_token, firestore_db):
    owner, guest = new_user(), new_user()
    owner_token = make_token(owner)
    conv = await api.create_conversation(owner_token)
    await api.add_participant(owner_token, conv["id"], guest)
    # 105 stored messages (written directly: the event rate limit would make sending them slow).
    messages = firestore_db.collection("conversations").document(conv["id"]).collection("messages")
    batch = firestore_db.batch()
    now = datetime.now(UTC)
    for i in range(105):
        at = now + timedelta(microseconds=i)
        batch.set(messages.document(f"m{i:03d}"), {
            "role": "user", "content": f"n{i}", "user_id": owner, "username": "", "created_at": at,
            "sort_key": f"{int(at.timestamp() * 1e6):017d}-m{i:03d}", "status": "complete", "files": [], "seq": 0})
    batch.commit()
    status, body = await api.request("GET", "/api/conversations", make_token(guest))
    [item] = [c for c in body["items"] if c["id"] == conv["id"]]
    assert item["unread_count"] == 99


# -- AI modes --------------------------------------------------------------------------
async def assert_no_reply(client, firestore_db, conv_id, message_id):
    await asyncio.sleep(QUIET)
    assert not client.received("ai_thinking")
    docs = firestore_db.collection("conversations").document(conv_id).collection("messages").stream()
    assert [d.id for d in docs if d.get("role") == "assistant"] == []


async def test_ai_mode_off_stores_and_acks_but_never_replies(api, service, make_token, clients, firestore_db):
    _, _, conv, client = await joined_room(api, service, make_token, clients, mode="off")
    ack = await client.call("send_message", {"conversation_id": conv["id"], "message": "@ai are you there?"})
    assert ack["ok"] is True and set(ack) == {"ok", "message_id"}
    await client.wait_for("new_message", lambda m: m["message_id"] == ack["message_id"])
    await assert_no_reply(client, firestore_db, conv["id"], ack["message_id"])
    # A retry finds the same message, still without a reply.
    payload = {"conversation_id": conv["id"], "message": "again", "client_message_id": "off-1"}
    first = await client.call("send_message", payload)
    second = await client.call("send_message", payload)
    assert first == second and first["ok"]
    await assert_no_reply(client, firestore_db, conv["id"], first["message_id"])


async def test_ai_mode_mention_replies_only_when_addressed(api, service, make_token, clients, firestore_db):
    _, _, conv, client = await joined_room(api, service, make_token, clients, mode="mention")
    for text in ("hello everyone", "write to me@ai.com", "@aide please", "the @air is cold"):
        ack = await client.call("send_message", {"conversation_id": conv["id"], "message": text})
        assert ack["ok"], ack
    await assert_no_reply(client, firestore_db, conv["id"], None)
    for text in ("@ai what is 2+2?", "hey @AI, help", "thanks\n@Ai"):
        ack = await client.call("send_message", {"conversation_id": conv["id"], "message": text})
        thinking = await client.wait_for("ai_thinking", lambda t, n=len(client.received("ai_thinking")): True)
        assert thinking["conversation_id"] == conv["id"]
    await asyncio.sleep(0.5)
    assert len(client.received("ai_thinking")) == 3
    # "always" (the default) answers everything.
    _, _, conv2, client2 = await joined_room(api, service, make_token, clients)
    await client2.call("send_message", {"conversation_id": conv2["id"], "message": "no mention"})
    await client2.wait_for("ai_thinking")


# -- stop and regenerate --------------------------------------------------------------------
async def test_stop_says_who_stopped_the_reply(api, service, service_b, make_token, clients, firestore_db):
    owner, token, conv, client = await joined_room(api, service, make_token, clients, name="Olivia")
    stopper = new_user()
    await api.add_participant(token, conv["id"], stopper)
    other = await clients(service_b, make_token(stopper, name="Stan"))
    await other.call("join_room", {"conversation_id": conv["id"]})
    await client.call("send_message", {"conversation_id": conv["id"], "message": "/stream 5000"})
    reply_id = (await client.wait_for("ai_thinking"))["message_id"]
    await client.wait_for("ai_response_chunk", lambda c: c["message_id"] == reply_id and c["seq"] >= 2, timeout=20)
    ack = await other.call("stop_generation", {"conversation_id": conv["id"], "message_id": reply_id})
    assert ack == {"ok": True, "message_ids": [reply_id]}
    for c in (client, other):
        done = await c.wait_for("ai_response_complete", lambda m: m["message_id"] == reply_id, timeout=20)
        assert done["status"] == "cancelled"
        assert done["stopped_by"] == {"user_id": stopper, "name": "Stan"}
    status, page = await api.request("GET", f"/api/conversations/{conv['id']}/messages", token)
    [item] = [m for m in page["items"] if m["message_id"] == reply_id]
    assert item["status"] == "cancelled" and item["stopped_by"] == {"user_id": stopper, "name": "Stan"}
    # A completed reply has no stopped_by.
    await client.call("send_message", {"conversation_id": conv["id"], "message": "short one"})
    done = await client.wait_for("ai_response_complete", lambda m: m["status"] == "complete", timeout=30)
    assert "stopped_by" not in done


async def test_regenerate_answers_the_same_message_again(api, service, make_token, clients, firestore_db):
    owner, token, conv, client = await joined_room(api, service, make_token, clients)
    first = await client.call("send_message", {"conversation_id": conv["id"], "message": "first question"})
    first_reply = (await client.wait_for("ai_thinking"))["message_id"]
    await client.wait_for("ai_response_complete", lambda m: m["message_id"] == first_reply, timeout=30)
    second = await client.call("send_message", {"conversation_id": conv["id"], "message": "second one here"})
    second_reply = (await client.wait_for("ai_thinking", lambda t: t["message_id"] != first_reply))["message_id"]
    await client.wait_for("ai_response_complete", lambda m: m["message_id"] == second_reply, timeout=30)

    ack = await client.call("regenerate", {"conversation_id": conv["id"], "message_id": first["message_id"]})
    assert ack["ok"] is True and set(ack) == {"ok", "message_id"}
    new_reply = ack["message_id"]
    assert new_reply not in (first_reply, second_reply)
    await client.wait_for("ai_thinking", lambda t: t["message_id"] == new_reply)
    done = await client.wait_for("ai_response_complete", lambda m: m["message_id"] == new_reply, timeout=30)
    assert done["status"] == "complete"
    # The prompt is the history up to the first question: nothing after it.
    assert "“first question”" in done["content"] and "0 earlier messages" in done["content"]
    status, page = await api.request("GET", f"/api/conversations/{conv['id']}/messages", token)
    [item] = [m for m in page["items"] if m["message_id"] == new_reply]
    assert item["reply_to"] == first["message_id"] and item["status"] == "complete"
    assert second["ok"]


async def test_regenerate_errors_and_modes(api, service, make_token, clients, firestore_db):
    owner, token, conv, client = await joined_room(api, service, make_token, clients, mode="off")
    ack = await client.call("send_message", {"conversation_id": conv["id"], "message": "no reply in off mode"})
    await assert_no_reply(client, firestore_db, conv["id"], ack["message_id"])
    # An explicit request: answered even in "off" mode.
    again = await client.call("regenerate", {"conversation_id": conv["id"], "message_id": ack["message_id"]})
    assert again["ok"], again
    done = await client.wait_for("ai_response_complete", lambda m: m["message_id"] == again["message_id"],
                                 timeout=30)
    assert done["status"] == "complete"
    cases = [
        ({"conversation_id": conv["id"], "message_id": "nope"}, "not_found"),
        ({"conversation_id": conv["id"], "message_id": again["message_id"]}, "invalid_argument"),  # a reply
        ({"conversation_id": conv["id"]}, "invalid_argument"),
        ({"conversation_id": conv["id"], "message_id": 5}, "invalid_argument"),
        ({"conversation_id": "no-such-conversation", "message_id": ack["message_id"]}, "not_found"),
    ]
    for payload, code in cases:
        answer = await client.call("regenerate", payload)
        assert answer["ok"] is False and answer["error"]["code"] == code, (payload, answer)
    errors = [e for e in client.received("error") if e.get("event") == "regenerate"]
    assert len(errors) == len(cases)
    stranger = await clients(service, make_token(new_user()))
    answer = await stranger.call("regenerate", {"conversation_id": conv["id"], "message_id": ack["message_id"]})
    assert answer["error"]["code"] == "forbidden"


async def test_retried_send_on_another_instance_is_stored_once(api, service, service_b, make_token, clients):
    owner, token, conv, client = await joined_room(api, service, make_token, clients)
    other = await clients(service_b, token)
    payload = {"conversation_id": conv["id"], "message": "once", "client_message_id": "ui-outbox-1"}
    first = await client.call("send_message", payload)
    second = await other.call("send_message", payload)
    assert first == second and first["ok"]
    status, page = await api.request("GET", f"/api/conversations/{conv['id']}/messages", token)
    assert [m["message_id"] for m in page["items"] if m["role"] == "user"] == [first["message_id"]]
    assert len([m for m in page["items"] if m["role"] == "assistant"]) == 1


async def test_list_items_carry_the_newest_message_from_the_first_load(api, service, make_token, clients):
    # Previews must not wait for a live update: a reload of the page shows them at once.
    owner, guest = new_user(), new_user()
    owner_token = make_token(owner, name="Olga")
    conv = await api.create_conversation(owner_token)
    empty = await api.create_conversation(owner_token)
    await api.request("PATCH", f"/api/conversations/{conv['id']}", owner_token, json={"ai_mode": "off"})
    await api.add_participant(owner_token, conv["id"], guest)
    client = await clients(service, owner_token)
    await client.call("join_room", {"conversation_id": conv["id"]})
    await client.call("send_message", {"conversation_id": conv["id"], "message": "first"})
    last = await client.call("send_message", {"conversation_id": conv["id"], "message": "the **newest** one"})

    status, body = await api.request("GET", "/api/conversations", make_token(guest))
    assert status == 200
    [item] = [c for c in body["items"] if c["id"] == conv["id"]]
    assert item["last_message"] == {"message_id": last["message_id"], "role": "user", "user_id": owner,
                                    "username": "Olga", "preview": item["last_message"]["preview"],
                                    "timestamp": item["last_message"]["timestamp"]}
    assert "newest" in item["last_message"]["preview"]
    status, body = await api.request("GET", "/api/conversations", owner_token)
    assert {c["id"]: c["last_message"] for c in body["items"]}[empty["id"]] is None
    status, one = await api.request("GET", f"/api/conversations/{conv['id']}", owner_token)
    assert status == 200 and one["last_message"]["message_id"] == last["message_id"]
