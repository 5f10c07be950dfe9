"""The google and google-beta provider schemas, read from the prebuilt CDKTF bindings on npm, and a
checker of parsed Terraform blocks against them.

Terraform cannot validate here (no provider download), but the bindings published for one provider
version carry its whole schema: ``@cdktf/provider-google@16.12.1`` and
``@cdktf/provider-google-beta@16.12.1`` are generated from provider 6.50.0 (``npm view <package>
cdktf.provider``), pinned as devDependencies in package.json and installed by ``npm ci`` (``make
prereqs``). Each package's ``.jsii`` assembly (JSON) describes, per resource and data source:

- a class whose docs summary links the registry page,
  ``{@link https://registry.terraform.io/providers/hashicorp/google/6.50.0/docs/resources/pubsub_topic
  google_pubsub_topic}``: the Terraform type name (``resources`` or ``data-sources``), and the
  provider version;
- the ``config`` struct of its constructor: one property per argument or nested block. A
  property's docs link ``...#<terraform_name>``, the argument's own name (it is not always the
  snake_case of the camelCase property: ``buildAttribute`` is ``build``, ``detectMd5Hash`` is
  ``detect_md5hash``); a property without ``optional`` is required;
- a nested block is a property typed by another struct (its docs summary says "<name> block."),
  directly when the block may appear once (max_items 1), in a list otherwise.

What the bindings cannot say: a nested block's max_items beyond one (a list block is only known to
allow several), min_items beyond one, and conflicts between arguments (exactly_one_of and the
like). Required arguments and required blocks (min_items >= 1) are known exactly.

Parsing a 100 MB assembly takes about a second and 500 MB: the schema is reduced once to a compact
JSON cached under node_modules/.cache/provider-schema/ (keyed by the installed package and this
module's code; about 5 MB for both providers, read in 20 ms), and kept in memory for the session.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .hcl_model import ROOT

NODE_MODULES = ROOT / "node_modules"
CACHE_DIR = NODE_MODULES / ".cache" / "provider-schema"
# Terraform provider name -> npm package of its bindings.
PACKAGES = {"google": "@cdktf/provider-google", "google-beta": "@cdktf/provider-google-beta"}

_LINK = re.compile(r"\{@link https://registry\.terraform\.io/providers/hashicorp/(?P<provider>[\w-]+)/"
                   r"(?P<version>[\d.]+)/docs(?:/(?P<kind>resources|data-sources)/(?P<page>\w+))?"
                   r"(?:#(?P<anchor>\w+))? (?P<text>[^}\s]+)\}")
_BASES = {"cdktf.TerraformResource": "resource", "cdktf.TerraformDataSource": "data",
          "cdktf.TerraformProvider": "provider"}


# -- the schema ------------------------------------------------------------------------------
@dataclass
class Schema:
    """One provider's schema: per resource type, data source type and the provider block, the
    config struct; per struct, its arguments and nested blocks."""

    provider: str
    version: str
    resources: dict[str, str] = field(default_factory=dict)  # terraform type -> struct id
    data: dict[str, str] = field(default_factory=dict)
    provider_config: str = ""
    # struct id -> {"arguments": {name: required}, "blocks": {name: [struct id, required, single]}}
    structs: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Properties whose Terraform name was not in their docs (named by snake_case instead).
    guessed: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return self.__dict__

    @classmethod
    def from_json(cls, raw: dict) -> Schema:
        return cls(**raw)


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _struct_refs(jtype: dict, types: dict, in_list: bool = False):
    """(struct fqn, inside a collection?) of a jsii type reference: a property typed by a struct,
    a list or set of them, or a union of those with cdktf.IResolvable."""
    if "fqn" in jtype:
        target = types.get(jtype["fqn"])
        if target is not None and target.get("datatype"):
            yield jtype["fqn"], in_list
    elif "collection" in jtype:
        yield from _struct_refs(jtype["collection"]["elementtype"], types, True)
    elif "union" in jtype:
        for member in jtype["union"]["types"]:
            yield from _struct_refs(member, types, in_list)


def _terraform_name(prop: dict) -> str | None:
    docs = prop.get("docs", {})
    anchors = [m.group("anchor") for m in _LINK.finditer(f"{docs.get('summary', '')} {docs.get('remarks', '')}")
               if m.group("anchor")]
    return anchors[-1] if anchors else None


def extract(assembly: dict, provider: str) -> Schema:
    """The compact schema of one provider's jsii assembly."""
    types = assembly["types"]
    schema = Schema(provider=provider, version="")
    for fqn, jtype in types.items():
        kind = _BASES.get(jtype.get("base", "")) if jtype.get("kind") == "class" else None
        if kind is None:
            continue
        link = _LINK.search(jtype.get("docs", {}).get("summary", ""))
        assert link and link.group("provider") == provider, f"{fqn}: no registry link naming {provider}"
        schema.version = schema.version or link.group("version")
        assert link.group("version") == schema.version, f"{fqn}: provider version {link.group('version')}"
        (config,) = [p["type"]["fqn"] for p in jtype["initializer"]["parameters"] if p["name"] == "config"]
        if kind == "provider":
            schema.provider_config = config
            continue
        assert link.group("kind") == ("resources" if kind == "resource" else "data-sources"), fqn
        # The link text is the Terraform type (google-beta's types are named google_ too); the
        # page is that name with or without its google_ prefix.
        name = link.group("text")
        assert name.startswith("google_") and link.group("page") in (name, name.removeprefix("google_")), fqn
        (schema.resources if kind == "resource" else schema.data)[name] = config

    def struct(fqn: str) -> None:
        if fqn in schema.structs:
            return
        entry = schema.structs[fqn] = {"arguments": {}, "blocks": {}}
        for prop in types[fqn].get("properties", []):
            name = _terraform_name(prop)
            if name is None:
                name = _snake(prop["name"])
                schema.guessed.append(f"{fqn}.{prop['name']}")
            required = not prop.get("optional", False)
            refs = list(_struct_refs(prop["type"], types))
            if refs:
                ((nested, in_list),) = set(refs)
                entry["blocks"][name] = [nested, required, not in_list]
                struct(nested)
            else:
                entry["arguments"][name] = required

    for config in [*schema.resources.values(), *schema.data.values(), schema.provider_config]:
        struct(config)
    return schema


