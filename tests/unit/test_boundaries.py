"""The dependency rule, read from every module's imports (ast), lazy ones included.

- the shared package (chatcore) imports no deployable and no tool (socket_service,
  functions/*, devstack, deploy, bench);
- the deployables (the socket service and each function) never import one
  another, nor the tools;
- the room bus library (packages/socketio-pubsub-gcp, its tests too) imports
  neither chatcore nor any deployable or tool: the chat reaches it only
  through constructor arguments.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUS_LIBRARY = ROOT / "packages" / "socketio-pubsub-gcp"

# Each part of the tree and the top-level import names that mean it.
DEPLOYABLES = {
    "socket_service": (ROOT / "socket_service", {"socket_service"}),
    "functions/ai_stream": (ROOT / "functions" / "ai_stream", {"aistream"}),
    "functions/upload": (ROOT / "functions" / "upload", {"uploads"}),
}
TOOLS = {"devstack", "deploy", "bench", "tests"}
SHARED = "chatcore"
LIBRARY = "socketio_pubsub_gcp"


def imported(path: Path) -> set[str]:
    """Top-level names of the modules ``path`` imports absolutely (relative imports stay in their package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def sources(folder: Path) -> list[Path]:
    return [p for p in sorted(folder.rglob("*.py")) if "__pycache__" not in p.parts and ".egg-info" not in str(p)
            and "build" not in p.relative_to(folder).parts]


def violations(folder: Path, forbidden: set[str]) -> dict[str, list[str]]:
    found = {}
    for path in sources(folder):
        bad = sorted(imported(path) & forbidden)
        if bad:
            found[str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)] = bad
    return found


def deployable_names() -> set[str]:
    return set().union(*(names for _, names in DEPLOYABLES.values()))


def test_every_part_is_walked():
    assert len(sources(ROOT / SHARED)) >= 20
    assert len(sources(BUS_LIBRARY / "src")) >= 9 and len(sources(BUS_LIBRARY / "tests")) >= 4
    for name, (folder, _) in DEPLOYABLES.items():
        assert sources(folder), name
    functions = {p.parent.name for p in (ROOT / "functions").glob("*/main.py")}
    assert {f"functions/{f}" for f in functions} <= set(DEPLOYABLES), "a new function needs its import names here"


def test_the_shared_package_imports_no_deployable_and_no_tool():
    assert violations(ROOT / SHARED, deployable_names() | TOOLS) == {}


@pytest.mark.parametrize("deployable", sorted(DEPLOYABLES))
def test_deployables_never_import_one_another(deployable):
    folder, own = DEPLOYABLES[deployable]
    assert violations(folder, (deployable_names() - own) | TOOLS) == {}


def test_the_bus_library_imports_neither_the_chat_nor_a_deployable():
    forbidden = {SHARED} | deployable_names() | TOOLS
    assert violations(BUS_LIBRARY / "src", forbidden) == {}
    assert violations(BUS_LIBRARY / "tests", forbidden) == {}


def test_a_forbidden_import_is_caught_lazy_or_not(tmp_path):
    (tmp_path / "a.py").write_text("import os\n\ndef f():\n    from chatcore.store.conversations import conversations\n")
    (tmp_path / "b.py").write_text("from . import sibling\nimport socket_service.app as app\n")
    assert violations(tmp_path, {SHARED, "socket_service"}) == {str(tmp_path / "a.py"): ["chatcore"],
                                                                 str(tmp_path / "b.py"): ["socket_service"]}
