"""A static model of the Terraform module in infra/terraform, parsed with python-hcl2.

It knows what each file declares (variables, locals, resources, data
sources, outputs, modules) and every reference each expression makes, which
is what the offline checks need: Terraform itself cannot plan here (no
providers, no cloud).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hcl2
from hcl2 import SerializationOptions

ROOT = Path(__file__).resolve().parents[2]
TERRAFORM_DIR = ROOT / "infra" / "terraform"

_OPTIONS = SerializationOptions(with_comments=False, strip_string_quotes=True)
# References that must resolve to something the module defines.
_REF = re.compile(
    r"(?<![\w.])(?:"
    r"(?P<kind>var|local|module)\.(?P<name>[A-Za-z_][\w-]*)"
    r"|data\.(?P<dtype>[a-z][a-z0-9_]*)\.(?P<dname>[A-Za-z_][\w-]*)(?P<dindex>\[[^\]]*\])?(?:\.(?P<dattr>\w+))?"
    r"|(?P<rtype>(?:google|archive)_[a-z0-9_]+|terraform_data)\.(?P<rname>[A-Za-z_][\w-]*)(?P<rindex>\[[^\]]*\])?(?:\.(?P<rattr>\w+))?"
    r")"
)


@dataclass(frozen=True)
class Ref:
    kind: str  # var, local, module, data, resource
    type: str  # resource or data source type ("" otherwise)
    name: str
    attr: str  # first attribute after the name (and index), "" if none
    file: str


@dataclass
class Block:
    kind: str  # resource, data, variable, output, module
    type: str
    name: str
    body: dict[str, Any]
    file: str


@dataclass
class Module:
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    variables: dict[str, Block] = field(default_factory=dict)
    locals: dict[str, Any] = field(default_factory=dict)
    local_files: dict[str, str] = field(default_factory=dict)
    resources: dict[tuple[str, str], Block] = field(default_factory=dict)
    data: dict[tuple[str, str], Block] = field(default_factory=dict)
    outputs: dict[str, Block] = field(default_factory=dict)
    modules: dict[str, Block] = field(default_factory=dict)
    # provider "google" { ... }: by provider name (aliased configurations are not used here).
    providers: dict[str, Block] = field(default_factory=dict)
    # moved { from = ..., to = ... }: addresses as written (without ${}), in file order.
    moved: list[tuple[str, str, str]] = field(default_factory=list)

    def resource(self, rtype: str, name: str) -> dict[str, Any]:
        return self.resources[(rtype, name)].body

    def resources_of(self, rtype: str) -> dict[str, dict[str, Any]]:
        return {name: b.body for (t, name), b in self.resources.items() if t == rtype}

    def refs(self) -> Iterator[Ref]:
        """References of every expression; a moved block's `from` names what no longer exists, so those are left out."""
        for file, content in self.files.items():
            for text in strings({kind: value for kind, value in content.items() if kind != "moved"}):
                yield from references(text, file)

    def instances(self, rtype: str, name: str) -> dict[str, dict[str, Any]]:
        """The instances of a resource whose for_each is a map literal (inline, or a local), by key, each
        body with ``each.key`` and ``each.value.<attribute>`` replaced by that entry's values (see
        :func:`expand`); a resource without for_each is its one instance, under the key ``""``, and one
        whose for_each is any other expression (a set, a for expression) stays as written, under ``"*"``.

        Two more forms are read: ``cond ? {map literal} : {}`` gives the instances that exist when
        ``cond`` holds, and an entry ``merge(local.x, {object literal})`` is that local's map with the
        literal's attributes added (see :meth:`value`)."""
        body = self.resource(rtype, name)
        if "for_each" not in body:
            return {"": body}
        entries = self.value(body["for_each"])
        conditional = re.fullmatch(r"\$\{.+? \? (\{.*\}) : \{\}\}", str(entries), re.S)
        if conditional and not conditional.group(1).startswith("{for "):
            entries = object_literal(conditional.group(1))
        if not isinstance(entries, dict):
            return {"*": body}
        return {key: expand({k: v for k, v in body.items() if k != "for_each"}, key, self.value(value))
                for key, value in entries.items() if not key.startswith("__")}

    def value(self, value: Any) -> Any:
        """``${local.x}`` as that local's value, ``${merge(local.x, {...})}`` as the local's map with the
        object literal's attributes added (later ones win, as in Terraform); anything else as it is."""
        if not isinstance(value, str):
            return value
        match = re.fullmatch(r"\$\{local\.(\w+)\}", value)
        if match:
            return self.locals[match.group(1)]
        match = re.fullmatch(r"\$\{merge\(local\.(\w+), (\{.*\})\)\}", value, re.S)
        if match and isinstance(self.locals[match.group(1)], dict) and not match.group(2).startswith("{for "):
            return {**self.locals[match.group(1)], **object_literal(match.group(2))}
        return value

    def instance(self, rtype: str, name: str, key: str) -> dict[str, Any]:
        return self.instances(rtype, name)[key]

    def all_instances(self, rtype: str) -> dict[str, dict[str, Any]]:
        """Every instance of every resource of a type (see :meth:`instances`), by address:
        ``name`` for a resource without for_each, ``name["key"]`` (or ``name[*]``) otherwise."""
        found = {}
        for name in self.resources_of(rtype):
            for key, body in self.instances(rtype, name).items():
                address = name if key == "" else f"{name}[*]" if key == "*" else f'{name}["{key}"]'
                found[address] = body
        return found