def assembly_path(provider: str) -> Path:
    return NODE_MODULES / PACKAGES[provider] / ".jsii"


class BindingsMissing(RuntimeError):
    pass


@functools.cache
def load(provider: str) -> Schema:
    """The schema of ``google`` or ``google-beta``, from the cache when its assembly has not changed."""
    path = assembly_path(provider)
    if not path.exists():
        raise BindingsMissing(f"{path.relative_to(ROOT)} is missing: run `make prereqs` (npm ci installs "
                              f"{PACKAGES[provider]}, a devDependency in package.json)")
    package = json.loads((path.parent / "package.json").read_text())
    stat = path.stat()
    # The assembly as installed, and this module's own code (a change of extract() re-extracts).
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:10]
    key = f"{provider}-{package['version']}-{stat.st_size}-{int(stat.st_mtime)}-{code}"
    cached = CACHE_DIR / f"{key}.json"
    if cached.exists():
        return Schema.from_json(json.loads(cached.read_text()))
    with path.open("rb") as handle:
        schema = extract(json.load(handle), provider)
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".tmp")
    partial.write_text(json.dumps(schema.to_json(), separators=(",", ":")))
    partial.replace(cached)
    return schema


# -- the checker ---------------------------------------------------------------------------------
# Terraform's own (https://developer.hashicorp.com/terraform/language/meta-arguments).
RESOURCE_META_ARGUMENTS = {"count", "for_each", "depends_on", "provider"}
DATA_META_ARGUMENTS = {"count", "for_each", "depends_on", "provider"}
LIFECYCLE = {"arguments": {"create_before_destroy": False, "prevent_destroy": False, "ignore_changes": False,
                           "replace_triggered_by": False},
             "blocks": {"precondition": ["condition", False, False], "postcondition": ["condition", False, False]}}
DATA_LIFECYCLE = {"arguments": {}, "blocks": LIFECYCLE["blocks"]}
CONDITION = {"arguments": {"condition": True, "error_message": True}, "blocks": {}}
CONNECTION_ARGUMENTS = {"type", "host", "user", "password", "port", "timeout", "script_path", "private_key",
                        "certificate", "agent", "agent_identity", "host_key", "target_platform", "https",
                        "insecure", "use_ntlm", "cacert", "bastion_host", "bastion_host_key", "bastion_port",
                        "bastion_user", "bastion_password", "bastion_private_key", "bastion_certificate",
                        "proxy_scheme", "proxy_host", "proxy_port", "proxy_user_name", "proxy_user_password"}
