# Versions are pinned exactly; `terraform init` records the provider checksums
# in .terraform.lock.hcl, which belongs in version control after the first
# init (it cannot be generated here, without the registry).
terraform {
  # 1.9: validation rules that refer to other variables and to locals (variables.tf: firestore_location,
  # jwt_issuer, jwt_audience, the origin lists).
  required_version = ">= 1.9.0, < 2.0.0"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "6.50.0"
    }
    # Only for google_project_service_identity (the Pub/Sub service agent).
    google-beta = {
      source  = "hashicorp/google-beta"
      version = "6.50.0"
    }
    archive = {
      source  = "hashicorp/archive"
      version = "2.7.1"
    }
  }

  # State lives in a GCS bucket created once by hand (docs/DEPLOY.md); the
  # bucket and prefix are given at init time: `python -m deploy` passes
  # -backend-config=bucket=<project>-tfstate -backend-config=prefix=chat/<environment>.
  backend "gcs" {}
}
