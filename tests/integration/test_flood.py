"""One client flooding events as fast as it can is refused, then disconnected; the others are served meanwhile.

How much the others' latency moves during a flood is measured by
``bench/flood.py`` (docs/RELIABILITY.md), not asserted here.
"""

import asyncio
import json

import aiohttp

from bench import wsclient
from tests.conftest import new_user

FLOOD_FRAMES = 20_000  # far more than the cut-off (5 x EVENT_BURST refusals in 10 s)


async def test_a_flooding_connection_is_disconnected_and_the_others_are_served(service, api, make_token, clients):
    owner = new_user()
    owner_token = make_token(owner)
    conv = await api.create_conversation(owner_token)
    flooder_id = new_user("flooder")
    await api.add_participant(owner_token, conv["id"], flooder_id)
    others = [await clients(service, owner_token) for _ in range(3)]
    for other in others:
        assert (await other.call("join_room", {"conversation_id": conv["id"]}))["ok"]

    async with wsclient.new_session() as session:
        flooder = await wsclient.connect(session, service, {"token": make_token(flooder_id)})
        frame = "42" + json.dumps(["typing", {"conversation_id": conv["id"], "is_typing": True}])
        sent = 0

        async def flood():
            nonlocal sent
            try:
                while sent < FLOOD_FRAMES and not flooder.closed:
                    await flooder.ws.send_str(frame)
                    sent += 1
                    if sent % 200 == 0:
                        await asyncio.sleep(0)  # let the reader notice the close
            except (ConnectionError, aiohttp.ClientError):
                pass  # the server closed the socket under us

        async def keep_calling():
            answers = []
            while not flooder.closed and len(answers) < 200:
                answers += await asyncio.gather(*(o.call("typing", {"conversation_id": conv["id"],
                                                                    "is_typing": False}) for o in others))
                await asyncio.sleep(0.05)  # within the others' own rate limit (20/s)
            return answers

        flooding = asyncio.ensure_future(flood())
        answers = await keep_calling()
        await asyncio.wait_for(flooding, 60)
        deadline = asyncio.get_running_loop().time() + 15
        while not flooder.closed and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        assert flooder.closed, f"the flooding connection is still open after {sent} frames"
        await flooder.close()

    # For a while, the flooder's user cannot reconnect to this instance: the
    # handshake is refused, and the server closes the socket itself.
    async with aiohttp.ClientSession() as session:
        ws = await session.ws_connect(service.replace("http", "ws", 1) + "/socket.io/?EIO=4&transport=websocket")
        assert (await ws.receive_str(timeout=10)).startswith("0")
        await ws.send_str("40" + json.dumps({"token": make_token(flooder_id)}))
        refusal = await ws.receive_str(timeout=10)
        assert refusal.startswith("44") and json.loads(refusal[2:])["code"] == "rate_limited"
        while True:  # what follows the refusal is the close (maybe after an Engine.IO CLOSE packet)
            msg = await ws.receive(timeout=10)
            if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                break
            assert msg.data == "1", msg
        await ws.close()
    assert answers and all(a["ok"] for a in answers), [a for a in answers if not a["ok"]][:3]
    # The others are still connected and served after the flood.
    for other in others:
        assert (await other.call("typing", {"conversation_id": conv["id"], "is_typing": False}))["ok"]
