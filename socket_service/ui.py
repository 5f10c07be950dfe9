"""The browser chat UI: ``GET /`` and its static files under ``/ui/``.

The page speaks only the public protocol (PROTOCOL.md). Its third-party
scripts live in ``ui/vendor/``, filled at install time from pinned npm
packages (``make ui``), so the page needs no CDN. Every response carries the
strict headers of ``socket_service.headers``.

The page is told which parent windows may hand it a token with
``postMessage`` (``TOKEN_PARENT_ORIGINS``) through a ``<meta>`` filled in
here: it then ignores a token posted by any other window.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

from aiohttp import web

from .headers import security_headers

UI_DIR = Path(__file__).resolve().parent / "ui"
# In index.html, filled per deployment by index_html().
TOKEN_ORIGINS_META = '<meta name="chat-token-origins" content="">'
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml",
                 ".png": "image/png", ".map": "application/json"}


def index_html(settings) -> str:
    """The chat page, naming the origins allowed to post it a token (``'self'`` is read by the page as its own)."""
    origins = " ".join(getattr(settings, "token_parent_origins", ()))
    page = (UI_DIR / "index.html").read_text(encoding="utf-8")
    return page.replace(TOKEN_ORIGINS_META, f'<meta name="chat-token-origins" content="{escape(origins)}">')


def add_ui_routes(app: web.Application, settings) -> None:
    """Registers ``GET /`` (the chat page) and ``GET /ui/{file}`` on ``app``."""
    # The page may be framed only by FRAME_ANCESTORS, which are then the only
    # windows that can hand it a token with postMessage.
    headers = {**security_headers(settings), "Cache-Control": "no-cache"}

    def serve(path: Path) -> web.StreamResponse:
        if not path.is_file():
            raise web.HTTPNotFound()
        content_type = CONTENT_TYPES.get(path.suffix)
        if content_type is None:
            raise web.HTTPNotFound()
        response = web.FileResponse(path, headers={**headers, "Content-Type": f"{content_type}; charset=utf-8"
                                                   if content_type.startswith("text/") else content_type})
        return response

    async def index(request: web.Request) -> web.StreamResponse:
        return web.Response(text=index_html(settings), headers={**headers, "Content-Type": "text/html; charset=utf-8"})

    async def static(request: web.Request) -> web.StreamResponse:
        root = UI_DIR.resolve()
        target = (root / request.match_info["path"]).resolve()
        if root not in target.parents:  # no way out of ui/ (.., absolute paths, symlinks)
            raise web.HTTPNotFound()
        return serve(target)

    app.router.add_get("/", index)
    app.router.add_get("/ui/{path:.+}", static)
