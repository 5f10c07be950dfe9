"""PROTOCOL.md "Authentication", checked with a real Socket.IO v4 client against the running service."""

import asyncio
import base64
import json
import time

import pytest
import socketio

from chatcore.identity.auth import issue_token
from tests.conftest import ChatClient, new_user

UNAUTHENTICATED = "unauthenticated"


def _b64(obj) -> str:
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")


def unsigned_token(user_id: str) -> str:
    now = int(time.time())
    return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64({'sub': user_id, 'iat': now, 'exp': now + 600})}."


async def refused(service, **kwargs) -> dict:
    client = ChatClient(service, **kwargs)
    with pytest.raises(socketio.exceptions.ConnectionError):
        await client.connect()
    assert not client.sio.connected
    return client.connect_error


def bad_tokens(secret: str, user: str) -> dict[str, dict]:
    return {
        "garbage": {"token": "not-a-jwt"},
        "expired": {"token": issue_token(secret, user, ttl_seconds=-120)},
        "wrong-signature": {"token": issue_token("x" * 48, user)},
        "alg-none": {"token": unsigned_token(user)},
        "empty": {"token": ""},
        "non-string": {"token": 12345},
    }


@pytest.mark.parametrize("case", ["garbage", "expired", "wrong-signature", "alg-none", "empty", "non-string"])
async def test_bad_tokens_are_refused_and_nothing_is_persisted(stack, service, api, make_token, firestore_db,
                                                               case):
    owner = new_user()
    conv = await api.create_conversation(make_token(owner))
    auth = bad_tokens(stack.jwt_secret, owner)[case]
    error = await refused(service, auth=auth)
    assert error["code"] == UNAUTHENTICATED
    assert isinstance(error["message"], str) and error["message"]
    if isinstance(auth["token"], str) and auth["token"]:
        assert auth["token"] not in error["message"]
    messages = firestore_db.collection("conversations").document(conv["id"]).collection("messages").get()
    assert messages == []


async def test_missing_token_is_refused(service):
    error = await refused(service, auth={})
    expected = {"code": UNAUTHENTICATED, "message": "missing token: send auth {token} in the handshake"}
    assert error == {**expected, "data": expected}


async def test_query_string_token_is_refused_even_when_valid(service, make_token):
    error = await refused(service, auth={}, query=f"token={make_token()}")
    assert error["code"] == UNAUTHENTICATED
    assert "query string" in error["message"]


async def test_authorization_header_is_accepted(service, make_token, clients):
    user = new_user()
    client = await clients(service, auth={}, headers={"Authorization": f"Bearer {make_token(user)}"})
    connected = await client.wait_for("connected")
    assert connected["user_id"] == user


async def test_display_name_falls_back_to_sub(service, make_token, clients):
    user = new_user()
    client = await clients(service, make_token(user))
    assert await client.wait_for("connected") == {"status": "ok", "message": f"connected as {user}",
                                                  "user_id": user}


async def test_live_connection_is_told_and_disconnected_when_token_expires(service, make_token, clients):
    client = await clients(service, make_token(ttl_seconds=2))
    await client.wait_for("connected")
    error = await client.wait_for("error", timeout=10)
    assert error == {"code": UNAUTHENTICATED, "message": "token expired"}
    await client.wait_for("__disconnect__", timeout=10)
    await asyncio.sleep(0.2)
    assert not client.sio.connected
