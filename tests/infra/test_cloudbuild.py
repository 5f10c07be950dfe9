"""cloudbuild.yaml is consistent: unique step ids, waitFor names real steps, substitutions are
declared (and used), every image built is pushed, and it tests before it pushes or deploys."""

from __future__ import annotations

import re

import pytest
import yaml

from deploy import settings as deploy_settings

from .hcl_model import ROOT

# https://cloud.google.com/build/docs/configuring-builds/substitute-variable-values
BUILT_IN = {"PROJECT_ID", "PROJECT_NUMBER", "BUILD_ID", "LOCATION", "TRIGGER_NAME", "COMMIT_SHA", "REVISION_ID",
            "SHORT_SHA", "REPO_NAME", "REPO_FULL_NAME", "BRANCH_NAME", "TAG_NAME", "REF_NAME", "TRIGGER_BUILD_CONFIG_PATH",
            "SERVICE_ACCOUNT_EMAIL", "SERVICE_ACCOUNT", "_HEAD_BRANCH", "_BASE_BRANCH", "_HEAD_REPO_URL", "_PR_NUMBER"}
# $NAME or ${NAME}, but not $$ (an escaped dollar for the shell).
_SUBSTITUTION = re.compile(r"(?<!\$)\$(?:\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)\}|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))")


@pytest.fixture(scope="module")
def build() -> dict:
    return yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _used_substitutions(value) -> set[str]:
    used = set()
    for text in _strings(value):
        text = text.replace("$$", "")
        for match in _SUBSTITUTION.finditer(text):
            used.add(match.group("braced") or match.group("bare"))
    return used


def test_step_ids_are_unique_and_wait_for_existing_steps(build):
    ids = [step["id"] for step in build["steps"]]
    assert len(ids) == len(set(ids)), "duplicate step id"
    for index, step in enumerate(build["steps"]):
        for waited in step.get("waitFor", []):
            assert waited == "-" or waited in ids[:index], f"{step['id']} waits for unknown or later step {waited}"


def test_every_substitution_is_declared_and_used(build):
    declared = set(build.get("substitutions", {}))
    assert all(name.startswith("_") for name in declared), "user substitutions start with _"
    used = _used_substitutions({k: v for k, v in build.items() if k != "substitutions"})
    used_in_defaults = _used_substitutions(build.get("substitutions", {}))
    assert used - declared - BUILT_IN == set(), "used but not declared"
    assert (used | used_in_defaults) & declared == declared, "declared but never used (Cloud Build refuses that)"
    if used_in_defaults:
        assert build["options"]["dynamicSubstitutions"] is True
    assert {"_DEPLOY_PROJECT", "_REGION", "_ENVIRONMENT"} <= declared


def test_every_image_built_is_pushed(build):
    built, pushed = set(), set(build.get("images", []))
    for step in build["steps"]:
        text = " ".join(_strings(step.get("args", [])))
        built.update(re.findall(r"(?:--tag[= ]|-t )(\S+)", text))
        pushed.update(re.findall(r"docker push (\S+)", text))
    assert built, "no image is built"
    assert built <= pushed


def test_order_tests_then_push_then_deploy(build):
    steps = {step["id"]: step for step in build["steps"]}

    def ancestors(step_id: str) -> set[str]:
        ids = [s["id"] for s in build["steps"]]
        waits = steps[step_id].get("waitFor")
        if waits is None:  # default: all previous steps
            parents = set(ids[:ids.index(step_id)])
        else:
            parents = {w for w in waits if w != "-"}
        return parents.union(*(ancestors(p) for p in parents)) if parents else set()

    assert "make test" in " ".join(_strings(steps["test"]["args"]))
    assert "test" in ancestors("push-image")
    assert {"test", "push-image", "package-functions"} <= ancestors("deploy")
    deploy = " ".join(_strings(steps["deploy"]["args"]))
    assert "python3 -m deploy apply" in deploy and "--image=" in deploy
    for flag in ("--project=${_DEPLOY_PROJECT}", "--region=${_REGION}", "--environment=${_ENVIRONMENT}"):
        assert flag in deploy
    assert "python -m deploy package" in " ".join(["python", *steps["package-functions"]["args"]])


