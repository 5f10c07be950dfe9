"""``python -m deploy doctor``: what can be known before ``terraform apply``, read-only.

Runs every check of deploy/checks (REGISTRY) and prints one line per check:

    ok       billing                          billing is enabled
    fail     APIs                             serviceusage not enabled; ... -> gcloud services enable ...

status (ok, warn, fail, unknown), what was found, and after "->" what to do.
A check that crashes or whose gcloud call fails becomes "unknown" with the
reason; it never hides the others. The exit code is 1 if any check failed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import replace

from .checks import REGISTRY
from .checks.base import DEFAULT_TIMEOUT, Check, Context, GcloudError, ReadOnlyGcloud, Result, Status
from .settings import ROOT, Target

NAME_WIDTH = 32


def run_check(check: Check, ctx: Context) -> Result:
    """One check, whatever happens inside it."""
    name = getattr(check, "title", check.__name__)
    try:
        return replace(check(ctx), name=name)
    except GcloudError as exc:
        return Result(name, Status.UNKNOWN, f"gcloud could not tell: {exc}")
    except Exception as exc:  # a bug or an unexpected answer: report it, run the next check
        return Result(name, Status.UNKNOWN, f"the check itself failed: {type(exc).__name__}: {exc}")


def format_result(result: Result) -> str:
    """One line, whatever the texts contain (newlines and runs of spaces become one space)."""
    found, action = (" ".join(text.split()) for text in (result.found, result.action))
    return f"{result.status.value:<8} {result.name:<{NAME_WIDTH}} {found}" + (f" -> {action}" if action else "")


def run_doctor(ctx: Context, checks: Iterable[Check] = REGISTRY, *,
               say: Callable[[str], None] = print) -> list[Result]:
    """Run every check, printing each line as soon as it is known."""
    results = []
    for check in checks:
        result = run_check(check, ctx)
        results.append(result)
        say(format_result(result))
    return results


def exit_code(results: Iterable[Result]) -> int:
    return 1 if any(r.status is Status.FAIL for r in results) else 0


def summary(results: list[Result]) -> str:
    counts = {status: sum(r.status is status for r in results) for status in Status}
    return "doctor: " + ", ".join(f"{n} {status.value}" for status, n in counts.items() if n)


def doctor(target: Target, *, timeout: float = DEFAULT_TIMEOUT, verbose: bool = False) -> int:
    """The CLI entry: gcloud commands go to stderr with --verbose, check lines to stdout."""
    echo = (lambda line: print(line, file=sys.stderr, flush=True)) if verbose else (lambda line: None)
    ctx = Context(target=target, gcloud=ReadOnlyGcloud(ROOT, timeout=timeout, echo=echo))
    results = run_doctor(ctx, say=lambda line: print(line, flush=True))
    print(summary(results), file=sys.stderr)
    return exit_code(results)
