"""Stages each function's source with the shared package next to its main.py and the bus library's wheel.

Cloud Functions builds a function from one folder; our functions import
``chatcore``, which lives at the repository root, and ``socketio_pubsub_gcp``,
the room bus library (packages/socketio-pubsub-gcp), which ships as a wheel.
Staging copies ``functions/<name>/`` and ``chatcore/`` into
``infra/terraform/.build/functions/<name>/`` (no caches, no tests), puts the
library's wheel next to them and adds it to the staged ``requirements.txt``,
so Cloud Functions' build installs it with the pinned requirements. Terraform
zips and uploads each folder (infra/terraform/functions.tf).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from .settings import FUNCTION_BUILD_DIR, ROOT

SHARED_PACKAGE = "chatcore"
BUS_PACKAGE = Path("packages") / "socketio-pubsub-gcp"
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "tests", ".pytest_cache")


def function_sources(root: Path = ROOT) -> dict[str, Path]:
    """``{name: folder}`` of every function: a folder of functions/ with a main.py."""
    return {d.name: d for d in sorted((root / "functions").iterdir()) if (d / "main.py").is_file()}


def bus_wheel_name(root: Path = ROOT) -> str:
    """The file name of the bus library's wheel, from its pyproject.toml."""
    with (root / BUS_PACKAGE / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    return f"{project['name'].replace('-', '_')}-{project['version']}-py3-none-any.whl"


def bus_wheel(root: Path = ROOT) -> Path:
    """The bus library's wheel in its dist/, as ``make test`` built it; built now if missing or older than its sources.

    Cloud Build's package step runs after the test step in the same workspace,
    so it ships the wheel that was tested.
    """
    package = root / BUS_PACKAGE
    wheel = package / "dist" / bus_wheel_name(root)
    sources = [package / "pyproject.toml", package / "README.md", *(package / "src").rglob("*.py")]
    if not wheel.is_file() or wheel.stat().st_mtime < max(p.stat().st_mtime for p in sources):
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir",
                        str(package / "dist"), str(package)], check=True)
        shutil.rmtree(package / "build", ignore_errors=True)
    return wheel


def stage_functions(root: Path = ROOT, out: Path = FUNCTION_BUILD_DIR, wheel: Path | None = None) -> dict[str, Path]:
    """Stage every function; returns ``{name: staged folder}``. Idempotent.

    ``wheel``: the bus library's wheel to ship (default: ``bus_wheel(root)``).
    """
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
        wheel = wheel or bus_wheel(root)
        shutil.copy2(wheel, target / wheel.name)
        with (target / "requirements.txt").open("a") as f:
            # pip reads a path in a requirements file from the folder it runs in: the function's source.
            f.write(f"# The room bus library, built from {BUS_PACKAGE.as_posix()} (deploy/packaging.py).\n"
                    f"./{wheel.name}\n")
        staged[name] = target
    return staged
