"""Fixtures of the offline deployment checks: the parsed Terraform module, the topology, checkov."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatcore import topology as topology_mod

from . import hcl_model

ROOT = hcl_model.ROOT
CHECKOV_REQUIREMENTS = ROOT / "infra" / "checkov-requirements.txt"


@pytest.fixture(scope="session")
def tf() -> hcl_model.Module:
    return hcl_model.load()


@pytest.fixture(scope="session")
def topology_raw() -> dict:
    return json.loads(topology_mod.TOPOLOGY_FILE.read_text())


@pytest.fixture(scope="session")
def checkov() -> Path:
    """The checkov executable, in its own virtualenv under .venv/tools (made once per pinned list).

    checkov pins packaging<24 while pytest 9 needs packaging>=24, so it cannot
    live in the project's virtualenv; infra/checkov-requirements.txt pins it
    and everything it needs.
    """
    digest = hashlib.sha256(CHECKOV_REQUIREMENTS.read_bytes()).hexdigest()[:12]
    venv = ROOT / ".venv" / "tools" / f"checkov-{digest}"
    exe = venv / "bin" / "checkov"
    stamp = venv / ".installed"
    if not stamp.exists():
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        result = subprocess.run(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             "--no-deps", "-r", str(CHECKOV_REQUIREMENTS)],
            capture_output=True, text=True, env={**os.environ, "PIP_NO_INPUT": "1"})
        if result.returncode != 0:
            pytest.fail(f"could not install checkov from {CHECKOV_REQUIREMENTS.name}:\n{result.stderr[-3000:]}",
                        pytrace=False)
        stamp.write_text(digest)
    return exe
