"""`python -m deploy`: the commands it runs, in order, with the right variables (no cloud account:
subprocess.run is replaced by pytest-mock), and the function sources it stages."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from deploy import __main__ as cli
from deploy import commands, packaging, runner, workflow
from deploy import settings as deploy_settings
from deploy.settings import (
    BOOTSTRAP_TARGETS,
    JWT_SECRET_ID,
    PLACEHOLDER_IMAGE,
    ROOT,
    TERRAFORM_DIR,
    Target,
)

from .hcl_model import first, references, strings

VAR_FILE = Target.var_file  # the real one (an autouse fixture stubs it)
TF = ["terraform", f"-chdir={TERRAFORM_DIR}"]
DIGEST = "sha256:" + "ab" * 32
IMAGE = f"us-central1-docker.pkg.dev/demo-project/chat/socket-service@{DIGEST}"
VARS = ["-var=project_id=demo-project", "-var=region=us-central1", "-var=environment=prod"]
INIT = [*TF, "init", "-input=false", "-reconfigure", "-backend-config=bucket=demo-project-tfstate",
        "-backend-config=prefix=chat/prod"]
OUTPUTS = {"chat_url": {"value": "https://socket-service-123.us-central1.run.app"},
           "upload_url": {"value": "https://request-upload-x.a.run.app"},
           "uploads_bucket": {"value": "demo-project-chat-uploads"}, "image": {"value": IMAGE},
           "invoker_check_disabled_services": {"value": ["request-upload"]}}
BUILD_ACCOUNT = "projects/demo-project/serviceAccounts/chat-fn-build@demo-project.iam.gserviceaccount.com"
INVOKER_ANNOTATION = "metadata.annotations['run.googleapis.com/invoker-iam-disabled']"


def open_up(service: str = "request-upload", region: str = "us-central1") -> list[list[str]]:
    """The commands that turn the invoker IAM check off on a gen2 function's service, then read it back."""
    return [["gcloud", "run", "services", "update", service, "--project=demo-project", f"--region={region}",
             "--no-invoker-iam-check", "--quiet"],
            ["gcloud", "run", "services", "describe", service, "--project=demo-project", f"--region={region}",
             f"--format=value({INVOKER_ANNOTATION})"]]


class FakeCommands:
    """Stands in for subprocess.run: records each argv (and stdin) and answers from a table."""

    def __init__(self, answers: dict[str, str | int] | None = None):
        self.calls: list[list[str]] = []
        self.stdin: list[str | None] = []
        self.answers = {
            "secrets versions list": "projects/1/secrets/chat-jwt-secret/versions/1",
            "output -json": json.dumps(OUTPUTS),
            "output -raw image": IMAGE,
            "rev-parse": "0123456789ab",
            "images describe": DIGEST,
            "services describe": "true",
            **(answers or {}),
        }

    def __call__(self, argv, cwd=None, input=None, text=None, stdout=None):
        assert cwd == ROOT and text is True
        self.calls.append(list(argv))
        self.stdin.append(input)
        joined = " ".join(argv)
        for key, answer in self.answers.items():
            if key in joined:
                if isinstance(answer, list):  # one answer per call, the last one repeated
                    answer = answer.pop(0) if len(answer) > 1 else answer[0]
                if isinstance(answer, int):
                    return subprocess.CompletedProcess(argv, answer, stdout="")
                return subprocess.CompletedProcess(argv, 0, stdout=answer + "\n" if stdout else None)
        return subprocess.CompletedProcess(argv, 0, stdout="" if stdout else None)


@pytest.fixture
def fake(mocker):
    def install(**answers):
        fake_run = FakeCommands(answers)
        mocker.patch.object(runner.subprocess, "run", side_effect=fake_run)
        return fake_run
    return install


@pytest.fixture
def staged(mocker):
    return mocker.patch.object(workflow, "stage_functions", return_value={})


