"""The UI routes on a bare aiohttp app: the files served, their headers, and nothing outside ui/."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from socket_service.headers import content_security_policy
from socket_service.ui import UI_DIR, add_ui_routes

SETTINGS = SimpleNamespace(upload_url="http://127.0.0.1:8081/", signing=SimpleNamespace(endpoint="http://127.0.0.1:4443"),
                           frame_ancestors=("'self'", "https://app.example.com"), uploads_bucket="chat-uploads",
                           token_parent_origins=("'self'",))


@pytest.fixture
async def client():
    app = web.Application()
    add_ui_routes(app, SETTINGS)
    async with TestClient(TestServer(app)) as c:
        yield c


async def test_the_page_and_its_files_carry_strict_headers(client):
    r = await client.get("/")
    assert r.status == 200 and r.headers["Content-Type"] == "text/html; charset=utf-8"
    assert r.headers["Content-Security-Policy"] == content_security_policy(
        "http://127.0.0.1:8081/", "http://127.0.0.1:4443", ("'self'", "https://app.example.com"), "chat-uploads")
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    html = await r.text()
    assert "<script>" not in html and "http" not in html.split("<body>")[0]  # no inline script, no CDN
    for path, kind in (("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css"),
                       ("/ui/vendor/socket.io.min.js", "text/javascript")):
        r = await client.get(path)
        assert r.status == 200, (path, "run `make ui` to fill ui/vendor/")
        assert r.headers["Content-Type"].startswith(kind) and r.headers["X-Content-Type-Options"] == "nosniff"


def test_the_policy_allows_only_what_the_page_needs():
    csp = dict(part.split(" ", 1) for part in content_security_policy(
        "http://127.0.0.1:8081/upload", "https://storage.googleapis.com", ("'self'", "https://app.example.com"),
        "chat-uploads").split("; "))
    assert csp["default-src"] == "'none'" and csp["script-src"] == "'self'" and csp["style-src"] == "'self'"
    assert csp["connect-src"] == "'self' http://127.0.0.1:8081 https://storage.googleapis.com"
    # Images: our bucket's folder only, not the whole storage host (which serves anyone's bucket).
    assert csp["img-src"] == "'self' https://storage.googleapis.com/chat-uploads/"
    assert csp["frame-ancestors"] == "'self' https://app.example.com"


def test_framing_is_refused_unless_framers_are_named():
    csp = dict(part.split(" ", 1) for part in content_security_policy(None, None, ()).split("; "))
    assert csp["frame-ancestors"] == "'none'"


@pytest.mark.parametrize("path", ["/ui/../ui.py", "/ui/%2e%2e/ui.py", "/ui/..%2fui.py", "/ui/nope.js", "/ui/vendor",
                                  "/ui/index.html/x"])
async def test_nothing_outside_the_ui_folder_is_served(client, path):
    r = await client.get(path)
    assert r.status == 404, path
    assert (UI_DIR.parent / "ui.py").exists()  # the file the traversal attempts aim at is really there
