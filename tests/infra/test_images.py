"""The socket service's container image (checked statically: no Docker engine here) and what
each deployable ships: everything its code imports comes from its own pinned requirements."""

from __future__ import annotations

import ast
import fnmatch
import importlib.metadata
import importlib.util
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from functools import cache
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from deploy import packaging

from .hcl_model import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            joined.append(current)
            current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in joined]


def _copy_sources(args: str) -> list[str]:
    """Sources of a COPY from the build context (COPY --from=<stage> copies from a build stage)."""
    words = shlex.split(args)
    if any(w.startswith("--from=") for w in words):
        return []
    return [w for w in words[:-1] if not w.startswith("--")]


def test_images_are_pinned_by_tag_and_the_service_runs_on_slim_python_311():
    froms = [args.split()[0] for op, args in instructions() if op == "FROM"]
    for image in froms:
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", image), f"{image} is not pinned"
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", froms[-1]), froms[-1]


def _ui_vendor_stage() -> tuple[list[str], list[str]]:
    """The ui-vendor build stage: what it copies from the context, and its RUN commands."""
    stage: list[tuple[str, str]] = []
    for op, args in instructions():
        if op == "FROM":
            if stage:
                break
            if args.split()[-1] == "ui-vendor":
                stage.append((op, args))
        elif stage:
            stage.append((op, args))
    copies = [s for op, args in stage if op == "COPY" for s in _copy_sources(args)]
    return copies, [args for op, args in stage if op == "RUN"]


def test_the_image_build_stage_vendors_every_library_the_page_loads(tmp_path):
    """The chat UI's vendor files are not committed: the image's ui-vendor stage builds them from
    package-lock.json. Its commands, run here against the installed node_modules (npm ci done),
    must produce every /ui/vendor/ file index.html loads, as `make ui` does."""
    copies, runs = _ui_vendor_stage()
    assert "package-lock.json" in copies and any("npm ci" in r for r in runs)
    for source in copies:
        (tmp_path / Path(source).name).write_bytes((ROOT / source).read_bytes())
    (tmp_path / "node_modules").symlink_to(ROOT / "node_modules")
    for run in runs:
        for command in run.split("&&"):
            if "npm ci" not in command:
                subprocess.run(command, shell=True, cwd=tmp_path, check=True)
    page = (ROOT / "socket_service/ui/index.html").read_text()
    wanted = set(re.findall(r'"/ui/vendor/([^"]+)"', page))
    assert wanted and wanted <= {p.name for p in (tmp_path / "vendor").iterdir()}
    assert any(op == "COPY" and "--from=ui-vendor" in args
               and args.split()[-1].rstrip("/").endswith("socket_service/ui/vendor")
               for op, args in instructions())


