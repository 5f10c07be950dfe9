"""What Terraform deploys does what the application needs: Cloud Run settings for WebSockets,
the functions and their sources, least-privilege IAM, Firestore indexes for the queries the
code makes, and alerts on what the code logs."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from deploy import packaging

from . import hcl_model
from .hcl_model import ROOT, dynamic_blocks, first, literal, strings

PRIMITIVE_ROLES = {"roles/owner", "roles/editor", "roles/viewer"}


# -- Cloud Run -----------------------------------------------------------------
def test_socket_service_is_websocket_friendly(tf):
    service = tf.resource("google_cloud_run_v2_service", "socket")
    template = first(service, "template")
    assert template["timeout"] == "3600s"
    assert template["session_affinity"] is True
    assert template["max_instance_request_concurrency"] == "${var.socket_concurrency}"
    assert "var.socket_concurrency <= 1000" in tf.variables["socket_concurrency"].body["validation"][0]["condition"]
    assert first(template, "scaling")["min_instance_count"] == "${var.socket_min_instances}"
    container = first(template, "containers")
    resources = first(container, "resources")
    assert resources["cpu_idle"] is False, "CPU must stay allocated: the instance subscription keeps pulling"
    # Cloud Run's frontend reserves paths ending in z (a Google 404 page for /healthz): /health.
    for probe in ("startup_probe", "liveness_probe"):
        assert first(container, probe, "http_get")["path"] == "/health"
    assert template["service_account"] == "${google_service_account.socket.email}"
    assert container["image"] == "${var.image}"
    # The service's UPLOAD_URL is the deployed request_upload function.
    assert tf.locals["socket_service_env"]["UPLOAD_URL"] == \
        '${google_cloudfunctions2_function.functions["request_upload"].url}'


def _routes() -> dict[str, str]:
    """GET routes the socket service registers, path -> handler name (on a bare aiohttp app)."""
    from types import SimpleNamespace

    from aiohttp import web

    from socket_service import http_api

    app = web.Application()
    http_api.add_routes(app, SimpleNamespace(http_requests_per_second=1.0, http_request_burst=1, dev_tokens=False))
    return {route.resource.canonical: route.handler.__name__ for route in app.router.routes()
            if route.method == "GET" and route.resource is not None}


def test_socket_service_probe_paths_exist_and_avoid_reserved_paths(tf):
    container = first(tf.resource("google_cloud_run_v2_service", "socket"), "template", "containers")
    routes = _routes()
    for probe in ("startup_probe", "liveness_probe", "readiness_probe"):
        if probe in container:
            path = first(container, probe, "http_get")["path"]
            assert not path.endswith("z"), f"{probe}: Cloud Run reserves some paths ending in z"
            assert path in routes, f"{probe}: the service has no GET {path}"
    # The public names (docs/DEPLOY.md, "Check it") answer like the local ones.
    assert routes.get("/health") == routes.get("/healthz") and routes.get("/ready") == routes.get("/readyz")


def test_chat_origin_is_the_services_deterministic_url(tf):
    assert tf.locals["socket_service_url"] == \
        "https://${local.socket_service_name}-${data.google_project.this.number}.${var.region}.run.app"
    assert tf.resource("google_cloud_run_v2_service", "socket")["name"] == "${local.socket_service_name}"
    assert tf.locals["cors_origins"] == "${distinct(concat([local.socket_service_url], var.cors_allowed_origins))}"


# -- functions ---------------------------------------------------------------
FUNCTIONS = {"request_upload": "upload", "on_upload_finalized": "upload", "ai_stream": "ai_stream"}


def _function(tf, name: str) -> dict:
    """The google_cloudfunctions2_function instance of a target, its for_each entry filled in."""
    return tf.instance("google_cloudfunctions2_function", "functions", name)


def test_one_function_resource_for_every_target(tf):
    assert list(tf.resources_of("google_cloudfunctions2_function")) == ["functions"]
    assert set(tf.instances("google_cloudfunctions2_function", "functions")) == set(FUNCTIONS)


@pytest.mark.parametrize("function", sorted(FUNCTIONS))
def test_function_entry_point_and_source(tf, function):
    body = _function(tf, function)
    build = first(body, "build_config")
    assert build["entry_point"] == function
    assert build["runtime"] == "python311"
    source_dir = FUNCTIONS[function]
    # The entry point is a callable of that source's main.py, as functions-framework loads it.
    assert callable(getattr(_main_module(source_dir), function))
    # Its archive is the staged folder of that source (python -m deploy package).
    obj = first(build, "source", "storage_source")["object"]
    (archive,) = re.findall(r'google_storage_bucket_object\.(\w+)\["(\w+)"\]\.name', obj)
    assert archive == ("function_source", source_dir)
    archive_source = hcl_model.expand(tf.resource("google_storage_bucket_object", archive[0]), source_dir,
                                      source_dir)["source"]
    (data_name, data_key) = re.fullmatch(r'\$\{data\.archive_file\.(\w+)\["(\w+)"\]\.output_path\}',
                                         archive_source).groups()
    data = hcl_model.expand(tf.data[("archive_file", data_name)].body, data_key, data_key)
    assert data["source_dir"] == "${local.function_build_dir}/" + source_dir
    assert tf.locals["function_sources"] == "${toset([for f in local.functions : f.source])}"
    assert source_dir in packaging.function_sources()
    assert tf.locals["function_build_dir"] == "${path.module}/.build/functions"
    assert packaging.FUNCTION_BUILD_DIR == ROOT / "infra" / "terraform" / ".build" / "functions"


def _main_module(source_dir: str):
    """functions/<source_dir>/main.py imported as functions-framework does (its folder first on sys.path)."""
    import importlib.util
    import sys

    folder = ROOT / "functions" / source_dir
    spec = importlib.util.spec_from_file_location(f"_infra_main_{source_dir}", folder / "main.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(folder))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(folder))
    return module


def test_only_request_upload_is_public(tf):
    # allUsers only in the public_access = "allUsers" mode (test_first_deploy.py); the default
    # disables the invoker check on the same two services instead.
    public = {name: body for name, body in tf.all_instances("google_cloud_run_v2_service_iam_member").items()
              if body["member"] == "allUsers"}
    assert {body["name"] for body in public.values()} == {
        '${google_cloudfunctions2_function.functions["request_upload"].name}',
        "${google_cloud_run_v2_service.socket.name}"}
    assert tf.resource("google_cloud_run_v2_service", "socket")["invoker_iam_disabled"] == \
        '${var.public_access == "invoker_iam_disabled"}'
    assert tf.outputs["invoker_check_disabled_services"].body["value"].count("google_cloudfunctions2_function.") == 1
    push = tf.resource("google_cloud_run_v2_service_iam_member", "push_invoker")
    assert push["for_each"] == "${local.push_functions}"
    assert push["member"] == "${google_service_account.push_invoker.member}"
    assert push["role"] == "roles/run.invoker"
    for function in ("ai_stream", "on_upload_finalized"):
        service = first(_function(tf, function), "service_config")
        assert service["ingress_settings"] == "${var.push_function_ingress}"
    assert first(_function(tf, "request_upload"), "service_config")["ingress_settings"] == "ALLOW_ALL"
    assert tf.variables["push_function_ingress"].body["default"] == "ALLOW_INTERNAL_ONLY"


def test_each_deployable_runs_as_its_own_service_account(tf):
    accounts = {
        "socket": first(tf.resource("google_cloud_run_v2_service", "socket"), "template")["service_account"],
        **{name: first(_function(tf, name), "service_config")["service_account_email"] for name in FUNCTIONS},
    }
    assert accounts == {
        "socket": "${google_service_account.socket.email}",
        "request_upload": "${google_service_account.upload.email}",
        "on_upload_finalized": "${google_service_account.upload.email}",
        "ai_stream": "${google_service_account.ai_stream.email}",
    }
    for name in FUNCTIONS:
        build = first(_function(tf, name), "build_config")
        assert build["service_account"] == "${google_service_account.functions_build.id}"


# -- IAM -----------------------------------------------------------------------
def _iam_bindings(tf):
    for (rtype, name), block in tf.resources.items():
        if rtype.endswith(("_iam_member", "_iam_binding", "_iam_policy")):
            yield rtype, name, block.body


def test_no_primitive_or_broad_pubsub_roles(tf):
    roles = set()
    for _, _, body in _iam_bindings(tf):
        roles.add(body.get("role", ""))
        for text in strings(body):
            roles.update(re.findall(r"roles/[\w.]+", text))
    assert roles & PRIMITIVE_ROLES == set()
    assert roles & {"roles/pubsub.editor", "roles/pubsub.admin", "roles/storage.admin",
                    "roles/iam.serviceAccountUser"} == set()
    assert not tf.resources_of("google_project_iam_binding") and not tf.resources_of("google_project_iam_policy")


def test_token_creator_only_on_accounts_themselves(tf):
    """Keyless signing needs signBlob on the account itself, never project-wide."""
    for rtype, name, body in _iam_bindings(tf):
        if body.get("role") == "roles/iam.serviceAccountTokenCreator":
            assert rtype == "google_service_account_iam_member", name
    self_sign = tf.resource("google_service_account_iam_member", "self_sign")
    assert set(self_sign["for_each"]) == {"socket", "upload"}
    assert (self_sign["service_account_id"], self_sign["member"]) == ("${each.value.name}", "${each.value.member}")


def test_socket_service_may_manage_only_subscriptions(tf):
    role = tf.resource("google_project_iam_custom_role", "instance_subscriptions")
    # list: an instance deletes the leftovers of instances that died without their SIGTERM.
    assert sorted(role["permissions"]) == ["pubsub.subscriptions.consume", "pubsub.subscriptions.create",
                                           "pubsub.subscriptions.delete", "pubsub.subscriptions.get",
                                           "pubsub.subscriptions.list"]
    binding = tf.instance("google_project_iam_member", "runtime", "socket_instance_subscriptions")
    assert binding["role"] == "${google_project_iam_custom_role.instance_subscriptions.name}"
    assert binding["member"] == "${google_service_account.socket.member}"
    # Attaching subscriptions: on the two room-bus topics only (test_bus_grants.py).
    grants = tf.instances("google_pubsub_topic_iam_member", "socket_bus")
    assert {(g["topic"], g["role"], g["member"]) for g in grants.values()} == {
        (f"${{google_pubsub_topic.topics[local.topology.topics.{topic}].name}}", f"roles/pubsub.{role}",
         "${google_service_account.socket.member}")
        for topic, role in (("chat_events", "subscriber"), ("function_events", "subscriber"),
                            ("chat_events", "viewer"))}


def test_ai_function_may_call_vertex_ai(tf):
    binding = tf.instance("google_project_iam_member", "runtime", "ai_stream_vertex")
    assert (binding["role"], binding["member"]) == ("roles/aiplatform.user", "${google_service_account.ai_stream.member}")


def test_all_apis_the_resources_need_are_enabled(tf):
    apis = set(tf.locals["apis"].removeprefix("${toset(").removesuffix(")}").replace('"', "").replace(",", " ")
               .replace("[", " ").replace("]", " ").split())
    needed = {"run", "cloudfunctions", "cloudbuild", "artifactregistry", "pubsub", "firestore", "storage",
              "secretmanager", "iam", "iamcredentials", "aiplatform", "monitoring", "logging", "firebaserules"}
    assert {f"{api}.googleapis.com" for api in needed} <= apis


# -- Firestore -----------------------------------------------------------------
def _call_name(node: ast.AST) -> str:
    if not isinstance(node, ast.Call):
        return ""
    return node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")


def _chain_root(node: ast.AST) -> ast.AST:
    """Follow a method chain (``a.collection(X).where(...).order_by(...)``) down to its query's root:
    the collection()/collection_group() call, or the variable the query was kept in."""
    while isinstance(node, ast.Call | ast.Attribute):
        if _call_name(node) in ("collection", "collection_group"):
            return node
        node = node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else (
            node.value if isinstance(node, ast.Attribute) else node.func)
    return node


def _queries() -> list[dict]:
    """Firestore queries of chatcore that use several fields, found by parsing the code.

    A query is a chain rooted at collection()/collection_group(), including
    later ``query = query.where(...)`` refinements of the same variable.
    """
    found = []
    for module_name in ("chatcore.store.conversations", "chatcore.store.replies", "chatcore.store.uploads",
                        "chatcore.store.quotas", "chatcore.store.profiles"):
        module = importlib.import_module(module_name)
        tree = ast.parse(Path(module.__file__).read_text())
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            variables = {}  # variable -> root call of the query it holds
            for node in ast.walk(func):
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    root = _chain_root(node.value)
                    if _call_name(root) in ("collection", "collection_group"):
                        variables.setdefault(node.targets[0].id, root)
            queries: dict[int, dict] = {}
            for node in ast.walk(func):
                name = _call_name(node)
                if name not in ("where", "order_by"):
                    continue
                root = _chain_root(node.func.value) if isinstance(node.func, ast.Attribute) else None
                if isinstance(root, ast.Name):
                    root = variables.get(root.id)
                if root is None or _call_name(root) not in ("collection", "collection_group"):
                    continue
                arg = root.args[0]
                collection = arg.value if isinstance(arg, ast.Constant) else getattr(module, arg.id, None)
                query = queries.setdefault(id(root), {"where": func.name, "module": module_name, "filters": {},
                                                      "order": {}, "collection": collection,
                                                      "group": _call_name(root) == "collection_group"})
                if name == "where":
                    for expr in [*node.args, *(k.value for k in node.keywords)]:
                        if _call_name(expr) == "FieldFilter" and isinstance(expr.args[0], ast.Constant):
                            query["filters"][expr.args[0].value] = expr.args[1].value
                else:
                    descending = any(k.arg == "direction" and "DESCENDING" in ast.unparse(k.value)
                                     for k in node.keywords)
                    query["order"][node.args[0].value] = "DESCENDING" if descending else "ASCENDING"
            found.extend(q for q in queries.values() if len(set(q["filters"]) | set(q["order"])) > 1)
    return found


def test_composite_indexes_cover_the_codes_queries(tf):
    queries = _queries()
    assert {q["where"] for q in queries} >= {"list_conversations", "fail_stale"}
    indexes = []
    for body in tf.all_instances("google_firestore_index").values():
        # The fields, in order, from a dynamic block over the index's list (firestore.tf).
        (dynamic,) = dynamic_blocks(body, "fields")
        assert {k: v for k, v in first(dynamic, "content").items() if not k.startswith("__")} == {
            name: f"${{fields.value.{name}}}" for name in ("field_path", "order", "array_config")}
        fields = {}
        for field in dynamic["for_each"]:
            fields[field["field_path"]] = "CONTAINS" if field.get("array_config") else field["order"]
        indexes.append((body["collection"], body.get("query_scope") or "COLLECTION", fields))
    for query in queries:
        expected = {}
        for field, op in query["filters"].items():
            expected[field] = "CONTAINS" if op == "array_contains" else "ASCENDING"
        expected.update(query["order"])
        scope = "COLLECTION_GROUP" if query["group"] else "COLLECTION"
        assert (query["collection"], scope, expected) in indexes, f"no index for {query['module']}.{query['where']}"


def test_firestore_is_native_and_closed_to_clients(tf):
    database = tf.resource("google_firestore_database", "main")
    assert database["type"] == "FIRESTORE_NATIVE"
    assert database["name"] == "${var.firestore_database}"
    rules = (ROOT / "infra" / "terraform" / "firestore.rules").read_text()
    assert re.search(r"match /\{document=\*\*\}\s*\{\s*allow read, write: if false;\s*\}", rules)
    assert "allow" not in rules.replace("allow read, write: if false;", "")
    ruleset = tf.resource("google_firebaserules_ruleset", "firestore")
    assert 'file("${path.module}/firestore.rules")' in first(ruleset, "source", "files")["content"]
    release = tf.resource("google_firebaserules_release", "firestore")
    assert "cloud.firestore" in release["name"]


# -- timeouts --------------------------------------------------------------------
def test_literal_timeouts_are_durations(tf):
    for name, body in tf.resources_of("google_pubsub_subscription").items():
        for block in ("retry_policy",):
            if block in body:
                for value in first(body, block).values():
                    if isinstance(value, str) and literal(value) is not None:
                        assert re.fullmatch(r"\d+s", value), (name, value)
