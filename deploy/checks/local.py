"""Checks of this machine: the gcloud account, Terraform's credentials, the chosen Firestore location."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .base import Context, GcloudError, Result, check, fail, ok, warn

# Firestore multi-regions Terraform accepts, and the prefix of the regions each fits. Variable
# "firestore_location" defaults to null: Terraform then derives the location from the region the same
# way as suggested_firestore_location, and refuses one that does not fit (infra/terraform/variables.tf;
# a test keeps the two rules equal).
MULTI_REGIONS = {"nam5": "us-", "eur3": "europe-"}


@check("gcloud account")
def gcloud_account(ctx: Context) -> Result:
    try:
        account = ctx.active_account()
    except GcloudError as exc:
        return fail(f"gcloud does not answer: {exc}",
                    "install the Google Cloud CLI: https://cloud.google.com/sdk/docs/install")
    if not account:
        return fail("no active gcloud account", "gcloud auth login")
    return ok(f"{account} is active")


def _adc_file(ctx: Context) -> tuple[Path, bool]:
    """Where Terraform's Application Default Credentials are, and whether an env var chose it."""
    explicit = ctx.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if explicit:
        return Path(explicit).expanduser(), True
    config = ctx.environ.get("CLOUDSDK_CONFIG")
    if not config and ctx.environ.get("APPDATA"):  # Windows
        config = str(Path(ctx.environ["APPDATA"]) / "gcloud")
    base = Path(config).expanduser() if config else ctx.home / ".config" / "gcloud"
    return base / "application_default_credentials.json", False


def terraform_overrides_quota_project(terraform: str) -> bool:
    """Does provider "google" send the target project as quota project (user_project_override)?"""
    return bool(re.search(r"user_project_override\s*=\s*true", terraform))


@check("application default credentials")
def application_default_credentials(ctx: Context) -> Result:
    """Only the file's type and quota project are read out; no key or token is ever printed."""
    set_quota = f"gcloud auth application-default set-quota-project {ctx.project}"
    path, explicit = _adc_file(ctx)
    if not path.is_file():
        if explicit:
            return fail(f"GOOGLE_APPLICATION_CREDENTIALS names a missing file ({path})",
                        "point it at a credentials file, or unset it and run gcloud auth application-default login")
        for var in ("GOOGLE_CREDENTIALS", "GOOGLE_OAUTH_ACCESS_TOKEN"):
            if ctx.environ.get(var):
                return ok(f"Terraform will use ${var} (no ADC file)")
        if ctx.environ.get("CLOUD_SHELL") == "true":
            return warn("no ADC file: Terraform will use Cloud Shell's built-in user credentials",
                        f"if Terraform reports end-user credential errors: gcloud auth application-default login "
                        f"&& {set_quota}")
        return fail(f"no Application Default Credentials ({path} does not exist)",
                    f"gcloud auth application-default login && {set_quota}")
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return fail(f"{path} is not readable JSON", "gcloud auth application-default login")
    kind = info.get("type", "?") if isinstance(info, dict) else "?"
    if kind != "authorized_user":
        return ok(f"{kind} credentials in {path}")
    quota = info.get("quota_project_id")
    if quota == ctx.project:
        return ok(f"user credentials, quota project {quota}")
    overrides = terraform_overrides_quota_project(ctx.terraform)
    if quota:
        if overrides:
            return ok(f"user credentials, quota project {quota} (Terraform bills {ctx.project} "
                      "instead: user_project_override)")
        return warn(f"user credentials with quota project {quota}, not {ctx.project}",
                    set_quota)
    if overrides:
        # The provider sends billing_project itself; that needs serviceusage.services.use on the project.
        return warn("user credentials without a quota project (Terraform sends "
                    f"{ctx.project} itself, which needs serviceusage.services.use there)",
                    set_quota)
    return fail("user credentials without a quota project: the Firebase Rules API "
                "refuses them (firestore.rules cannot be released)", set_quota)


def suggested_firestore_location(region: str) -> str:
    for location, prefix in MULTI_REGIONS.items():
        if region.startswith(prefix):
            return location
    return region


@check("firestore location")
def firestore_location(ctx: Context) -> Result:
    """Local only: the location the tfvars choose against the region the services run in."""
    suggestion = suggested_firestore_location(ctx.region)
    if "firestore_location" not in ctx.tfvars:
        return ok(f"firestore_location unset: Terraform derives {suggestion!r} from region {ctx.region}")
    location = ctx.tfvars["firestore_location"]
    prefix = MULTI_REGIONS.get(location)
    if (ctx.region.startswith(prefix) if prefix else location == ctx.region):
        return ok(f"firestore_location {location!r} fits region {ctx.region}")
    return fail(
                f"firestore_location {location!r} does not fit region {ctx.region}: Terraform refuses it "
                "(every transaction would cross regions, about 100 ms each)",
                f'set firestore_location = "{suggestion}" in '
                f"infra/terraform/environments/{ctx.target.environment}.tfvars, or remove it, before the first "
                "apply (it cannot change later)")
