"""The doctor's checks, in the order they are printed (``python -m deploy doctor``).

Each is a function ``check(ctx) -> Result`` (see base.py); to add one, write
it in the module of its topic and list it here. Every gcloud call goes through
``ctx.gcloud``, which only runs read verbs (describe, list, get-*).
"""

from __future__ import annotations

from . import local, placement, policies, project
from .base import Check

REGISTRY: list[Check] = [
    local.gcloud_account,  # 1. gcloud installed, an account active
    local.application_default_credentials,  # 2. Terraform's credentials and their quota project
    project.project_exists,  # 3. the project is reachable...
    project.billing,  # ... and billed
    project.apis,  # 4. serviceusage and cloudresourcemanager on; which others are on already
    project.state_bucket,  # the Terraform state bucket (docs/DEPLOY.md step 2)
    policies.public_access,  # 5. allUsers refused by domain-restricted sharing?
    policies.invoker_iam_required,  # ... and may the invoker IAM check be disabled instead?
    policies.default_sa_grants,  # ... default service accounts without roles (info)
    policies.build_service_account,  # 6. Cloud Build's default service account
    placement.region,  # 7. Cloud Run and Cloud Functions in the region
    placement.firestore_database,  # ... a database that already exists
    local.firestore_location,  # ... the tfvars' Firestore location against the region
    project.caller_roles,  # 8. your roles on the project
]
