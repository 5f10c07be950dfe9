"""request_upload in-process, on the real emulators: per-user rate limit and CORS with configured origins.

The handler is driven through a Flask test client with its own settings (a
small upload window, one allowed origin), the way functions-framework calls
it, while Firestore is the emulator of the session stack.
"""

from __future__ import annotations

import json

import flask
import pytest
from google.api_core import exceptions as gexc
from google.cloud import firestore
from uploads.handler import Runtime, handle_request_upload
from uploads.settings import Settings

from chatcore.identity.auth import issue_token
from chatcore.identity.signing import SigningConfig, UrlSigner
from tests.conftest import new_user

ORIGIN = "https://chat.example.com"


@pytest.fixture(scope="module")
def runtime(stack):
    settings = Settings.from_env(stack.service_env(), uploads_per_window=3, upload_window_seconds=3600,
                                 cors_allowed_origins=(ORIGIN,))
    rt = Runtime(settings)
    yield rt
    rt.runner.close()


@pytest.fixture(scope="module")
def client(runtime):
    app = flask.Flask("request_upload_test")
    app.add_url_rule("/", "request_upload", lambda: handle_request_upload(flask.request, runtime),
                     methods=["GET", "POST", "PUT", "OPTIONS"])
    return app.test_client()


@pytest.fixture(scope="module")
def conversation(stack, firestore_db):
    """A conversation written straight to Firestore: this module needs no socket service."""
    owner = new_user()
    ref = firestore_db.collection("conversations").document(f"c-{owner}")
    now = firestore.SERVER_TIMESTAMP
    ref.set({"owner_id": owner, "participants": [owner], "title": "t", "created_at": now, "updated_at": now,
             "updated_key": "0"})
    return ref.id, issue_token(stack.jwt_secret, owner)


def ask(client, token, conversation_id, headers=None):
    body = {"conversation_id": conversation_id, "filename": "a.txt", "content_type": "text/plain", "size": 5}
    return client.post("/", data=json.dumps(body), content_type="application/json",
                       headers={"Authorization": f"Bearer {token}", **(headers or {})})


def test_uploads_per_user_are_rate_limited(client, conversation, firestore_db):
    cid, token = conversation
    answers = [ask(client, token, cid) for _ in range(4)]
    assert [a.status_code for a in answers] == [201, 201, 201, 429]
    assert answers[3].get_json() == {"error": {"code": "rate_limited", "message": "at most 3 uploads per 3600 s"}}
    # A refused request records nothing.
    pending = firestore_db.collection("uploads").where(
        filter=firestore.FieldFilter("conversation_id", "==", cid)).get()
    assert sorted(d.id for d in pending) == sorted(a.get_json()["upload_id"] for a in answers[:3])


def test_preflight_from_an_allowed_origin(client):
    answer = client.options("/", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                                          "Access-Control-Request-Headers": "authorization,content-type"})
    assert answer.status_code == 204
    assert answer.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert answer.headers["Access-Control-Allow-Methods"] == "POST, OPTIONS"
    assert answer.headers["Access-Control-Allow-Headers"] == "Authorization, Content-Type"
    assert answer.headers["Vary"] == "Origin"


def test_preflight_from_another_origin_is_refused(client):
    answer = client.options("/", headers={"Origin": "https://evil.example.com", "Access-Control-Request-Method": "POST"})
    assert answer.status_code == 403
    assert "Access-Control-Allow-Origin" not in answer.headers


def test_responses_name_only_allowed_origins(client, stack):
    token = issue_token(stack.jwt_secret, new_user())
    allowed = ask(client, token, "c-none", headers={"Origin": ORIGIN})
    other = ask(client, token, "c-none", headers={"Origin": "https://evil.example.com"})
    assert allowed.status_code == other.status_code == 403  # not a participant, but answered to the browser
    assert allowed.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Access-Control-Allow-Origin" not in other.headers


def test_other_methods_are_405(client, conversation):
    _, token = conversation
    answer = client.put("/", headers={"Authorization": f"Bearer {token}"})
    assert answer.status_code == 405 and answer.get_json()["error"]["code"] == "invalid_argument"


class FirestoreDown:
    """Firestore answering UNAVAILABLE to everything (the one fault the emulator cannot be made to show)."""

    def collection(self, name):
        return self

    def document(self, doc_id):
        return self

    async def get(self, **kwargs):
        raise gexc.ServiceUnavailable("firestore is down")


def test_unavailable_firestore_is_503_not_500(stack, conversation):
    cid, token = conversation
    rt = Runtime(Settings.from_env(stack.service_env()), firestore_client=FirestoreDown())
    try:
        app = flask.Flask("request_upload_down")
        app.add_url_rule("/", "request_upload", lambda: handle_request_upload(flask.request, rt), methods=["POST"])
        answer = ask(app.test_client(), token, cid)
        assert answer.status_code == 503
        assert answer.get_json() == {"error": {"code": "unavailable",
                                               "message": "uploads are unavailable right now; please retry"}}
    finally:
        rt.runner.close()


def test_no_signing_identity_is_503_and_records_nothing(stack, conversation, firestore_db, tmp_path):
    cid, token = conversation
    settings = Settings.from_env(stack.service_env(), uploads_per_window=1000)
    rt = Runtime(settings, signer=UrlSigner(SigningConfig(key_file=str(tmp_path / "missing.json"),
                                                          endpoint=settings.signing.endpoint), settings.bucket))
    try:
        app = flask.Flask("request_upload_unsigned")
        app.add_url_rule("/", "request_upload", lambda: handle_request_upload(flask.request, rt), methods=["POST"])
        before = len(firestore_db.collection("uploads").where(
            filter=firestore.FieldFilter("conversation_id", "==", cid)).get())
        answer = ask(app.test_client(), token, cid)
        assert answer.status_code == 503 and answer.get_json()["error"]["code"] == "unavailable"
        assert len(firestore_db.collection("uploads").where(
            filter=firestore.FieldFilter("conversation_id", "==", cid)).get()) == before
    finally:
        rt.runner.close()
