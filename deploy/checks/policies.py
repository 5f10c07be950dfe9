"""Organization policies that shape the deploy, and Cloud Build's default service account.

Two APIs answer for org policies: the v1 ``gcloud resource-manager
org-policies`` (through cloudresourcemanager, which step 1 enables) for the
legacy constraints, and the v2 ``gcloud org-policies`` (orgpolicy.googleapis.com,
possibly off) for managed constraints. A v2 call that fails is "unknown", never
a failure of the deploy.
"""

from __future__ import annotations

from .. import commands
from .base import Context, GcloudError, Result, Status, check, fail, ok, unknown, warn

DRS = "constraints/iam.allowedPolicyMemberDomains"  # domain-restricted sharing (v1, legacy)
MANAGED_MEMBERS = "constraints/iam.managed.allowedPolicyMembers"  # its managed successor (v2)
REQUIRE_INVOKER_IAM = "constraints/run.managed.requireInvokerIam"  # v2
DEFAULT_SA_GRANTS = "constraints/iam.automaticIamGrantsForDefaultServiceAccounts"  # v1, boolean


def _v1(ctx: Context, constraint: str) -> dict:
    return ctx.gcloud.json("resource-manager", "org-policies", "describe", constraint,
                           f"--project={ctx.project}", "--effective") or {}


def _v2_enforced(ctx: Context, constraint: str) -> bool:
    """Is a v2 (managed, boolean) constraint enforced on the project? A rule with a condition counts."""
    try:
        policy = ctx.gcloud.json("org-policies", "describe", constraint, f"--project={ctx.project}",
                                 "--effective") or {}
    except GcloudError as exc:
        if "NOT_FOUND" in str(exc):  # never set anywhere: the default, not enforced
            return False
        raise
    return any(rule.get("enforce") for rule in (policy.get("spec") or {}).get("rules", []))


def members_restriction(ctx: Context) -> str:
    """Why allUsers bindings are refused ('' when they are not). Raises GcloudError if nothing can tell."""
    list_policy = _v1(ctx, DRS).get("listPolicy") or {}
    if list_policy.get("allowedValues"):
        return f"{DRS} allows only {', '.join(list_policy['allowedValues'])}"
    if list_policy.get("allValues") == "DENY":
        return f"{DRS} denies every domain"
    try:
        if _v2_enforced(ctx, MANAGED_MEMBERS):
            return f"{MANAGED_MEMBERS} is enforced"
    except GcloudError:
        pass  # the v1 answer stands; the managed constraint is reported by its own line only if needed
    return ""


def deploy_disables_invoker_check(ctx: Context) -> bool:
    """Does this checkout make the public services public with invoker_iam_disabled (rather than allUsers)?"""
    return "invoker_iam_disabled" in ctx.terraform


@check("org policy: allUsers")
def public_access(ctx: Context) -> Result:
    restriction = members_restriction(ctx)
    if not restriction:
        return ok("allUsers bindings are allowed")
    found = f"allUsers bindings are refused ({restriction})"
    if deploy_disables_invoker_check(ctx):
        return ok(f"{found}; fine: the deploy disables Cloud Run's invoker IAM check instead")
    return warn(f"{found}, and this checkout's Terraform still grants allUsers",
                "the apply will fail with 'do not belong to a permitted customer': use a checkout that sets "
                "invoker_iam_disabled, or ask for an exception for this project")


@check("org policy: invoker IAM")
def invoker_iam_required(ctx: Context) -> Result:
    try:
        enforced = _v2_enforced(ctx, REQUIRE_INVOKER_IAM)
    except GcloudError as exc:
        return unknown(f"{REQUIRE_INVOKER_IAM} unreadable (the v2 Org Policy API, "
                       f"orgpolicy.googleapis.com, may be off): {exc}",
                       "if the apply is refused on invoker_iam_disabled, ask whether this constraint is enforced")
    if not enforced:
        return ok(f"{REQUIRE_INVOKER_IAM} not enforced: the invoker IAM check may be disabled")
    found = f"{REQUIRE_INVOKER_IAM} is enforced: Cloud Run's invoker IAM check may not be disabled"
    try:
        restricted = bool(members_restriction(ctx))
    except GcloudError:
        restricted = False
    if restricted or deploy_disables_invoker_check(ctx):
        why = "and allUsers is refused too: the chat page cannot be public" if restricted else \
            "which the deploy does to make the chat page and request-upload public"
        return fail(f"{found}, {why}",
                    f"ask for an exception to {REQUIRE_INVOKER_IAM} for this project")
    return warn(f"{found} (this checkout uses allUsers bindings, which are allowed)")


@check("org policy: default SAs")
def default_sa_grants(ctx: Context) -> Result:
    """Informational: explains why the deploy brings its own build service accounts."""
    enforced = (_v1(ctx, DEFAULT_SA_GRANTS).get("booleanPolicy") or {}).get("enforced")
    if enforced:
        return ok(f"{DEFAULT_SA_GRANTS} enforced: default service accounts get no roles "
                  "(which is why the deploy builds with its own accounts)")
    return ok(f"{DEFAULT_SA_GRANTS} not enforced: default service accounts get Editor")


@check("Cloud Build default SA")
def build_service_account(ctx: Context) -> Result:
    if ctx.api_off("cloudbuild.googleapis.com"):
        return unknown("the Cloud Build API is not enabled yet (the deploy's bootstrap enables it)")
    email = (ctx.gcloud.json("builds", "get-default-service-account", f"--project={ctx.project}") or {}).get(
        "serviceAccountEmail", "")
    email = email.rsplit("/", 1)[-1]  # projects/P/serviceAccounts/EMAIL
    if deploy_names_build_account(ctx):
        own, status = "the deploy's image build names its own account", Status.OK
    else:
        own, status = "the deploy's image build (gcloud builds submit) runs as this account", Status.WARN
    if email.endswith("@cloudbuild.gserviceaccount.com"):
        return ok(f"legacy Cloud Build account {email}")
    if email.endswith("-compute@developer.gserviceaccount.com"):
        return Result("", status, f"the Compute Engine default account {email}, which may have no roles; {own}",
                      "name a service account (--service-account) in any build you submit")
    if not email:
        return Result("", status, f"none: every build must name its service account; {own}",
                      "name a service account (--service-account) in any build you submit")
    return ok(email)


def deploy_names_build_account(ctx: Context) -> bool:
    """Does `python -m deploy apply` pass --service-account to gcloud builds submit?"""
    try:
        argv = commands.build_image(ctx.target, "doctor")
    except Exception:  # its signature changed: assume the worst, it is only a warning
        return False
    return any(arg.startswith("--service-account") for arg in argv)
