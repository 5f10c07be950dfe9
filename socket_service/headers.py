"""Security headers: the same on every response of the service, the chat page and the API alike.

The page's Content-Security-Policy (``socket_service.ui``) allows scripts
only from this origin and network access only to this origin, the upload
function and the storage endpoint of signed URLs. Images load only from this
origin and from our uploads bucket's folder on the storage endpoint: the
storage host serves every other bucket too, anyone's, so allowing the whole
host would let an image URL carry conversation text to an attacker's bucket
(issue 13, finding 2). ``frame-ancestors`` comes
from ``FRAME_ANCESTORS``: ``'none'`` unless origins are named (production
default), so no other site can frame the chat, or an API response, and
overlay it. API responses carry the same headers: a JSON error opened
directly in a browser tab is a document too.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote, urlparse

from aiohttp import web

SELF = "'self'"
NONE = "'none'"


def origin_of(url: str | None) -> str | None:
    if not url:
        return None
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        return None
    return f"{parsed.scheme}://{parsed.netloc}"


def bucket_source(storage_endpoint: str | None, bucket: str | None) -> str | None:
    """The CSP source of one bucket's objects: signed URLs are path-style, ``<endpoint>/<bucket>/<object>``.

    The trailing ``/`` makes it a folder: it matches that bucket's objects and no other path.
    """
    origin = origin_of(storage_endpoint)
    return f"{origin}/{quote(bucket, safe='')}/" if origin and bucket else None


def content_security_policy(upload_url: str | None, storage_endpoint: str | None,
                            frame_ancestors: tuple[str, ...] = (), uploads_bucket: str | None = None) -> str:
    """The CSP. ``frame_ancestors``: origins (or ``'self'``) allowed to frame the page; none gives ``'none'``.
    ``uploads_bucket``: the one bucket images (thumbnails of uploads) may come from."""
    framers = [SELF] if SELF in frame_ancestors else []
    framers += sorted({o for o in map(origin_of, frame_ancestors) if o})
    remote = " ".join(sorted({o for o in (origin_of(upload_url), origin_of(storage_endpoint)) if o}))
    images = bucket_source(storage_endpoint, uploads_bucket) or ""
    return "; ".join([
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        f"img-src 'self' {images}".rstrip(),
        f"connect-src 'self' {remote}".rstrip(),
        "base-uri 'none'",
        "form-action 'none'",
        f"frame-ancestors {' '.join(framers) or NONE}",
        "object-src 'none'",
    ])


def security_headers(settings) -> dict[str, str]:
    """The headers every response carries, from the service's settings."""
    signing = getattr(settings, "signing", None)
    return {
        "Content-Security-Policy": content_security_policy(getattr(settings, "upload_url", None),
                                                          getattr(signing, "endpoint", None),
                                                          tuple(getattr(settings, "frame_ancestors", ())),
                                                          getattr(settings, "uploads_bucket", None)),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }


def security_headers_middleware(headers: Mapping[str, str]):
    """Adds ``headers`` to every response that does not set them itself (errors included)."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            _add(exc.headers, headers)
            raise
        _add(response.headers, headers)
        return response

    return middleware


def _add(target, headers: Mapping[str, str]) -> None:
    for name, value in headers.items():
        target.setdefault(name, value)
