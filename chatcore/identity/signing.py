"""V4 signed URLs for the uploads bucket: PUT for the browser's upload, GET for downloads.

Two ways to sign, chosen by :class:`SigningConfig`:

- **key**: a service-account JSON key file (``SIGNING_KEY_FILE``). ``make dev``
  generates one per run; production may mount one from Secret Manager.
- **iam** (keyless, the production default): the runtime service account signs
  through the IAM Credentials ``signBlob`` API. google-cloud-storage does
  this itself when given ``service_account_email`` and an OAuth
  ``access_token`` (see ``google.cloud.storage._signing._sign_message``); the
  account needs ``roles/iam.serviceAccountTokenCreator`` on itself.

Signed URLs are bearer credentials: never log them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote, urlparse

from ..config import env_int, env_str
from ..errors import ConfigError

GCS_ENDPOINT = "https://storage.googleapis.com"
CLOUD_PLATFORM_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
MODE_KEY = "key"
MODE_IAM = "iam"
# V4 signatures are valid for at most seven days.
MAX_TTL_SECONDS = 7 * 24 * 3600
# Types a browser may show in place; anything else (text, JSON, SVG...) is served
# as an attachment, so an uploaded file can never render as a page of our origin.
INLINE_TYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf"})


@dataclass(frozen=True)
class SigningConfig:
    key_file: str = ""
    service_account_email: str = ""
    endpoint: str = GCS_ENDPOINT
    upload_ttl_seconds: int = 900
    download_ttl_seconds: int = 900

    def __post_init__(self):
        parsed = urlparse(self.endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path not in ("", "/"):
            raise ConfigError("SIGNED_URL_ENDPOINT must be an http(s) origin such as https://storage.googleapis.com")

    @property
    def mode(self) -> str:
        return MODE_KEY if self.key_file else MODE_IAM

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> SigningConfig:
        # Locally STORAGE_EMULATOR_HOST is fake-gcs-server, so signed URLs point there.
        default_endpoint = env_str(environ, "STORAGE_EMULATOR_HOST") or GCS_ENDPOINT
        return cls(
            key_file=env_str(environ, "SIGNING_KEY_FILE"),
            service_account_email=env_str(environ, "SIGNING_SERVICE_ACCOUNT"),
            endpoint=env_str(environ, "SIGNED_URL_ENDPOINT", default_endpoint).rstrip("/"),
            upload_ttl_seconds=env_int(environ, "UPLOAD_URL_TTL_SECONDS", 900, minimum=60, maximum=3600),
            download_ttl_seconds=env_int(environ, "DOWNLOAD_URL_TTL_SECONDS", 900, minimum=60,
                                         maximum=MAX_TTL_SECONDS),
        )


@dataclass(frozen=True)
class SignedRequest:
    url: str
    method: str
    headers: dict[str, str]  # exactly the headers the client must send (Host excepted)
    expires_at: datetime


class SigningUnavailable(Exception):
    """No usable signing identity (no key file, no service account credentials)."""


class _KeylessIdentity:
    """The runtime service account's e-mail and a fresh access token, for signBlob."""

    def __init__(self, email: str, credentials=None, request_factory: Callable[[], object] | None = None):
        self._email = email
        self._credentials = credentials
        self._request_factory = request_factory
        self._lock = threading.Lock()

    def current(self) -> tuple[str, str]:
        import google.auth
        from google.auth import exceptions as auth_exc
        from google.auth.transport import requests as auth_requests

        with self._lock:
            try:
                if self._credentials is None:
                    self._credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM_SCOPE])
                if not self._credentials.valid:
                    self._credentials.refresh((self._request_factory or auth_requests.Request)())
            except auth_exc.GoogleAuthError as exc:
                raise SigningUnavailable(f"no credentials to sign with: {type(exc).__name__}") from None
            email = self._email or getattr(self._credentials, "service_account_email", "")
            if not email or email == "default":
                raise SigningUnavailable("set SIGNING_SERVICE_ACCOUNT: the runtime credentials name no account")
            return email, self._credentials.token


