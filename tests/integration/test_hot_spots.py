"""Hot spots: many sends by one user (many tabs, many conversations), many users in one conversation.

Each send is stored or refused with ``rate_limited``; none is refused for
contention (``internal``/``unavailable``), and what was acknowledged is
exactly what Firestore holds. Latency under these loads is measured by
``bench/hot_spots.py`` (docs/RELIABILITY.md), not here.
"""

import asyncio

import pytest

from devstack.processes import free_port
from tests.conftest import new_user

# Default per-user limits (2 replies at a time, 30 messages a minute).
DEFAULT_LIMITS: dict[str, str] = {}


@pytest.fixture(scope="module")
def default_limits_service(stack, ai_function):
    port = free_port()
    proc = stack.start_socket_service(port, name=f"default-limits-{port}", **DEFAULT_LIMITS)
    yield stack.chat_url(port)
    proc.stop()


def _user_messages(firestore_db, conversation_ids, user_id) -> list[str]:
    ids = []
    for cid in conversation_ids:
        for doc in firestore_db.collection("conversations").document(cid).collection("messages").stream():
            d = doc.to_dict()
            if d["role"] == "user" and d["user_id"] == user_id:
                ids.append(doc.id)
    return ids


async def _burst(tabs, conversation_ids, count: int, text: str) -> list[dict]:
    """``count`` sends at once, spread over every tab and conversation."""
    return await asyncio.gather(*(
        tabs[i % len(tabs)].call("send_message", {"conversation_id": conversation_ids[i % len(conversation_ids)],
                                                  "message": f"{text} #{i}", "client_message_id": f"burst-{i}"})
        for i in range(count)))


async def _tabs_and_conversations(url, token, make_api, clients, tabs: int, conversations: int):
    convs = [await make_api.create_conversation(token, f"c{i}") for i in range(conversations)]
    connected = [await clients(url, token) for _ in range(tabs)]
    return connected, [c["id"] for c in convs]


async def test_one_user_in_five_tabs_sending_twenty_at_once_is_limited_not_failed(
        default_limits_service, api, make_token, clients, firestore_db):
    user = new_user()
    token = make_token(user)
    tabs, cids = await _tabs_and_conversations(default_limits_service, token, api, clients, 5, 10)
    # Long replies hold both concurrency slots for the whole burst.
    acks = await _burst(tabs, cids, 20, "/stream 3000")
    codes = [a["error"]["code"] if not a["ok"] else "ok" for a in acks]
    assert set(codes) <= {"ok", "rate_limited"}, codes
    assert codes.count("ok") == 2, codes
    stored = _user_messages(firestore_db, cids, user)
    assert sorted(stored) == sorted(a["message_id"] for a in acks if a["ok"])
    for tab, cid in zip(tabs, cids, strict=False):
        await tab.call("join_room", {"conversation_id": cid})
        await tab.call("stop_generation", {"conversation_id": cid})


async def test_one_user_sending_a_hundred_at_once_stores_every_one(service, api, make_token, clients,
                                                                    firestore_db):
    user = new_user()
    token = make_token(user)
    tabs, cids = await _tabs_and_conversations(service, token, api, clients, 5, 10)
    acks = await _burst(tabs, cids, 100, "hello")
    assert [a for a in acks if not a["ok"]] == []
    stored = _user_messages(firestore_db, cids, user)
    assert sorted(stored) == sorted(a["message_id"] for a in acks)


async def test_twenty_users_sending_at_once_to_one_conversation_are_all_stored(service, api, make_token, clients,
                                                                               firestore_db):
    owner = new_user()
    owner_token = make_token(owner)
    conv = await api.create_conversation(owner_token)
    users = [new_user() for _ in range(20)]
    for u in users:
        await api.add_participant(owner_token, conv["id"], u)
    members = [await clients(service, make_token(u)) for u in users]
    acks = await asyncio.gather(*(m.call("send_message", {"conversation_id": conv["id"], "message": f"hi from {i}"})
                                  for i, m in enumerate(members)))
    assert [a for a in acks if not a["ok"]] == []
    for u, ack in zip(users, acks, strict=True):
        assert _user_messages(firestore_db, [conv["id"]], u) == [ack["message_id"]]