def _label(value: str) -> str:
    return value.strip('"')


def load(directory: Path = TERRAFORM_DIR) -> Module:
    module = Module()
    for path in sorted(directory.glob("*.tf")):
        with path.open() as handle:
            content = hcl2.load(handle, serialization_options=_OPTIONS)
        module.files[path.name] = content
        for entry in content.get("variable", []):
            for name, body in entry.items():
                module.variables[_label(name)] = Block("variable", "", _label(name), body, path.name)
        for entry in content.get("locals", []):
            for name, value in entry.items():
                if name.startswith("__"):
                    continue
                if name in module.locals:
                    raise ValueError(f"local.{name} is defined twice ({module.local_files[name]}, {path.name})")
                module.locals[name] = value
                module.local_files[name] = path.name
        for kind, target in (("resource", module.resources), ("data", module.data)):
            for entry in content.get(kind, []):
                for rtype, named in entry.items():
                    for name, body in named.items():
                        if name.startswith("__"):
                            continue
                        key = (_label(rtype), _label(name))
                        if key in target:
                            raise ValueError(f"{kind} {key} is defined twice")
                        target[key] = Block(kind, key[0], key[1], body, path.name)
        for entry in content.get("moved", []):
            module.moved.append((_unwrap(entry["from"]), _unwrap(entry["to"]), path.name))
        for kind, target in (("output", module.outputs), ("module", module.modules), ("provider", module.providers)):
            for entry in content.get(kind, []):
                for name, body in entry.items():
                    target[_label(name)] = Block(kind, "", _label(name), body, path.name)
    return module


def object_literal(text: str) -> dict[str, Any]:
    """An HCL object literal as python-hcl2 writes it back inside an expression (``{a = "x", b = var.y}``),
    parsed as the same bodies :func:`load` gives (``{"a": "x", "b": "${var.y}"}``)."""
    parsed = hcl2.loads(f"value = {text}\n", serialization_options=_OPTIONS)["value"]
    if not isinstance(parsed, dict):
        raise ValueError(f"not an object literal: {text}")
    return parsed


def _unwrap(expression: str) -> str:
    return expression[2:-1] if expression.startswith("${") and expression.endswith("}") else expression


_EACH = re.compile(r"(?<![\w.])each\.(?:key\b|value(?:\.(\w+))?)")


