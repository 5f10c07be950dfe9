"""Least privilege on the room bus (review issue 13, finding 8), against a real socket-service process.

The upload and AI functions' service accounts must not be able to steer the
socket service: whatever they may publish on (per the Terraform IAM grants,
tests/infra/bus_grants.py), an instance obeys only the emits the functions
really make (replies and file_uploaded to a conversation's room, an upload
error to the uploader's own room) and ignores every manager command
(disconnect, enter_room, close_room, leave_room_members) and every other emit
(a broadcast, any other event in a user's private room).

Each case publishes, in ONE bus message (so the instance handles its parts in
order): the forged part, then a genuine reply chunk to the victim's
conversation, then a genuine upload error to the victim's own room (the
sentinel). Once the sentinel has arrived (or the victim was disconnected),
everything before it has been handled, and the victim must have received
exactly the chunk and the sentinel.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from socketio_pubsub_gcp.publisher import Publisher
from socketio_pubsub_gcp.pubsub_transport import encode

from chatcore import protocol
from chatcore import topology as topology_mod
from tests.conftest import ChatClient, new_user
from tests.infra import bus_grants, hcl_model
from tests.unit.test_bus_function_policy import function_emit

FORGER = "forger"  # the host id of the forged messages


@pytest.fixture(scope="module")
def function_topics() -> list[str]:
    """The topics a function's account may publish on: what a stolen function credential can reach."""
    raw = json.loads(topology_mod.TOPOLOGY_FILE.read_text())
    topics = bus_grants.topics_published_by(hcl_model.load(), raw, *bus_grants.FUNCTION_ACCOUNTS)
    assert topics, "the functions must be able to publish their emits somewhere"
    return sorted(topics)


@pytest.fixture(scope="module")
def publisher():
    return Publisher()


def chunk(conversation_id: str, text: str) -> dict:
    return {"conversation_id": conversation_id, "message_id": f"m-{uuid.uuid4().hex[:8]}", "seq": 1, "chunk": text}


@dataclass(frozen=True)
class Victim:
    sid: str
    user_id: str
    conversation_id: str


def command(method: str, **fields) -> dict:
    return {"method": method, "namespace": "/", "host_id": FORGER, **fields}


# What a compromised function account might publish, each against one victim.
FORGERIES: dict[str, Callable[[Victim], list[dict]]] = {
    "disconnect": lambda v: [command("disconnect", sid=v.sid)],
    # Put the victim into a conversation it is not part of, then talk in it.
    "enter_room": lambda v: [command("enter_room", sid=v.sid, room=protocol.conversation_room("elsewhere")),
                             function_emit(protocol.AI_RESPONSE_CHUNK, chunk("elsewhere", "eavesdropped"),
                                           protocol.conversation_room("elsewhere"))],
    "close_room": lambda v: [command("close_room", room=protocol.conversation_room(v.conversation_id))],
    "leave_room_members": lambda v: [command("leave_room_members", member_room=protocol.user_room(v.user_id),
                                             room=protocol.conversation_room(v.conversation_id))],
    "broadcast_to_everyone": lambda v: [function_emit(protocol.NEW_MESSAGE, {"content": "to all"}, None)],
    "other_event_in_private_room": lambda v: [function_emit(protocol.NEW_MESSAGE, {"content": "forged"},
                                                            protocol.user_room(v.user_id))],
}


async def publish_as_one_bus_message(publisher: Publisher, project_id: str, topic: str, messages: list[dict]):
    future = publisher.publish(f"projects/{project_id}/topics/{topic}", encode(messages), ordering_key=FORGER,
                               origin=FORGER)
    await asyncio.wrap_future(future)


async def sentinel_or_disconnect(client: ChatClient, sentinel: dict) -> None:
    waits = {asyncio.ensure_future(client.wait_for(protocol.ERROR, lambda d: d == sentinel, timeout=20)),
             asyncio.ensure_future(client.wait_for("__disconnect__", timeout=20))}
    done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    for task in done:
        task.result()  # a timeout fails the test here


@pytest.mark.parametrize("forgery", sorted(FORGERIES))
async def test_an_instance_obeys_only_function_emits_from_what_function_accounts_may_publish_on(
        forgery, stack, service, api, make_token, clients, function_topics, publisher):
    user = new_user()
    token = make_token(user)
    conversation = await api.create_conversation(token)
    client = await clients(service, token)
    assert (await client.call("join_room", {"conversation_id": conversation["id"]}))["ok"]
    victim = Victim(client.sio.get_sid("/"), user, conversation["id"])

    for topic in function_topics:
        genuine_chunk = chunk(victim.conversation_id, f"genuine on {topic}")
        sentinel = protocol.error_payload("invalid_argument", f"sentinel {uuid.uuid4().hex}", "upload")
        seen = len(client.events)
        await publish_as_one_bus_message(publisher, stack.project_id, topic, [
            *FORGERIES[forgery](victim),
            function_emit(protocol.AI_RESPONSE_CHUNK, genuine_chunk, protocol.conversation_room(victim.conversation_id)),
            function_emit(protocol.ERROR, sentinel, protocol.user_room(user)),
        ])
        await sentinel_or_disconnect(client, sentinel)
        assert client.events[seen:] == [(protocol.AI_RESPONSE_CHUNK, genuine_chunk), (protocol.ERROR, sentinel)], \
            f"forged {forgery} published on {topic} was obeyed"
