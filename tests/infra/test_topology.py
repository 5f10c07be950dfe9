"""Topics, subscriptions and buckets: Terraform and the local stack take every name from
chatcore/topology.json and wire them the same way."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

from chatcore import topology as topology_mod
from chatcore.identity import signing
from devstack import stack as devstack_stack

from .hcl_model import first

# Prose attributes may mention a topic by name; nothing else may spell one out.
PROSE_KEYS = {"description", "display_name", "title", "content", "error_message"}


def _strings_with_keys(value, key=""):
    if isinstance(value, str):
        yield key, value
    elif isinstance(value, dict):
        for k, item in value.items():
            if not k.startswith("__"):
                yield from _strings_with_keys(item, k)
    elif isinstance(value, list):
        for item in value:
            yield from _strings_with_keys(item, key)


def _topology_names(raw: dict) -> set[str]:
    names = set(raw["topics"].values()) | set(raw["buckets"].values())
    names |= {s["name"] for s in raw["push_subscriptions"] + raw["pull_subscriptions"]}
    names.add(raw["instance_subscription"]["name_prefix"])
    names.add(raw["instance_subscription"]["function_events_name_prefix"])
    return names


def test_terraform_reads_the_topology_file(tf):
    assert tf.locals["topology"] == '${jsondecode(file("${path.module}/../../chatcore/topology.json"))}'
    assert (tf.local_files["topology"], topology_mod.TOPOLOGY_FILE.name) == ("main.tf", "topology.json")


def test_no_topology_name_is_retyped_in_terraform(tf, topology_raw):
    names = _topology_names(topology_raw)
    found = []
    for file, content in tf.files.items():
        for key, text in _strings_with_keys(content):
            if key in PROSE_KEYS:
                continue
            for name in names:
                if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text):
                    found.append(f"{file}: {key} = {text!r} spells out {name!r}")
    assert found == []


def test_every_topology_topic_is_created_and_only_those(tf):
    topics = tf.resources_of("google_pubsub_topic")
    assert list(topics) == ["topics"]
    assert topics["topics"]["for_each"] == "${toset(values(local.topology.topics))}"
    assert topics["topics"]["name"] == "${each.value}"


def test_the_room_bus_topics_have_no_static_subscription(tf, topology_raw):
    """Each socket-service instance creates its own on each; a static one would pile up unread messages."""
    bus_topics = {topology_raw["topics"][key] for key in ("chat_events", "function_events")}
    subscribed = {s["topic"] for s in topology_raw["push_subscriptions"] + topology_raw["pull_subscriptions"]}
    assert bus_topics.isdisjoint(subscribed)
    template = topology_raw["instance_subscription"]
    assert {template["topic"], template["function_events_topic"]} == bus_topics
    for name, body in tf.resources_of("google_pubsub_subscription").items():
        assert "chat_events" not in body["topic"] and "function_events" not in body["topic"], name


def test_push_subscriptions_match_the_local_stack(tf, topology_raw):
    push = tf.resource("google_pubsub_subscription", "push")
    assert tf.locals["push_subscriptions"] == "${{for s in local.topology.push_subscriptions : s.name => s}}"
    assert push["for_each"] == "${local.push_subscriptions}"
    assert push["name"] == "${each.value.name}"
    assert push["topic"] == "${google_pubsub_topic.topics[each.value.topic].id}"
    assert push["ack_deadline_seconds"] == "${each.value.ack_deadline_seconds}"
    dead_letter = first(push, "dead_letter_policy")
    assert dead_letter["dead_letter_topic"] == "${google_pubsub_topic.topics[each.value.dead_letter_topic].id}"
    assert dead_letter["max_delivery_attempts"] == "${each.value.max_delivery_attempts}"
    assert first(push, "retry_policy")["minimum_backoff"] and first(push, "retry_policy")["maximum_backoff"]
    assert first(push, "expiration_policy")["ttl"] == ""

    # The push endpoint has the path the local stack gives it (test_local_push_endpoints_are_terraforms).
    config = first(push, "push_config")
    base = "${local.push_functions[each.value.target].service_config[0].uri}"
    assert config["push_endpoint"] == base + "/projects/${var.project_id}/topics/${each.value.topic}"
    oidc = first(config, "oidc_token")
    assert oidc["service_account_email"] == "${google_service_account.push_invoker.email}"
    assert oidc["audience"] == base

    # Each push target is a deployed function whose entry point is that target.
    targets = {s["target"] for s in topology_raw["push_subscriptions"]}
    assert tf.locals["push_functions"] == ("${{for target in keys(local.push_by_target) : "
                                           "target => google_cloudfunctions2_function.functions[target]}}")
    assert tf.locals["push_by_target"] == "${{for s in local.topology.push_subscriptions : s.target => s}}"
    functions = tf.instances("google_cloudfunctions2_function", "functions")
    assert targets <= set(functions)
    for target in targets:
        assert first(functions[target], "build_config")["entry_point"] == target


def test_dead_letters_are_never_silently_lost(tf, topology_raw):
    pulled = {s["topic"] for s in topology_raw["pull_subscriptions"]}
    for sub in topology_raw["push_subscriptions"]:
        assert sub["dead_letter_topic"] in topology_raw["topics"].values()
        assert sub["dead_letter_topic"] in pulled, f"{sub['dead_letter_topic']} has no subscription"
    dead = tf.resource("google_pubsub_subscription", "dead_letter")
    assert dead["for_each"] == "${local.pull_subscriptions}"
    assert dead["name"] == "${each.value.name}"
    assert first(dead, "expiration_policy")["ttl"] == ""
    # The Pub/Sub service agent may forward: publisher on each dead-letter topic, subscriber on each source.
    publisher = tf.resource("google_pubsub_topic_iam_member", "dead_letter_publisher")
    assert publisher["for_each"] == "${local.dead_letter_topics}" and publisher["role"] == "roles/pubsub.publisher"
    assert "google_project_service_identity.pubsub.email" in publisher["member"]
    subscriber = tf.resource("google_pubsub_subscription_iam_member", "dead_letter_source_subscriber")
    assert subscriber["for_each"] == "${local.push_subscriptions}"
    assert subscriber["role"] == "roles/pubsub.subscriber"
    assert "google_project_service_identity.pubsub.email" in subscriber["member"]
    # ...and someone hears about it.
    alert = tf.resource("google_monitoring_alert_policy", "dead_letters")
    assert alert["for_each"] == "${local.pull_subscriptions}"
    assert "num_undelivered_messages" in first(alert, "conditions", "condition_threshold")["filter"]


def test_ack_deadline_outlasts_the_longest_reply(tf, topology_raw):
    (ai,) = [s for s in topology_raw["push_subscriptions"] if s["target"] == "ai_stream"]
    assert tf.variables["ai_max_reply_seconds"].body["default"] < ai["ack_deadline_seconds"] <= 600
    functions = tf.instances("google_cloudfunctions2_function", "functions")
    assert first(functions["ai_stream"], "service_config")["timeout_seconds"] == \
        '${local.push_by_target["ai_stream"].ack_deadline_seconds}'
    # The precondition is checked on the ai_stream instance only (one error, not one per function).
    (precondition,) = first(tf.resource("google_cloudfunctions2_function", "functions"), "lifecycle")["precondition"]
    assert precondition["condition"] == ('${each.key != "ai_stream" || '
                                         'var.ai_max_reply_seconds < local.push_by_target["ai_stream"].ack_deadline_seconds}')


def test_uploads_bucket_name_and_notifications(tf, topology_raw, tmp_path, monkeypatch):
    assert tf.locals["uploads_bucket_name"] == "${var.project_id}-${local.topology.buckets.uploads}"
    bucket = tf.resource("google_storage_bucket", "uploads")
    assert bucket["name"] == "${local.uploads_bucket_name}"
    assert bucket["uniform_bucket_level_access"] is True
    assert bucket["public_access_prevention"] == "enforced"
    rule = first(bucket, "lifecycle_rule")
    assert first(rule, "action")["type"] == "AbortIncompleteMultipartUpload"
    assert first(rule, "condition")["age"] == "${local.uploads_layout.incomplete_upload_max_age_days}"
    assert tf.locals["uploads_layout"] == "${local.topology.uploads}"

    notification = tf.resource("google_storage_notification", "uploads_finalized")
    assert notification["event_types"] == ["OBJECT_FINALIZE"]
    assert notification["payload_format"] == "JSON_API_V1"
    assert notification["topic"] == "${google_pubsub_topic.topics[local.topology.topics.gcs_uploads].id}"
    assert notification["object_name_prefix"] == "${local.uploads_layout.object_prefix}/"
    # fake-gcs-server publishes to the same topic locally.
    command = _fake_gcs_command(tmp_path, monkeypatch)
    topic_key = re.fullmatch(r"\$\{google_pubsub_topic\.topics\[local\.topology\.topics\.(\w+)\]\.id\}",
                             notification["topic"]).group(1)
    assert _flag(command, "-event.pubsub-topic") == topology_raw["topics"][topic_key]
    publisher = tf.resource("google_pubsub_topic_iam_member", "storage_agent_publisher")
    assert publisher["topic"] == "${google_pubsub_topic.topics[local.topology.topics.gcs_uploads].name}"
    assert "google_storage_project_service_account.gcs.email_address" in publisher["member"]


def test_uploads_cors_matches_the_local_stack_and_the_signed_headers(tf, tmp_path, monkeypatch):
    cors = first(tf.resource("google_storage_bucket", "uploads"), "cors")
    assert sorted(cors["method"]) == ["GET", "PUT"]
    assert cors["origin"] == "${local.cors_origins}"
    assert cors["response_header"] == "${local.uploads_cors_headers}"
    terraform_headers = {h.lower() for h in tf.locals["uploads_cors_headers"]}
    # fake-gcs-server, as the local stack starts it, allows the same headers.
    local_headers = _flag(_fake_gcs_command(tmp_path, monkeypatch), "-cors-headers")
    assert terraform_headers == set(local_headers.lower().split(","))
    # Every header the browser must send with a signed PUT is allowed: sign one (with a key like the
    # local stack's) and read the headers it must carry and those its signature covers.
    key_dir = tmp_path / "key"
    key_dir.mkdir()
    signer = signing.UrlSigner(signing.SigningConfig(key_file=str(devstack_stack.write_signing_key(key_dir, "p"))),
                               "chat-uploads")
    signed = signer.upload("uploads/c/u/f.png", "image/png", 10)
    sent = {h.lower() for h in signed.headers}
    assert sent >= {"content-type", "x-goog-content-length-range", "x-goog-if-generation-match"}
    covered = parse_qs(urlsplit(signed.url).query)["X-Goog-SignedHeaders"][0].split(";")
    assert set(covered) == sent | {"host"}
    assert sent <= terraform_headers


def _fake_gcs_command(tmp_path, monkeypatch) -> list[str]:
    """The command line the local stack starts fake-gcs-server with (nothing is started)."""
    started = []

    class Recorded:
        def __init__(self, name, cmd, *args, **kwargs):
            self.name, self.argv = name, cmd

        def start(self):
            started.append(self)

        def wait_until(self, ready, timeout):
            pass

    monkeypatch.setattr(devstack_stack, "Managed", Recorded)
    monkeypatch.setattr(devstack_stack, "fake_gcs_binary", lambda: "fake-gcs-server")
    monkeypatch.setattr(devstack_stack.Stack, "provision_pubsub", lambda self, *a, **k: None)
    monkeypatch.setattr(devstack_stack.Stack, "provision_buckets", lambda self: None)
    stack = devstack_stack.Stack(ports=devstack_stack.Ports(firestore=1, pubsub=2, gcs=3, chat=4, ai=5, upload=6,
                                                            finalize=7), log_dir=tmp_path / "logs")
    stack.start_emulators()
    (gcs,) = [proc for proc in started if proc.name == "fake-gcs-server"]
    return gcs.argv


def _flag(command: list[str], flag: str) -> str:
    (index,) = [i for i, arg in enumerate(command) if arg == flag]
    return command[index + 1]


class _RecordingPubSub:
    """Stands in for google.cloud.pubsub_v1's clients: records what the local stack creates."""

    def __init__(self):
        self.subscriptions: list[dict] = []
        outer = self

        class Publisher:
            def topic_path(self, project, topic):
                return f"projects/{project}/topics/{topic}"

            def create_topic(self, name):
                pass

        class Subscriber:
            def subscription_path(self, project, name):
                return f"projects/{project}/subscriptions/{name}"

            def create_subscription(self, request):
                outer.subscriptions.append(request)

            def close(self):
                pass

        self.PublisherClient, self.SubscriberClient = Publisher, Subscriber


