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
a local, e.g. the dead-letter topics).
"""

from __future__ import annotations

import re
from typing import Any

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
_EACH_VALUE = re.compile(r"each\.value\.(\w+)")


def _custom_publishing_roles(tf: Module) -> set[str]:
    """References to the module's custom roles that include the publish permission."""
    return {f"${{google_project_iam_custom_role.{name}.name}}"
            for name, body in tf.resources_of("google_project_iam_custom_role").items()
            if PUBLISH_PERMISSION in body.get("permissions", [])}


def _instances(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The binding once per ``for_each`` entry of a map literal, with ``each.value.X`` substituted."""
    for_each = body.get("for_each")
    if not isinstance(for_each, dict):
        return [body]
    instances = []
    for key, value in for_each.items():
        if key.startswith("__") or not isinstance(value, dict):
            continue

        instances.append({k: _substitute(v, value) for k, v in body.items() if k != "for_each"})
    return instances


def _substitute(text: Any, value: dict[str, str]) -> Any:
    """``text`` with ``each.value.X`` replaced by entry ``value``'s X (a whole ``${each.value.X}`` by X as is)."""
    if not isinstance(text, str):
        return text
    whole = re.fullmatch(r"\$\{each\.value\.(\w+)\}", text)
    if whole:
        return value[whole.group(1)]
    return _EACH_VALUE.sub(lambda m: value[m.group(1)].removeprefix("${").removesuffix("}"), text)


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
        for body in tf.resources_of(rtype).values():
            for binding in _instances(body):
                if binding.get("role") not in publishing:
                    continue
                topic = _topic(binding["topic"], topics) if scope == "topic" else ALL_TOPICS
                grants.add((_member(binding["member"]), topic))
    return grants


def topics_published_by(tf: Module, topology_raw: dict, *accounts: str) -> set[str]:
    return {topic for member, topic in publish_grants(tf, topology_raw) if member in accounts}


def publishers_of(tf: Module, topology_raw: dict, topic: str) -> set[str]:
    return {member for member, granted in publish_grants(tf, topology_raw) if granted in (topic, ALL_TOPICS)}