@pytest.fixture(autouse=True)
def no_var_file(mocker):
    mocker.patch.object(Target, "var_file", return_value=None)


@pytest.fixture(autouse=True)
def build_config(mocker, tmp_path) -> Path:
    """Where the helper writes the image's build config (the real one is under infra/terraform/.build)."""
    path = tmp_path / "image-build.json"
    mocker.patch.object(workflow, "IMAGE_BUILD_CONFIG", path, create=True)
    return path


@pytest.fixture
def slept(mocker):
    return mocker.patch.object(workflow.time, "sleep")


def deployment(**target) -> workflow.Deployment:
    return workflow.Deployment(Target(project="demo-project", **target), runner.Runner(ROOT, echo=lambda _: None),
                               say=lambda _: None)


# -- apply ---------------------------------------------------------------------
def test_apply_first_deploy_bootstraps_builds_and_applies(fake, staged, build_config, slept):
    run = fake(**{"secrets versions list": ""})
    summary = deployment().apply(workflow.Options())
    build_tag = "us-central1-docker.pkg.dev/demo-project/chat/socket-service:0123456789ab"
    assert run.calls == [
        INIT,
        [*TF, "apply", "-input=false", *(f"-target={t}" for t in BOOTSTRAP_TARGETS), *VARS,
         f"-var=image={PLACEHOLDER_IMAGE}"],
        ["gcloud", "secrets", "versions", "list", JWT_SECRET_ID, "--project=demo-project", "--limit=1",
         "--format=value(name)"],
        ["gcloud", "secrets", "versions", "add", JWT_SECRET_ID, "--project=demo-project", "--data-file=-"],
        ["git", "rev-parse", "--short=12", "HEAD"],
        # As the build account made in the bootstrap (a new project's default build identity may be
        # a Compute Engine account without roles), source staged in a bucket that account may read.
        ["gcloud", "builds", "submit", "--project=demo-project", f"--config={build_config}",
         f"--service-account={BUILD_ACCOUNT}",
         "--gcs-source-staging-dir=gs://demo-project-chat-function-sources/cloudbuild", "."],
        ["gcloud", "artifacts", "docker", "images", "describe", build_tag, "--project=demo-project",
         "--format=value(image_summary.digest)"],
        [*TF, "apply", "-input=false", *VARS, f"-var=image={IMAGE}"],
        [*TF, "output", "-json"],
        *open_up(),
    ]
    staged.assert_called_once_with()
    assert summary == {name: OUTPUTS[name]["value"] for name in workflow.SUMMARY_OUTPUTS}
    # A user-specified build account needs its logs in Cloud Logging (or a bucket of ours).
    assert json.loads(build_config.read_text()) == {
        "steps": [{"name": "gcr.io/cloud-builders/docker", "args": ["build", f"--tag={build_tag}", "."]}],
        "images": [build_tag],
        "options": {"logging": "CLOUD_LOGGING_ONLY"},
    }
    slept.assert_not_called()
    # The generated secret goes on stdin only, long enough for chatcore.identity.auth (>= 32 characters).
    secret = run.stdin[3]
    assert secret and len(secret) >= 32 and not any(secret in " ".join(call) for call in run.calls)


def test_apply_keeps_an_existing_secret_and_uses_the_given_image(fake, staged):
    run = fake()
    deployment().apply(workflow.Options(image=IMAGE, auto_approve=True))
    assert [c[2:4] if c[0] == "terraform" else c[:4] for c in run.calls] == [
        ["init", "-input=false"], ["apply", "-input=false"], ["gcloud", "secrets", "versions", "list"],
        ["apply", "-input=false"], ["output", "-json"], ["gcloud", "run", "services", "update"],
        ["gcloud", "run", "services", "describe"]]
    assert run.calls[1][4] == "-auto-approve" and run.calls[3][4] == "-auto-approve"
    assert run.calls[3][-1] == f"-var=image={IMAGE}"