def test_local_push_endpoints_are_terraforms(tf, topology_raw, tmp_path, monkeypatch):
    """The push endpoint Terraform gives each subscription, evaluated for a function at some URL, is
    where the local stack pushes for a function there: straight from the emulator, or through the
    push relay (devstack.LOCAL_PUSH_RELAYED)."""
    from google.cloud import pubsub_v1

    template = first(tf.resource("google_pubsub_subscription", "push"), "push_config")["push_endpoint"]
    project = "chat-local"
    bases = {s["target"]: f"http://127.0.0.1:{9000 + i}" for i, s in enumerate(topology_raw["push_subscriptions"])}

    def terraform_endpoint(sub: dict) -> str:
        return (template.replace("${local.push_functions[each.value.target].service_config[0].uri}", bases[sub["target"]])
                .replace("${var.project_id}", project).replace("${each.value.topic}", sub["topic"]))

    fake = _RecordingPubSub()
    monkeypatch.setattr(pubsub_v1, "PublisherClient", fake.PublisherClient)
    monkeypatch.setattr(pubsub_v1, "SubscriberClient", fake.SubscriberClient)
    relays = []
    monkeypatch.setattr(devstack_stack.Stack, "_start", lambda self, proc, ready, timeout: relays.append(proc) or proc)
    stack = devstack_stack.Stack(ports=devstack_stack.Ports(firestore=1, pubsub=2, gcs=3, chat=4, ai=5, upload=6,
                                                            finalize=7), log_dir=tmp_path, project_id=project)
    stack.provision_pubsub(bases)
    created = {request["name"].rsplit("/", 1)[1]: request for request in fake.subscriptions}
    for sub in topology_raw["push_subscriptions"]:
        expected = terraform_endpoint(sub)
        assert "${" not in expected
        if sub["target"] in devstack_stack.LOCAL_PUSH_RELAYED:
            assert "push_config" not in created[sub["name"]]
            stack.start_push_relay(sub["target"], bases[sub["target"]], name=f"{sub['target']}-relay")
            assert _flag(relays[-1].argv, "--endpoint") == expected
        else:
            assert created[sub["name"]]["push_config"] == {"push_endpoint": expected}


def test_pending_upload_ttl_field_comes_from_the_topology(tf, topology_raw):
    field = tf.resource("google_firestore_field", "pending_upload_ttl")
    assert field["collection"] == "${local.uploads_layout.pending_collection}"
    assert field["field"] == "${local.uploads_layout.pending_expiry_field}"
    assert "ttl_config" in field
    assert {"pending_collection", "pending_expiry_field"} <= set(topology_raw["uploads"])

