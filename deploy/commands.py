"""The command lines of a deployment, as argv lists (pure functions, no side effects)."""

from __future__ import annotations

from pathlib import Path

from .settings import BOOTSTRAP_TARGETS, IMAGE_BUILD_CONFIG, JWT_SECRET_ID, TERRAFORM_DIR, Target

TERRAFORM = "terraform"
GCLOUD = "gcloud"


def _tf(*args: str) -> list[str]:
    # -chdir: every command runs against infra/terraform wherever we are.
    return [TERRAFORM, f"-chdir={TERRAFORM_DIR}", *args]


def tf_vars(target: Target, image: str, **extra: str) -> list[str]:
    args = []
    var_file = target.var_file()
    if var_file:
        args.append(f"-var-file={var_file}")
    values = {"project_id": target.project, "region": target.region, "environment": target.environment,
              "image": image, **extra}
    for key, value in values.items():
        args.append(f"-var={key}={value}")
    return args


def tf_init(target: Target) -> list[str]:
    return _tf("init", "-input=false", "-reconfigure", f"-backend-config=bucket={target.bucket}",
               f"-backend-config=prefix={target.state_prefix}")


def tf_bootstrap(target: Target, image: str, auto_approve: bool) -> list[str]:
    """What must exist before an image can be built and pushed (settings.BOOTSTRAP_TARGETS)."""
    targets = [f"-target={t}" for t in BOOTSTRAP_TARGETS]
    return _tf("apply", "-input=false", *(["-auto-approve"] if auto_approve else []), *targets,
               *tf_vars(target, image))


def tf_plan(target: Target, image: str) -> list[str]:
    return _tf("plan", "-input=false", *tf_vars(target, image))


def tf_apply(target: Target, image: str, auto_approve: bool, **extra: str) -> list[str]:
    return _tf("apply", "-input=false", *(["-auto-approve"] if auto_approve else []),
               *tf_vars(target, image, **extra))


def tf_destroy(target: Target, image: str, auto_approve: bool) -> list[str]:
    return _tf("destroy", "-input=false", *(["-auto-approve"] if auto_approve else []),
               *tf_vars(target, image, deletion_protection="false"))


def tf_output_raw(name: str) -> list[str]:
    return _tf("output", "-raw", name)


def tf_output_json() -> list[str]:
    return _tf("output", "-json")


def secret_versions(target: Target) -> list[str]:
    return [GCLOUD, "secrets", "versions", "list", JWT_SECRET_ID, f"--project={target.project}",
            "--limit=1", "--format=value(name)"]


def secret_add_version(target: Target) -> list[str]:
    # The value comes on stdin (--data-file=-): never on a command line.
    return [GCLOUD, "secrets", "versions", "add", JWT_SECRET_ID, f"--project={target.project}", "--data-file=-"]


def image_build_config(target: Target, tag: str) -> dict:
    """What `gcloud builds submit --tag` does, plus the one option it has no flag for: a user-specified
    build account needs its logs in Cloud Logging (or in a bucket of ours), or Cloud Build refuses the
    build ("if 'build.service_account' is specified, the build must either (a) specify
    'build.logs_bucket', (b) use the REGIONAL_USER_OWNED_BUCKET ... or (c) use either
    CLOUD_LOGGING_ONLY / NONE logging options")."""
    image = f"{target.image_repository}:{tag}"
    return {
        "steps": [{"name": "gcr.io/cloud-builders/docker", "args": ["build", f"--tag={image}", "."]}],
        "images": [image],
        "options": {"logging": "CLOUD_LOGGING_ONLY"},
    }


def build_image(target: Target, tag: str, config: Path = IMAGE_BUILD_CONFIG) -> list[str]:
    """Build the Dockerfile at the repository root with Cloud Build (no local Docker needed) and push it,
    as the build account (not the project's default build identity, which in new projects may be the
    Compute Engine default account, with no roles), from a staging bucket that account may read.

    ``config`` holds image_build_config(target, tag) (the workflow writes it)."""
    return [GCLOUD, "builds", "submit", f"--project={target.project}", f"--config={config}",
            f"--service-account={target.build_service_account}",
            f"--gcs-source-staging-dir=gs://{target.sources_bucket}/cloudbuild", "."]


def image_digest(target: Target, tag: str) -> list[str]:
    return [GCLOUD, "artifacts", "docker", "images", "describe", f"{target.image_repository}:{tag}",
            f"--project={target.project}", "--format=value(image_summary.digest)"]


# The Cloud Run (v1) annotation behind `--no-invoker-iam-check`.
INVOKER_IAM_DISABLED = "run.googleapis.com/invoker-iam-disabled"


def disable_invoker_check(target: Target, service: str) -> list[str]:
    """Turn Cloud Run's invoker IAM check off on a service Terraform cannot set it on (a gen2 function's)."""
    return [GCLOUD, "run", "services", "update", service, f"--project={target.project}", f"--region={target.region}",
            "--no-invoker-iam-check", "--quiet"]


def invoker_check_disabled(target: Target, service: str) -> list[str]:
    """Read it back: prints ``true`` when the check is off."""
    return [GCLOUD, "run", "services", "describe", service, f"--project={target.project}",
            f"--region={target.region}", f"--format=value(metadata.annotations['{INVOKER_IAM_DISABLED}'])"]


def git_short_sha() -> list[str]:
    return ["git", "rev-parse", "--short=12", "HEAD"]
