"""The command lines of a deployment, as argv lists (pure functions, no side effects)."""

from __future__ import annotations

from .settings import BOOTSTRAP_TARGETS, JWT_SECRET_ID, TERRAFORM_DIR, Target

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
    """APIs, the image registry and the JWT secret: what must exist before an image can be pushed."""
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


def build_image(target: Target, tag: str) -> list[str]:
    """Build the Dockerfile at the repository root with Cloud Build (no local Docker needed) and push it."""
    return [GCLOUD, "builds", "submit", f"--project={target.project}", f"--tag={target.image_repository}:{tag}",
            "."]


def image_digest(target: Target, tag: str) -> list[str]:
    return [GCLOUD, "artifacts", "docker", "images", "describe", f"{target.image_repository}:{tag}",
            f"--project={target.project}", "--format=value(image_summary.digest)"]


def git_short_sha() -> list[str]:
    return ["git", "rev-parse", "--short=12", "HEAD"]