def test_apply_in_cloud_build_skips_package_and_bootstrap(fake, staged):
    run = fake()
    deployment(region="europe-west1", environment="staging", state_bucket="ops-state").apply(
        workflow.Options(image=IMAGE, auto_approve=True, skip_package=True, skip_bootstrap=True))
    assert run.calls == [
        [*TF, "init", "-input=false", "-reconfigure", "-backend-config=bucket=ops-state",
         "-backend-config=prefix=chat/staging"],
        [*TF, "apply", "-input=false", "-auto-approve", "-var=project_id=demo-project", "-var=region=europe-west1",
         "-var=environment=staging", f"-var=image={IMAGE}"],
        [*TF, "output", "-json"],
        *open_up(region="europe-west1"),
    ]
    staged.assert_not_called()


def test_apply_stops_at_the_first_failure(fake, staged, slept):
    run = fake(**{"builds submit": 1})
    with pytest.raises(runner.CommandFailed, match="gcloud builds submit"):
        deployment().apply(workflow.Options())
    assert not any(call[2:3] == ["apply"] and f"-var=image={IMAGE}" in call for call in run.calls)
    assert run.calls[-1][:3] == ["gcloud", "builds", "submit"]


def test_a_build_right_after_the_bootstrap_is_retried_once_while_grants_propagate(fake, staged, slept):
    """The bootstrap may just have granted the build account its roles; IAM takes typically 2 minutes."""
    said = []
    run = fake(**{"builds submit": [1, 0]})
    workflow.Deployment(Target(project="demo-project"), runner.Runner(ROOT, echo=lambda _: None),
                        say=said.append).apply(workflow.Options())
    builds = [call for call in run.calls if call[:3] == ["gcloud", "builds", "submit"]]
    assert len(builds) == 2 and builds[0] == builds[1]
    slept.assert_called_once_with(workflow.IMAGE_BUILD_RETRY_SECONDS)
    assert any("propagat" in line for line in said), said
    assert run.calls[-4][2] == "apply" and f"-var=image={IMAGE}" in run.calls[-4]


def test_a_build_that_fails_twice_after_the_bootstrap_stops_the_deploy(fake, staged, slept):
    run = fake(**{"builds submit": 1})
    with pytest.raises(runner.CommandFailed, match="gcloud builds submit"):
        deployment().apply(workflow.Options())
    assert len([call for call in run.calls if call[:3] == ["gcloud", "builds", "submit"]]) == 2
    assert slept.call_count == 1


def test_a_build_without_bootstrap_is_not_retried(fake, staged, slept):
    run = fake(**{"builds submit": 1})
    with pytest.raises(runner.CommandFailed):
        deployment().apply(workflow.Options(skip_bootstrap=True))
    assert len([call for call in run.calls if call[:3] == ["gcloud", "builds", "submit"]]) == 1
    slept.assert_not_called()


def test_apply_stops_when_the_invoker_check_is_still_on(fake, staged):
    """An organization policy (constraints/run.managed.requireInvokerIam) can keep the check on."""
    fake(**{"services describe": ""})
    with pytest.raises(workflow.DeployError, match="requireInvokerIam"):
        deployment().apply(workflow.Options(image=IMAGE, skip_bootstrap=True))


def test_apply_in_all_users_mode_leaves_the_invoker_check_alone(fake, staged):
    outputs = {**OUTPUTS, "invoker_check_disabled_services": {"value": []}}
    run = fake(**{"output -json": json.dumps(outputs)})
    deployment().apply(workflow.Options(image=IMAGE, skip_bootstrap=True))
    assert not [call for call in run.calls if call[:2] == ["gcloud", "run"]]


def test_apply_refuses_an_image_without_digest(fake, staged):
    fake(**{"images describe": "no such image"})
    with pytest.raises(workflow.DeployError, match="digest"):
        deployment().apply(workflow.Options())


