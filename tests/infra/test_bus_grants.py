"""Least privilege on the room bus and the uploads bucket (review issue 13, finding 8).

Socket-service instances obey every manager command found on chat-events, so
only the socket service may publish there; the functions publish their emits
on their own topic, from which the instances obey only function emits
(tests/unit/test_bus_function_policy.py). The socket service only reads and
deletes uploaded files, so it gets no role that could create or overwrite one.
"""

from __future__ import annotations

import ast
import re

from chatcore import topology as topology_mod

from .bus_grants import ALL_TOPICS, FUNCTION_ACCOUNTS, publish_grants, publishers_of, topics_published_by
from .hcl_model import ROOT

SOCKET = "${google_service_account.socket.member}"


def topic_ref(key: str) -> str:
    return f"${{google_pubsub_topic.topics[local.topology.topics.{key}].name}}"


def test_only_the_socket_service_may_publish_on_chat_events(tf, topology_raw):
    assert publishers_of(tf, topology_raw, topology_raw["topics"]["chat_events"]) == {"socket"}


def test_the_functions_may_publish_only_on_their_own_topic(tf, topology_raw):
    function_events = topology_raw["topics"]["function_events"]
    for account in FUNCTION_ACCOUNTS:
        assert topics_published_by(tf, topology_raw, account) == {function_events}, account
    assert publishers_of(tf, topology_raw, function_events) == set(FUNCTION_ACCOUNTS)


def test_no_account_may_publish_on_every_topic(tf, topology_raw):
    assert [member for member, topic in publish_grants(tf, topology_raw) if topic == ALL_TOPICS] == []


def function_buses() -> dict:
    """The write-only bus manager each function's runtime builds (no client is created before a publish)."""
    import secrets
    from unittest import mock

    from uploads.handler import Runtime
    from uploads.settings import Settings as UploadSettings

    from aistream.handler import build_runtime
    from aistream.settings import Settings as AiSettings

    env = {"GOOGLE_CLOUD_PROJECT": "chat-unit", "JWT_SECRET": secrets.token_urlsafe(48)}
    ai = build_runtime(AiSettings.from_env(env), firestore_client=mock.Mock(), storage_client=mock.Mock(),
                       provider=mock.Mock())
    upload = Runtime(UploadSettings.from_env(env), firestore_client=mock.Mock(), storage_client=mock.Mock(),
                     signer=mock.Mock())
    try:
        return {"ai_stream": ai.generator.bus, "upload": upload.finalizer.bus}
    finally:
        ai.runner.close()
        upload.runner.close()


def test_the_functions_emit_on_the_topic_they_may_publish_on(topology_raw):
    function_events = topology_raw["topics"]["function_events"]
    for name, bus in function_buses().items():
        assert bus.write_only, name
        assert bus.transport.topic_path == f"projects/chat-unit/topics/{function_events}", name
    assert topology_mod.load().function_events_topic == function_events


def test_instances_subscribe_to_both_topics_and_may_attach_to_those_only(tf, topology_raw):
    template = topology_raw["instance_subscription"]
    assert template["topic"] == topology_raw["topics"]["chat_events"]
    assert template["function_events_topic"] == topology_raw["topics"]["function_events"]
    assert template["function_events_name_prefix"] != template["name_prefix"]
    attach = {body["topic"] for name in tf.resources_of("google_pubsub_topic_iam_member")
              for body in tf.instances("google_pubsub_topic_iam_member", name).values()
              if body["role"] == "roles/pubsub.subscriber" and body["member"] == SOCKET}
    assert attach == {topic_ref("chat_events"), topic_ref("function_events")}
    depends = tf.resource("google_cloud_run_v2_service", "socket")["depends_on"]
    assert "${google_pubsub_topic_iam_member.socket_bus}" in depends


def test_socket_service_may_read_and_delete_uploads_but_not_write_them(tf):
    grants = tf.resource("google_storage_bucket_iam_member", "uploads")["for_each"]
    socket_roles = {g["role"] for key, g in grants.items() if not key.startswith("__") and g["member"] == SOCKET}
    assert socket_roles == {"roles/storage.objectViewer",
                            "${google_project_iam_custom_role.uploads_object_delete.name}"}
    assert tf.resource("google_project_iam_custom_role", "uploads_object_delete")["permissions"] == [
        "storage.objects.delete"]
    other_bucket_grants = [name for name, body in tf.resources_of("google_storage_bucket_iam_member").items()
                           if name != "uploads" and body.get("member") == SOCKET]
    assert other_bucket_grants == []


def test_what_the_socket_service_does_with_uploaded_files_is_read_and_delete():
    """The grant above is all it needs: signed GET URLs, and listing then deleting a conversation's files."""
    source = "\n".join(path.read_text() for path in sorted((ROOT / "socket_service").glob("*.py")))
    storage_uses = re.findall(r"^.*\[(?:http_api\.)?(?:STORAGE|SIGNER)\].*$", source, flags=re.MULTILINE)
    uses = {"assigned" if re.search(r"\]\s*=", line) else
            "delete_conversation_objects" if "delete_conversation_objects" in line else
            "download_urls" if ".download_urls" in line else line.strip() for line in storage_uses}
    assert uses == {"assigned", "delete_conversation_objects", "download_urls"}
    deleting = ast.get_source_segment(
        (ROOT / "chatcore" / "store" / "uploads.py").read_text(),
        next(node for node in ast.parse((ROOT / "chatcore" / "store" / "uploads.py").read_text()).body
             if isinstance(node, ast.FunctionDef) and node.name == "delete_conversation_objects"))
    calls = set(re.findall(r"\.(\w+)\(", deleting))
    assert calls == {"list_blobs", "delete"}
