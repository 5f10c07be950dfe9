"""What one deployment targets: project, region, environment and where its state lives."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TERRAFORM_DIR = ROOT / "infra" / "terraform"
# Staged function sources; infra/terraform/functions.tf zips these folders.
FUNCTION_BUILD_DIR = TERRAFORM_DIR / ".build" / "functions"
ENVIRONMENTS = ("dev", "staging", "prod")
# Names defined in infra/terraform (tests/infra checks they match).
REPOSITORY = "chat"
IMAGE_NAME = "socket-service"
JWT_SECRET_ID = "chat-jwt-secret"
# Used only while bootstrapping (APIs, registry, secret), before our own image exists.
PLACEHOLDER_IMAGE = "us-docker.pkg.dev/cloudrun/container/hello:latest"
BOOTSTRAP_TARGETS = (
    "google_project_service.apis",
    "google_artifact_registry_repository.chat",
    "google_secret_manager_secret.jwt",
)


@dataclass(frozen=True)
class Target:
    project: str
    region: str = "us-central1"
    environment: str = "prod"
    state_bucket: str = ""  # default: <project>-tfstate

    def __post_init__(self):
        if not self.project:
            raise ValueError("a project is required (--project or GOOGLE_CLOUD_PROJECT)")
        if self.environment not in ENVIRONMENTS:
            raise ValueError(f"environment must be one of {', '.join(ENVIRONMENTS)}")

    @property
    def bucket(self) -> str:
        return self.state_bucket or f"{self.project}-tfstate"

    @property
    def state_prefix(self) -> str:
        return f"chat/{self.environment}"

    @property
    def image_repository(self) -> str:
        return f"{self.region}-docker.pkg.dev/{self.project}/{REPOSITORY}/{IMAGE_NAME}"

    def var_file(self, terraform_dir: Path = TERRAFORM_DIR) -> str | None:
        """``environments/<environment>.tfvars`` (relative to the Terraform folder) when it exists."""
        relative = Path("environments") / f"{self.environment}.tfvars"
        return str(relative) if (terraform_dir / relative).is_file() else None
