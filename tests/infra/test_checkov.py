"""checkov (pinned, in its own virtualenv) finds no failed check in infra/terraform or the
Dockerfile, and every check skipped says why, inline."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from .hcl_model import ROOT, TERRAFORM_DIR

pytestmark = pytest.mark.timeout(900)  # the first run installs checkov (about two minutes)

_SKIP = re.compile(r"#\s*checkov:skip=(?P<id>[A-Z0-9_]+)(?::(?P<reason>.*))?")


def _scan(checkov, *args: str) -> dict:
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    result = subprocess.run([str(checkov), *args, "--output", "json", "--compact", "--skip-download"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert result.returncode in (0, 1), f"checkov failed to run:\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout)
    return report[0] if isinstance(report, list) else report


def _failures(report: dict) -> list[str]:
    return [f"{c['check_id']} {c['resource']} ({c['file_path']}:{c['file_line_range']}): {c['check_name']}"
            for c in report["results"]["failed_checks"]]


def test_terraform_has_no_failed_check(checkov):
    report = _scan(checkov, "--directory", str(TERRAFORM_DIR), "--framework", "terraform")
    assert report["summary"]["parsing_errors"] == 0
    assert report["summary"]["passed"] > 20, "checkov evaluated almost nothing: is it reading the module?"
    assert _failures(report) == []
    # Every skip in the report is one of ours, with its reason.
    for check in report["results"]["skipped_checks"]:
        assert check["check_result"].get("suppress_comment", "").strip(), check["check_id"]


def test_dockerfile_has_no_failed_check(checkov):
    report = _scan(checkov, "--file", str(ROOT / "Dockerfile"), "--framework", "dockerfile")
    assert report["summary"]["passed"] > 10
    assert _failures(report) == []


def test_every_skip_carries_a_reason():
    files = [*sorted(TERRAFORM_DIR.glob("*.tf")), ROOT / "Dockerfile"]
    skips = 0
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "checkov:skip" in line:
                match = _SKIP.search(line)
                assert match and match.group("reason") and len(match.group("reason").strip()) >= 20, \
                    f"{path.name}:{number}: a checkov skip needs an inline reason"
                skips += 1
    assert skips < 15, "that many skips: fix the resources instead"