# -- plan and destroy ------------------------------------------------------------
def test_plan_reuses_the_deployed_image(fake, staged):
    run = fake()
    deployment().plan(workflow.Options())
    assert run.calls == [INIT, [*TF, "output", "-raw", "image"], [*TF, "plan", "-input=false", *VARS,
                                                                   f"-var=image={IMAGE}"]]


def test_plan_without_anything_deployed_asks_for_an_image(fake, staged):
    fake(**{"output -raw image": 1})
    with pytest.raises(workflow.DeployError, match="--image"):
        deployment().plan(workflow.Options())


def test_destroy_lifts_deletion_protection_first(fake, staged):
    run = fake()
    deployment().destroy(workflow.Options())
    assert run.calls == [
        INIT,
        [*TF, "output", "-raw", "image"],
        [*TF, "apply", "-input=false", *VARS, f"-var=image={IMAGE}", "-var=deletion_protection=false"],
        [*TF, "destroy", "-input=false", *VARS, f"-var=image={IMAGE}", "-var=deletion_protection=false"],
    ]
    staged.assert_called_once_with()  # archive_file data sources are read on destroy too


def test_var_file_of_the_environment_is_passed(mocker):
    mocker.patch.object(Target, "var_file", return_value="environments/prod.tfvars")
    argv = commands.tf_plan(Target(project="demo-project"), IMAGE)
    assert argv[3:5] == ["-input=false", "-var-file=environments/prod.tfvars"]


def test_target_var_file_only_when_present(tmp_path):
    target = Target(project="demo-project", environment="dev")
    assert VAR_FILE(target, tmp_path) is None
    (tmp_path / "environments").mkdir()
    (tmp_path / "environments" / "dev.tfvars").write_text('cors_allowed_origins = ["https://chat.example.com"]\n')
    assert VAR_FILE(target, tmp_path) == "environments/dev.tfvars"


# -- CLI -------------------------------------------------------------------------
def test_cli_runs_the_command_with_its_options(fake, staged, monkeypatch):
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "demo-project")
    run = fake()
    assert cli.main(["plan", "--image", IMAGE, "--skip-package"]) == 0
    assert run.calls == [INIT, [*TF, "plan", "-input=false", *VARS, f"-var=image={IMAGE}"]]
    staged.assert_not_called()


def test_cli_reports_failures_without_a_traceback(fake, staged, capsys):
    fake(**{"init": 1})
    assert cli.main(["apply", "--project", "demo-project"]) == 1
    assert "deploy: command failed (1): terraform" in capsys.readouterr().err


def test_cli_needs_a_project(monkeypatch, capsys):
    monkeypatch.delenv("GOOGLE_CLOUD_PROJECT", raising=False)
    assert cli.main(["plan"]) == 1
    assert "project is required" in capsys.readouterr().err


# -- packaging -------------------------------------------------------------------
def test_package_stages_each_function_with_chatcore(tmp_path):
    staged = packaging.stage_functions(out=tmp_path)
    assert set(staged) == {"ai_stream", "upload"}
    for name, folder in staged.items():
        assert (folder / "main.py").read_bytes() == (ROOT / "functions" / name / "main.py").read_bytes()
        assert (folder / "requirements.txt").is_file()
        assert (folder / "chatcore" / "__init__.py").is_file()
        assert (folder / "chatcore" / "topology.json").read_text() == (ROOT / "chatcore" / "topology.json").read_text()
        assert not list(folder.rglob("__pycache__")) and not list(folder.rglob("*.pyc"))
    # Idempotent: a file that disappeared from the source disappears from the stage.
    (staged["upload"] / "stale.py").write_text("")
    packaging.stage_functions(out=tmp_path)
    assert not (staged["upload"] / "stale.py").exists()


