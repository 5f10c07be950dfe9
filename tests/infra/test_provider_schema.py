"""Every resource, data source, provider block and nested block of infra/terraform against the
schema of the provider version versions.tf pins (google and google-beta 6.50.0), read from the
CDKTF bindings of that version (tests/infra/provider_schema.py): an unknown resource type, an
unknown or misspelled argument or block, a missing required argument or block fails here, as
`terraform validate` would with the provider downloaded."""

from __future__ import annotations

import io
import json
import re
import time

import hcl2
import pytest

from . import provider_schema
from .hcl_model import _OPTIONS, ROOT, TERRAFORM_DIR

# The bindings' versions (package.json devDependencies) and the provider version they were generated from.
BINDINGS_VERSION = "16.12.1"


@pytest.fixture(scope="session")
def schemas():
    """Both schemas, loaded once (from node_modules/.cache after the first run)."""
    try:
        started = time.perf_counter()
        loaded = {name: provider_schema.load(name) for name in provider_schema.PACKAGES}
    except provider_schema.BindingsMissing as exc:
        pytest.fail(str(exc), pytrace=False)
    print(f"provider schemas loaded in {time.perf_counter() - started:.2f}s")
    return loaded


def test_bindings_are_pinned_and_carry_the_pinned_provider_version(tf, schemas):
    package = json.loads((ROOT / "package.json").read_text())
    lock = json.loads((ROOT / "package-lock.json").read_text())
    (terraform,) = tf.files["versions.tf"]["terraform"]
    (providers,) = terraform["required_providers"]
    for provider, npm_name in provider_schema.PACKAGES.items():
        assert package["devDependencies"][npm_name] == BINDINGS_VERSION
        assert lock["packages"][f"node_modules/{npm_name}"]["version"] == BINDINGS_VERSION
        installed = json.loads((provider_schema.assembly_path(provider).parent / "package.json").read_text())
        assert installed["version"] == BINDINGS_VERSION, "node_modules is stale: run `make prereqs`"
        # The registry version each binding was generated from (package.json cdktf.provider, and every doc link).
        assert installed["cdktf"]["provider"] == {"name": f"registry.terraform.io/hashicorp/{provider}",
                                                  "version": providers[provider]["version"]}
        assert schemas[provider].version == providers[provider]["version"]
    assert providers["google"]["version"] == providers["google-beta"]["version"] == "6.50.0"


def test_the_schemas_are_whole_and_named_as_terraform_names_them(schemas):
    google, beta = schemas["google"], schemas["google-beta"]
    assert len(google.resources) > 1000 and len(google.data) > 300
    assert set(google.resources) < set(beta.resources)
    # Terraform names come from each property's registry link, not from its camelCase name:
    # cdktf renames `build` (buildAttribute) and spells detectMd5Hash for detect_md5hash.
    trigger = google.structs[google.resources["google_cloudbuild_trigger"]]
    assert "build" in trigger["blocks"] and "build_attribute" not in trigger["blocks"]
    obj = google.structs[google.resources["google_storage_bucket_object"]]
    assert {"detect_md5hash", "source_md5hash"} <= set(obj["arguments"])
    # A dozen of 26,000 properties have no link (their docs were cut): named by snake_case
    # (test_infra_terraform_matches_the_provider_schema checks that none is ours).
    assert 0 < len(google.guessed) < 30
    # Required arguments and blocks, single and repeated blocks.
    function = google.structs[google.resources["google_cloudfunctions2_function"]]
    assert function["arguments"]["name"] is True and function["arguments"]["location"] is True
    assert function["arguments"]["description"] is False
    build_ref, build_required, build_single = function["blocks"]["build_config"]
    assert (build_required, build_single) == (False, True)
    service = google.structs[google.resources["google_cloud_run_v2_service"]]
    assert service["blocks"]["template"][1:] == [True, True]
    assert service["blocks"]["traffic"][1:] == [False, False]


def test_infra_terraform_matches_the_provider_schema(tf, schemas):
    started = time.perf_counter()
    checker = provider_schema.check_module(tf.files)
    elapsed = time.perf_counter() - started
    assert [str(p) for p in checker.problems] == []
    coverage = checker.coverage
    guessed = {g.rsplit(".", 1)[0] for schema in schemas.values() for g in schema.guessed}
    assert checker.visited and not checker.visited & guessed, "a block of ours has a property named by guess"
    # Every resource and data source of the module was checked, none skipped.
    assert coverage.resources == len(tf.resources) and coverage.data_sources == len(tf.data)
    assert coverage.providers == len(tf.providers) == 2
    assert coverage.blocks > 40 and coverage.arguments > 300
    print(f"checked {coverage.resources} resources, {coverage.data_sources} data sources, {coverage.providers} "
          f"providers, {coverage.blocks} nested blocks, {coverage.arguments} arguments in {elapsed * 1000:.0f} ms")


