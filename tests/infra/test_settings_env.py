"""Environment variables: what each deployable reads (parsed from its settings module), what
Terraform sets for it, and what the local stack sets for it, agree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from chatcore.identity import auth
from deploy import settings as deploy_settings
from devstack.stack import Ports, Stack

from .app_settings import env_choices, env_names
from .hcl_model import dynamic_blocks, first, map_keys
from .test_terraform_module import enum_choices

DEPLOYABLES = ("socket_service", "upload", "ai_stream")

# Where Terraform keeps each deployable's environment (infra/terraform/environment.tf): the maps
# always set, the maps set unless null or empty (shared maps first, then the deployable's own), the
# two merged as the resource uses them, and the secrets.
ENV_LOCALS = {
    "socket_service": (("shared_env", "token_env", "socket_service_env"),
                       ("token_optional_env", "socket_service_optional_env"),
                       "socket_service_environment", "token_secret_env"),
    "upload": (("shared_env", "token_env", "upload_env"), ("token_optional_env", "upload_optional_env"),
               "upload_environment", "token_secret_env"),
    "ai_stream": (("shared_env", "ai_stream_env"), ("ai_stream_optional_env",), "ai_stream_environment",
                  "ai_stream_secret_env"),
}

# Read by the runtime rather than by the settings module.
RUNTIME_ENV = {
    "socket_service": set(),  # PORT is read by the settings and set by Cloud Run itself
    "upload": {"THREADS"},  # functions-framework's gunicorn threads
    "ai_stream": {"THREADS"},
}

# Variables a deployable reads but Terraform deliberately leaves unset, so
# that the application default (the README's settings tables) applies in
# production. A new setting fails test_every_setting_is_set_or_deliberately_defaulted
# until it is either set in infra/terraform or listed here with its reason.
EMULATORS = "emulator address: local stack and tests only"
DEFAULT_IN_PRODUCTION = {
    "socket_service": {
        "FIRESTORE_EMULATOR_HOST": EMULATORS, "PUBSUB_EMULATOR_HOST": EMULATORS, "STORAGE_EMULATOR_HOST": EMULATORS,
        "SIGNING_KEY_FILE": "production signs keylessly (signBlob as the runtime service account)",
        "SIGNED_URL_ENDPOINT": "defaults to https://storage.googleapis.com when no emulator is set",
        "CHAT_HOST": "defaults to 0.0.0.0 when CHAT_ENV=production",
        "CHAT_PORT": "unset so that the PORT Cloud Run sets is used",
        "PORT": "set by Cloud Run (reserved: a service may not set it)",
        "DEV_TOKEN_TTL_SECONDS": "dev tokens are off in production",
        "MAX_HTTP_BUFFER_SIZE": "protocol default (1 MB frames)",
        "DOWNLOAD_URL_TTL_SECONDS": "application default",
        "UPLOAD_URL_TTL_SECONDS": "only the upload functions sign PUT URLs",
        "BUS_PACK_WINDOW_MS": "tuned by benchmark (docs/PERFORMANCE.md)",
        "EVENTS_PER_SECOND": "application default", "EVENT_BURST": "application default",
        "MALFORMED_FRAME_WARNINGS": "application default", "MALFORMED_FRAME_WINDOW_SECONDS": "application default",
        "REPLY_STALE_SECONDS": "application default", "REPLY_SWEEP_SECONDS": "application default",
        "SHUTDOWN_GRACE_SECONDS": "default 8 s fits Cloud Run's 10 s between SIGTERM and SIGKILL",
        "REQUEST_DEADLINE_SECONDS": "application default (10 s)",
        "UPLOAD_STALL_SECONDS": "application default (30 s)",
        "GC_TUNING": "on by default",
        "JWT_SECRET": "set from Secret Manager when an HS* algorithm is allowed (secret env map)",
        "AUTH_TIMEOUT_SECONDS": "application default (5 s)",
        "MAX_CONNECTIONS_PER_USER": "application default (20)",
        "HTTP_REQUESTS_PER_SECOND": "application default", "HTTP_REQUEST_BURST": "application default",
        "TOKEN_PARENT_ORIGINS": "defaults to FRAME_ANCESTORS (var.frame_ancestors), the only possible parents",
        "REPLY_PENDING_STALE_SECONDS": "application default (900 s) outlasts push redelivery backoff (up to 600 s) "
                                       "plus a cold start; ai_stream_min_instances is the deployment's knob",
        "BUS_STARTUP_RETRY_SECONDS": "application default (300 s) outlasts typical IAM propagation after a deploy",
        "INSTANCE_HEARTBEAT_SECONDS": "application default (60 s)",
        "INSTANCE_STALE_SECONDS": "application default (600 s, many missed heartbeats)",
    },
    "upload": {
        "FIRESTORE_EMULATOR_HOST": EMULATORS, "PUBSUB_EMULATOR_HOST": EMULATORS, "STORAGE_EMULATOR_HOST": EMULATORS,
        "SIGNING_KEY_FILE": "production signs keylessly (signBlob as the runtime service account)",
        "SIGNED_URL_ENDPOINT": "defaults to https://storage.googleapis.com when no emulator is set",
        "DOWNLOAD_URL_TTL_SECONDS": "application default",
        "JWT_SECRET": "set from Secret Manager when an HS* algorithm is allowed (secret env map)",
    },
    "ai_stream": {
        "FIRESTORE_EMULATOR_HOST": EMULATORS, "PUBSUB_EMULATOR_HOST": EMULATORS, "STORAGE_EMULATOR_HOST": EMULATORS,
        "GEMINI_BASE_URL": "tests only (a local Gemini wire-format fake)",
        "OFFLINE_TOKEN_DELAY_MS": "only for the offline stand-in",
        "CHUNK_INTERVAL_MS": "application default", "CHUNK_MAX_CHARS": "application default",
        "CHECKPOINT_INTERVAL_MS": "application default", "STOP_POLL_INTERVAL_MS": "application default",
        "HISTORY_BUDGET_CHARS": "application default", "HISTORY_MAX_MESSAGES": "application default",
        "PROMPT_MAX_CHARS": "application default", "FILE_TEXT_MAX_CHARS": "application default",
        "IMAGE_MAX_BYTES": "application default",
        "GC_TUNING": "on by default",
    },
}
# Never in production.
FORBIDDEN = {"FIRESTORE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST", "SIGNING_KEY_FILE", "PORT",
             "CHAT_PORT", "GEMINI_BASE_URL"}
# Set by the local stack but meaningless in production (emulators, per-run key, explicit port).
LOCAL_ONLY = {"FIRESTORE_EMULATOR_HOST", "PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST", "SIGNING_KEY_FILE",
              "CHAT_PORT", "PYTHONPATH"}
# Settings whose value is each deployable's own, not shared.
PER_DEPLOYABLE = {"SIGNING_SERVICE_ACCOUNT", "THREADS"}


def terraform_env(tf, deployable: str) -> dict[str, object]:
    always, optional, _, secret = ENV_LOCALS[deployable]
    values: dict[str, object] = {}
    for name in (*always, *optional):
        part = tf.locals[name]
        assert not set(values) & set(part), f"{deployable}: a variable of local.{name} is set by another map too"
        values.update(part)
    values.update({name: "<secret>" for name in map_keys(tf.locals[secret])})
    return values


@pytest.fixture(scope="module")
def local_stack_env(mocker_module) -> dict[str, dict[str, str]]:
    """The environment the local stack (devstack, `make dev`) gives each deployable, captured without starting it."""
    captured = []
    mocker_module.patch.object(Stack, "_start", side_effect=lambda proc, ready, timeout: captured.append(proc) or proc)
    mocker_module.patch.object(Stack, "provision_pubsub")
    stack = Stack(ports=Ports(firestore=1, pubsub=2, gcs=3, chat=4, ai=5, upload=6, finalize=7), log_dir=Path("/tmp"))
    try:
        stack.start_ai_function()
        stack.start_upload_functions()
        stack.start_socket_service()
    finally:
        stack.stop()
    by_name = {proc.name: proc.env for proc in captured}
    # The push relay is local plumbing (devstack/push_relay.py), not a deployable.
    assert by_name.pop("ai-stream-push-relay")["PUBSUB_EMULATOR_HOST"] == "127.0.0.1:2"
    assert set(by_name) == {"ai-stream", "request-upload", "upload-finalized", "socket-service"}
    assert by_name["request-upload"].keys() == by_name["upload-finalized"].keys()
    return {"ai_stream": by_name["ai-stream"], "upload": by_name["request-upload"],
            "socket_service": by_name["socket-service"]}


@pytest.fixture(scope="module")
def mocker_module(pytestconfig):
    from pytest_mock import MockerFixture

    mocker = MockerFixture(pytestconfig)
    yield mocker
    mocker.stopall()


@pytest.mark.parametrize("deployable", DEPLOYABLES)
def test_terraform_sets_only_what_the_deployable_reads(tf, deployable):
    unknown = set(terraform_env(tf, deployable)) - env_names(deployable) - RUNTIME_ENV[deployable]
    assert unknown == set(), f"Terraform sets variables {deployable} never reads"


@pytest.mark.parametrize("deployable", DEPLOYABLES)
def test_every_setting_is_set_or_deliberately_defaulted(tf, deployable):
    missing = env_names(deployable) - set(terraform_env(tf, deployable)) - set(DEFAULT_IN_PRODUCTION[deployable])
    assert missing == set(), (f"{deployable} reads these but Terraform does not set them: set them in "
                              f"infra/terraform or add them to DEFAULT_IN_PRODUCTION with the reason")
    stale = set(DEFAULT_IN_PRODUCTION[deployable]) - env_names(deployable)
    assert stale == set(), f"{deployable} no longer reads these"


@pytest.mark.parametrize("deployable", DEPLOYABLES)
def test_production_environment(tf, deployable):
    env = terraform_env(tf, deployable)
    assert env["CHAT_ENV"] == "production"
    assert env["GOOGLE_CLOUD_PROJECT"] == "${var.project_id}"
    assert env["FIRESTORE_DATABASE"] == "${google_firestore_database.main.name}"
    assert set(env) & FORBIDDEN == set()
    if "UPLOAD_BUCKET" in env_names(deployable):
        assert env["UPLOAD_BUCKET"] == "${google_storage_bucket.uploads.name}"


@pytest.mark.parametrize("deployable", DEPLOYABLES)
def test_local_stack_settings_are_set_in_production_too(tf, local_stack_env, deployable):
    # The local stack gives every service the same base environment; what counts is what this one reads.
    local = set(local_stack_env[deployable]) & (env_names(deployable) | RUNTIME_ENV[deployable]) - LOCAL_ONLY
    assert local, "the local stack sets nothing this deployable reads?"
    assert local - set(terraform_env(tf, deployable)) == set()


def test_shared_settings_get_the_same_value_everywhere(tf):
    """What one deployable advertises and another enforces (upload limits, reply length, auth...) cannot differ."""
    envs = {d: terraform_env(tf, d) for d in DEPLOYABLES}
    names = set().union(*envs.values()) - PER_DEPLOYABLE
    for name in sorted(names):
        values = {d: env[name] for d, env in envs.items() if name in env}
        if len(values) > 1:
            assert len({str(v) for v in values.values()}) == 1, f"{name} differs: {values}"


def test_deployables_use_their_env_maps(tf):
    def for_each_of(blocks: list[dict], name: str) -> str:
        (block,) = [b for b in blocks if f"local.{name}" in b["for_each"]]
        return block["for_each"]

    for deployable, (always, optional, merged, _) in ENV_LOCALS.items():
        # Optional values are dropped only when null or empty; only variables decide that, so the
        # set of names is known at plan time.
        optional_maps = f"local.{optional[0]}" if len(optional) == 1 else \
            f"merge({', '.join(f'local.{name}' for name in optional)})"
        assert tf.locals[merged] == (
            f"${{{{for k, v in merge({', '.join(f'local.{name}' for name in always)}, "
            f"{{for name, value in {optional_maps} : name => value "
            f'if value != null && value != ""}}) : k => tostring(v)}}}}'), deployable
        for name in optional:
            for value in tf.locals[name].values():
                assert "google_" not in value and "data." not in value, f"{deployable}: {value} is not known at plan"

    container = first(tf.resource("google_cloud_run_v2_service", "socket"), "template", "containers")
    envs = dynamic_blocks(container, "env")
    assert len(envs) == 2
    assert for_each_of(envs, "socket_service_environment") == "${local.socket_service_environment}"
    assert for_each_of(envs, "token_secret_env").startswith("${local.jwt_uses_hmac ?")

    for function, deployable in (("request_upload", "upload"), ("on_upload_finalized", "upload"),
                                 ("ai_stream", "ai_stream")):
        service = first(tf.instance("google_cloudfunctions2_function", "functions", function), "service_config")
        _, _, merged, secret = ENV_LOCALS[deployable]
        assert service["environment_variables"] == f"${{local.{merged}}}", function
        for_each_of(dynamic_blocks(service, "secret_environment_variables"), secret)


def test_secret_values_are_secret_ids_not_values(tf):
    assert ENV_LOCALS["socket_service"][3] == ENV_LOCALS["upload"][3] == "token_secret_env"
    assert tf.locals["token_secret_env"] == {"JWT_SECRET": "${google_secret_manager_secret.jwt.secret_id}"}
    assert tf.locals["ai_stream_secret_env"] == {"OPENAI_API_KEY": "${var.openai_api_key_secret}",
                                                 "GEMINI_API_KEY": "${var.gemini_api_key_secret}"}
    assert tf.resource("google_secret_manager_secret", "jwt")["secret_id"] == deploy_settings.JWT_SECRET_ID
    assert not tf.resources_of("google_secret_manager_secret_version"), "a secret value would sit in the state"


def test_enum_settings_offer_the_applications_choices(tf):
    """An env var the application reads with env_choice gets a variable validated with the same choices."""
    checked = 0
    for deployable in DEPLOYABLES:
        choices = env_choices(deployable)
        for name, value in terraform_env(tf, deployable).items():
            if name not in choices:
                continue
            match = re.fullmatch(r"\$\{var\.(\w+)\}", str(value))
            if match:
                assert enum_choices(tf, match.group(1)) == set(choices[name]), name
                checked += 1
            else:
                assert value in choices[name], f"{name} = {value!r}"
    assert checked >= 4
    assert enum_choices(tf, "environment") == set(deploy_settings.ENVIRONMENTS)


def test_jwt_algorithms_offer_what_chatcore_accepts(tf):
    (validation,) = tf.variables["jwt_algorithms"].body["validation"]
    offered = set(re.findall(r'"([A-Z]{2}\d{3})"', validation["condition"]))
    assert offered == set(auth.HMAC_ALGORITHMS + auth.ASYMMETRIC_ALGORITHMS)
    assert tf.locals["token_env"]["JWT_ALGORITHMS"] == '${join(",", var.jwt_algorithms)}'
