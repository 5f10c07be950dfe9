"""What every doctor check uses: its Result, a read-only gcloud, and the facts checks share.

A check is a function ``check(ctx: Context) -> Result`` marked ``@check("title")``
that returns ``ok(found)``, ``warn(found, action)``, ``fail(...)`` or ``unknown(...)``. It reads what
it needs through ``ctx`` (gcloud answers are cached there, so two checks that
need the list of enabled APIs cost one call) and says what it found and what
to do. If gcloud fails inside a check, the GcloudError propagates and the
doctor turns it into an "unknown" line: a check only catches it when a failed
call means something specific (a bucket that does not exist, say).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Any

from ..runner import Runner
from ..settings import TERRAFORM_DIR, Target

GCLOUD = "gcloud"
DEFAULT_TIMEOUT = 30.0  # seconds per gcloud call

# The only gcloud verbs the doctor may run. A verb is the first word after the
# command groups (``gcloud GROUP [GROUP...] VERB ARGS``); anything else, e.g.
# ``services enable``, is refused before a process is started.
READ_VERBS = frozenset({"describe", "list", "get-value", "get-iam-policy", "get-default-service-account"})
GROUPS = frozenset({
    "auth", "config", "projects", "billing", "services", "resource-manager", "org-policies", "builds",
    "run", "functions", "regions", "firestore", "databases", "storage", "buckets", "objects",
})
# gcloud must never ask anything (it would offer to *enable* a disabled API) nor
# wait on stdin: prompts off, API-enablement prompts off, no update check.
GCLOUD_ENV = {
    "CLOUDSDK_CORE_DISABLE_PROMPTS": "1",
    "CLOUDSDK_CORE_SHOULD_PROMPT_TO_ENABLE_API": "false",
    "CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK": "1",
}


class Status(StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Result:
    name: str  # filled in from the check's @check title
    status: Status
    found: str  # what the check saw (never a credential)
    action: str = ""  # what to do about it; empty when nothing


def ok(found: str, action: str = "") -> Result:
    return Result("", Status.OK, found, action)


def warn(found: str, action: str = "") -> Result:
    return Result("", Status.WARN, found, action)


def fail(found: str, action: str = "") -> Result:
    return Result("", Status.FAIL, found, action)


def unknown(found: str, action: str = "") -> Result:
    return Result("", Status.UNKNOWN, found, action)


def check(title: str):
    """Marks a function as a doctor check; ``title`` names its line."""
    def mark(function):
        function.title = title
        return function
    return mark


class GcloudError(Exception):
    """A gcloud call that failed, timed out or could not start; the message is a one-line reason."""


def verb_of(argv: list[str]) -> str:
    """``gcloud resource-manager org-policies describe X`` -> ``describe``."""
    words = argv[1:]
    for word in words:
        if word not in GROUPS:
            return word
    return ""


def _reason(stderr: str) -> str:
    """The useful line of a gcloud error, without its ``ERROR: (gcloud.x.y)`` prefix."""
    lines = [line.strip() for line in (stderr or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")] or lines or ["no error message"]
    text = re.sub(r"^ERROR:\s*(\([^)]*\)\s*)?", "", errors[0])
    return text[:200] + ("..." if len(text) > 200 else "")


class ReadOnlyGcloud(Runner):
    """The deploy Runner, restricted to read-only gcloud calls, each bounded by a timeout.

    ``json(*args)`` runs ``gcloud ARGS --format=json`` and returns the parsed
    output; the answer (or the error) is cached, so checks may ask twice.
    """

    def __init__(self, cwd: Path, *, timeout: float = DEFAULT_TIMEOUT, echo=None):
        super().__init__(cwd, echo=echo)
        self.timeout = timeout
        self._cache: dict[tuple[str, ...], Any] = {}
        self._installed = True  # once gcloud is found missing, no further call tries to start it

    def read(self, *args: str) -> str:
        argv = [GCLOUD, *args]
        verb = verb_of(argv)
        if verb not in READ_VERBS:
            raise PermissionError(f"doctor refuses a non-read gcloud command (verb {verb!r}): {shlex.join(argv)}")
        if not self._installed:
            raise GcloudError("gcloud is not installed (not on PATH)")
        self._echo(f"$ {shlex.join(argv)}")
        try:
            result = subprocess.run(argv, cwd=self.cwd, text=True, stdin=subprocess.DEVNULL, capture_output=True,
                                    env={**os.environ, **GCLOUD_ENV}, timeout=self.timeout)
        except FileNotFoundError as exc:
            self._installed = False
            raise GcloudError("gcloud is not installed (not on PATH)") from exc
        except subprocess.TimeoutExpired as exc:
            raise GcloudError(f"no answer within {self.timeout:g} s") from exc
        if result.returncode != 0:
            raise GcloudError(_reason(result.stderr))
        return result.stdout or ""

    def json(self, *args: str) -> Any:
        key = (*args, "--format=json")
        if key not in self._cache:
            try:
                text = self.read(*key)
                self._cache[key] = json.loads(text) if text.strip() else None
            except json.JSONDecodeError:
                self._cache[key] = GcloudError("gcloud printed something that is not JSON")
            except GcloudError as exc:
                self._cache[key] = exc
        answer = self._cache[key]
        if isinstance(answer, GcloudError):
            raise answer
        return answer


# -- local files -----------------------------------------------------------------
_TFVAR = re.compile(r'^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:(?:#|//).*)?$')


def read_tfvars(path: Path) -> dict[str, str]:
    """The top-level ``name = "string"`` assignments of a .tfvars file (enough for the doctor)."""
    if not path.is_file():
        return {}
    values = {}
    for line in path.read_text().splitlines():
        match = _TFVAR.match(line)
        if match:
            values[match.group(1)] = match.group(2)
    return values


def terraform_apis(terraform_dir: Path) -> list[str]:
    """The APIs main.tf's ``local.apis`` enables (its ``"*.googleapis.com"`` strings)."""
    text = (terraform_dir / "main.tf").read_text() if (terraform_dir / "main.tf").is_file() else ""
    block = re.search(r"apis\s*=\s*toset\(\[(.*?)\]\)", text, re.S)
    return sorted(set(re.findall(r'"([a-z0-9.-]+\.googleapis\.com)"', block.group(1) if block else text)))


