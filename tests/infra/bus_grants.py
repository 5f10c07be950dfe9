"""Who may publish on which Pub/Sub topic, read from the Terraform module's IAM grants.

The room bus trusts a topic exactly as far as IAM lets accounts publish on it,
so the offline checks (tests/infra/test_bus_grants.py) and the emulator test
of what an instance obeys (tests/integration/test_bus_least_privilege.py)
both ask this module, rather than restate the grants.

A grant is resolved to ``(member, topic)`` pairs: the member is a service
account's Terraform name (``socket``, ``upload``, ``ai_stream``, ...) or, for
anything else, the member expression itself; the topic is its name from
chatcore/topology.json, ``ALL_TOPICS`` for a project-wide grant, or the topic
expression itself when it cannot be resolved statically (a ``for_each`` over
a set, e.g. the dead-letter topics).
"""

from __future__ import annotations

import re

from .hcl_model import Module

ALL_TOPICS = "*"
# The functions' service accounts (Terraform names): a stolen one must not steer the socket service.
FUNCTION_ACCOUNTS = ("upload", "ai_stream")
# Predefined roles that include pubsub.topics.publish. The broader ones are
# forbidden anyway (test_services.py); listing them keeps this model honest.
PUBLISHING_ROLES = {"roles/pubsub.publisher", "roles/pubsub.editor", "roles/pubsub.admin",
                    "roles/owner", "roles/editor"}
PUBLISH_PERMISSION = "pubsub.topics.publish"

_ACCOUNT = re.compile(r"^\$\{google_service_account\.(\w+)\.member\}$")
_TOPOLOGY_TOPIC = re.compile(r"local\.topology\.topics\.(\w+)")


def _custom_publishing_roles(tf: Module) -> set[str]:
    """References to the module's custom roles that include the publish permission."""
    return {f"${{google_project_iam_custom_role.{name}.name}}"
            for name, body in tf.resources_of("google_project_iam_custom_role").items()
            if PUBLISH_PERMISSION in body.get("permissions", [])}


def _member(expression: str) -> str:
    match = _ACCOUNT.match(expression)
    return match.group(1) if match else expression


def _topic(expression: str, topics: dict[str, str]) -> str:
    match = _TOPOLOGY_TOPIC.search(expression)
    return topics[match.group(1)] if match else expression


def publish_grants(tf: Module, topology_raw: dict) -> set[tuple[str, str]]:
    """Every (member, topic) that may publish, from topic-level and project-level grants."""
    topics = topology_raw["topics"]
    publishing = PUBLISHING_ROLES | _custom_publishing_roles(tf)
    grants = set()
    for rtype, scope in (("google_pubsub_topic_iam_member", "topic"), ("google_project_iam_member", "project")):
        # One binding per for_each instance (each.value.X substituted, hcl_model.Module.instances).
        for binding in tf.all_instances(rtype).values():
            if binding.get("role") not in publishing:
                continue
            topic = _topic(binding["topic"], topics) if scope == "topic" else ALL_TOPICS
            grants.add((_member(binding["member"]), topic))
    return grants


def topics_published_by(tf: Module, topology_raw: dict, *accounts: str) -> set[str]:
    return {topic for member, topic in publish_grants(tf, topology_raw) if member in accounts}


def publishers_of(tf: Module, topology_raw: dict, topic: str) -> set[str]:
    return {member for member, granted in publish_grants(tf, topology_raw) if granted in (topic, ALL_TOPICS)}
