"""`python -m deploy doctor`: each check's ok/warn/fail/unknown paths against realistic gcloud JSON
(subprocess.run is replaced by pytest-mock, no cloud account), that it only ever runs read verbs,
its one-line-per-check output and its exit code."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from deploy import __main__ as cli
from deploy import checks, doctor
from deploy import settings as deploy_settings
from deploy.checks import base, local, placement, policies, project
from deploy.checks.base import READ_VERBS, Context, ReadOnlyGcloud, Status
from deploy.settings import ROOT, TERRAFORM_DIR, Target

PROJECT = "demo-project"
ACCOUNT = "ada@example.com"
NUMBER = "123456789012"

# -- realistic gcloud answers (--format=json) ----------------------------------------------------
AUTH_LIST = [{"account": ACCOUNT, "status": "ACTIVE"},
             {"account": f"ci@{PROJECT}.iam.gserviceaccount.com", "status": ""}]
PROJECT_INFO = {"createTime": "2025-03-01T09:12:44.418Z", "lifecycleState": "ACTIVE", "name": PROJECT,
                "parent": {"id": "987654321098", "type": "organization"}, "projectId": PROJECT,
                "projectNumber": NUMBER}
BILLING = {"billingAccountName": "billingAccounts/01A2B3-C4D5E6-F7A8B9", "billingEnabled": True,
           "name": f"projects/{PROJECT}/billingInfo", "projectId": PROJECT}


def services(*apis: str) -> list[dict]:
    return [{"config": {"name": api, "title": api.split(".")[0].title() + " API"},
             "name": f"projects/{NUMBER}/services/{api}", "parent": f"projects/{NUMBER}", "state": "ENABLED"}
            for api in apis]


ENABLED = services("serviceusage.googleapis.com", "cloudresourcemanager.googleapis.com", "run.googleapis.com",
                   "cloudfunctions.googleapis.com", "cloudbuild.googleapis.com", "firestore.googleapis.com",
                   "storage.googleapis.com", "logging.googleapis.com")
STATE_BUCKET = {"creation_time": "2025-03-01T09:20:01+0000", "default_storage_class": "STANDARD",
                "location": "US-CENTRAL1", "location_type": "region", "metageneration": 2,
                "name": f"{PROJECT}-tfstate", "public_access_prevention": "enforced",
                "storage_url": f"gs://{PROJECT}-tfstate/", "uniform_bucket_level_access": True,
                "versioning_enabled": True}
DRS_OPEN = {"constraint": "constraints/iam.allowedPolicyMemberDomains", "etag": "BwYq4Lw0xZc="}
DRS_RESTRICTED = {**DRS_OPEN, "listPolicy": {"allowedValues": ["C03xk2ab1"]}}
DEFAULT_SA_GRANTS_ON = {"booleanPolicy": {"enforced": True}, "etag": "BwYq4Lw0xZc=",
                        "constraint": "constraints/iam.automaticIamGrantsForDefaultServiceAccounts"}


def v2_policy(constraint: str, enforce: bool) -> dict:
    return {"name": f"projects/{NUMBER}/policies/{constraint.removeprefix('constraints/')}",
            "spec": {"etag": "CJDhz7sGEOCe5Mk=", "rules": [{"enforce": enforce}],
                     "updateTime": "2025-02-11T10:00:00.123456Z"}}


def build_sa(email: str) -> dict:
    answer = {"name": f"projects/{PROJECT}/locations/global/defaultServiceAccount"}
    if email:
        answer["serviceAccountEmail"] = f"projects/{PROJECT}/serviceAccounts/{email}"
    return answer


def locations(*regions: str) -> list[dict]:
    return [{"displayName": r, "labels": {"cloud.googleapis.com/region": r}, "locationId": r,
             "name": f"projects/{PROJECT}/locations/{r}"} for r in regions]


def firestore_db(name="(default)", location="nam5", kind="FIRESTORE_NATIVE") -> dict:
    return {"appEngineIntegrationMode": "DISABLED", "concurrencyMode": "PESSIMISTIC",
            "createTime": "2024-11-02T08:00:00.000Z", "deleteProtectionState": "DELETE_PROTECTION_DISABLED",
            "locationId": location, "name": f"projects/{PROJECT}/databases/{name}", "type": kind,
            "uid": "6a1e2f0c-1111-2222-3333-444455556666"}


def iam_policy(*bindings: tuple[str, list[str]]) -> dict:
    return {"bindings": [{"members": members, "role": role} for role, members in bindings],
            "etag": "BwYq4MOuKyo=", "version": 1}


class Err:
    """A failing gcloud call: exit 1 and gcloud's usual error line on stderr."""

    def __init__(self, message: str, command: str = "gcloud.x.y"):
        self.stderr = f"ERROR: ({command}) {message}\n"


TIMEOUT = object()  # the call hangs until the timeout
NOT_INSTALLED = object()  # there is no gcloud on PATH
ORGPOLICY_OFF = Err(f"[{ACCOUNT}] does not have permission to access projects instance [{PROJECT}] (or it may not "
                    f"exist): Org Policy API has not been used in project {NUMBER} before or it is disabled.",
                    "gcloud.org-policies.describe")
