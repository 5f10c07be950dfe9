"""Checks of the project itself: reachable, billed, the first APIs on, the state bucket, the caller's roles."""

from __future__ import annotations

from ..settings import CI_ROLES
from .base import Context, GcloudError, Result, check, fail, ok, terraform_apis, unknown, warn

# Terraform needs these two to enable everything else (docs/DEPLOY.md step 1).
BOOTSTRAP_APIS = ("serviceusage.googleapis.com", "cloudresourcemanager.googleapis.com")
# The roles docs/DEPLOY.md asks of a deployer that is not Owner: CI's roles, plus projectIamAdmin
# (which CI holds only under a condition; a person deploying by hand holds it plainly).
DEPLOYER_ROLES = (*CI_ROLES, "roles/resourcemanager.projectIamAdmin")


def _short(api: str) -> str:
    return api.removesuffix(".googleapis.com")


@check("project")
def project_exists(ctx: Context) -> Result:
    try:
        info = ctx.project_info()
    except GcloudError as exc:
        return fail(f"{ctx.project} cannot be read: {exc}",
                    "check the project id, and that your account has a role on it")
    state = info.get("lifecycleState", "?")
    if state != "ACTIVE":
        return fail(f"{ctx.project} is {state}",
                    f"use an active project (a deleted one can be restored: gcloud projects undelete {ctx.project})")
    return ok(f"{ctx.project} (number {info.get('projectNumber', '?')}) is ACTIVE")


@check("billing")
def billing(ctx: Context) -> Result:
    info = ctx.gcloud.json("billing", "projects", "describe", ctx.project) or {}
    if info.get("billingEnabled"):
        return ok("billing is enabled")
    return fail("billing is not enabled: Cloud Run, Functions and Firestore need it",
                f"gcloud billing projects link {ctx.project} --billing-account=ACCOUNT_ID")


@check("APIs")
def apis(ctx: Context) -> Result:
    enable = f"gcloud services enable {' '.join(BOOTSTRAP_APIS)} --project={ctx.project}"
    try:
        enabled = ctx.enabled_apis()
    except GcloudError as exc:
        if "SERVICE_DISABLED" in str(exc) or "has not been used" in str(exc):
            return fail(f"the Service Usage API answers: {exc}", enable)
        raise
    missing = [api for api in BOOTSTRAP_APIS if api not in enabled]
    others = [api for api in terraform_apis(ctx.terraform_dir) if api not in BOOTSTRAP_APIS]
    on = [_short(api) for api in others if api in enabled]
    rest = f"{len(on)} of the {len(others)} others Terraform enables are on already" + (
        f" ({', '.join(on)})" if on else "")
    if missing:
        return fail(f"{', '.join(map(_short, missing))} not enabled; {rest}", enable)
    return ok(f"{' and '.join(map(_short, BOOTSTRAP_APIS))} on; {rest}")


@check("state bucket")
def state_bucket(ctx: Context) -> Result:
    """The Terraform state bucket of docs/DEPLOY.md step 2 (python -m deploy --state-bucket)."""
    bucket = f"gs://{ctx.target.bucket}"
    try:
        info = ctx.gcloud.json("storage", "buckets", "describe", bucket, f"--project={ctx.project}") or {}
    except GcloudError as exc:
        if "404" in str(exc) or "not found" in str(exc).lower():
            return fail(f"{bucket} does not exist",
                        f"create it (docs/DEPLOY.md step 2): gcloud storage buckets create {bucket} "
                        f"--location={ctx.region} --uniform-bucket-level-access --public-access-prevention")
        raise
    if not info.get("versioning_enabled"):
        return warn(f"{bucket} exists without versioning (an overwritten state is lost)",
                    f"gcloud storage buckets update {bucket} --versioning")
    return ok(f"{bucket} exists, versioned")


def member_of(account: str) -> str:
    return f"serviceAccount:{account}" if account.endswith(".gserviceaccount.com") else f"user:{account}"


@check("your roles")
def caller_roles(ctx: Context) -> Result:
    account = ctx.active_account()
    if not account:
        return unknown("no active gcloud account", "gcloud auth login")
    member = member_of(account)
    policy = ctx.gcloud.json("projects", "get-iam-policy", ctx.project) or {}
    roles = {b.get("role") for b in policy.get("bindings", []) if member in b.get("members", [])}
    if "roles/owner" in roles:
        return ok(f"{member} is Owner of {ctx.project}")
    missing = [role for role in DEPLOYER_ROLES if role not in roles]
    if not missing:
        return ok(f"{member} has every role docs/DEPLOY.md lists")
    return warn(
                f"{member} is not Owner and lacks {len(missing)} role(s) of docs/DEPLOY.md on the project: "
                f"{' '.join(missing)}",
                "ask for them (or Owner); ignore this if they come through a group, folder or organization, "
                "which this check cannot see")