def test_test_step_installs_java_and_the_emulators(build):
    (test,) = [s for s in build["steps"] if s["id"] == "test"]
    script = " ".join(_strings(test["args"]))
    for package in ("openjdk-17-jre-headless", "google-cloud-cli-firestore-emulator",
                    "google-cloud-cli-pubsub-emulator", "nodejs", "npm"):
        assert package in script
    assert re.fullmatch(r"python:3\.11\.\d+(-\w+)*", test["name"])


def test_image_path_matches_the_deploy_helper_and_terraform(build):
    built = re.findall(r"--tag=(\S+)", " ".join(_strings(build["steps"])))
    (tag,) = set(built)
    expected = deploy_settings.Target(project="${_DEPLOY_PROJECT}", region="${_REGION}").image_repository
    assert tag == f"{expected}:${{BUILD_ID}}"
    registry = (ROOT / "infra" / "terraform" / "registry.tf").read_text()
    assert f'repository_id = "{deploy_settings.REPOSITORY}"' in registry


def test_image_tags_are_pinned(build):
    for step in build["steps"]:
        name = step["name"]
        if name.startswith("gcr.io/cloud-builders/"):
            continue  # Cloud Build's own builders, cached on its workers and kept current by Google
        assert ":" in name and not name.endswith(":latest"), f"{step['id']} uses an unpinned image {name}"
        if name.startswith(("python:", "hashicorp/terraform:", "gcr.io/google.com/cloudsdktool/")):
            assert re.search(r":\d+\.\d+\.\d+", name), name


# -- issue 14: the deploy step, and the CI account ---------------------------------------------
def test_deploy_step_has_terraform_and_gcloud(build):
    """After terraform apply the helper turns the invoker IAM check off on request-upload with gcloud
    (deploy/workflow.py), so the deploy step runs in the Google Cloud CLI image with Terraform's
    own binary, copied from the pinned Terraform image by an earlier step."""
    steps = {step["id"]: step for step in build["steps"]}
    deploy = steps["deploy"]
    assert re.fullmatch(r"gcr\.io/google\.com/cloudsdktool/google-cloud-cli:\d+\.\d+\.\d+-alpine", deploy["name"])
    (copier,) = [step for step in build["steps"] if step["name"].startswith("hashicorp/terraform:")]
    assert copier["id"] in deploy["waitFor"]
    copy = " ".join(_strings(copier["args"]))
    (directory,) = re.findall(r"cp \S+ (/workspace/\S+)/terraform", copy)
    script = " ".join(_strings(deploy["args"]))
    assert f"PATH={directory}:" in script
    assert build["options"]["logging"] in ("CLOUD_LOGGING_ONLY", "NONE"), \
        "a user-specified build account needs its logs in Cloud Logging (or a bucket of ours)"


def test_ci_account_may_grant_only_the_roles_terraform_grants_on_the_project(tf):
    """Terraform sets project-level IAM members, so CI needs roles/resourcemanager.projectIamAdmin;
    docs/DEPLOY.md grants it with an IAM condition that lets it grant or revoke these roles and no
    other (iam.googleapis.com/modifiedGrantsByRole)."""
    granted = set()
    for body in tf.all_instances("google_project_iam_member").values():
        role = body["role"]
        match = re.fullmatch(r"\$\{google_project_iam_custom_role\.(\w+)\.name\}", role)
        if match:
            role_id = tf.resource("google_project_iam_custom_role", match.group(1))["role_id"]
            role = f"projects/{{project}}/roles/{role_id}"
        granted.add(role)
    assert set(deploy_settings.CI_GRANTABLE_PROJECT_ROLES) == granted
    assert "roles/resourcemanager.projectIamAdmin" not in deploy_settings.CI_ROLES, "only with the condition"
    condition = deploy_settings.ci_iam_admin_condition("demo-project")
    assert condition.startswith("api.getAttribute('iam.googleapis.com/modifiedGrantsByRole', []).hasOnly([")
    for role in granted:
        assert f"'{role.format(project='demo-project')}'" in condition
    for role in deploy_settings.CI_ROLES:
        assert role.startswith("roles/") and role not in {"roles/owner", "roles/editor"}