STATE_OBJECT = f"storage objects describe gs://{PROJECT}-tfstate/chat/prod/default.tfstate"
# A project where every check passes; tests change one answer at a time.
HEALTHY = {
    "auth list": AUTH_LIST,
    f"projects describe {PROJECT}": PROJECT_INFO,
    f"billing projects describe {PROJECT}": BILLING,
    "services list": ENABLED,
    f"storage buckets describe gs://{PROJECT}-tfstate": STATE_BUCKET,
    "resource-manager org-policies describe constraints/iam.allowedPolicyMemberDomains": DRS_OPEN,
    "org-policies describe constraints/iam.managed.allowedPolicyMembers":
        v2_policy("constraints/iam.managed.allowedPolicyMembers", False),
    "org-policies describe constraints/run.managed.requireInvokerIam":
        v2_policy("constraints/run.managed.requireInvokerIam", False),
    "resource-manager org-policies describe constraints/iam.automaticIamGrantsForDefaultServiceAccounts":
        DEFAULT_SA_GRANTS_ON,
    "builds get-default-service-account": build_sa(f"{NUMBER}@cloudbuild.gserviceaccount.com"),
    "run regions list": locations("europe-west1", "us-central1", "us-east1"),
    "functions regions list": locations("europe-west1", "us-central1"),
    "firestore databases list": [],
    STATE_OBJECT: Err(f"gs://{PROJECT}-tfstate/chat/prod/default.tfstate not found: 404.",
                      "gcloud.storage.objects.describe"),
    f"projects get-iam-policy {PROJECT}": iam_policy(("roles/owner", [f"user:{ACCOUNT}"]),
                                                     ("roles/viewer", ["group:devs@example.com"])),
}
# Words that would change something; none may ever reach gcloud.
WRITE_WORDS = {"enable", "disable", "create", "delete", "update", "set", "set-quota-project", "add-iam-policy-binding",
               "set-iam-policy", "link", "unlink", "submit", "deploy", "import", "undelete", "login", "activate"}


def command_key(argv: list[str]) -> str:
    return " ".join(word for word in argv[1:] if not word.startswith("--"))


def assert_read_only(argv: list[str]) -> None:
    """The test's own reading of a command: ``gcloud GROUP... VERB [ARG]``, VERB a read verb."""
    assert argv[0] == "gcloud", argv
    words = [w for w in argv[1:] if not w.startswith("--")]
    verbs = [i for i, w in enumerate(words) if w in {"describe", "list", "get-value"} or w.startswith("get-")]
    assert verbs, f"no read verb in {argv}"
    verb = verbs[0]
    assert all(re.fullmatch(r"[a-z][a-z-]*", w) for w in words[:verb]), argv  # groups only before the verb
    assert not set(words) & WRITE_WORDS, argv
    assert words[verb] in {"describe", "list", "get-value", "get-iam-policy"} or words[verb].startswith("get-")
    assert not (words[:verb] == ["auth"] and words[verb] != "list"), argv  # auth: only `auth list`
    assert "--format=json" in argv


class FakeGcloud:
    """Stands in for subprocess.run: records each argv and answers from a table of command keys."""

    def __init__(self, answers: dict):
        self.answers = answers
        self.calls: list[list[str]] = []
        self.kwargs: list[dict] = []

    def __call__(self, argv, **kwargs):
        self.calls.append(list(argv))
        self.kwargs.append(kwargs)
        assert_read_only(argv)
        answer = self.answers[command_key(argv)]  # KeyError: a command no test expected
        if answer is TIMEOUT:
            raise subprocess.TimeoutExpired(argv, kwargs.get("timeout"))
        if answer is NOT_INSTALLED:
            raise FileNotFoundError(2, "No such file or directory", "gcloud")
        if isinstance(answer, Err):
            return subprocess.CompletedProcess(argv, 1, stdout="", stderr=answer.stderr)
        return subprocess.CompletedProcess(argv, 0, stdout=json.dumps(answer, indent=2) + "\n", stderr="")

    def count(self, key: str) -> int:
        return sum(command_key(argv) == key for argv in self.calls)


MAIN_TF = """
provider "google" {
  project = var.project_id
%s}
locals {
  apis = toset([
    "cloudbuild.googleapis.com",
    "cloudresourcemanager.googleapis.com",
    "firestore.googleapis.com",
    "run.googleapis.com",
  ])
}
"""


@pytest.fixture
def tfdir(tmp_path):
    """A Terraform folder whose provider sets user_project_override and whose service disables the invoker check."""
    folder = tmp_path / "terraform"
    (folder / "environments").mkdir(parents=True)
    (folder / "main.tf").write_text(MAIN_TF % "  user_project_override = true\n  billing_project = var.project_id\n")
    (folder / "run.tf").write_text('resource "google_cloud_run_v2_service" "socket" {\n  invoker_iam_disabled = true\n}\n')
    return folder


