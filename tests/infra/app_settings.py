"""What each deployable reads from its environment, found by parsing its settings module.

A variable counts as read when the settings module, or a ``X.from_env``
constructor it calls (AuthConfig, GcpConfig, UploadLimits, SigningConfig,
...), passes its name to one of chatcore.config's readers (env_str, env_int,
env_float, env_bool, env_list, env_choice). Parsing instead of listing keeps
the infrastructure checks in step with the settings as they change.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path

READERS = frozenset({"env_str", "env_int", "env_float", "env_bool", "env_list", "env_choice"})

# Deployable -> its one settings module (see each deployable's README section).
SETTINGS_MODULES = {
    "socket_service": "socket_service.settings",
    "upload": "uploads.settings",
    "ai_stream": "aistream.settings",
}


@dataclass(frozen=True)
class EnvRead:
    name: str
    reader: str
    module: str
    choices: tuple[str, ...] | None  # env_choice's allowed values


def _source(module_name: str) -> tuple[Path, ast.Module]:
    spec = importlib.util.find_spec(module_name)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(module_name)
    path = Path(spec.origin)
    return path, ast.parse(path.read_text(), filename=str(path))


def _imports(tree: ast.Module, module_name: str) -> dict[str, str]:
    """Local name -> module it was imported from (``from x import Y`` only)."""
    names = {}
    package = module_name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                names[alias.asname or alias.name] = base
    return names


def _choices(node: ast.expr, module_name: str) -> tuple[str, ...] | None:
    try:
        return tuple(ast.literal_eval(node))
    except ValueError:
        pass
    if isinstance(node, ast.Name):
        value = getattr(importlib.import_module(module_name), node.id, None)
        if isinstance(value, tuple | list):
            return tuple(value)
    return None


def _names(arg: ast.expr, scope: ast.AST) -> list[str]:
    """The variable name(s) a reader is given: a literal, or a local assigned literals
    (``name = "CHAT_PORT" if ... else "PORT"``)."""
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return [arg.value]
    if isinstance(arg, ast.Name):
        values = [node.value for node in ast.walk(scope) if isinstance(node, ast.Assign)
                  and any(isinstance(t, ast.Name) and t.id == arg.id for t in node.targets)]
        names = []
        for value in values:
            branches = [value.body, value.orelse] if isinstance(value, ast.IfExp) else [value]
            names.extend(b.value for b in branches if isinstance(b, ast.Constant) and isinstance(b.value, str))
        if names:
            return names
    raise ValueError(f"cannot tell which variable line {arg.lineno} reads: teach tests/infra/app_settings.py")


def _reads_in(node: ast.AST, module_name: str, imports: dict[str, str], seen: set) -> list[EnvRead]:
    reads = []
    for call in ast.walk(node):
        if not isinstance(call, ast.Call):
            continue
        func = call.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name in READERS and len(call.args) >= 2:
            choices = _choices(call.args[3], module_name) if name == "env_choice" and len(call.args) > 3 else None
            for variable in _names(call.args[1], node):
                reads.append(EnvRead(variable, name, module_name, choices))
        elif (name == "from_env" and isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
              and func.value.id != "cls"):
            owner = func.value.id
            reads.extend(_class_reads(imports.get(owner, module_name), owner, seen))
    return reads


def _class_reads(module_name: str, class_name: str, seen: set) -> list[EnvRead]:
    if (module_name, class_name) in seen:
        return []
    seen.add((module_name, class_name))
    _, tree = _source(module_name)
    imports = _imports(tree, module_name)
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "from_env":
                    return _reads_in(item, module_name, imports, seen)
    raise LookupError(f"{module_name}.{class_name}.from_env not found")


@cache
def env_reads(deployable: str) -> tuple[EnvRead, ...]:
    """Every environment variable the deployable's settings read (settings.py and the from_env it calls)."""
    return tuple(_class_reads(SETTINGS_MODULES[deployable], "Settings", set()))


def env_names(deployable: str) -> set[str]:
    return {read.name for read in env_reads(deployable)}


def env_choices(deployable: str) -> dict[str, tuple[str, ...]]:
    return {read.name: read.choices for read in env_reads(deployable) if read.choices is not None}