class UrlSigner:
    """Signs URLs for objects of one bucket. Thread-safe; download URLs are cached.

    A download URL is reused while more than half of its lifetime remains, so
    a page of history costs no signature (and, keyless, no signBlob call) for
    files signed recently.
    """

    CACHE_SIZE = 10_000

    def __init__(self, config: SigningConfig, bucket: str, *, storage_client=None, credentials=None,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.bucket_name = bucket
        self._storage_client = storage_client
        self._key_credentials = credentials if config.mode == MODE_KEY else None
        self._keyless = None if config.mode == MODE_KEY else _KeylessIdentity(config.service_account_email,
                                                                              credentials)
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()

    # -- public ----------------------------------------------------------
    def upload(self, object_name: str, content_type: str, size: int,
               extra_headers: Mapping[str, str] | None = None) -> SignedRequest:
        """A PUT URL that only accepts these exact bytes' type and size, and never overwrites."""
        headers = {
            "Content-Type": content_type,
            "x-goog-content-length-range": f"{size},{size}",
            "x-goog-if-generation-match": "0",
            **(extra_headers or {}),
        }
        ttl = self.config.upload_ttl_seconds
        expires_at = datetime.fromtimestamp(self._clock(), UTC) + timedelta(seconds=ttl)
        # Content-Type is passed in `headers`, not `content_type=`, so it is
        # signed as a header and the returned dict is exactly what was signed.
        url = self._sign(object_name, "PUT", ttl, headers=dict(headers))
        return SignedRequest(url=url, method="PUT", headers=headers, expires_at=expires_at)

    def download(self, object_name: str, filename: str = "", content_type: str = "") -> str:
        disposition = content_disposition(filename, content_type)
        key = (object_name, disposition)
        now = self._clock()
        with self._lock:
            cached = self._cache.get(key)
            if cached and cached[1] - now > self.config.download_ttl_seconds / 2:
                self._cache.move_to_end(key)
                return cached[0]
        url = self._sign(object_name, "GET", self.config.download_ttl_seconds,
                         response_disposition=disposition or None)
        with self._lock:
            self._cache[key] = (url, now + self.config.download_ttl_seconds)
            self._cache.move_to_end(key)
            while len(self._cache) > self.CACHE_SIZE:
                self._cache.popitem(last=False)
        return url

    def download_urls(self, files: Iterable[Mapping]) -> dict[str, str]:
        """``{file_id: url}`` for stored file records (those without an object are skipped)."""
        urls = {}
        for record in files:
            if record.get("object_name") and record.get("file_id"):
                urls[record["file_id"]] = self.download(record["object_name"], str(record.get("filename", "")),
                                                        str(record.get("content_type", "")))
        return urls

    # -- internals -------------------------------------------------------
    def _client(self):
        if self._storage_client is None:
            from google.auth.credentials import AnonymousCredentials
            from google.cloud import storage

            # Only used for the bucket/blob objects and the universe domain:
            # signing never calls the storage API.
            self._storage_client = storage.Client(project="signing", credentials=AnonymousCredentials())
        return self._storage_client

    def _credentials(self):
        if self._key_credentials is None:
            from google.oauth2 import service_account

            try:
                self._key_credentials = service_account.Credentials.from_service_account_file(
                    self.config.key_file)
            except (OSError, ValueError, KeyError) as exc:
                raise SigningUnavailable(f"cannot read SIGNING_KEY_FILE: {type(exc).__name__}") from None
        return self._key_credentials

    def _sign(self, object_name: str, method: str, ttl: int, **kwargs) -> str:
        blob = self._client().bucket(self.bucket_name).blob(object_name)
        common = {"version": "v4", "expiration": timedelta(seconds=ttl), "method": method,
                  "api_access_endpoint": self.config.endpoint, **kwargs}
        if self._keyless is None:
            return blob.generate_signed_url(credentials=self._credentials(), **common)
        email, token = self._keyless.current()
        return blob.generate_signed_url(service_account_email=email, access_token=token, **common)


def content_disposition(filename: str, content_type: str) -> str:
    """Raster images and PDFs open in the browser; everything else downloads."""
    if not filename:
        return ""
    kind = "inline" if content_type in INLINE_TYPES else "attachment"
    ascii_name = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in filename)
    return f"{kind}; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"