@pytest.fixture
def adc(tmp_path):
    """Writes the ADC file (in a fake home) and returns the environment pointing at it."""
    def write(info: dict | None = None) -> dict[str, str]:
        path = tmp_path / "home" / ".config" / "gcloud" / "application_default_credentials.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info or {
            "account": "", "client_id": "764086051850-6qr4p6gpi6hn506pt8ejuq83di341hur.apps.googleusercontent.com",
            "client_secret": "d-FL95Q19q7MQmFpd7hHD0Ty", "quota_project_id": PROJECT,
            "refresh_token": "1//0gSECRET-REFRESH-TOKEN", "type": "authorized_user",
            "universe_domain": "googleapis.com"}))
        return {}
    return write


@pytest.fixture
def make(mocker, tmp_path, tfdir, adc):
    """make(answers=..., region=..., environ=...) -> (Context, FakeGcloud) over a healthy project."""
    def build(region="us-central1", environ=None, terraform_dir=None, environment="prod", **answers):
        fake = FakeGcloud({**HEALTHY, **answers})
        mocker.patch.object(base.subprocess, "run", side_effect=fake)
        if environ is None:
            adc()
            environ = {}
        ctx = Context(Target(project=PROJECT, region=region, environment=environment),
                      ReadOnlyGcloud(ROOT, timeout=7, echo=lambda line: None),
                      terraform_dir=terraform_dir or tfdir, environ=environ, home=tmp_path / "home")
        return ctx, fake
    return build


def run(check, ctx):
    return doctor.run_check(check, ctx)


def only(check, ctx, status: Status, *needles: str):
    result = run(check, ctx)
    assert result.status is status, result
    line = doctor.format_result(result)
    for needle in needles:
        assert needle in line, (needle, line)
    return result


# -- the whole run ------------------------------------------------------------------------------
def test_a_healthy_project_passes_every_check_with_reads_only(make):
    ctx, fake = make()
    results = doctor.run_doctor(ctx, say=lambda line: None)
    assert [r.status for r in results] == [Status.OK] * len(checks.REGISTRY), results
    assert doctor.exit_code(results) == 0
    assert fake.calls and all(base.verb_of(argv) in READ_VERBS for argv in fake.calls)
    # Bounded, non-interactive: a timeout, no stdin, no prompt that could enable an API.
    for kwargs in fake.kwargs:
        assert kwargs["timeout"] == 7 and kwargs["stdin"] is subprocess.DEVNULL
        assert kwargs["env"]["CLOUDSDK_CORE_DISABLE_PROMPTS"] == "1"
        assert kwargs["env"]["CLOUDSDK_CORE_SHOULD_PROMPT_TO_ENABLE_API"] == "false"
    # Answers are shared: the enabled APIs and the account are asked for once.
    assert fake.count("services list") == 1 and fake.count("auth list") == 1


def test_every_gcloud_command_of_every_path_is_a_read(make):
    """Failing answers take other branches (and other commands): all of them must be reads too."""
    failing = {key: Err("PERMISSION_DENIED: nope") for key in HEALTHY}
    for answers in (failing, {"services list": []}, {key: TIMEOUT for key in HEALTHY}):
        ctx, fake = make(**answers)
        doctor.run_doctor(ctx, say=lambda line: None)
        assert fake.calls
        for argv in fake.calls:
            assert_read_only(argv)


def test_the_runner_refuses_a_write_before_starting_anything(mocker):
    spawn = mocker.patch.object(base.subprocess, "run")
    gcloud = ReadOnlyGcloud(ROOT, echo=lambda line: None)
    for args in (("services", "enable", "run.googleapis.com"), ("builds", "submit", "."),
                 ("auth", "application-default", "set-quota-project", PROJECT), ("projects", "delete", PROJECT)):
        with pytest.raises(PermissionError):
            gcloud.json(*args)
    spawn.assert_not_called()


def test_one_line_per_check_and_exit_code_1_on_a_failure(make):
    ctx, _ = make(**{f"billing projects describe {PROJECT}": {**BILLING, "billingEnabled": False}})
    lines = []
    results = doctor.run_doctor(ctx, say=lines.append)
    assert len(lines) == len(checks.REGISTRY) == len(results)
    assert all("\n" not in line for line in lines)
    for line, result, check in zip(lines, results, checks.REGISTRY, strict=True):
        assert line.split()[0] == result.status.value
        assert result.name == check.title and check.title in line
    (billing,) = [line for line in lines if line.startswith("fail")]
    assert re.match(r"fail +billing +billing is not enabled.* -> gcloud billing projects link demo-project", billing)
    assert doctor.exit_code(results) == 1


def test_unknown_and_warn_do_not_fail_the_run(make):
    ctx, _ = make(**{f"billing projects describe {PROJECT}": Err("PERMISSION_DENIED: billing.resourceAssociations"),
                     f"storage buckets describe gs://{PROJECT}-tfstate": {**STATE_BUCKET, "versioning_enabled": False}})
    results = doctor.run_doctor(ctx, say=lambda line: None)
    assert {r.status for r in results} == {Status.OK, Status.WARN, Status.UNKNOWN}
    assert doctor.exit_code(results) == 0


