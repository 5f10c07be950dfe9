"""Where things go: the region (Cloud Run and Cloud Functions offer it) and the Firestore database."""

from __future__ import annotations

import re

from .base import Context, GcloudError, Result, check, fail, ok, unknown

# Default of variable "firestore_database" in infra/terraform/variables.tf (a test keeps them equal).
DEFAULT_FIRESTORE_DATABASE = "(default)"
_REGION = re.compile(r"^[a-z]+(-[a-z]+)+[0-9]+$")  # us-central1, europe-west4, northamerica-northeast1
# The region lists come from each product's API, so each needs its API on.
REGION_LISTS = {
    "Cloud Run": ("run.googleapis.com", ("run", "regions", "list")),
    "Cloud Functions": ("cloudfunctions.googleapis.com", ("functions", "regions", "list", "--gen2")),
}


def _location_ids(locations: list[dict] | None) -> set[str]:
    return {loc.get("locationId") or loc.get("name", "").rsplit("/", 1)[-1] for loc in locations or []}


@check("region")
def region(ctx: Context) -> Result:
    if not _REGION.match(ctx.region):
        return fail(f"{ctx.region!r} is not a region name", "pass --region, e.g. us-central1")
    offered, refused, unchecked = [], [], []
    for product, (api, command) in REGION_LISTS.items():
        if ctx.api_off(api):
            unchecked.append(f"{product} (API off)")
            continue
        try:
            regions = _location_ids(ctx.gcloud.json(*command, f"--project={ctx.project}"))
        except GcloudError as exc:
            unchecked.append(f"{product} ({exc})")
            continue
        (offered if ctx.region in regions else refused).append(product)
    note = f"; not checked: {', '.join(unchecked)}" if unchecked else ""
    if refused:
        return fail(f"{' and '.join(refused)} not offered in {ctx.region}{note}",
                    "pick a region both offer (gcloud run regions list; gcloud functions regions list --gen2)")
    if offered:
        return ok(f"{' and '.join(offered)} offered in {ctx.region}{note}")
    return unknown(f"{ctx.region} looks like a region name{note}")


def _state_exists(ctx: Context) -> bool | None:
    """Has Terraform state been written for this environment (a previous apply)? None: cannot tell.

    Only the object's metadata is read (``objects describe``), never the state itself.
    """
    state = f"gs://{ctx.target.bucket}/{ctx.target.state_prefix}/default.tfstate"
    try:
        ctx.gcloud.json("storage", "objects", "describe", state, f"--project={ctx.project}")
        return True
    except GcloudError as exc:
        return False if ("404" in str(exc) or "not found" in str(exc).lower()) else None


@check("firestore database")
def firestore_database(ctx: Context) -> Result:
    """A database of the configured id that Terraform did not create makes the apply fail with 409."""
    database = ctx.tfvar("firestore_database", DEFAULT_FIRESTORE_DATABASE)
    if ctx.api_off("firestore.googleapis.com"):
        return ok(f"no database yet (Firestore API off): Terraform will create {database}")
    existing = {db.get("name", "").rsplit("/", 1)[-1]: db
                for db in ctx.gcloud.json("firestore", "databases", "list", f"--project={ctx.project}") or []}
    others = f" (the project has: {', '.join(sorted(existing))})" if existing else ""
    if database not in existing:
        return ok(f"no {database} database yet: Terraform will create it{others}")
    db = existing[database]
    found = f"{database} exists already ({db.get('type', '?')}, {db.get('locationId', '?')})"
    if _state_exists(ctx):
        return ok(f"{found}; this environment has Terraform state, presumably from a "
                  "previous apply")
    env_file = f"infra/terraform/environments/{ctx.target.environment}.tfvars"
    if db.get("type") != "FIRESTORE_NATIVE":
        fix = f"it is not in native mode: set firestore_database to a new id in {env_file}"
    else:
        fix = (f"import it (python -m deploy's -var flags, plus firestore_location = \"{db.get('locationId')}\" in "
               f"{env_file}): terraform -chdir=infra/terraform import google_firestore_database.main "
               f"projects/{ctx.project}/databases/{database}; or set firestore_database to a new id in {env_file}")
    return fail(f"{found} and Terraform would create it (409 already exists)", fix)
