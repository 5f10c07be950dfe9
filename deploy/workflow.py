"""plan, apply and destroy: the order of the commands (docs/DEPLOY.md explains each step)."""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass

from . import commands
from .packaging import stage_functions
from .runner import CommandFailed, Runner
from .settings import IMAGE_BUILD_CONFIG, IMAGE_BUILD_RETRY_SECONDS, PLACEHOLDER_IMAGE, Target

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
# Outputs printed after apply, in this order.
SUMMARY_OUTPUTS = ("chat_url", "upload_url", "uploads_bucket", "image")
# Output naming the gen2 functions' Cloud Run services whose invoker IAM check the helper turns off
# after each apply (var.public_access = "invoker_iam_disabled"; Terraform has no argument for it).
INVOKER_OUTPUT = "invoker_check_disabled_services"


class DeployError(Exception):
    """Something the user must fix; the message says what."""


@dataclass(frozen=True)
class Options:
    image: str = ""  # empty: apply builds one, plan and destroy reuse the deployed one
    auto_approve: bool = False
    skip_package: bool = False  # cloudbuild.yaml packages in its own step
    skip_bootstrap: bool = False  # APIs, registry and secret already exist (CI)


def package_functions(say=print) -> None:
    for name, folder in stage_functions().items():
        say(f"staged function {name} with chatcore in {folder}")


class Deployment:
    def __init__(self, target: Target, runner: Runner, *, say=print):
        self.target = target
        self.runner = runner
        self.say = say

    # -- steps -----------------------------------------------------------
    def package(self) -> None:
        package_functions(self.say)

    def init(self) -> None:
        self.runner.run(commands.tf_init(self.target))

    def bootstrap(self, auto_approve: bool) -> None:
        self.runner.run(commands.tf_bootstrap(self.target, PLACEHOLDER_IMAGE, auto_approve))
        self.ensure_jwt_secret()

    def ensure_jwt_secret(self) -> None:
        """Give the JWT secret a random first version if it has none (Cloud Run needs one to start)."""
        if self.runner.output(commands.secret_versions(self.target)):
            return
        self.say("the JWT secret has no version yet: adding a random one (read it with "
                 "`gcloud secrets versions access latest --secret=...`)")
        self.runner.run(commands.secret_add_version(self.target), stdin=secrets.token_urlsafe(48))

    def build_image(self, *, just_bootstrapped: bool = False) -> str:
        """Build and push the socket service's image; returns it by digest.

        Right after a bootstrap the build account's grants may still be propagating (typically 2
        minutes, sometimes 7 or more): a failed build is then retried once, after a wait."""
        try:
            tag = self.runner.output(commands.git_short_sha())
        except CommandFailed:
            tag = ""
        tag = tag or time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        IMAGE_BUILD_CONFIG.parent.mkdir(parents=True, exist_ok=True)
        IMAGE_BUILD_CONFIG.write_text(json.dumps(commands.image_build_config(self.target, tag), indent=2) + "\n")
        argv = commands.build_image(self.target, tag, IMAGE_BUILD_CONFIG)
        try:
            self.runner.run(argv)
        except CommandFailed:
            if not just_bootstrapped:
                raise
            self.say(f"the image build failed right after the bootstrap: if that was a permission error, the "
                     f"build account's new IAM grants may still be propagating (typically 2 minutes); "
                     f"retrying once in {IMAGE_BUILD_RETRY_SECONDS} s (Ctrl-C to stop)")
            time.sleep(IMAGE_BUILD_RETRY_SECONDS)
            self.runner.run(argv)
        digest = self.runner.output(commands.image_digest(self.target, tag))
        if not _DIGEST.match(digest):
            raise DeployError(f"could not read the digest of {self.target.image_repository}:{tag} (got {digest!r})")
        return f"{self.target.image_repository}@{digest}"

    def deployed_image(self) -> str:
        """The image of the last apply, from the Terraform state ('' if nothing is deployed)."""
        try:
            return self.runner.output(commands.tf_output_raw("image"))
        except CommandFailed:
            return ""

    def outputs(self) -> dict:
        return json.loads(self.runner.output(commands.tf_output_json()) or "{}")

    def open_functions(self, outputs: dict) -> None:
        """Turn the invoker IAM check off on the services Terraform names, and read it back.

        Run after every apply: whether a function's redeploy keeps the setting is not documented."""
        for service in outputs.get(INVOKER_OUTPUT, {}).get("value") or []:
            self.runner.run(commands.disable_invoker_check(self.target, service))
            state = self.runner.output(commands.invoker_check_disabled(self.target, service))
            if state.lower() != "true":
                raise DeployError(
                    f"the invoker IAM check of {service} is still on (read back {state!r}): browsers get 403. "
                    "An organization policy may require it (constraints/run.managed.requireInvokerIam): ask for "
                    "an exception for this project, or set public_access = \"allUsers\" if domain-restricted "
                    "sharing does not apply (docs/DEPLOY.md, \"What can go wrong on a first deploy\")")

    def summary(self, outputs: dict | None = None) -> dict[str, str]:
        outputs = self.outputs() if outputs is None else outputs
        values = {name: outputs[name]["value"] for name in SUMMARY_OUTPUTS if name in outputs}
        for name, value in values.items():
            self.say(f"{name:<15} {value}")
        return values

    # -- commands --------------------------------------------------------
    def plan(self, options: Options) -> None:
        if not options.skip_package:
            self.package()
        self.init()
        image = options.image or self.deployed_image()
        if not image:
            raise DeployError("nothing is deployed yet, so there is no image to plan with: pass --image, "
                              "or run `python -m deploy apply`")
        self.runner.run(commands.tf_plan(self.target, image))

    def apply(self, options: Options) -> dict[str, str]:
        if not options.skip_package:
            self.package()
        self.init()
        if not options.skip_bootstrap:
            self.bootstrap(options.auto_approve)
        image = options.image or self.build_image(just_bootstrapped=not options.skip_bootstrap)
        self.runner.run(commands.tf_apply(self.target, image, options.auto_approve))
        outputs = self.outputs()
        self.open_functions(outputs)
        return self.summary(outputs)

    def destroy(self, options: Options) -> None:
        if not options.skip_package:
            self.package()  # the archive data sources read the staged folders even on destroy
        self.init()
        image = options.image or self.deployed_image() or PLACEHOLDER_IMAGE
        # Deletion protection (Cloud Run, Firestore, bucket) must be off in the
        # state before anything can be destroyed.
        self.runner.run(commands.tf_apply(self.target, image, options.auto_approve, deletion_protection="false"))
        self.runner.run(commands.tf_destroy(self.target, image, options.auto_approve))