def test_a_crashing_or_hanging_check_becomes_unknown_and_the_others_still_run(make):
    ctx, _ = make(**{f"projects get-iam-policy {PROJECT}": TIMEOUT})

    def broken(ctx):
        raise KeyError("bindings")

    lines = []
    results = doctor.run_doctor(ctx, [broken, project.caller_roles, project.billing], say=lines.append)
    assert [r.status for r in results] == [Status.UNKNOWN, Status.UNKNOWN, Status.OK]
    assert "the check itself failed: KeyError" in lines[0]
    assert lines[1].startswith("unknown  your roles") and "no answer within 7 s" in lines[1]


def test_format_keeps_each_result_on_one_line():
    result = base.Result("APIs", Status.WARN, "first\nsecond   third", "do\nthis")
    assert doctor.format_result(result) == f"warn     {'APIs':<32} first second third -> do this"


def test_no_credential_is_ever_printed(make, tmp_path):
    ctx, _ = make()
    lines = []
    doctor.run_doctor(ctx, say=lines.append)
    text = "\n".join(lines)
    assert "SECRET" not in text and "d-FL95Q19q7MQmFpd7hHD0Ty" not in text and "apps.googleusercontent" not in text


# -- 1. gcloud account ---------------------------------------------------------------------------
def test_gcloud_account(make):
    only(local.gcloud_account, make()[0], Status.OK, f"{ACCOUNT} is active")
    only(local.gcloud_account, make(**{"auth list": [{"account": ACCOUNT, "status": ""}]})[0], Status.FAIL,
         "no active gcloud account", "gcloud auth login")
    ctx, _ = make(**{"auth list": NOT_INSTALLED})
    only(local.gcloud_account, ctx, Status.FAIL, "gcloud is not installed", "cloud.google.com/sdk")
    # ... and the checks that need gcloud say so instead of crashing.
    only(project.billing, ctx, Status.UNKNOWN, "gcloud is not installed")


# -- 2. Application Default Credentials -----------------------------------------------------------
def test_adc_user_credentials_and_their_quota_project(make, adc, tmp_path):
    ctx, _ = make()
    only(local.application_default_credentials, ctx, Status.OK, f"quota project {PROJECT}")
    user = {"type": "authorized_user", "client_id": "x", "client_secret": "y", "refresh_token": "z"}
    adc(user)
    # Terraform sends the quota project itself (user_project_override): warn, with the fix.
    only(local.application_default_credentials, ctx, Status.WARN, "without a quota project",
         "serviceusage.services.use", f"-> gcloud auth application-default set-quota-project {PROJECT}")
    adc({**user, "quota_project_id": "other-project"})
    only(local.application_default_credentials, ctx, Status.OK, "quota project other-project",
         "user_project_override")


def test_adc_without_quota_project_fails_when_terraform_does_not_override(make, adc, tmp_path):
    bare = tmp_path / "bare"
    (bare / "environments").mkdir(parents=True)
    (bare / "main.tf").write_text(MAIN_TF % "")
    ctx, _ = make(terraform_dir=bare)
    user = {"type": "authorized_user", "client_id": "x", "client_secret": "y", "refresh_token": "z"}
    adc(user)
    only(local.application_default_credentials, ctx, Status.FAIL, "Firebase Rules API refuses them",
         f"set-quota-project {PROJECT}")
    adc({**user, "quota_project_id": "other-project"})
    only(local.application_default_credentials, ctx, Status.WARN, "quota project other-project, not demo-project")


