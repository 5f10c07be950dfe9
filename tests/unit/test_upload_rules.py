"""The rules of the upload path that need no emulator: names, sniffing, events, limits, settings, wire shape."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from uploads import sniffing
from uploads.finalize import StorageObject, parse_event
from uploads.requesting import UnsupportedType, parse_body
from uploads.settings import Settings

from chatcore import topology
from chatcore.errors import ConfigError, InvalidArgument, RateLimited, TooLarge
from chatcore.store import uploads as uploads_mod
from chatcore.store.conversations import Message

SECRET = "s" * 48
ENV = {"GOOGLE_CLOUD_PROJECT": "chat-unit", "JWT_SECRET": SECRET}
UPLOAD_ID = "AbCdEfGhIjKlMnOpQr_-"


# -- names ---------------------------------------------------------------------------
@pytest.mark.parametrize(("raw", "expected"), [
    ("photo.png", "photo.png"),
    ("../../x", "x"),
    ("..\\..\\x.txt", "x.txt"),
    (".", "file"), ("..", "file"), ("...", "file"), (" ", "file"), ("/", "file"),
    ("a\nb\tc.txt", "a b c.txt"),
    ("\x00\x01name\x7f.txt", "name.txt"),
    ("evil\u202egnp.exe", "evilgnp.exe"),
    ("Résumé 2024 (final).pdf", "Résumé 2024 (final).pdf"),
    ("日本語.txt", "日本語.txt"),
    ("a<b>c|d:e\"f'g.png", "a_b_c_d_e_f_g.png"),
    ("x" * 2000, "x" * 200),
    ("x" * 300 + ".markdown", "x" * 191 + ".markdown"),
    ("é" * 1000, "é" * 100),
    ("x" * 300 + "." + "y" * 40, ("x" * 300 + "." + "y" * 40)[:200]),
])
def test_sanitize_filename(raw, expected):
    name = uploads_mod.sanitize_filename(raw)
    assert name == expected
    assert "/" not in name and "\\" not in name and not name.startswith(".")
    assert len(name.encode()) <= uploads_mod.MAX_FILENAME_BYTES


def test_object_names_round_trip():
    name = uploads_mod.object_name("conv-1", UPLOAD_ID, "a b.png")
    assert name == f"uploads/conv-1/{UPLOAD_ID}/a b.png"
    assert uploads_mod.parse_object_name(name) == uploads_mod.ObjectRef("conv-1", UPLOAD_ID, "a b.png")
    assert uploads_mod.conversation_prefix("conv-1") == "uploads/conv-1/"


@pytest.mark.parametrize("name", [
    "elsewhere/c/AbCdEfGhIjKlMnOpQr_-/a.png", "uploads/a.png", "uploads/c/AbCdEfGhIjKlMnOpQr_-/",
    "uploads/c/short/a.png", "uploads/c/AbCdEfGhIjKlMnOpQr_-/a/b.png", "uploads/c.d/AbCdEfGhIjKlMnOpQr_-/a.png",
])
def test_names_outside_the_layout_are_not_uploads(name):
    assert uploads_mod.parse_object_name(name) is None


def test_layout_comes_from_topology_json():
    raw = json.loads(topology.TOPOLOGY_FILE.read_text())["uploads"]
    layout = uploads_mod.layout()
    assert layout.object_prefix == raw["object_prefix"] == "uploads"
    assert layout.pending_collection == "uploads"
    assert layout.pending_ttl_seconds == raw["pending_ttl_seconds"] > 900  # outlives the signed URL
    assert layout.incomplete_upload_max_age_days >= 1
    assert topology.load().uploads_bucket == "chat-uploads"
    assert any(s.target == "on_upload_finalized" and s.topic == topology.load().gcs_uploads_topic
               for s in topology.load().push_subscriptions)


def test_new_upload_ids_are_valid_and_distinct():
    ids = {uploads_mod.new_upload_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(uploads_mod.is_upload_id(i) for i in ids)


# -- per-user window -------------------------------------------------------------------
def test_upload_window():
    policy = uploads_mod.UploadPolicy(uploads_per_window=2, window_seconds=60)
    now = datetime.now(UTC)
    doc = uploads_mod.window_admit(None, now, policy)
    doc = uploads_mod.window_admit(doc, now + timedelta(seconds=1), policy)
    assert doc == {"window_start": now, "window_count": 2}
    with pytest.raises(RateLimited):
        uploads_mod.window_admit(doc, now + timedelta(seconds=59), policy)
    assert uploads_mod.window_admit(doc, now + timedelta(seconds=60), policy)["window_count"] == 1


# -- sniffing ----------------------------------------------------------------------------
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF"
GIF = b"GIF89a\x01\x00\x01\x00"
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 "
PDF = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"
HTML = b"<!DOCTYPE html><html><body>hi</body></html>"
EXE = b"MZ\x90\x00\x03\x00\x00\x00"
ELF = b"\x7fELF\x02\x01\x01\x00"


@pytest.mark.parametrize(("content_type", "head"), [
    ("image/png", PNG), ("image/jpeg", JPEG), ("image/gif", GIF), ("image/webp", WEBP), ("application/pdf", PDF),
    ("text/plain", "héllo wörld\n".encode()), ("text/markdown", b"# Title\n\n<b>inline html is text</b>"),
    ("text/csv", b"a,b\n1,2\n"), ("application/json", b'  {"a": [1, 2]}'), ("application/json", b"[1]"),
    ("application/json", b"\xef\xbb\xbf{}"), ("audio/mpeg", b"ID3\x04\x00"),
])
def test_matching_content_is_accepted(content_type, head):
    assert sniffing.content_problem(content_type, head, complete=True) is None


@pytest.mark.parametrize(("content_type", "head"), [
    ("image/png", HTML), ("image/png", EXE), ("image/png", ELF), ("image/png", JPEG), ("image/jpeg", PNG),
    ("image/gif", b"GIF90a"), ("image/webp", b"RIFF\x00\x00\x00\x00WAVE"), ("application/pdf", HTML),
    ("text/plain", b"abc\x00def"), ("text/plain", b"\xff\xfe\x00a"), ("text/csv", b"caf\xe9,1\n"),
    ("application/json", b"<html></html>"), ("application/json", b"alert(1)"),
    ("audio/mpeg", HTML), ("audio/mpeg", EXE), ("video/mp4", b"<svg onload=alert(1)>"),
])
def test_mismatching_content_is_refused(content_type, head):
    assert sniffing.content_problem(content_type, head, complete=True) is not None


def test_a_character_cut_by_the_sample_is_fine_unless_the_file_ends_there():
    head = b"a" * 4095 + "é".encode()[:1]
    assert sniffing.content_problem("text/plain", head, complete=False) is None
    assert sniffing.content_problem("text/plain", head, complete=True) == "is not UTF-8 text"


# -- events --------------------------------------------------------------------------
RESOURCE = {"kind": "storage#object", "name": f"uploads/c1/{UPLOAD_ID}/a.png", "bucket": "chat-uploads",
            "generation": "1795634500261890", "contentType": "image/png", "size": "10"}
ATTRIBUTES = {"eventType": "OBJECT_FINALIZE", "bucketId": "chat-uploads", "objectId": RESOURCE["name"],
              "objectGeneration": "1795634500261890", "payloadFormat": "JSON_API_V1"}
PUBSUB = "google.cloud.pubsub.topic.v1.messagePublished"


def push(attributes: dict, data: bytes | None) -> dict:
    message = {"attributes": attributes, "messageId": "1"}
    if data is not None:
        message["data"] = base64.b64encode(data).decode()
    return {"message": message, "subscription": "projects/p/subscriptions/gcs-uploads-push"}


EXPECTED = StorageObject("chat-uploads", RESOURCE["name"], 1795634500261890, 10, "image/png")


def test_pubsub_notification_is_parsed():
    assert parse_event(PUBSUB, push(ATTRIBUTES, json.dumps(RESOURCE).encode())) == EXPECTED


def test_notification_without_payload_uses_attributes():
    obj = parse_event(PUBSUB, push({**ATTRIBUTES, "payloadFormat": "NONE"}, None))
    assert obj == StorageObject("chat-uploads", RESOURCE["name"], 1795634500261890, None, None)


def test_eventarc_storage_event_is_parsed():
    assert parse_event("google.cloud.storage.object.v1.finalized", RESOURCE) == EXPECTED
    assert parse_event("google.cloud.storage.object.v1.finalized", json.dumps(RESOURCE).encode()) == EXPECTED


@pytest.mark.parametrize(("event_type", "data"), [
    (PUBSUB, push({**ATTRIBUTES, "eventType": "OBJECT_DELETE"}, json.dumps(RESOURCE).encode())),
    (PUBSUB, push({**ATTRIBUTES, "eventType": "OBJECT_METADATA_UPDATE"}, None)),
    ("google.cloud.storage.object.v1.deleted", RESOURCE),
])
def test_other_events_are_ignored(event_type, data):
    assert parse_event(event_type, data) is None


@pytest.mark.parametrize("data", [
    {"no": "message"}, None, push(ATTRIBUTES, b"not json"), push(ATTRIBUTES, b"[1]"),
    {"message": {"attributes": ATTRIBUTES, "data": "***"}},
    push({"eventType": "OBJECT_FINALIZE"}, None),
    push(ATTRIBUTES, json.dumps({**RESOURCE, "generation": "x"}).encode()),
])
def test_malformed_events_are_invalid(data):
    with pytest.raises(InvalidArgument):
        parse_event(PUBSUB, data)


# -- request bodies ----------------------------------------------------------------------
SETTINGS = Settings.from_env(ENV)


def parse(**fields):
    body = {"conversation_id": "c1", "filename": "a.png", "content_type": "image/png", "size": 10, **fields}
    return parse_body(json.dumps(body).encode(), SETTINGS)


def test_body_is_parsed_and_normalized():
    req = parse(content_type="Text/Plain; charset=utf-8", message="  hi  ", conversation_id=42)
    assert (req.conversation_id, req.content_type, req.caption, req.size) == ("42", "text/plain", "hi", 10)
    assert parse().caption == ""


def test_body_refusals_have_the_right_class():
    with pytest.raises(TooLarge):
        parse(size=SETTINGS.limits.max_upload_bytes + 1)
    with pytest.raises(UnsupportedType) as info:
        parse(content_type="text/html")
    assert info.value.http_status == 415 and info.value.code == "invalid_argument"
    with pytest.raises(InvalidArgument):
        parse_body(b"x" * 20000, SETTINGS)


# -- settings ----------------------------------------------------------------------------
def test_settings_defaults():
    s = Settings.from_env(ENV)
    assert s.environment == "local" and s.cors_allowed_origins == ("*",)
    assert s.limits.max_upload_bytes == 25 * 1024 * 1024
    assert "image/png" in s.limits.allowed_content_types and "application/json" in s.limits.allowed_content_types
    assert s.bucket == "chat-uploads"
    assert (s.uploads_per_window, s.upload_window_seconds) == (30, 60)
    assert s.pending_ttl_seconds == uploads_mod.layout().pending_ttl_seconds
    assert s.signing.upload_ttl_seconds == 900 and s.signing.mode == "iam"


def test_settings_from_environment():
    s = Settings.from_env({**ENV, "MAX_UPLOAD_BYTES": "1000", "ALLOWED_CONTENT_TYPES": "image/png, text/plain",
                           "UPLOAD_BUCKET": "b", "UPLOADS_PER_WINDOW": "3", "UPLOAD_WINDOW_SECONDS": "10",
                           "SIGNING_KEY_FILE": "/k.json", "UPLOAD_PENDING_TTL_SECONDS": "7200"})
    assert s.limits.max_upload_bytes == 1000 and s.limits.allowed_content_types == ("image/png", "text/plain")
    assert (s.bucket, s.policy) == ("b", uploads_mod.UploadPolicy(3, 10))
    assert s.signing.mode == "key" and s.pending_ttl_seconds == 7200


@pytest.mark.parametrize("env", [
    {"CHAT_ENV": "production"},
    {"CHAT_ENV": "production", "CORS_ALLOWED_ORIGINS": "*"},
    {"CHAT_ENV": "production", "CORS_ALLOWED_ORIGINS": "https://chat.example.com",
     "SIGNED_URL_ENDPOINT": "http://storage.example.com"},
    {"UPLOAD_PENDING_TTL_SECONDS": "600"},
    {"ALLOWED_CONTENT_TYPES": ""},
    {"UPLOADS_PER_WINDOW": "0"},
])
def test_settings_refusals(env):
    with pytest.raises(ConfigError):
        Settings.from_env({**ENV, **env})


def test_production_settings():
    s = Settings.from_env({**ENV, "CHAT_ENV": "production", "CORS_ALLOWED_ORIGINS": "https://chat.example.com"})
    assert s.signing.endpoint == "https://storage.googleapis.com" and s.signing.mode == "iam"


# -- the wire never shows where a file is stored -------------------------------------------
def test_file_messages_on_the_wire():
    record = {"file_id": UPLOAD_ID, "filename": "a.png", "content_type": "image/png", "size": 10,
              "object_name": f"uploads/c1/{UPLOAD_ID}/a.png"}
    message = Message(id=uploads_mod.file_message_id(UPLOAD_ID), conversation_id="c1", role="user",
                      content="caption", user_id="ada", created_at=datetime(2026, 1, 2, tzinfo=UTC), status="complete",
                      files=(record,))
    assert message.to_doc()["files"] == [record]
    wire = message.to_wire(file_urls={UPLOAD_ID: "https://signed"})
    assert wire == {"message_id": f"f{UPLOAD_ID}", "role": "user", "content": "caption",
                    "timestamp": "2026-01-02T00:00:00.000000Z", "conversation_id": "c1", "user_id": "ada",
                    "files": [{"file_id": UPLOAD_ID, "filename": "a.png", "content_type": "image/png", "size": 10,
                               "url": "https://signed"}]}
    assert message.to_wire()["files"] == [{"file_id": UPLOAD_ID, "filename": "a.png", "content_type": "image/png",
                                           "size": 10}]
