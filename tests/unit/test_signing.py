"""chatcore.identity.signing: V4 signed URLs, with a private key and keyless through the IAM signBlob API.

Each signature is checked the way Cloud Storage checks it: the canonical
request is rebuilt from the URL and the headers a client sends, and the
RSA-SHA256 signature is verified with the signer's public key. So these tests
fail if a promised header (content type, length range, no-overwrite) is not
actually bound by the signature.

The keyless mode talks HTTP to a local server that speaks the IAM Credentials
``signBlob`` REST API; only the host of google-cloud-storage's HTTP call is
redirected to it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import types
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, unquote, urlparse

import google.auth.credentials
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from google.auth.transport import requests as auth_requests
from google.cloud.storage import _signing as storage_signing

from chatcore.errors import ConfigError
from chatcore.identity.signing import (
    GCS_ENDPOINT,
    MODE_IAM,
    MODE_KEY,
    SigningConfig,
    SigningUnavailable,
    UrlSigner,
    content_disposition,
)
from devstack.stack import write_signing_key
from tests.fakes.local_http import JsonHandler, ThreadedServer

EMULATOR = "http://127.0.0.1:4443"
BUCKET = "chat-uploads"
OBJECT = "uploads/conv1/AbCdEfGhIjKlMnOpQrSt/my photo.png"
SA_EMAIL = "uploader@chat-prod.iam.gserviceaccount.com"
UPLOAD_HEADERS = {"Content-Type": "image/png", "x-goog-content-length-range": "1234,1234",
                  "x-goog-if-generation-match": "0"}
SIGNED = "content-type;host;x-goog-content-length-range;x-goog-if-generation-match"


def verify(url: str, method: str, headers: dict[str, str], public_key) -> None:
    """Check a V4 signature as Cloud Storage does; raises InvalidSignature when it does not match."""
    parsed = urlparse(url)
    query, _, signature = parsed.query.rpartition("&X-Goog-Signature=")
    params = {k: v[0] for k, v in parse_qs(query).items()}
    sent = {k.lower(): " ".join(v.split()) for k, v in {**headers, "Host": parsed.netloc}.items()}
    signed_names = params["X-Goog-SignedHeaders"].split(";")
    assert sorted(sent) == signed_names, "the client must send exactly the signed headers"
    canonical_request = "\n".join([
        method, parsed.path, "&".join(sorted(query.split("&"))),
        "".join(f"{name}:{sent[name]}\n" for name in signed_names),
        params["X-Goog-SignedHeaders"], "UNSIGNED-PAYLOAD"])
    scope = params["X-Goog-Credential"].split("/", 1)[1]
    string_to_sign = "\n".join(["GOOG4-RSA-SHA256", params["X-Goog-Date"], scope,
                                hashlib.sha256(canonical_request.encode()).hexdigest()])
    public_key.verify(bytes.fromhex(signature), string_to_sign.encode(), padding.PKCS1v15(), hashes.SHA256())


def public_key_of(key_file) -> object:
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    return load_pem_private_key(json.loads(key_file.read_text())["private_key"].encode(), None).public_key()


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    return write_signing_key(tmp_path_factory.mktemp("key"), "chat-unit")


# -- configuration -------------------------------------------------------------
def test_config_defaults_to_keyless_on_storage_googleapis():
    config = SigningConfig.from_env({})
    assert config.mode == MODE_IAM
    assert config.endpoint == GCS_ENDPOINT
    assert (config.upload_ttl_seconds, config.download_ttl_seconds) == (900, 900)


def test_config_points_at_the_emulator_locally(key_file):
    config = SigningConfig.from_env({"STORAGE_EMULATOR_HOST": EMULATOR + "/", "SIGNING_KEY_FILE": str(key_file)})
    assert config.endpoint == EMULATOR and config.mode == MODE_KEY


def test_explicit_endpoint_wins():
    config = SigningConfig.from_env({"STORAGE_EMULATOR_HOST": EMULATOR, "SIGNED_URL_ENDPOINT": GCS_ENDPOINT})
    assert config.endpoint == GCS_ENDPOINT


@pytest.mark.parametrize("env", [{"SIGNED_URL_ENDPOINT": "storage.googleapis.com"},
                                 {"SIGNED_URL_ENDPOINT": "https://storage.googleapis.com/bucket"},
                                 {"UPLOAD_URL_TTL_SECONDS": "30"}, {"UPLOAD_URL_TTL_SECONDS": "7200"},
                                 {"DOWNLOAD_URL_TTL_SECONDS": str(8 * 24 * 3600)}])
def test_bad_config_is_refused(env):
    with pytest.raises(ConfigError):
        SigningConfig.from_env(env)


# -- key mode ------------------------------------------------------------------------
def test_upload_url_binds_type_size_and_no_overwrite_with_a_key(key_file):
    now = datetime.now(UTC)
    signer = UrlSigner(SigningConfig(key_file=str(key_file), endpoint=EMULATOR), BUCKET)
    signed = signer.upload(OBJECT, "image/png", 1234)
    assert signed.method == "PUT"
    assert signed.headers == UPLOAD_HEADERS
    assert timedelta(seconds=899) <= signed.expires_at - now <= timedelta(seconds=901)
    parsed = urlparse(signed.url)
    assert f"{parsed.scheme}://{parsed.netloc}" == EMULATOR
    assert unquote(parsed.path) == f"/{BUCKET}/{OBJECT}"
    params = {k: v[0] for k, v in parse_qs(parsed.query).items()}
    assert params["X-Goog-Algorithm"] == "GOOG4-RSA-SHA256"
    assert params["X-Goog-Credential"].startswith("local-signer@chat-unit.iam.gserviceaccount.com/")
    assert params["X-Goog-Expires"] == "900"
    assert params["X-Goog-SignedHeaders"] == SIGNED
    public_key = public_key_of(key_file)
    verify(signed.url, "PUT", signed.headers, public_key)
    for header, other in (("Content-Type", "text/html"), ("x-goog-content-length-range", "0,999999999"),
                          ("x-goog-if-generation-match", "123")):
        with pytest.raises(InvalidSignature):
            verify(signed.url, "PUT", {**signed.headers, header: other}, public_key)
    with pytest.raises(InvalidSignature):
        verify(signed.url, "POST", signed.headers, public_key)


def test_production_urls_point_at_storage_googleapis(key_file):
    signer = UrlSigner(SigningConfig(key_file=str(key_file)), BUCKET)
    assert signer.upload(OBJECT, "image/png", 1).url.startswith(f"https://storage.googleapis.com/{BUCKET}/uploads/")


def test_download_url_is_signed_and_cached(key_file):
    clock = [1_000_000.0]
    signer = UrlSigner(SigningConfig(key_file=str(key_file), endpoint=EMULATOR, download_ttl_seconds=600), BUCKET,
                       clock=lambda: clock[0])
    signatures = []
    sign = signer._sign
    signer._sign = lambda *args, **kwargs: signatures.append(args) or sign(*args, **kwargs)
    url = signer.download(OBJECT, "my photo.png", "image/png")
    params = {k: v[0] for k, v in parse_qs(urlparse(url).query).items()}
    assert params["X-Goog-Expires"] == "600" and params["X-Goog-SignedHeaders"] == "host"
    assert params["response-content-disposition"].startswith('inline; filename="my photo.png"')
    verify(url, "GET", {}, public_key_of(key_file))
    clock[0] += 299
    assert signer.download(OBJECT, "my photo.png", "image/png") == url  # more than half its life left
    assert len(signatures) == 1
    clock[0] += 2
    signer.download(OBJECT, "my photo.png", "image/png")
    assert len(signatures) == 2  # re-signed once less than half its life was left
    signer.download(OBJECT, "other.png", "image/png")
    assert len(signatures) == 3  # the disposition (filename) is part of the cache key
    urls = signer.download_urls([{"file_id": "f1", "object_name": OBJECT, "filename": "a.png"},
                                 {"file_id": "f2"}])
    assert list(urls) == ["f1"]


def test_unreadable_key_file_is_unavailable(tmp_path):
    signer = UrlSigner(SigningConfig(key_file=str(tmp_path / "missing.json"), endpoint=EMULATOR), BUCKET)
    with pytest.raises(SigningUnavailable):
        signer.upload(OBJECT, "image/png", 1)


@pytest.mark.parametrize(("filename", "content_type", "expected"), [
    ("a.png", "image/png", "inline; filename=\"a.png\"; filename*=UTF-8''a.png"),
    ("doc.pdf", "application/pdf", "inline; filename=\"doc.pdf\"; filename*=UTF-8''doc.pdf"),
    ("notes.txt", "text/plain", "attachment; filename=\"notes.txt\"; filename*=UTF-8''notes.txt"),
    ("x.svg", "image/svg+xml", "attachment; filename=\"x.svg\"; filename*=UTF-8''x.svg"),
    ('é "q".csv', "text/csv", "attachment; filename=\"_ _q_.csv\"; filename*=UTF-8''%C3%A9%20%22q%22.csv"),
    ("", "text/plain", ""),
])
def test_content_disposition(filename, content_type, expected):
    assert content_disposition(filename, content_type) == expected


# -- keyless mode (IAM Credentials signBlob) ------------------------------------------
class FakeIamCredentials(ThreadedServer):
    """A local server speaking the IAM Credentials API's signBlob method."""

    def __init__(self):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.calls: list[dict] = []
        self.valid_token = "access-token-1"
        fake = self

        class Handler(JsonHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.calls.append({"path": self.path, "authorization": self.headers.get("Authorization"),
                                   "body": body})
                if self.headers.get("Authorization") != f"Bearer {fake.valid_token}":
                    return self.send_json(401, {"error": {"code": 401, "status": "UNAUTHENTICATED"}})
                signature = fake.key.sign(base64.b64decode(body["payload"]), padding.PKCS1v15(), hashes.SHA256())
                self.send_json(200, {"keyId": "0123abcd", "signedBlob": base64.b64encode(signature).decode()})

        super().__init__(Handler, name="fake-iam-credentials")


@pytest.fixture
def iam(monkeypatch):
    fake = FakeIamCredentials().start()

    class Redirected:
        """google-auth's requests transport, with the IAM host swapped for the local server."""

        def __init__(self):
            self.inner = auth_requests.Request()

        def __call__(self, url, method="GET", body=None, headers=None, timeout=None, **kwargs):
            assert url.startswith("https://iamcredentials.googleapis.com/v1/"), url
            url = url.replace("https://iamcredentials.googleapis.com", fake.base)
            return self.inner(url, method=method, body=body, headers=headers, timeout=timeout, **kwargs)

    monkeypatch.setattr(storage_signing, "requests", types.SimpleNamespace(Request=Redirected))
    yield fake
    fake.stop()


class RuntimeCredentials(google.auth.credentials.Credentials):
    """Like the metadata-server credentials of Cloud Run: a token that needs refreshing, and an account e-mail."""

    def __init__(self, email: str = SA_EMAIL, token: str = "access-token-1"):
        super().__init__()
        self.service_account_email = email
        self._next_token = token
        self.refreshes = 0

    def refresh(self, request):
        self.refreshes += 1
        self.token = self._next_token
        self.expiry = (datetime.now(UTC) + timedelta(hours=1)).replace(tzinfo=None)


def test_keyless_upload_url_is_signed_by_signblob(iam):
    credentials = RuntimeCredentials()
    signer = UrlSigner(SigningConfig(), BUCKET, credentials=credentials)
    assert signer.config.mode == MODE_IAM
    signed = signer.upload(OBJECT, "image/png", 1234)
    assert signed.headers == UPLOAD_HEADERS
    assert credentials.refreshes == 1
    assert len(iam.calls) == 1
    call = iam.calls[0]
    assert call["path"] == f"/v1/projects/-/serviceAccounts/{SA_EMAIL}:signBlob?alt=json"
    assert call["authorization"] == "Bearer access-token-1"
    parsed = urlparse(signed.url)
    assert f"{parsed.scheme}://{parsed.netloc}" == GCS_ENDPOINT
    params = {k: v[0] for k, v in parse_qs(parsed.query).items()}
    assert params["X-Goog-Credential"].startswith(f"{SA_EMAIL}/")
    assert params["X-Goog-SignedHeaders"] == SIGNED
    # What signBlob signed is exactly the string Cloud Storage will rebuild from this URL and these headers.
    verify(signed.url, "PUT", signed.headers, iam.key.public_key())
    with pytest.raises(InvalidSignature):
        verify(signed.url, "PUT", {**signed.headers, "x-goog-if-generation-match": "7"}, iam.key.public_key())
    signer.download(OBJECT, "a.png", "image/png")
    assert credentials.refreshes == 1, "a valid token is reused"
    assert len(iam.calls) == 2


def test_keyless_configured_email_wins(iam):
    other = "signer@chat-prod.iam.gserviceaccount.com"
    signer = UrlSigner(SigningConfig(service_account_email=other), BUCKET, credentials=RuntimeCredentials())
    signed = signer.upload(OBJECT, "text/plain", 5)
    assert iam.calls[0]["path"].startswith(f"/v1/projects/-/serviceAccounts/{other}:signBlob")
    assert parse_qs(urlparse(signed.url).query)["X-Goog-Credential"][0].startswith(f"{other}/")


def test_keyless_refused_token_is_an_error(iam):
    from google.auth import exceptions as auth_exc

    signer = UrlSigner(SigningConfig(), BUCKET, credentials=RuntimeCredentials(token="revoked"))
    with pytest.raises(auth_exc.TransportError):
        signer.upload(OBJECT, "image/png", 1)


def test_keyless_without_an_account_is_unavailable(iam):
    signer = UrlSigner(SigningConfig(), BUCKET, credentials=RuntimeCredentials(email="default"))
    with pytest.raises(SigningUnavailable):
        signer.upload(OBJECT, "image/png", 1)
    assert iam.calls == []
