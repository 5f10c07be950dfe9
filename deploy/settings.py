"""What one deployment targets: project, region, environment and where its state lives."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TERRAFORM_DIR = ROOT / "infra" / "terraform"
# What the helper generates; infra/terraform/functions.tf zips the staged function sources.
BUILD_DIR = TERRAFORM_DIR / ".build"
FUNCTION_BUILD_DIR = BUILD_DIR / "functions"
# The Cloud Build config of the socket service's image (written by `apply`, deploy/commands.py).
IMAGE_BUILD_CONFIG = BUILD_DIR / "image-build.json"
ENVIRONMENTS = ("dev", "staging", "prod")
# Names defined in infra/terraform (tests/infra checks they match).
REPOSITORY = "chat"
IMAGE_NAME = "socket-service"
JWT_SECRET_ID = "chat-jwt-secret"
# The account builds run as (the functions' and the socket service's image): a new project's
# default build identity may be the Compute Engine default account, with no roles.
BUILD_SERVICE_ACCOUNT_ID = "chat-fn-build"
# <project>-chat-function-sources: the image's build source is staged under cloudbuild/ there.
SOURCES_BUCKET_SUFFIX = "chat-function-sources"
# Used only while bootstrapping, before our own image exists.
PLACEHOLDER_IMAGE = "us-docker.pkg.dev/cloudrun/container/hello:latest"
# What must exist before the image can be built and pushed: the APIs, the registry and the JWT
# secret, the build account with its grants and the bucket its source is staged in, and the wait
# for those grants to take effect (it sleeps only when they are new).
BOOTSTRAP_TARGETS = (
    "google_project_service.apis",
    "google_artifact_registry_repository.chat",
    "google_secret_manager_secret.jwt",
    "google_service_account.functions_build",
    "google_storage_bucket.function_sources",
    "google_project_iam_member.functions_build_logs",
    "google_artifact_registry_repository_iam_member.functions_build_push",
    "google_storage_bucket_iam_member.functions_build_sources",
    "google_project_iam_member.functions_build_gcf_sources",
    "terraform_data.build_iam_settle",
)
# A build started right after the bootstrap granted the build account its roles can fail while
# they propagate (typically 2 minutes): it is retried once, after this wait.
IMAGE_BUILD_RETRY_SECONDS = 90

# The Cloud Build account of CI (docs/DEPLOY.md, step 7): what `terraform apply` of this module
# needs, nothing project-wide beyond it. (The build that runs it also needs roles/logging.logWriter.)
CI_ACCOUNT_ID = "chat-ci"
CI_ROLES = (
    "roles/run.admin",  # services, their IAM, the invoker check (run.services.setIamPolicy)
    "roles/cloudfunctions.developer",  # create and update the functions (no function IAM is set)
    "roles/pubsub.admin",  # topics, subscriptions and their IAM
    "roles/storage.admin",  # buckets, their IAM, the Terraform state
    "roles/datastore.owner",  # the database, indexes, TTL field
    "roles/firebaserules.admin",  # the security rules
    "roles/secretmanager.admin",  # the secret and its IAM
    "roles/artifactregistry.admin",  # the repository, its IAM, pushing the image
    "roles/iam.serviceAccountAdmin",  # the service accounts and their IAM
    "roles/iam.serviceAccountUser",  # deploy as them (actAs)
    "roles/iam.roleAdmin",  # the custom roles
    "roles/serviceusage.serviceUsageAdmin",  # enable APIs; serviceusage.services.use (quota project)
    "roles/monitoring.alertPolicyEditor", "roles/monitoring.notificationChannelEditor",  # the alerts
    "roles/logging.logWriter",  # the build's own logs (Cloud Logging only)
)
# Terraform also grants roles on the project itself, which takes
# roles/resourcemanager.projectIamAdmin: CI gets it only with an IAM condition that lets it grant
# or revoke these roles and no other (tests/infra checks they are the ones infra/terraform grants).
CI_GRANTABLE_PROJECT_ROLES = (
    "roles/aiplatform.user",
    "roles/datastore.user",
    "roles/logging.logWriter",
    "roles/storage.objectViewer",
    "projects/{project}/roles/chatInstanceSubscriptions",
)


def ci_iam_admin_condition(project: str) -> str:
    """The condition on CI's roles/resourcemanager.projectIamAdmin (iam.googleapis.com/modifiedGrantsByRole)."""
    roles = ", ".join(f"'{role.format(project=project)}'" for role in CI_GRANTABLE_PROJECT_ROLES)
    return f"api.getAttribute('iam.googleapis.com/modifiedGrantsByRole', []).hasOnly([{roles}])"


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

    @property
    def build_service_account(self) -> str:
        """The build account as --service-account takes it (projects/P/serviceAccounts/EMAIL)."""
        return (f"projects/{self.project}/serviceAccounts/"
                f"{BUILD_SERVICE_ACCOUNT_ID}@{self.project}.iam.gserviceaccount.com")

    @property
    def sources_bucket(self) -> str:
        return f"{self.project}-{SOURCES_BUCKET_SUFFIX}"

    def var_file(self, terraform_dir: Path = TERRAFORM_DIR) -> str | None:
        """``environments/<environment>.tfvars`` (relative to the Terraform folder) when it exists."""
        relative = Path("environments") / f"{self.environment}.tfvars"
        return str(relative) if (terraform_dir / relative).is_file() else None
