"""What Terraform deploys does what the application needs: Cloud Run settings for WebSockets,
the functions and their sources, least-privilege IAM, Firestore indexes for the queries the
code makes, and alerts on what the code logs."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest

from deploy import packaging
from socket_service import app as socket_app

from .hcl_model import ROOT, first, literal, strings

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
    for probe in ("startup_probe", "liveness_probe"):
        assert first(container, probe, "http_get")["path"] == "/healthz"
    assert template["service_account"] == "${google_service_account.socket.email}"
    assert container["image"] == "${var.image}"
    # The service's UPLOAD_URL is the deployed request_upload function.
    assert tf.locals["socket_service_env"]["UPLOAD_URL"] == "${google_cloudfunctions2_function.request_upload.url}"


def test_socket_service_health_path_exists():
    source = inspect.getsource(importlib.import_module("socket_service.http_api"))
    assert '"/healthz"' in source


def test_chat_origin_is_the_services_deterministic_url(tf):
    assert tf.locals["socket_service_url"] == \
        "https://${local.socket_service_name}-${data.google_project.this.number}.${var.region}.run.app"
    assert tf.resource("google_cloud_run_v2_service", "socket")["name"] == "${local.socket_service_name}"
    assert tf.locals["cors_origins"] == "${distinct(concat([local.socket_service_url], var.cors_allowed_origins))}"


# -- functions ---------------------------------------------------------------
FUNCTIONS = {"request_upload": "upload", "on_upload_finalized": "upload", "ai_stream": "ai_stream"}


@pytest.mark.parametrize("function", sorted(FUNCTIONS))
def test_function_entry_point_and_source(tf, function):
    body = tf.resource("google_cloudfunctions2_function", function)
    build = first(body, "build_config")
    assert build["entry_point"] == function
    assert build["runtime"] == "python311"
    source_dir = FUNCTIONS[function]
    # The entry point is a function of that source's main.py.
    main = ast.parse((ROOT / "functions" / source_dir / "main.py").read_text())
    assert function in {n.name for n in main.body if isinstance(n, ast.FunctionDef)}
    # Its archive is the staged folder of that source (python -m deploy package).
    obj = first(build, "source", "storage_source")["object"]
    (archive,) = re.findall(r"google_storage_bucket_object\.(\w+)\.name", obj)
    archive_source = tf.resource("google_storage_bucket_object", archive)["source"]
    (data_name,) = re.findall(r"data\.archive_file\.(\w+)\.output_path", archive_source)
    assert tf.data[("archive_file", data_name)].body["source_dir"] == "${local.function_build_dir}/" + source_dir
    assert source_dir in packaging.function_sources()
    assert tf.locals["function_build_dir"] == "${path.module}/.build/functions"
    assert packaging.FUNCTION_BUILD_DIR == ROOT / "infra" / "terraform" / ".build" / "functions"


def test_only_request_upload_is_public(tf):
    public = {name: body for name, body in tf.resources_of("google_cloud_run_v2_service_iam_member").items()
              if body["member"] == "allUsers"}
    assert {body["name"] for body in public.values()} == {
        "${google_cloudfunctions2_function.request_upload.name}", "${google_cloud_run_v2_service.socket.name}"}
    push = tf.resource("google_cloud_run_v2_service_iam_member", "push_invoker")
    assert push["for_each"] == "${local.push_functions}"
    assert push["member"] == "${google_service_account.push_invoker.member}"
    assert push["role"] == "roles/run.invoker"
    for function in ("ai_stream", "on_upload_finalized"):
        service = first(tf.resource("google_cloudfunctions2_function", function), "service_config")
        assert service["ingress_settings"] == "${var.push_function_ingress}"
    assert tf.variables["push_function_ingress"].body["default"] == "ALLOW_INTERNAL_ONLY"


def test_each_deployable_runs_as_its_own_service_account(tf):
    accounts = {
        "socket": first(tf.resource("google_cloud_run_v2_service", "socket"), "template")["service_account"],
        **{name: first(tf.resource("google_cloudfunctions2_function", name), "service_config")[
            "service_account_email"] for name in FUNCTIONS},
    }
    assert accounts == {
        "socket": "${google_service_account.socket.email}",
        "request_upload": "${google_service_account.upload.email}",
        "on_upload_finalized": "${google_service_account.upload.email}",
        "ai_stream": "${google_service_account.ai_stream.email}",
    }
    for name in FUNCTIONS:
        build = first(tf.resource("google_cloudfunctions2_function", name), "build_config")
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
    assert sorted(role["permissions"]) == ["pubsub.subscriptions.consume", "pubsub.subscriptions.create",
                                           "pubsub.subscriptions.delete", "pubsub.subscriptions.get"]
    binding = tf.resource("google_project_iam_member", "socket_instance_subscriptions")
    assert binding["member"] == "${google_service_account.socket.member}"
    # Attaching subscriptions: on the two room-bus topics only (test_bus_grants.py).
    for name, key in (("socket_attach_chat_events", "chat_events"), ("socket_attach_function_events", "function_events")):
        attach = tf.resource("google_pubsub_topic_iam_member", name)
        assert attach["topic"] == f"${{google_pubsub_topic.topics[local.topology.topics.{key}].name}}"
        assert attach["role"] == "roles/pubsub.subscriber"


def test_ai_function_may_call_vertex_ai(tf):
    binding = tf.resource("google_project_iam_member", "ai_stream_vertex")
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
    for module_name in ("chatcore.store", "chatcore.replies", "chatcore.uploads", "chatcore.quotas"):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError:
            continue
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
    for body in tf.resources_of("google_firestore_index").values():
        fields = {}
        for field in body["fields"]:
            fields[field["field_path"]] = "CONTAINS" if field.get("array_config") else field["order"]
        indexes.append((body["collection"], body.get("query_scope", "COLLECTION"), fields))
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


# -- alerts ----------------------------------------------------------------------
def test_stale_reply_metric_matches_the_sweepers_warning(tf):
    metric = tf.resource("google_logging_metric", "stale_replies")
    log_filter = metric["filter"]
    assert 'severity = \\"WARNING\\"' in log_filter or 'severity = "WARNING"' in log_filter
    assert "google_cloud_run_v2_service.socket.name" in log_filter
    pattern = re.search(r'jsonPayload\.message =~ \\?"([^"\\]+)\\?"', log_filter).group(1)
    calls = [node for node in ast.walk(ast.parse(inspect.getsource(socket_app)))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and node.func.attr == "warning" and node.args and isinstance(node.args[0], ast.Constant)
             and re.search(pattern, node.args[0].value)]
    assert len(calls) == 1, f"the sweeper's logger.warning no longer matches {pattern!r}"
    message = calls[0].args[0].value % tuple("x" for _ in range(calls[0].args[0].value.count("%s")))
    assert re.search(pattern, message)
    alert = tf.resource("google_monitoring_alert_policy", "stale_replies")
    assert "google_logging_metric.stale_replies.name" in first(alert, "conditions", "condition_threshold")["filter"]


def test_literal_timeouts_are_durations(tf):
    for name, body in tf.resources_of("google_pubsub_subscription").items():
        for block in ("retry_policy",):
            if block in body:
                for value in first(body, block).values():
                    if isinstance(value, str) and literal(value) is not None:
                        assert re.fullmatch(r"\d+s", value), (name, value)
