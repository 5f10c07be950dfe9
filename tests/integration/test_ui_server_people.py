"""Issue 16, server side: people by name (profiles, handles, lookup, contacts), conversation objects with
names and AI mode, and adding a participant by handle. Real service, real emulators."""

from __future__ import annotations

import asyncio
import uuid

from tests.conftest import new_user


def handle_for(prefix: str = "h") -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


async def test_me_is_the_token_name_or_the_user_id(api, make_token):
    ada = new_user()
    status, body = await api.request("GET", "/api/me", make_token(ada, name="Ada Lovelace"))
    assert status == 200
    assert body == {"user_id": ada, "name": "Ada Lovelace", "handle": None}
    nameless = new_user()
    status, body = await api.request("GET", "/api/me", make_token(nameless))
    assert status == 200 and body == {"user_id": nameless, "name": nameless, "handle": None}
    status, body = await api.request("GET", "/api/me")
    assert status == 401 and body["error"]["code"] == "unauthenticated"


async def test_a_chosen_name_and_handle_stick_and_a_taken_handle_is_refused(api, make_token, firestore_db):
    ada, bob = new_user(), new_user()
    ada_token, bob_token = make_token(ada, name="Ada"), make_token(bob, name="Bob")
    handle = handle_for("ada.")
    status, body = await api.request("PATCH", "/api/me", ada_token, json={"handle": handle.upper(), "name": " Countess "})
    assert status == 200, body
    assert body == {"user_id": ada, "name": "Countess", "handle": handle}
    # The token still says "Ada": a name the user chose is not overwritten by the next call.
    status, body = await api.request("GET", "/api/me", ada_token)
    assert body == {"user_id": ada, "name": "Countess", "handle": handle}
    assert firestore_db.collection("handles").document(handle).get().to_dict()["user_id"] == ada
    # Taken: invalid_argument (400), saying why.
    status, body = await api.request("PATCH", "/api/me", bob_token, json={"handle": handle})
    assert status == 400 and body["error"]["code"] == "invalid_argument"
    assert body["error"].get("reason") == "handle_taken" and "taken" in body["error"]["message"]
    # Setting the same handle again is no change.
    status, body = await api.request("PATCH", "/api/me", ada_token, json={"handle": handle})
    assert status == 200 and body["handle"] == handle
    # A new handle frees the old one.
    new_handle = handle_for("lovelace-")
    status, body = await api.request("PATCH", "/api/me", ada_token, json={"handle": new_handle})
    assert status == 200 and body["handle"] == new_handle
    assert not firestore_db.collection("handles").document(handle).get().exists
    status, body = await api.request("PATCH", "/api/me", bob_token, json={"handle": handle})
    assert status == 200 and body["handle"] == handle
    # null removes it.
    status, body = await api.request("PATCH", "/api/me", ada_token, json={"handle": None})
    assert status == 200 and body["handle"] is None
    assert not firestore_db.collection("handles").document(new_handle).get().exists


async def test_handle_and_name_validation(api, make_token):
    token = make_token(new_user())
    for bad in ("ab", "x" * 31, "has space", "émile", "a/b", "__ab__", 5, "...", ""):
        status, body = await api.request("PATCH", "/api/me", token, json={"handle": bad})
        assert status == 400 and body["error"]["code"] == "invalid_argument", bad
    for bad in ("", "   ", "x" * 101, "bell\x07", 7):
        status, body = await api.request("PATCH", "/api/me", token, json={"name": bad})
        assert status == 400 and body["error"]["code"] == "invalid_argument", bad
    status, body = await api.request("PATCH", "/api/me", token, json={})
    assert status == 400 and body["error"]["code"] == "invalid_argument"


async def test_lookup_by_exact_handle_or_user_id_only(api, make_token):
    ada, caller = new_user(), new_user()
    handle = handle_for("ada_")
    status, _ = await api.request("PATCH", "/api/me", make_token(ada, name="Ada L"), json={"handle": handle})
    assert status == 200
    token = make_token(caller)
    expected = {"user_id": ada, "name": "Ada L", "handle": handle}
    for q in (handle, "@" + handle, handle.upper(), ada):
        status, body = await api.request("GET", "/api/users/lookup", token, params={"q": q})
        assert status == 200 and body == expected, q
    # No search: a prefix, a name or an unknown id finds nothing.
    for q in (handle[:-1], "Ada L", "Ada", new_user()):
        status, body = await api.request("GET", "/api/users/lookup", token, params={"q": q})
        assert status == 404 and body["error"]["code"] == "not_found", q
    status, body = await api.request("GET", "/api/users/lookup", token)
    assert status == 400 and body["error"]["code"] == "invalid_argument"