PROVISIONERS = {
    "local-exec": {"arguments": {"command": True, "working_dir": False, "interpreter": False, "environment": False,
                                 "quiet": False, "when": False, "on_failure": False}, "blocks": {}},
    "remote-exec": {"arguments": {"inline": False, "script": False, "scripts": False, "when": False,
                                  "on_failure": False}, "blocks": {}},
    "file": {"arguments": {"source": False, "content": False, "destination": True, "when": False,
                           "on_failure": False}, "blocks": {}},
}
# Types no google provider defines: Terraform's built-in terraform_data, and hashicorp/archive
# 2.7.1's archive_file (versions.tf), from their documentation.
BUILTIN_RESOURCES = {
    "terraform_data": {"arguments": {"input": False, "triggers_replace": False}, "blocks": {}},
}
OTHER_DATA = {
    "archive_file": {
        "arguments": {"type": True, "output_path": True, "source_content": False, "source_content_filename": False,
                      "source_file": False, "source_dir": False, "excludes": False,
                      "exclude_symlink_directories": False, "output_file_mode": False},
        "blocks": {"source": ["archive_file.source", False, False]},
    },
    "archive_file.source": {"arguments": {"content": True, "filename": True}, "blocks": {}},
}
# Top-level blocks that are not resources or data sources, and what they may hold.
OTHER_TOP_LEVEL = {
    "moved": {"from", "to"},
    "import": {"to", "id", "identity", "provider", "for_each"},
    "removed": {"from", "lifecycle", "provisioner", "connection"},
}


@dataclass(frozen=True)
class Problem:
    file: str
    address: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.address}{'.' + self.path if self.path else ''}: {self.message}"


@dataclass
class Coverage:
    resources: int = 0
    data_sources: int = 0
    providers: int = 0
    blocks: int = 0  # nested blocks checked, dynamic ones included
    arguments: int = 0


