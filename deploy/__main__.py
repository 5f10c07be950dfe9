"""``python -m deploy package|plan|apply|destroy|doctor`` (see docs/DEPLOY.md).

doctor checks, read-only, what can be known before an apply (credentials, project, APIs, org
policies, region, Firestore, roles); it exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import os
import sys

from .doctor import DEFAULT_TIMEOUT, doctor
from .runner import CommandFailed, Runner
from .settings import ENVIRONMENTS, ROOT, Target
from .workflow import DeployError, Deployment, Options, package_functions


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m deploy", description=__doc__)
    parser.add_argument("command", choices=("package", "plan", "apply", "destroy", "doctor"))
    parser.add_argument("--project", default=os.environ.get("GOOGLE_CLOUD_PROJECT", ""),
                        help="Google Cloud project (default: $GOOGLE_CLOUD_PROJECT)")
    parser.add_argument("--region", default="us-central1")
    parser.add_argument("--environment", default="prod", choices=ENVIRONMENTS)
    parser.add_argument("--state-bucket", default="", help="Terraform state bucket (default: <project>-tfstate)")
    parser.add_argument("--image", default="",
                        help="socket-service image, ideally by digest (default: apply builds one with Cloud Build, "
                             "plan and destroy reuse the deployed one)")
    parser.add_argument("--auto-approve", action="store_true", help="do not ask before applying or destroying")
    parser.add_argument("--skip-package", action="store_true", help="function sources are staged already")
    parser.add_argument("--skip-bootstrap", action="store_true",
                        help="APIs, registry and JWT secret version exist already (CI)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                        help="doctor: seconds each gcloud call may take (default: %(default)g)")
    parser.add_argument("--verbose", action="store_true", help="doctor: print each gcloud command it runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "package":
            package_functions()
            return 0
        target = Target(project=args.project, region=args.region, environment=args.environment,
                        state_bucket=args.state_bucket)
        if args.command == "doctor":
            return doctor(target, timeout=args.timeout, verbose=args.verbose)
        deployment = Deployment(target, Runner(ROOT))
        options = Options(image=args.image, auto_approve=args.auto_approve, skip_package=args.skip_package,
                          skip_bootstrap=args.skip_bootstrap)
        getattr(deployment, args.command)(options)
    except (ValueError, DeployError, CommandFailed) as exc:
        print(f"deploy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
