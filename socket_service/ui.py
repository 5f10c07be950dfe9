"""The browser chat UI: ``GET /`` and its static files under ``/ui/``.

The page speaks only the public protocol (PROTOCOL.md). Its third-party
scripts live in ``ui/vendor/``, filled at install time from pinned npm
packages (``make ui``), so the page needs no CDN. Every response carries a
strict Content-Security-Policy: scripts only from this origin, no inline
script, network access only to this origin, the upload function and the
storage endpoint of signed URLs, and framing only by the allowed origins.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from aiohttp import web

UI_DIR = Path(__file__).resolve().parent / "ui"
CONTENT_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml",
                 ".png": "image/png", ".map": "application/json"}


def _origin(url: str | None) -> str | None:
    if not url:
        return None
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        return None
    return f"{parsed.scheme}://{parsed.netloc}"


def content_security_policy(upload_url: str | None, storage_endpoint: str | None,
                            embedders: tuple[str, ...] = ()) -> str:
    """The page's CSP. ``embedders`` are the origins allowed to frame it (and so to post it a token)."""
    frame = "*" if "*" in embedders else " ".join(["'self'", *sorted(o for o in map(_origin, embedders) if o)])
    remote = " ".join(sorted({o for o in (_origin(upload_url), _origin(storage_endpoint)) if o}))
    storage = _origin(storage_endpoint) or ""
    return "; ".join([
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        f"img-src 'self' blob: data: {storage}".rstrip(),
        f"connect-src 'self' {remote}".rstrip(),
        "base-uri 'none'",
        "form-action 'none'",
        f"frame-ancestors {frame}",
        "object-src 'none'",
    ])


def add_ui_routes(app: web.Application, settings) -> None:
    """Registers ``GET /`` (the chat page) and ``GET /ui/{file}`` on ``app``."""
    signing = getattr(settings, "signing", None)
    headers = {
        # The page may be framed by the origins allowed to call the API (CORS_ALLOWED_ORIGINS), which
        # are then the only windows that can hand it a token with postMessage.
        "Content-Security-Policy": content_security_policy(getattr(settings, "upload_url", None),
                                                          getattr(signing, "endpoint", None),
                                                          tuple(getattr(settings, "cors_allowed_origins", ()))),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }

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
        return serve(UI_DIR / "index.html")

    async def static(request: web.Request) -> web.StreamResponse:
        root = UI_DIR.resolve()
        target = (root / request.match_info["path"]).resolve()
        if root not in target.parents:  # no way out of ui/ (.., absolute paths, symlinks)
            raise web.HTTPNotFound()
        return serve(target)

    app.router.add_get("/", index)
    app.router.add_get("/ui/{path:.+}", static)