# -- broken copies: each mistake in a copy of a real file is caught ------------------------------
BROKEN = [
    pytest.param("pubsub.tf", "  ack_deadline_seconds       = each.value.ack_deadline_seconds",
                 "  ack_deadline_second        = each.value.ack_deadline_seconds",
                 r"google_pubsub_subscription\.push\.ack_deadline_second: unknown argument "
                 r"\(did you mean ack_deadline_seconds\?\)", id="misspelled-argument"),
    pytest.param("pubsub.tf", "  topic   = google_pubsub_topic.topics[each.value.topic].id\n  labels  = local.labels\n\n"
                 "  # Longer", "  labels  = local.labels\n\n  # Longer",
                 r"google_pubsub_subscription\.push: missing required argument topic", id="missing-required-argument"),
    pytest.param("pubsub.tf", 'resource "google_pubsub_topic" "topics"', 'resource "google_pubsub_topics" "topics"',
                 r"google_pubsub_topics\.topics: unknown resource type in google 6\.50\.0 "
                 r"\(did you mean google_pubsub_topic\?\)", id="unknown-resource-type"),
    pytest.param("storage.tf", 'data "google_storage_project_service_account" "gcs"',
                 'data "google_storage_project_service_acount" "gcs"',
                 r"data\.google_storage_project_service_acount\.gcs: unknown data source type", id="unknown-data-type"),
    pytest.param("pubsub.tf", "  retry_policy {", "  retry_policies {",
                 r"google_pubsub_subscription\.push\.retry_policies: unknown block \(did you mean retry_policy\?\)",
                 id="unknown-nested-block"),
    pytest.param("pubsub.tf", "      service_account_email = google_service_account.push_invoker.email\n",
                 "      service_acount_email = google_service_account.push_invoker.email\n",
                 (r"google_pubsub_subscription\.push\.push_config\.oidc_token\.service_acount_email: unknown argument "
                  r"\(did you mean service_account_email\?\)",
                  # a misspelled required argument is missing too
                  r"push_config\.oidc_token: missing required argument service_account_email"),
                 id="misspelled-required-argument-two-blocks-deep"),
    pytest.param("pubsub.tf", "      service_account_email = google_service_account.push_invoker.email\n", "",
                 r"google_pubsub_subscription\.push\.push_config\.oidc_token: missing required argument "
                 r"service_account_email", id="missing-required-nested-argument"),
    pytest.param("storage.tf", '    action {\n      type = "AbortIncompleteMultipartUpload"\n    }\n', "",
                 r"google_storage_bucket\.uploads\.lifecycle_rule: missing required block action",
                 id="missing-required-block"),
    pytest.param("run.tf", "    scaling {", "    scaling {\n      min_instance_count = 0\n    }\n    scaling {",
                 r"google_cloud_run_v2_service\.socket\.template\.scaling: at most one scaling block is allowed, "
                 r"found 2", id="single-block-twice"),
    pytest.param("functions.tf", '    dynamic "secret_environment_variables" {', '    dynamic "secret_environment_variable" {',
                 r"google_cloudfunctions2_function\.functions\.service_config\.dynamic\.secret_environment_variable: "
                 r"dynamic block of unknown block type", id="unknown-dynamic-block"),
    pytest.param("functions.tf", "        project_id = var.project_id\n", "        projectid = var.project_id\n",
                 (r"service_config\.dynamic\.secret_environment_variables\.content\.projectid: unknown argument "
                  r"\(did you mean project_id\?\)",
                  r"secret_environment_variables\.content: missing required argument project_id"),
                 id="misspelled-argument-in-dynamic-content"),
    pytest.param("run.tf", "  traffic {\n    type    = \"TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST\"\n    percent = 100\n  }",
                 "  traffic = {\n    type    = \"TRAFFIC_TARGET_ALLOCATION_TYPE_LATEST\"\n    percent = 100\n  }",
                 r"google_cloud_run_v2_service\.socket\.traffic: traffic is a block", id="block-written-as-argument"),
    pytest.param("firestore.tf", "    ignore_changes = [location_id]", "    ignore_change = [location_id]",
                 r"google_firestore_database\.main\.lifecycle\.ignore_change: unknown argument "
                 r"\(did you mean ignore_changes\?\)", id="misspelled-lifecycle-argument"),
    pytest.param("pubsub.tf", "  provider = google-beta\n", "",
                 r"google_project_service_identity\.pubsub: unknown resource type in google 6\.50\.0 "
                 r"\(google-beta has it: set provider = google-beta\)", id="beta-resource-without-beta-provider"),
    pytest.param("main.tf", "  user_project_override = true\n  billing_project       = var.project_id\n}\n\nprovider",
                 "  user_project_overide = true\n  billing_project       = var.project_id\n}\n\nprovider",
                 r"provider\.google\.user_project_overide: unknown argument", id="misspelled-provider-argument"),
    pytest.param("iam.tf", '  provisioner "local-exec" {\n    command = "echo \'New IAM grants for',
                 '  provisioner "local-exec" {\n    comand = "echo \'New IAM grants for',
                 (r"terraform_data\.build_iam_settle\.provisioner\.local-exec\.comand: unknown argument "
                  r"\(did you mean command\?\)",
                  r"provisioner\.local-exec: missing required argument command"),
                 id="misspelled-provisioner-argument"),
    pytest.param("moved.tf", "  from = google_cloudfunctions2_function.ai_stream\n",
                 "  form = google_cloudfunctions2_function.ai_stream\n",
                 r"moved\.tf: moved\.form: unknown argument in a moved block \(did you mean from\?\)",
                 id="misspelled-moved-argument"),
]


@pytest.mark.parametrize(("file", "old", "new", "expected"), BROKEN)
def test_a_broken_copy_is_caught(schemas, file, old, new, expected):
    text = (TERRAFORM_DIR / file).read_text()
    assert text.count(old) == 1, f"{file} changed: {old!r} no longer found once"
    broken = hcl2.load(io.StringIO(text.replace(old, new)), serialization_options=_OPTIONS)
    intact = hcl2.load(io.StringIO(text), serialization_options=_OPTIONS)
    assert provider_schema.check_module({file: intact}).problems == []
    problems = [str(p) for p in provider_schema.check_module({file: broken}).problems]
    expected = (expected,) if isinstance(expected, str) else expected
    assert len(problems) == len(expected) and all(re.search(e, p) for e, p in zip(expected, problems, strict=True)), problems
