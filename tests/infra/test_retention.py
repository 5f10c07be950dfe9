"""Review finding 7 (issue 13): uploads are not kept for ever.

The uploads bucket deletes objects older than ``var.upload_retention_days``,
and the upload functions count each user's storage over the same number of
days (UPLOAD_RETENTION_DAYS, chatcore/store/uploads.py), so the two cannot drift.
"""

from __future__ import annotations

from chatcore.store import uploads as uploads_mod

from .hcl_model import first
from .test_settings_env import terraform_env


def delete_rules(tf) -> list[dict]:
    rules = tf.resource("google_storage_bucket", "uploads")["lifecycle_rule"]
    return [rule for rule in rules if first(rule, "action")["type"] == "Delete"]


def test_the_uploads_bucket_deletes_objects_after_the_retention_period(tf):
    (rule,) = delete_rules(tf)
    condition = first(rule, "condition")
    assert condition["age"] == "${var.upload_retention_days}"
    assert condition["matches_prefix"] == ["${local.uploads_layout.object_prefix}/"]
    assert {k for k in condition if not k.startswith("__")} == {"age", "matches_prefix"}, "nothing else decides"


def test_the_retention_variable_has_the_applications_default_and_is_validated(tf):
    variable = tf.variables["upload_retention_days"].body
    assert variable["type"] == "number"
    assert variable["default"] == uploads_mod.DEFAULT_RETENTION_DAYS
    (validation,) = variable["validation"]
    assert "var.upload_retention_days >= 1" in validation["condition"]


def test_the_storage_quota_counts_the_days_the_bucket_keeps(tf):
    env = terraform_env(tf, "upload")
    assert env["UPLOAD_RETENTION_DAYS"] == "${var.upload_retention_days}"
    assert tf.locals["upload_env"]["UPLOAD_RETENTION_DAYS"] == "${var.upload_retention_days}"  # always set