def test_package_refuses_a_function_shadowing_chatcore(tmp_path):
    root = tmp_path / "repo"
    (root / "functions" / "f" / "chatcore").mkdir(parents=True)
    (root / "functions" / "f" / "main.py").write_text("")
    (root / "functions" / "f" / "requirements.txt").write_text("")
    (root / "chatcore").mkdir()
    with pytest.raises(FileExistsError):
        packaging.stage_functions(root=root, out=tmp_path / "out")


def test_package_requires_requirements(tmp_path):
    root = tmp_path / "repo"
    (root / "functions" / "f").mkdir(parents=True)
    (root / "functions" / "f" / "main.py").write_text("")
    with pytest.raises(FileNotFoundError, match="requirements.txt"):
        packaging.stage_functions(root=root, out=tmp_path / "out")


# -- agreement with infra/terraform ----------------------------------------------
def test_bootstrap_targets_and_outputs_exist_in_terraform(tf):
    for target in BOOTSTRAP_TARGETS:
        rtype, name = target.split(".")
        assert (rtype, name) in tf.resources, target
    for name in (*workflow.SUMMARY_OUTPUTS, workflow.INVOKER_OUTPUT):
        assert name in tf.outputs, name
    assert "deletion_protection" in tf.variables


def test_the_image_is_built_by_the_account_and_bucket_the_bootstrap_makes(tf):
    """The build account, every grant it has, the sources bucket and the wait for those grants are
    bootstrapped before the image build."""
    account = tf.resource("google_service_account", "functions_build")
    assert account["account_id"] == deploy_settings.BUILD_SERVICE_ACCOUNT_ID
    assert tf.locals["sources_bucket_name"] == "${var.project_id}-" + deploy_settings.SOURCES_BUCKET_SUFFIX
    assert Target(project="demo-project").build_service_account == BUILD_ACCOUNT
    member = "${google_service_account.functions_build.member}"
    grants = {f"{b.type}.{b.name}" for b in tf.resources.values()
              if b.type.endswith("_iam_member") and b.body.get("member") == member}
    needed = {"google_service_account.functions_build", "google_storage_bucket.function_sources",
              "terraform_data.build_iam_settle", *grants}
    assert needed <= set(BOOTSTRAP_TARGETS)
    # The bucket grant lets it read the staged source; Cloud Logging only needs logWriter.
    roles = {tf.resources[tuple(g.split("."))].body["role"] for g in grants}
    assert {"roles/logging.logWriter", "roles/artifactregistry.writer", "roles/storage.objectViewer"} <= roles
    settle = tf.resource("terraform_data", "build_iam_settle")
    triggers = {f"{r.type}.{r.name}" for text in strings(settle["triggers_replace"]) for r in references(text)}
    assert grants <= triggers
    # Staged build sources do not pile up in the bucket.
    rules = tf.resource("google_storage_bucket", "function_sources")["lifecycle_rule"]
    assert any(first(rule, "condition").get("matches_prefix") == ["cloudbuild/"] for rule in rules)


def test_placeholder_and_built_images_pass_the_image_validation(tf):
    (validation,) = tf.variables["image"].body["validation"]
    pattern = re.search(r'regex\("(.*)", var\.image\)', validation["condition"]).group(1).replace("\\\\", "\\")
    for image in (PLACEHOLDER_IMAGE, IMAGE, "us-central1-docker.pkg.dev/p/chat/socket-service:0123456789ab"):
        assert re.search(pattern, image), image
    assert not re.search(pattern, "socket-service")


def test_state_bucket_and_prefix_defaults():
    target = Target(project="demo-project", environment="dev")
    assert (target.bucket, target.state_prefix) == ("demo-project-tfstate", "chat/dev")
    with pytest.raises(ValueError):
        Target(project="demo-project", environment="qa")


def test_helper_uses_only_the_standard_library():
    """It runs in Cloud Build's Terraform image with a bare python3."""
    import ast
    import sys

    for path in Path(workflow.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom) and not getattr(node, "level", 0):
                for name in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]):
                    assert name.split(".")[0] in sys.stdlib_module_names or name == "__future__", (path.name, name)