def test_runs_as_a_non_root_user():
    users = [args.strip() for op, args in instructions() if op == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # USER comes after every RUN (which may need root) and before CMD.
    order = [op for op, _ in instructions()]
    assert order.index("USER") > max(i for i, op in enumerate(order) if op == "RUN")
    assert order.index("USER") < order.index("CMD")


def test_installs_the_pinned_requirements_with_constraints():
    ops = instructions()
    sources = {src for op, args in ops if op == "COPY" for src in _copy_sources(args)}
    assert {"socket_service/requirements.txt", "constraints.txt"} <= sources
    runs = " ".join(args for op, args in ops if op == "RUN")
    assert re.search(r"pip install .*-r /tmp/requirements\.txt -c /tmp/constraints\.txt", runs)
    for line in (ROOT / "socket_service" / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert "==" in line, f"socket_service/requirements.txt: {line} is not pinned"


def test_copies_the_code_and_runs_the_service():
    ops = instructions()
    copied = {src.rstrip("/") for op, args in ops if op == "COPY" for src in _copy_sources(args)}
    assert {"chatcore", "socket_service"} <= copied
    cmd = [args for op, args in ops if op == "CMD"][-1]
    assert ast.literal_eval(cmd) == ["python", "-m", "socket_service"]
    env = " ".join(args for op, args in ops if op == "ENV")
    assert "CHAT_ENV=production" in env  # so CHAT_HOST defaults to 0.0.0.0 and dev tokens stay off
    assert "CHAT_PORT" not in env, "CHAT_PORT would override the PORT Cloud Run sets"


def test_the_image_installs_the_bus_library_from_its_wheel():
    """A builder stage makes the wheel from packages/socketio-pubsub-gcp; the service's stage installs that wheel."""
    ops = instructions()
    stages = [i for i, (op, _) in enumerate(ops) if op == "FROM"]
    final = ops[stages[-1]:]
    builder = [args.split()[-1] for op, args in ops if op == "FROM" and " AS " in args.upper()]
    assert "bus-wheel" in builder
    runs = " ".join(args for op, args in ops[:stages[-1]] if op == "RUN")
    assert re.search(r"pip wheel .*--no-deps --wheel-dir /wheels /build/socketio-pubsub-gcp", runs)
    assert any(op == "COPY" and _copy_sources(args) == [f"{packaging.BUS_PACKAGE.as_posix()}/"]
               for op, args in ops[:stages[-1]])
    final_runs = " ".join(args for op, args in final if op == "RUN")
    assert f"/tmp/wheels/{packaging.bus_wheel_name()}" in final_runs
    assert any(op == "COPY" and "--from=bus-wheel" in args for op, args in final)
    assert not any(src.startswith("packages/") for op, args in final if op == "COPY" for src in _copy_sources(args)), \
        "the service's stage gets the library only as the wheel"


def _wheel_files(wheel: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(wheel) as z:
        return {n: z.read(n) for n in z.namelist() if not n.split("/")[0].endswith(".dist-info")}


def _wheel_metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(z.read(name).decode())


@pytest.fixture(scope="module")
def bus_wheel() -> Path:
    return packaging.bus_wheel()


def test_the_wheel_is_built_from_the_current_source_and_is_what_the_venv_runs(bus_wheel):
    """What ships (the wheel in dist/) is the library's source, and the tests run that wheel, not the source tree."""
    source = ROOT / packaging.BUS_PACKAGE / "src"
    files = _wheel_files(bus_wheel)
    expected = {p.relative_to(source).as_posix(): p.read_bytes() for p in source.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p)}
    assert files == expected
    installed = importlib.metadata.distribution("socketio-pubsub-gcp")
    assert installed.version == _wheel_metadata(bus_wheel)["Version"]
    assert not (installed.read_text("direct_url.json") or "").count('"editable": true'), "installed editable"
    import socketio_pubsub_gcp
    origin = Path(socketio_pubsub_gcp.__file__).resolve()
    assert "site-packages" in origin.parts, f"tests import the library from {origin}, not from the installed wheel"
    assert origin.read_bytes() == files["socketio_pubsub_gcp/__init__.py"]


def test_each_function_ships_the_wheel_and_lists_it(tmp_path, bus_wheel):
    staged = packaging.stage_functions(out=tmp_path, wheel=bus_wheel)
    for name, folder in staged.items():
        assert (folder / bus_wheel.name).read_bytes() == bus_wheel.read_bytes(), name
        lines = [line.strip() for line in (folder / "requirements.txt").read_text().splitlines()]
        assert f"./{bus_wheel.name}" in lines, name
        assert not (folder / "socketio_pubsub_gcp").exists(), "the library ships as its wheel, not as source"


def test_the_library_declares_what_it_imports():
    package = ROOT / packaging.BUS_PACKAGE
    with (package / "pyproject.toml").open("rb") as f:
        declared = tomllib.load(f)["project"]["dependencies"]
    closure = _closure_of(declared)
    missing = {m: sorted(_provided_by(m)) for m in _third_party_imports([package / "src"], {"socketio_pubsub_gcp"})
               if not _is_namespace(m) and not _provided_by(m) & closure}
    assert missing == {}, "the library imports modules its pyproject.toml does not declare"


def test_the_library_ranges_hold_the_pinned_versions():
    with (ROOT / packaging.BUS_PACKAGE / "pyproject.toml").open("rb") as f:
        declared = [Requirement(r) for r in tomllib.load(f)["project"]["dependencies"]]
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    for req in declared:
        assert req.specifier.contains(pins[re.sub(r"[-_.]+", "-", req.name).lower()]), (req, pins.get(req.name))


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies():
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for pattern in patterns:
            negate = pattern.startswith("!")
            pattern = pattern.lstrip("!").rstrip("/")
            candidates = [pattern, pattern.removeprefix("**/")]
            parts = path.split("/")
            prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
            if any(fnmatch.fnmatch(p, c) or fnmatch.fnmatch(parts[-1], c) for p in prefixes for c in candidates):
                keep = negate
        return keep

    for op, args in instructions():
        if op == "COPY":
            for source in _copy_sources(args):
                assert included(source.rstrip("/") + ("/__init__.py" if source.endswith("/") else "")), source
    for secret_or_bulk in (".venv/bin/python", ".git/config", "tests/conftest.py", ".devstack/logs/x",
                           "chatcore/__pycache__/x.pyc", "infra/terraform/main.tf", "node_modules/x/y.js",
                           "socket_service/ui/vendor/socket.io.min.js",
                           "packages/socketio-pubsub-gcp/dist/socketio_pubsub_gcp-0.1.0-py3-none-any.whl",
                           "packages/socketio-pubsub-gcp/tests/test_publisher.py"):
        assert not included(secret_or_bulk), secret_or_bulk


def test_python_versions_agree(tf):
    """The image, every function's runtime and pyproject all mean Python 3.11."""
    base = [args for op, args in instructions() if op == "FROM"][-1]
    assert base.startswith("python:3.11.")
    with (ROOT / "pyproject.toml").open("rb") as f:
        assert tomllib.load(f)["project"]["requires-python"] == ">=3.11"
    runtimes = {(name, key): body["build_config"][0]["runtime"]
                for name in tf.resources_of("google_cloudfunctions2_function")
                for key, body in tf.instances("google_cloudfunctions2_function", name).items()}
    assert runtimes and set(runtimes.values()) == {"python311"}, runtimes


# -- what each deployable imports is in its requirements ---------------------
def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _third_party_imports(roots: list[Path], first_party: set[str]) -> set[str]:
    """Top-level third-party modules imported by these source trees (every import, lazy ones too)."""
    found = set()
    for root in roots:
        for path in root.rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            for name in _imports(path):
                top = name.split(".")[0]
                if top in first_party or top in sys.stdlib_module_names or top == "__future__":
                    continue
                found.add(name)
    return found


def _closure(requirements: Path) -> set[str]:
    """Normalized names of the distributions the pinned requirements install, with their dependencies.

    A line that is a wheel's path (the bus library in a staged function) stands for the wheel's distribution."""
    lines = []
    for line in requirements.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.endswith(".whl"):
            lines.append(_wheel_metadata(requirements.parent / line)["Name"])
        elif line:
            lines.append(line)
    return _closure_of(lines)


def _closure_of(lines: list[str]) -> set[str]:
    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    todo, seen = [], set()
    for line in lines:
        req = Requirement(line)
        todo.append((req.name, frozenset(req.extras)))
    while todo:
        name, extras = todo.pop()
        if (norm(name), extras) in seen:
            continue
        seen.add((norm(name), extras))
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                todo.append((req.name, frozenset(req.extras)))
    return {name for name, _ in seen}


@cache
def _file_owners() -> dict[str, str]:
    """Installed file (relative to site-packages) -> normalized name of the distribution that installed it."""
    owners = {}
    for dist in importlib.metadata.distributions():
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower()
        for file in dist.files or []:
            owners[str(file)] = name
    return owners


@cache
def _provided_by(module: str) -> set[str]:
    """The distribution that installed the module (its longest importable prefix that is a file)."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        try:
            spec = importlib.util.find_spec(".".join(parts[:i]))
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
            continue  # not a module, or a namespace package (google, google.cloud)
        path = Path(spec.origin)
        for parent in path.parents:
            if parent.name == "site-packages":
                owner = _file_owners().get(str(path.relative_to(parent)))
                return {owner} if owner else set()
        return set()
    return set()


def _is_namespace(module: str) -> bool:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return False
    return spec is not None and spec.origin is None and spec.submodule_search_locations is not None


DEPLOYABLES = ["socket_service", *(f"functions/{name}" for name in packaging.function_sources())]


@pytest.fixture(scope="module")
def staged_functions(tmp_path_factory, bus_wheel) -> dict[str, Path]:
    return packaging.stage_functions(out=tmp_path_factory.mktemp("functions"), wheel=bus_wheel)


@pytest.mark.parametrize("deployable", DEPLOYABLES)
def test_deployable_imports_are_in_its_requirements(deployable, staged_functions, bus_wheel):
    """What each deployable imports (its code and chatcore) is installed by what it ships: the staged
    requirements.txt of a function (the bus library's wheel among them), the image's requirements and wheel."""
    if deployable == "socket_service":
        roots = [ROOT / "socket_service", ROOT / "chatcore"]
        shipped = [Requirement(line.split("#")[0].strip()).name
                   for line in (ROOT / "socket_service" / "requirements.txt").read_text().splitlines()
                   if line.split("#")[0].strip()] + [_wheel_metadata(bus_wheel)["Name"]]
        closure = _closure_of(shipped)
    else:
        folder = staged_functions[deployable.removeprefix("functions/")]
        roots = [folder]
        closure = _closure(folder / "requirements.txt")
    first_party = {"chatcore", "socket_service"} | {p.name for r in roots for p in r.iterdir() if p.is_dir()} | {
        p.stem for r in roots for p in r.glob("*.py")}
    missing = {m: sorted(_provided_by(m)) for m in _third_party_imports(roots, first_party)
               if not _is_namespace(m) and not _provided_by(m) & closure}
    assert missing == {}, f"{deployable} imports modules that what it ships does not install"