def _as_expression(value: Any) -> str:
    """A parsed value written back as an HCL expression (for substitution inside another expression)."""
    if isinstance(value, str):
        return value[2:-1] if re.fullmatch(r"\$\{.*\}", value, re.S) and value.count("${") == 1 else \
            '"' + value.replace('"', '\\"') + '"'
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _attribute(entry: Any, name: str) -> Any:
    """``each.value.<name>``: the entry's attribute, or for an entry that is a reference (a map of
    resources, ``{socket = google_service_account.socket}``) the reference to that attribute."""
    if isinstance(entry, str) and re.fullmatch(r"\$\{[\w.\[\]\"]+\}", entry):
        return f"{entry[:-1]}.{name}}}"
    return entry[name]


def expand(value: Any, key: str, entry: Any) -> Any:
    """``value`` (a parsed body) as the for_each instance ``key`` whose ``each.value`` is ``entry``.

    A string that is exactly ``${each.value.x}`` becomes the entry's value itself (a string, a number,
    None, a map...); inside a longer expression ``each.value.x`` becomes that value as an expression and
    ``each.key`` the quoted key, so ``${data.archive_file.f[each.key].output_md5}`` reads
    ``${data.archive_file.f["upload"].output_md5}``.
    """
    if isinstance(value, dict):
        return {k: v if k.startswith("__") else expand(v, key, entry) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(item, key, entry) for item in value]
    if not isinstance(value, str) or "each." not in value:
        return value
    whole = re.fullmatch(r"\$\{each\.(key|value(?:\.(\w+))?)\}", value)
    if whole:
        if whole.group(1) == "key":
            return key
        return _attribute(entry, whole.group(2)) if whole.group(2) else entry

    def replace(match: re.Match) -> str:
        if match.group(0) == "each.key":
            return f'"{key}"'
        return _as_expression(_attribute(entry, match.group(1)) if match.group(1) else entry)

    parts, last = [], 0
    for expression in interpolations(value):
        start = value.index("${" + expression, last)
        parts.append(value[last:start])
        inner = _EACH.sub(replace, expression)
        literal_string = re.fullmatch(r'"([^"\\$]*)"', inner)
        parts.append(literal_string.group(1) if literal_string else "${" + inner + "}")
        last = start + len(expression) + 3
    parts.append(value[last:])
    return "".join(parts)


def strings(value: Any) -> Iterator[str]:
    """Every string in a parsed body (skipping hcl2's own __markers__)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            if not (isinstance(key, str) and key.startswith("__")):
                yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


def interpolations(text: str) -> Iterator[str]:
    """The ``${...}`` expressions of a string, with nested braces balanced."""
    start = text.find("${")
    while start != -1:
        depth, i = 0, start + 1
        while i < len(text):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        yield text[start + 2:i]
        start = text.find("${", i)


def references(text: str, file: str = "") -> Iterator[Ref]:
    for expression in interpolations(text):
        for match in _REF.finditer(expression):
            if match.group("kind"):
                yield Ref(match.group("kind"), "", match.group("name"), "", file)
            elif match.group("dtype"):
                yield Ref("data", match.group("dtype"), match.group("dname"), match.group("dattr") or "", file)
            else:
                yield Ref("resource", match.group("rtype"), match.group("rname"), match.group("rattr") or "", file)


def literal(value: Any) -> Any:
    """A plain value, or None when it is an expression (``${...}``)."""
    if isinstance(value, str) and "${" in value:
        return None
    return value


def first(body: dict[str, Any], *path: str) -> Any:
    """Walk nested blocks (lists of one dict each), e.g. first(body, "template", "containers")."""
    value: Any = body
    for key in path:
        value = value[key]
        if isinstance(value, list) and value and isinstance(value[0], dict):
            value = value[0]
    return value


def dynamic_blocks(body: dict[str, Any], block: str) -> list[dict[str, Any]]:
    return [entry[block] for entry in body.get("dynamic", []) if block in entry]


def map_keys(value: Any) -> set[str]:
    """Keys of a local that is a map literal, or of the map literals inside an expression string."""
    if isinstance(value, dict):
        return {k for k in value if not k.startswith("__")}
    if isinstance(value, str):
        return set(re.findall(r"\b([A-Z][A-Z0-9_]*)\s*=", value))
    return set()