def _is_block(value: Any) -> bool:
    """A block as python-hcl2 parses it: a list of bodies marked __is_block__, or for a labelled block
    (dynamic "x", provisioner "local-exec") a list of {label: marked body}."""
    def marked(item: Any) -> bool:
        return isinstance(item, dict) and bool(item.get("__is_block__"))

    return isinstance(value, list) and bool(value) and all(
        marked(item) or (isinstance(item, dict) and item and all(marked(v) for k, v in item.items()
                                                                   if not k.startswith("__")))
        for item in value)


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, sorted(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


class Checker:
    """Checks parsed HCL bodies (python-hcl2, hcl_model) against the provider schemas."""

    def __init__(self, schemas=load):
        self._schemas = schemas
        self.problems: list[Problem] = []
        self.coverage = Coverage()
        self.visited: set[str] = set()  # ids of the provider structs the checked blocks were read against

    # -- entry points ----------------------------------------------------------------------
    def check_file(self, file: str, content: dict) -> None:
        for kind, entries in content.items():
            if kind.startswith("__"):
                continue
            for entry in entries if isinstance(entries, list) else [entries]:
                if kind in ("resource", "data"):
                    for rtype, named in entry.items():
                        for name, body in named.items():
                            if not name.startswith("__"):
                                self.check_resource(file, kind, rtype.strip('"'), name.strip('"'), body)
                elif kind == "provider":
                    for name, body in entry.items():
                        if not name.startswith("__"):
                            self.check_provider(file, name.strip('"'), body)
                elif kind == "check":
                    self._check_check_block(file, entry)
                elif kind in OTHER_TOP_LEVEL:
                    unknown = {k for k in entry if not k.startswith("__")} - OTHER_TOP_LEVEL[kind]
                    for key in sorted(unknown):
                        self._problem(file, kind, key, f"unknown argument in a {kind} block"
                                      f"{_suggest(key, OTHER_TOP_LEVEL[kind])}")

    def check_resource(self, file: str, kind: str, rtype: str, name: str, body: dict) -> None:
        address = f"{'data.' if kind == 'data' else ''}{rtype}.{name}"
        provider = self._provider_of(body, rtype)
        struct, schema = self._type_schema(file, address, kind, rtype, provider)
        if struct is None:
            return
        if kind == "resource":
            self.coverage.resources += 1
        else:
            self.coverage.data_sources += 1
        meta = RESOURCE_META_ARGUMENTS if kind == "resource" else DATA_META_ARGUMENTS
        self._check_body(file, address, "", body, struct, schema, meta=meta, top_kind=kind)

    def check_provider(self, file: str, name: str, body: dict) -> None:
        if name not in PACKAGES:
            self._problem(file, f"provider.{name}", "", "not a provider these schemas describe")
            return
        schema = self._schemas(name)
        self.coverage.providers += 1
        self._check_body(file, f"provider.{name}", "", body, self._struct(schema, schema.provider_config), schema,
                         meta={"alias"}, top_kind="provider")

    # -- internals -----------------------------------------------------------------------------
    def _problem(self, file: str, address: str, path: str, message: str) -> None:
        self.problems.append(Problem(file, address, path, message))

    @staticmethod
    def _provider_of(body: dict, rtype: str) -> str:
        configured = str(body.get("provider", "")).removeprefix("${").removesuffix("}").split(".")[0]
        return configured or rtype.split("_")[0]

    def _type_schema(self, file: str, address: str, kind: str, rtype: str, provider: str):
        """(struct, schema) of a resource or data source type; (None, None) when it is unknown."""
        if kind == "resource" and rtype in BUILTIN_RESOURCES:
            return BUILTIN_RESOURCES[rtype], None
        if kind == "data" and rtype in OTHER_DATA:
            return OTHER_DATA[rtype], None
        if provider not in PACKAGES:
            self._problem(file, address, "", f"unknown {'data source' if kind == 'data' else 'resource'} type "
                          f"(provider {provider!r} has no schema here)")
            return None, None
        schema = self._schemas(provider)
        known = schema.resources if kind == "resource" else schema.data
        if rtype not in known:
            what = "data source" if kind == "data" else "resource"
            hint = _suggest(rtype, known)
            if provider == "google" and rtype in (self._schemas("google-beta").resources if kind == "resource"
                                                  else self._schemas("google-beta").data):
                hint = " (google-beta has it: set provider = google-beta)"
            self._problem(file, address, "", f"unknown {what} type in {provider} {schema.version}{hint}")
            return None, None
        return self._struct(schema, known[rtype]), schema

    def _struct(self, schema: Schema | None, ref: str) -> dict:
        if schema is None:
            return OTHER_DATA[ref]
        self.visited.add(ref)
        return schema.structs[ref]

    def _check_body(self, file: str, address: str, path: str, body: dict, struct: dict, schema: Schema | None,
                    meta: set[str] = frozenset(), top_kind: str = "") -> None:
        arguments, blocks = struct["arguments"], struct["blocks"]
        seen_blocks: dict[str, int] = {}
        dynamic: set[str] = set()

        def where(key: str) -> str:
            return f"{path}.{key}" if path else key

        for key, value in body.items():
            if key.startswith("__"):
                continue
            if top_kind in ("resource", "data") and key == "lifecycle" and _is_block(value):
                for item in value:
                    self._check_plain(file, address, where(key), item,
                                      LIFECYCLE if top_kind == "resource" else DATA_LIFECYCLE)
                continue
            if top_kind == "resource" and key in ("provisioner", "connection") and _is_block(value):
                self._check_provisioners(file, address, where(key), key, value)
                continue
            if key == "dynamic" and _is_block(value):
                for item in value:
                    for name, spec in item.items():
                        if name.startswith("__"):
                            continue
                        dynamic.add(name)
                        self._check_dynamic(file, address, where(f"dynamic.{name}"), name, spec, blocks, schema)
                continue
            if key in meta and not _is_block(value):
                continue
            if _is_block(value):
                if key not in blocks:
                    hint = f" (an argument: write `{key} = ...`)" if key in arguments else \
                        _suggest(key, set(blocks) | set(arguments))
                    self._problem(file, address, where(key), f"unknown block{hint}")
                    continue
                ref, _, single = blocks[key]
                seen_blocks[key] = len(value)
                if single and len(value) > 1:
                    self._problem(file, address, where(key), f"at most one {key} block is allowed, found {len(value)}")
                for item in value:
                    self.coverage.blocks += 1
                    self._check_body(file, address, where(key), item, self._struct(schema, ref), schema)
            elif key in arguments:
                self.coverage.arguments += 1
            elif key in blocks:
                self._problem(file, address, where(key), f"{key} is a block: write `{key} {{ ... }}`, not an argument")
            else:
                self._problem(file, address, where(key),
                              f"unknown argument{_suggest(key, set(arguments) | set(blocks) | set(meta))}")
        for name, required in arguments.items():
            if required and name not in body:
                self._problem(file, address, path, f"missing required argument {name}")
        for name, (_, required, _) in blocks.items():
            if required and name not in seen_blocks and name not in dynamic:
                self._problem(file, address, path, f"missing required block {name}")

    def _check_dynamic(self, file: str, address: str, path: str, name: str, spec: dict, blocks: dict,
                       schema: Schema | None) -> None:
        if name not in blocks:
            self._problem(file, address, path, f"dynamic block of unknown block type{_suggest(name, blocks)}")
            return
        unknown = {k for k in spec if not k.startswith("__")} - {"for_each", "iterator", "labels", "content"}
        for key in sorted(unknown):
            self._problem(file, address, f"{path}.{key}", "unknown argument in a dynamic block")
        if "for_each" not in spec:
            self._problem(file, address, path, "missing required argument for_each")
        contents = spec.get("content", [])
        if len(contents) != 1:
            self._problem(file, address, path, "a dynamic block needs exactly one content block")
        for content in contents:
            self.coverage.blocks += 1
            self._check_body(file, address, f"{path}.content", content, self._struct(schema, blocks[name][0]), schema)

    def _check_plain(self, file: str, address: str, path: str, body: dict, struct: dict) -> None:
        """Terraform's own blocks (lifecycle and its conditions)."""
        for key, value in body.items():
            if key.startswith("__"):
                continue
            if _is_block(value) and key in struct["blocks"]:
                for item in value:
                    self._check_plain(file, address, f"{path}.{key}", item, CONDITION)
            elif key not in struct["arguments"]:
                self._problem(file, address, f"{path}.{key}",
                              f"unknown argument{_suggest(key, set(struct['arguments']) | set(struct['blocks']))}")
        for name, required in struct["arguments"].items():
            if required and name not in body:
                self._problem(file, address, path, f"missing required argument {name}")

    def _check_provisioners(self, file: str, address: str, path: str, kind: str, value: list) -> None:
        for item in value:
            if kind == "connection":
                for key in sorted({k for k in item if not k.startswith("__")} - CONNECTION_ARGUMENTS):
                    self._problem(file, address, f"{path}.{key}", "unknown connection argument")
                continue
            for ptype, body in item.items():
                if ptype.startswith("__"):
                    continue
                ptype = ptype.strip('"')
                if ptype not in PROVISIONERS:
                    self._problem(file, address, f"{path}.{ptype}", f"unknown provisioner{_suggest(ptype, PROVISIONERS)}")
                    continue
                rest = {k: v for k, v in body.items() if k != "connection"}
                self._check_plain(file, address, f"{path}.{ptype}", rest, PROVISIONERS[ptype])

    def _check_check_block(self, file: str, entry: dict) -> None:
        for name, body in entry.items():
            if name.startswith("__"):
                continue
            for key, value in body.items():
                if key.startswith("__"):
                    continue
                if key == "data":
                    for scoped in value:
                        for rtype, named in scoped.items():
                            for dname, dbody in named.items():
                                if not dname.startswith("__"):
                                    self.check_resource(file, "data", rtype.strip('"'), dname.strip('"'), dbody)
                elif key == "assert" and _is_block(value):
                    for item in value:
                        self._check_plain(file, f"check.{name.strip(chr(34))}", "assert", item, CONDITION)
                else:
                    self._problem(file, f"check.{name.strip(chr(34))}", key, "unknown in a check block")


def check_module(files: dict[str, dict], schemas=load) -> Checker:
    """Every resource, data source and provider block of parsed files (hcl_model.Module.files)."""
    checker = Checker(schemas)
    for file, content in files.items():
        checker.check_file(file, content)
    return checker