def test_adc_other_credential_kinds_and_missing_files(make, tmp_path):
    # A service-account key file as Google issues them, with a key generated here for the test.
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    key = tmp_path / "sa.json"
    key.write_text(json.dumps({"type": "service_account", "private_key": pem,
                               "client_email": f"ci@{PROJECT}.iam.gserviceaccount.com"}))
    ctx, _ = make(environ={"GOOGLE_APPLICATION_CREDENTIALS": str(key)})
    result = only(local.application_default_credentials, ctx, Status.OK, "service_account credentials")
    shown = doctor.format_result(result)
    assert "PRIVATE KEY" not in shown and pem.splitlines()[1] not in shown
    ctx, _ = make(environ={"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "gone.json")})
    only(local.application_default_credentials, ctx, Status.FAIL, "names a missing file")
    ctx, _ = make(environ={})  # no file in the fake home
    only(local.application_default_credentials, ctx, Status.FAIL, "no Application Default Credentials",
         "gcloud auth application-default login")
    ctx, _ = make(environ={"GOOGLE_OAUTH_ACCESS_TOKEN": "ya29.secret"})
    result = only(local.application_default_credentials, ctx, Status.OK, "$GOOGLE_OAUTH_ACCESS_TOKEN")
    assert "ya29" not in doctor.format_result(result)
    ctx, _ = make(environ={"CLOUD_SHELL": "true"})
    only(local.application_default_credentials, ctx, Status.WARN, "Cloud Shell")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    ctx, _ = make(environ={"GOOGLE_APPLICATION_CREDENTIALS": str(broken)})
    only(local.application_default_credentials, ctx, Status.FAIL, "not readable JSON")


# -- 3. project and billing ----------------------------------------------------------------------
def test_project(make):
    only(project.project_exists, make()[0], Status.OK, f"number {NUMBER}", "ACTIVE")
    ctx, _ = make(**{f"projects describe {PROJECT}": Err(
        f"[{ACCOUNT}] does not have permission to access projects instance [{PROJECT}] (or it may not exist): "
        "The caller does not have permission. This command is authenticated as ada@example.com which is the "
        "active account specified by the [core/account] property", "gcloud.projects.describe")})
    result = only(project.project_exists, ctx, Status.FAIL, "cannot be read", "does not have permission")
    assert "ERROR:" not in result.found and len(result.found) < 260
    ctx, _ = make(**{f"projects describe {PROJECT}": {**PROJECT_INFO, "lifecycleState": "DELETE_REQUESTED"}})
    only(project.project_exists, ctx, Status.FAIL, "DELETE_REQUESTED", "gcloud projects undelete")


def test_billing(make):
    only(project.billing, make()[0], Status.OK, "billing is enabled")
    ctx, _ = make(**{f"billing projects describe {PROJECT}": {"name": f"projects/{PROJECT}/billingInfo",
                                                                "projectId": PROJECT}})
    only(project.billing, ctx, Status.FAIL, "not enabled", "gcloud billing projects link")
    ctx, _ = make(**{f"billing projects describe {PROJECT}": Err("PERMISSION_DENIED: The caller does not have "
                                                                 "permission", "gcloud.billing.projects.describe")})
    only(project.billing, ctx, Status.UNKNOWN, "PERMISSION_DENIED")


# -- 4. APIs and the state bucket ----------------------------------------------------------------
def test_apis(make):
    only(project.apis, make()[0], Status.OK, "serviceusage and cloudresourcemanager on",
         "3 of the 3 others Terraform enables are on already (cloudbuild, firestore, run)")
    ctx, _ = make(**{"services list": services("cloudresourcemanager.googleapis.com", "run.googleapis.com")})
    only(project.apis, ctx, Status.FAIL, "serviceusage not enabled", "1 of the 3 others",
         "-> gcloud services enable serviceusage.googleapis.com cloudresourcemanager.googleapis.com "
         f"--project={PROJECT}")
    ctx, _ = make(**{"services list": Err(
        f"PERMISSION_DENIED: Service Usage API has not been used in project {NUMBER} before or it is disabled. "
        "reason: SERVICE_DISABLED", "gcloud.services.list")})
    only(project.apis, ctx, Status.FAIL, "SERVICE_DISABLED", "gcloud services enable")
    ctx, _ = make(**{"services list": Err("PERMISSION_DENIED: Permission denied to list services")})
    only(project.apis, ctx, Status.UNKNOWN, "Permission denied to list services")


def test_state_bucket(make):
    only(project.state_bucket, make()[0], Status.OK, f"gs://{PROJECT}-tfstate exists, versioned")
    key = f"storage buckets describe gs://{PROJECT}-tfstate"
    ctx, _ = make(**{key: {**STATE_BUCKET, "versioning_enabled": False}})
    only(project.state_bucket, ctx, Status.WARN, "without versioning", "--versioning")
    ctx, _ = make(**{key: Err(f"gs://{PROJECT}-tfstate not found: 404.", "gcloud.storage.buckets.describe")})
    only(project.state_bucket, ctx, Status.FAIL, "does not exist", "gcloud storage buckets create", "step 2")
    ctx, _ = make(**{key: Err(f"HTTPError 403: {ACCOUNT} does not have storage.buckets.get access")})
    only(project.state_bucket, ctx, Status.UNKNOWN, "403")


# -- 5. organization policies --------------------------------------------------------------------
DRS_KEY = "resource-manager org-policies describe constraints/iam.allowedPolicyMemberDomains"
MANAGED_KEY = "org-policies describe constraints/iam.managed.allowedPolicyMembers"
INVOKER_KEY = "org-policies describe constraints/run.managed.requireInvokerIam"
GRANTS_KEY = "resource-manager org-policies describe constraints/iam.automaticIamGrantsForDefaultServiceAccounts"


def allusers_terraform(tmp_path) -> Path:
    folder = tmp_path / "allusers"
    (folder / "environments").mkdir(parents=True, exist_ok=True)
    (folder / "main.tf").write_text(MAIN_TF % "")
    (folder / "iam.tf").write_text('resource "google_cloud_run_v2_service_iam_member" "socket_public" {\n'
                                   '  member = "allUsers"\n}\n')
    return folder


def test_public_access(make, tmp_path):
    only(policies.public_access, make()[0], Status.OK, "allUsers bindings are allowed")
    ctx, _ = make(**{DRS_KEY: DRS_RESTRICTED})
    only(policies.public_access, ctx, Status.OK, "refused", "allows only C03xk2ab1",
         "the deploy disables Cloud Run's invoker IAM check instead")
    ctx, _ = make(**{DRS_KEY: {**DRS_OPEN, "listPolicy": {"allValues": "DENY"}}}, terraform_dir=allusers_terraform(tmp_path))
    only(policies.public_access, ctx, Status.WARN, "denies every domain", "still grants allUsers",
         "do not belong to a permitted customer")
    ctx, _ = make(**{MANAGED_KEY: v2_policy("constraints/iam.managed.allowedPolicyMembers", True)})
    only(policies.public_access, ctx, Status.OK, "iam.managed.allowedPolicyMembers is enforced")
    ctx, _ = make(**{MANAGED_KEY: ORGPOLICY_OFF})  # v1 says open, v2 unknown: the v1 answer stands
    only(policies.public_access, ctx, Status.OK, "allowed")
    ctx, _ = make(**{DRS_KEY: Err("PERMISSION_DENIED: orgpolicy.policy.get")})
    only(policies.public_access, ctx, Status.UNKNOWN, "orgpolicy.policy.get")


def test_invoker_iam_required(make, tmp_path):
    only(policies.invoker_iam_required, make()[0], Status.OK, "not enforced")
    ctx, _ = make(**{INVOKER_KEY: Err("NOT_FOUND: Requested entity was not found.")})
    only(policies.invoker_iam_required, ctx, Status.OK, "not enforced")
    enforced = v2_policy("constraints/run.managed.requireInvokerIam", True)
    ctx, _ = make(**{INVOKER_KEY: enforced})
    only(policies.invoker_iam_required, ctx, Status.FAIL, "is enforced", "which the deploy does",
         "ask for an exception to constraints/run.managed.requireInvokerIam")
    ctx, _ = make(**{INVOKER_KEY: enforced, DRS_KEY: DRS_RESTRICTED}, terraform_dir=allusers_terraform(tmp_path))
    only(policies.invoker_iam_required, ctx, Status.FAIL, "allUsers is refused too: the chat page cannot be public")
    ctx, _ = make(**{INVOKER_KEY: enforced}, terraform_dir=allusers_terraform(tmp_path))
    only(policies.invoker_iam_required, ctx, Status.WARN, "uses allUsers bindings, which are allowed")
    ctx, _ = make(**{INVOKER_KEY: ORGPOLICY_OFF})
    only(policies.invoker_iam_required, ctx, Status.UNKNOWN, "orgpolicy.googleapis.com",
         "Org Policy API has not been used")


def test_default_service_account_grants(make):
    only(policies.default_sa_grants, make()[0], Status.OK, "enforced: default service accounts get no roles")
    ctx, _ = make(**{GRANTS_KEY: {"booleanPolicy": {}, "constraint": GRANTS_KEY.split()[-1], "etag": "BwY="}})
    only(policies.default_sa_grants, ctx, Status.OK, "not enforced")
    ctx, _ = make(**{GRANTS_KEY: Err("PERMISSION_DENIED: nope")})
    only(policies.default_sa_grants, ctx, Status.UNKNOWN, "PERMISSION_DENIED")


# -- 6. Cloud Build's default service account ----------------------------------------------------
def test_build_service_account(make, mocker):
    key = "builds get-default-service-account"
    only(policies.build_service_account, make()[0], Status.OK, f"legacy Cloud Build account {NUMBER}@cloudbuild")
    mocker.patch.object(policies, "deploy_names_build_account", return_value=False)
    ctx, _ = make(**{key: build_sa(f"{NUMBER}-compute@developer.gserviceaccount.com")})
    only(policies.build_service_account, ctx, Status.WARN, "Compute Engine default account",
         "runs as this account", "--service-account")
    ctx, _ = make(**{key: build_sa("")})
    only(policies.build_service_account, ctx, Status.WARN, "none: every build must name")
    ctx, _ = make(**{key: build_sa(f"builder@{PROJECT}.iam.gserviceaccount.com")})
    only(policies.build_service_account, ctx, Status.OK, f"builder@{PROJECT}")
    ctx, _ = make(**{"services list": services(*project.BOOTSTRAP_APIS)})
    only(policies.build_service_account, ctx, Status.UNKNOWN, "Cloud Build API is not enabled yet")
    ctx, _ = make(**{key: Err("PERMISSION_DENIED: cloudbuild.builds.get")})
    only(policies.build_service_account, ctx, Status.UNKNOWN, "cloudbuild.builds.get")
    # Once the deploy names its own build account, the Compute account is only information.
    mocker.patch.object(policies, "deploy_names_build_account", return_value=True)
    ctx, _ = make(**{key: build_sa(f"{NUMBER}-compute@developer.gserviceaccount.com")})
    only(policies.build_service_account, ctx, Status.OK, "names its own account")


def test_deploy_names_build_account_reads_the_deploy_commands(make, mocker):
    ctx, _ = make()
    build = mocker.patch.object(policies.commands, "build_image")
    build.return_value = ["gcloud", "builds", "submit", "--service-account=projects/p/serviceAccounts/b@p", "."]
    assert policies.deploy_names_build_account(ctx)
    build.return_value = ["gcloud", "builds", "submit", "--tag=x", "."]
    assert not policies.deploy_names_build_account(ctx)
    build.side_effect = TypeError("build_image() takes 3 arguments")
    assert not policies.deploy_names_build_account(ctx)


# -- 7. region and Firestore --------------------------------------------------------------------
def test_region(make):
    only(placement.region, make()[0], Status.OK, "Cloud Run and Cloud Functions offered in us-central1")
    only(placement.region, make(region="us-east1")[0], Status.FAIL, "Cloud Functions not offered in us-east1")
    only(placement.region, make(region="us-central")[0], Status.FAIL, "is not a region name")
    ctx, _ = make(**{"services list": services(*project.BOOTSTRAP_APIS, "run.googleapis.com")})
    only(placement.region, ctx, Status.OK, "Cloud Run offered", "not checked: Cloud Functions (API off)")
    ctx, _ = make(**{"services list": services(*project.BOOTSTRAP_APIS)})
    only(placement.region, ctx, Status.UNKNOWN, "looks like a region name", "Cloud Run (API off)")
    ctx, fake = make(**{"run regions list": TIMEOUT})
    only(placement.region, ctx, Status.OK, "Cloud Functions offered", "Cloud Run (no answer within 7 s)")


def test_firestore_database(make, tfdir):
    only(placement.firestore_database, make()[0], Status.OK, "no (default) database yet")
    ctx, _ = make(**{"services list": services(*project.BOOTSTRAP_APIS)})
    only(placement.firestore_database, ctx, Status.OK, "Firestore API off")
    existing = {"firestore databases list": [firestore_db(location="us-east1")]}
    ctx, fake = make(**existing)
    only(placement.firestore_database, ctx, Status.FAIL, "(default) exists already (FIRESTORE_NATIVE, us-east1)",
         "409", "terraform -chdir=infra/terraform import google_firestore_database.main "
         f"projects/{PROJECT}/databases/(default)", 'firestore_location = "us-east1"',
         "or set firestore_database to a new id in infra/terraform/environments/prod.tfvars")
    assert fake.count(STATE_OBJECT) == 1  # only the object's metadata: never the state itself
    ctx, _ = make(**existing, **{STATE_OBJECT: {"name": "chat/prod/default.tfstate", "size": 81234}})
    only(placement.firestore_database, ctx, Status.OK, "exists already", "has Terraform state")
    ctx, _ = make(**{"firestore databases list": [firestore_db(kind="DATASTORE_MODE")]})
    only(placement.firestore_database, ctx, Status.FAIL, "not in native mode")
    # A project whose (default) belongs to someone else: a database of our own name is fine.
    (tfdir / "environments" / "prod.tfvars").write_text('firestore_database = "chat"  # ours\n')
    ctx, _ = make(**{"firestore databases list": [firestore_db()]})
    only(placement.firestore_database, ctx, Status.OK, "no chat database yet", "the project has: (default)")
    ctx, _ = make(**{"firestore databases list": Err("PERMISSION_DENIED: datastore.databases.list")})
    only(placement.firestore_database, ctx, Status.UNKNOWN, "datastore.databases.list")


@pytest.mark.parametrize(("location", "region", "status", "needle"), [
    (None, "us-central1", Status.OK, "Terraform derives 'nam5' from region us-central1"),
    (None, "us-east4", Status.OK, "derives 'nam5'"),
    (None, "europe-west1", Status.OK, "derives 'eur3'"),
    (None, "asia-northeast1", Status.OK, "derives 'asia-northeast1'"),
    ("eur3", "europe-west4", Status.OK, "fits"),
    ("eur3", "us-central1", Status.FAIL, "Terraform refuses it"),
    ("europe-west1", "europe-west1", Status.OK, "fits"),
    ("europe-west1", "asia-northeast1", Status.FAIL, 'firestore_location = "asia-northeast1"'),
])
def test_firestore_location(make, tfdir, location, region, status, needle):
    if location:
        (tfdir / "environments" / "prod.tfvars").write_text(f'# chosen once\nfirestore_location = "{location}"\n')
    ctx, fake = make(region=region)
    only(local.firestore_location, ctx, status, needle)
    assert not fake.calls  # local only


# -- 8. your roles --------------------------------------------------------------------------------
def test_caller_roles(make):
    key = f"projects get-iam-policy {PROJECT}"
    only(project.caller_roles, make()[0], Status.OK, f"user:{ACCOUNT} is Owner")
    ctx, _ = make(**{key: iam_policy(*[(role, [f"user:{ACCOUNT}"]) for role in project.DEPLOYER_ROLES])})
    only(project.caller_roles, ctx, Status.OK, "has every role")
    ctx, _ = make(**{key: iam_policy(("roles/run.admin", [f"user:{ACCOUNT}"]), ("roles/owner", ["user:bob@x.com"]),
                                     ("roles/editor", [f"user:{ACCOUNT}"]))})
    result = only(project.caller_roles, ctx, Status.WARN, "is not Owner",
                  f"lacks {len(project.DEPLOYER_ROLES) - 1} role(s)",
                  "roles/iam.roleAdmin", "group, folder or organization")
    assert "roles/run.admin" not in result.found
    ci = f"ci@{PROJECT}.iam.gserviceaccount.com"
    ctx, _ = make(**{"auth list": [{"account": ci, "status": "ACTIVE"}],
                     key: iam_policy(("roles/owner", [f"serviceAccount:{ci}"]))})
    only(project.caller_roles, ctx, Status.OK, f"serviceAccount:{ci} is Owner")
    ctx, _ = make(**{"auth list": []})
    only(project.caller_roles, ctx, Status.UNKNOWN, "no active gcloud account")
    ctx, _ = make(**{key: Err(f"[{ACCOUNT}] does not have permission to access projects instance [{PROJECT}]: "
                              "resourcemanager.projects.getIamPolicy")})
    only(project.caller_roles, ctx, Status.UNKNOWN, "resourcemanager.projects.getIamPolicy")


# -- the CLI ---------------------------------------------------------------------------------------
def test_cli_doctor_prints_one_line_per_check_and_exits_1_on_failure(mocker, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.delenv("CLOUDSDK_CONFIG", raising=False)
    adc_file = tmp_path / ".config" / "gcloud" / "application_default_credentials.json"
    adc_file.parent.mkdir(parents=True)
    adc_file.write_text(json.dumps({"type": "authorized_user", "quota_project_id": PROJECT}))
    fake = FakeGcloud(dict(HEALTHY))
    mocker.patch.object(base.subprocess, "run", side_effect=fake)
    assert cli.main(["doctor", "--project", PROJECT, "--timeout", "5"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == len(checks.REGISTRY)
    assert "$ gcloud" not in out + err and err.startswith("doctor: ")
    assert {kwargs["timeout"] for kwargs in fake.kwargs} == {5.0}

    fake.answers["auth list"] = []
    fake.answers["billing projects describe demo-project"] = {**BILLING, "billingEnabled": False}
    fake.calls.clear()
    assert cli.main(["doctor", "--project", PROJECT, "--verbose"]) == 1
    out, err = capsys.readouterr()
    assert [line.split()[0] for line in out.splitlines()].count("fail") == 2
    assert "$ gcloud auth list --format=json" in err and "fail" in err


def test_cli_doctor_needs_a_project(monkeypatch, capsys):
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    assert cli.main(["doctor"]) == 1
    assert "project is required" in capsys.readouterr().err


def test_python_m_deploy_doctor_help():
    result = subprocess.run([sys.executable, "-m", "deploy", "doctor", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "doctor" in result.stdout and "--timeout" in result.stdout


# -- agreement with docs/DEPLOY.md, infra/terraform and the helper's rules --------------------------
def test_deployer_roles_are_the_ones_deploy_md_lists():
    text = (ROOT / "docs" / "DEPLOY.md").read_text()
    section = text[text.index("## 7."):]
    section = section[:section.index("\n## ", 4)]
    listed = set(re.findall(r"(?<![/\w])roles/[A-Za-z.]+[A-Za-z]", section))
    # Besides the deployer's roles, the section names those CI may grant (its IAM condition).
    grantable = {role for role in deploy_settings.CI_GRANTABLE_PROJECT_ROLES if role.startswith("roles/")}
    assert set(project.DEPLOYER_ROLES) | grantable == listed


def test_defaults_and_apis_match_terraform(tf):
    # Unset, Terraform derives the location from the region as the doctor suggests it
    # (tests/infra/test_first_deploy.py evaluates Terraform's rule for the same regions).
    assert tf.variables["firestore_location"].body["default"] is None
    assert [local.suggested_firestore_location(r) for r in ("us-central1", "us-east4", "europe-west4",
                                                            "asia-northeast1")] == \
        ["nam5", "nam5", "eur3", "asia-northeast1"]
    assert tf.variables["firestore_database"].body["default"] == placement.DEFAULT_FIRESTORE_DATABASE
    apis = set(re.findall(r"[a-z0-9.-]+\.googleapis\.com", str(tf.locals["apis"])))
    assert set(base.terraform_apis(TERRAFORM_DIR)) == apis
    assert "cloudresourcemanager.googleapis.com" in apis and "run.googleapis.com" in apis


def test_read_tfvars_takes_string_assignments_only(tmp_path):
    path = tmp_path / "prod.tfvars"
    path.write_text('# comment\nfirestore_location = "eur3" # note\nalert_emails = ["a@b.c"]\n'
                    'socket_min_instances = 1\n  firestore_database="chat"\n')
    assert base.read_tfvars(path) == {"firestore_location": "eur3", "firestore_database": "chat"}
    assert base.read_tfvars(tmp_path / "missing.tfvars") == {}


def test_verb_of():
    assert base.verb_of(["gcloud", "resource-manager", "org-policies", "describe", "x"]) == "describe"
    assert base.verb_of(["gcloud", "auth", "list"]) == "list"
    assert base.verb_of(["gcloud", "services", "enable", "x"]) == "enable"


def test_doctor_uses_only_the_standard_library():
    """Like the rest of the helper, it runs with a bare python3."""
    folder = Path(doctor.__file__).parent
    for path in [folder / "doctor.py", *sorted((folder / "checks").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom) and not getattr(node, "level", 0):
                for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]):
                    assert name.split(".")[0] in sys.stdlib_module_names or name == "__future__", (path.name, name)
