"""Stages each function's source with the shared package next to its main.py.

Cloud Functions builds a function from one folder; our functions import
``chatcore``, which lives at the repository root. Staging copies
``functions/<name>/`` and ``chatcore/`` into
``infra/terraform/.build/functions/<name>/`` (no caches, no tests), which
Terraform zips and uploads (infra/terraform/functions.tf).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .settings import FUNCTION_BUILD_DIR, ROOT

SHARED_PACKAGE = "chatcore"
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "tests", ".pytest_cache")


def function_sources(root: Path = ROOT) -> dict[str, Path]:
    """``{name: folder}`` of every function: a folder of functions/ with a main.py."""
    return {d.name: d for d in sorted((root / "functions").iterdir()) if (d / "main.py").is_file()}


def stage_functions(root: Path = ROOT, out: Path = FUNCTION_BUILD_DIR) -> dict[str, Path]:
    """Stage every function; returns ``{name: staged folder}``. Idempotent."""
    staged = {}
    for name, source in function_sources(root).items():
        if not (source / "requirements.txt").is_file():
            raise FileNotFoundError(f"{source}/requirements.txt is missing: Cloud Functions needs it")
        target = out / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target, ignore=_IGNORE)
        if (target / SHARED_PACKAGE).exists():
            raise FileExistsError(f"{source} has its own {SHARED_PACKAGE}/; it would shadow the shared one")
        shutil.copytree(root / SHARED_PACKAGE, target / SHARED_PACKAGE, ignore=_IGNORE)
        staged[name] = target
    return staged