def terraform_text(terraform_dir: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(terraform_dir.glob("*.tf")))


# -- the context -------------------------------------------------------------------
@dataclass
class Context:
    """What the checks look at: the target, gcloud, the Terraform folder and the environment."""

    target: Target
    gcloud: ReadOnlyGcloud
    terraform_dir: Path = TERRAFORM_DIR
    environ: dict[str, str] | None = None  # default: os.environ
    home: Path | None = None  # default: Path.home()

    def __post_init__(self):
        self.environ = dict(os.environ) if self.environ is None else self.environ
        self.home = Path.home() if self.home is None else self.home

    @property
    def project(self) -> str:
        return self.target.project

    @property
    def region(self) -> str:
        return self.target.region

    # Facts several checks need. Each raises GcloudError when gcloud cannot tell.
    def active_account(self) -> str | None:
        accounts = self.gcloud.json("auth", "list") or []
        return next((a.get("account") for a in accounts if a.get("status") == "ACTIVE"), None)

    def project_info(self) -> dict:
        return self.gcloud.json("projects", "describe", self.project) or {}

    def enabled_apis(self) -> set[str]:
        services = self.gcloud.json("services", "list", "--enabled", f"--project={self.project}") or []
        return {s.get("config", {}).get("name") or s.get("name", "").rsplit("/", 1)[-1] for s in services}

    def api_off(self, api: str) -> bool:
        """True only when the API is known to be disabled (False when it is on or we cannot tell)."""
        try:
            return api not in self.enabled_apis()
        except GcloudError:
            return False

    @cached_property
    def tfvars(self) -> dict[str, str]:
        var_file = self.target.var_file(self.terraform_dir)
        return read_tfvars(self.terraform_dir / var_file) if var_file else {}

    def tfvar(self, name: str, default: str) -> str:
        return self.tfvars.get(name, default)

    @cached_property
    def terraform(self) -> str:
        """All of infra/terraform/*.tf, for the few checks that depend on what this checkout deploys."""
        return terraform_text(self.terraform_dir)


Check = Callable[[Context], Result]