async def test_add_a_participant_by_handle(api, make_token):
    owner, guest = new_user(), new_user()
    owner_token = make_token(owner, name="Olivia")
    handle = handle_for("guest")
    status, _ = await api.request("PATCH", "/api/me", make_token(guest, name="Gus"), json={"handle": handle})
    assert status == 200
    conv = await api.create_conversation(owner_token)
    path = f"/api/conversations/{conv['id']}/participants"
    status, body = await api.request("POST", path, owner_token, json={"handle": "@" + handle})
    assert status == 200 and body == {"participants": [owner, guest]}
    status, body = await api.request("POST", path, owner_token, json={"handle": handle_for("nobody")})
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = await api.request("POST", path, owner_token, json={"handle": handle, "user_id": guest})
    assert status == 400 and body["error"]["code"] == "invalid_argument"
    # The contract's form is unchanged: any user id, signed in or not.
    invited = new_user()
    status, body = await api.request("POST", path, owner_token, json={"user_id": invited})
    assert status == 200 and body == {"participants": [owner, guest, invited]}
    status, body = await api.request("GET", "/api/conversations", owner_token)
    [item] = [c for c in body["items"] if c["id"] == conv["id"]]
    assert item["participants_info"] == [{"user_id": owner, "name": "Olivia"}, {"user_id": guest, "name": "Gus"},
                                         {"user_id": invited, "name": invited}]


async def test_conversation_objects_carry_names_ai_mode_and_unread_count(api, make_token):
    owner = new_user()
    token = make_token(owner, name="Olivia")
    status, created = await api.request("POST", "/api/conversations", token, json={"title": "Names"})
    assert status == 201
    assert {"id", "title", "owner_id", "participants", "created_at", "updated_at"} <= set(created)
    assert created["ai_mode"] == "always"
    assert created["participants_info"] == [{"user_id": owner, "name": "Olivia"}]
    status, page = await api.request("GET", "/api/conversations", token)
    [item] = [c for c in page["items"] if c["id"] == created["id"]]
    assert item["ai_mode"] == "always" and item["participants_info"] == created["participants_info"]
    assert item["unread_count"] == 0
    status, one = await api.request("GET", f"/api/conversations/{created['id']}", token)
    assert status == 200 and one["id"] == created["id"] and one["unread_count"] == 0
    status, body = await api.request("GET", f"/api/conversations/{created['id']}", make_token(new_user()))
    assert status == 403 and body["error"]["code"] == "forbidden"


async def test_patch_sets_ai_mode_owner_only_and_validates(api, make_token):
    owner, guest = new_user(), new_user()
    owner_token = make_token(owner)
    conv = await api.create_conversation(owner_token, title="Modes")
    await api.add_participant(owner_token, conv["id"], guest)
    path = f"/api/conversations/{conv['id']}"
    status, body = await api.request("PATCH", path, owner_token, json={"ai_mode": "mention"})
    assert status == 200 and body["ai_mode"] == "mention" and body["title"] == "Modes"
    status, body = await api.request("PATCH", path, owner_token, json={"ai_mode": "off", "title": "Quiet"})
    assert status == 200 and body["ai_mode"] == "off" and body["title"] == "Quiet"
    for bad in ({"ai_mode": "sometimes"}, {"ai_mode": None}, {"ai_mode": 1}, {}):
        status, body = await api.request("PATCH", path, owner_token, json=bad)
        assert status == 400 and body["error"]["code"] == "invalid_argument", bad
    status, body = await api.request("PATCH", path, make_token(guest), json={"ai_mode": "always"})
    assert status == 403 and body["error"]["code"] == "forbidden"
    status, body = await api.request("GET", "/api/conversations", owner_token)
    [item] = [c for c in body["items"] if c["id"] == conv["id"]]
    assert item["ai_mode"] == "off"


async def test_contacts_are_people_who_share_a_conversation(api, make_token):
    me, friend, other, stranger = new_user(), new_user(), new_user(), new_user()
    token = make_token(me, name="Me")
    await api.request("GET", "/api/me", make_token(friend, name="Friend"))
    conv1 = await api.create_conversation(token)
    conv2 = await api.create_conversation(token)
    await api.add_participant(token, conv1["id"], friend)
    await api.add_participant(token, conv2["id"], friend)
    await api.add_participant(token, conv2["id"], other)
    await api.create_conversation(make_token(stranger))
    status, body = await api.request("GET", "/api/contacts", token)
    assert status == 200
    assert sorted(body["items"], key=lambda c: c["user_id"]) == sorted(
        [{"user_id": friend, "name": "Friend", "handle": None}, {"user_id": other, "name": other, "handle": None}],
        key=lambda c: c["user_id"])
    status, body = await api.request("GET", "/api/contacts", make_token(new_user()))
    assert status == 200 and body == {"items": []}


async def test_profile_is_written_once_not_on_every_call(api, make_token, firestore_db):
    user = new_user()
    token = make_token(user, name="Once")
    for _ in range(3):
        status, _ = await api.request("GET", "/api/conversations", token)
        assert status == 200
    await asyncio.sleep(0.5)  # the profile is written in the background of the first call
    doc = firestore_db.collection("users").document(user).get()
    assert doc.exists and doc.get("name") == "Once"
    first = doc.update_time
    for _ in range(3):
        await api.request("GET", "/api/conversations", token)
    await asyncio.sleep(0.5)
    assert firestore_db.collection("users").document(user).get().update_time == first
    # A changed token name is written (the name was never chosen by the user).
    await api.request("GET", "/api/conversations", make_token(user, name="Twice"))
    await asyncio.sleep(0.5)
    assert firestore_db.collection("users").document(user).get().get("name") == "Twice"
