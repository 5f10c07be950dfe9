"""Two socket-service processes share the emulators; the Pub/Sub room bus joins them."""

import asyncio
import json
import subprocess
import sys
import textwrap

from devstack.stack import ROOT
from tests.conftest import new_user


async def _room_on_both(service, service_b, api, make_token, clients):
    owner, guest = new_user(), new_user()
    owner_token, guest_token = make_token(owner, name="Ana"), make_token(guest, name="Ben")
    conv = await api.create_conversation(owner_token)
    await api.add_participant(owner_token, conv["id"], guest)
    on_a = await clients(service, owner_token)
    on_b = await clients(service_b, guest_token)
    for c in (on_a, on_b):
        assert (await c.call("join_room", {"conversation_id": conv["id"]}))["ok"]
    return conv, (owner, on_a), (guest, on_b)


async def test_messages_and_typing_cross_instances(service, service_b, api, make_token, clients):
    conv, (owner, on_a), (guest, on_b) = await _room_on_both(service, service_b, api, make_token, clients)
    ack = await on_a.call("send_message", {"conversation_id": conv["id"], "message": "from A"})
    for c in (on_a, on_b):
        msg = await c.wait_for("new_message", lambda m: m["message_id"] == ack["message_id"])
        assert msg["content"] == "from A" and msg["user_id"] == owner
        await c.wait_for("ai_thinking")
    ack = await on_b.call("send_message", {"conversation_id": conv["id"], "message": "from B"})
    await on_a.wait_for("new_message", lambda m: m["message_id"] == ack["message_id"])

    assert (await on_b.call("typing", {"conversation_id": conv["id"], "is_typing": True}))["ok"]
    typing = await on_a.wait_for("user_typing")
    assert typing == {"user_id": guest, "username": "Ben", "is_typing": True, "conversation_id": conv["id"]}


EMITTER = textwrap.dedent("""
    import json, sys
    from chatcore import topology
    from socketio_pubsub_gcp.pubsub_manager import GooglePubSubManager

    project, room, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    bus = GooglePubSubManager(project, topology.load().function_events_topic, write_only=True)
    for seq in range(1, count + 1):
        bus.emit("ai_response_chunk", {"conversation_id": room[5:], "message_id": "m1", "seq": seq,
                                       "chunk": f"<{seq}>"}, room=room)
    print(json.dumps({"flushed": bus.flush(timeout=20)}))
""")


async def test_write_only_emitter_in_another_process_reaches_both_instances_in_order(
        stack, service, service_b, api, make_token, clients):
    conv, (_, on_a), (_, on_b) = await _room_on_both(service, service_b, api, make_token, clients)
    count = 200
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", EMITTER, stack.project_id, f"conv:{conv['id']}", str(count),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**stack.emulator_env, "PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert json.loads(out) == {"flushed": True}
    for c in (on_a, on_b):
        await c.wait_for("ai_response_chunk", lambda d: d["seq"] == count, timeout=30)
        seqs = [d["seq"] for d in c.received("ai_response_chunk")]
        assert seqs == list(range(1, count + 1))


async def test_participant_removed_on_one_instance_leaves_the_room_on_the_other(
        service, service_b, api, make_token, clients):
    conv, (owner, on_a), (guest, on_b) = await _room_on_both(service, service_b, api, make_token, clients)
    status, _ = await api.request("DELETE", f"/api/conversations/{conv['id']}/participants/{guest}",
                                  make_token(owner))
    assert status == 200
    await on_b.wait_for("left_room")
    ack = await on_a.call("send_message", {"conversation_id": conv["id"], "message": "after removal"})
    await on_a.wait_for("new_message", lambda m: m["message_id"] == ack["message_id"])
    # A barrier: the owner joins on B too. The room's messages reach B in order (one ordering key), so once
    # that connection has the owner's next message, B has handled the one above: the guest did not get it.
    owner_on_b = await clients(service_b, make_token(owner, name="Ana"))
    assert (await owner_on_b.call("join_room", {"conversation_id": conv["id"]}))["ok"]
    later = await on_a.call("send_message", {"conversation_id": conv["id"], "message": "barrier"})
    await owner_on_b.wait_for("new_message", lambda m: m["message_id"] == later["message_id"])
    assert ack["message_id"] not in [m["message_id"] for m in on_b.received("new_message")]
    assert later["message_id"] not in [m["message_id"] for m in on_b.received("new_message")]
