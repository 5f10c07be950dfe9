"""Review finding 2: "JWKS without issuer and audience accepts tokens from anyone."

A public key set such as Google's securetoken JWKS signs the ID tokens of
every Firebase project; only `iss` and `aud` tell this project's tokens from
the others'. So in production (CHAT_ENV=production) a JWKS URL or a public
key without JWT_ISSUER and JWT_AUDIENCE refuses to start, in every deployable
that verifies tokens: the socket service and the upload functions.
(ai_stream verifies no tokens. Terraform's side: tests/infra/test_jwt_issuer_audience_required.py.)
"""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from uploads.settings import Settings as UploadSettings

from chatcore.errors import ConfigError, Unauthenticated
from chatcore.identity.auth import AuthConfig, TokenVerifier
from socket_service.settings import Settings as ServiceSettings

GOOGLE_JWKS = "https://www.googleapis.com/service_accounts/v1/jwk/securetoken@system.gserviceaccount.com"
ISSUER = "https://securetoken.google.com/chat-prod-1"
AUDIENCE = "chat-prod-1"
PRODUCTION = {
    ServiceSettings: {"GOOGLE_CLOUD_PROJECT": "chat-prod-1", "CHAT_ENV": "production",
                      "CORS_ALLOWED_ORIGINS": "https://chat.example.com", "UPLOAD_URL": "https://upload.example.com/"},
    UploadSettings: {"GOOGLE_CLOUD_PROJECT": "chat-prod-1", "CHAT_ENV": "production",
                     "CORS_ALLOWED_ORIGINS": "https://chat.example.com"},
}
DEPLOYABLES = pytest.mark.parametrize("settings", PRODUCTION, ids=["socket_service", "upload"])


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(private_key) -> str:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def key_env(kind: str, private_key) -> dict[str, str]:
    if kind == "jwks":
        return {"JWT_ALGORITHMS": "RS256", "JWT_JWKS_URL": GOOGLE_JWKS}
    return {"JWT_ALGORITHMS": "ES256", "JWT_PUBLIC_KEY": public_pem(private_key)}


KINDS = pytest.mark.parametrize("kind", ["jwks", "public_key"])


@DEPLOYABLES
@KINDS
@pytest.mark.parametrize("claims", [{}, {"JWT_ISSUER": ISSUER}, {"JWT_AUDIENCE": AUDIENCE}],
                         ids=["neither", "issuer_only", "audience_only"])
def test_production_with_public_keys_but_no_issuer_or_audience_refuses_to_start(settings, kind, claims, ec_key):
    with pytest.raises(ConfigError, match="JWT_ISSUER and JWT_AUDIENCE"):
        settings.from_env({**PRODUCTION[settings], **key_env(kind, ec_key), **claims})


@DEPLOYABLES
@KINDS
def test_production_with_public_keys_issuer_and_audience_starts(settings, kind, ec_key):
    loaded = settings.from_env({**PRODUCTION[settings], **key_env(kind, ec_key), "JWT_ISSUER": ISSUER,
                                "JWT_AUDIENCE": AUDIENCE})
    assert (loaded.auth.issuer, loaded.auth.audience) == (ISSUER, AUDIENCE)


@DEPLOYABLES
def test_production_with_a_shared_secret_alone_needs_no_issuer_or_audience(settings):
    loaded = settings.from_env({**PRODUCTION[settings], "JWT_SECRET": "s" * 48})
    assert loaded.auth.algorithms == ("HS256",)


@DEPLOYABLES
def test_local_development_may_leave_issuer_and_audience_unset(settings, ec_key):
    local = {**PRODUCTION[settings], "CHAT_ENV": "local", "CORS_ALLOWED_ORIGINS": "*", "JWT_SECRET": "s" * 48}
    loaded = settings.from_env({**local, **key_env("public_key", ec_key), "JWT_ALGORITHMS": "HS256,ES256"})
    assert loaded.auth.issuer == loaded.auth.audience == ""


def test_with_issuer_and_audience_another_projects_token_is_refused(ec_key):
    """What the required settings buy: the same key set, another project's token, refused."""
    verifier = TokenVerifier(AuthConfig(algorithms=("ES256",), public_key_pem=public_pem(ec_key), issuer=ISSUER,
                                        audience=AUDIENCE))
    now = int(time.time())

    def token(project: str) -> str:
        return jwt.encode({"sub": "mallory", "iat": now - 10, "exp": now + 600, "aud": project,
                           "iss": f"https://securetoken.google.com/{project}"}, ec_key, algorithm="ES256")

    assert verifier.verify(token(AUDIENCE)).user_id == "mallory"
    with pytest.raises(Unauthenticated, match="issuer or audience"):
        verifier.verify(token("someone-elses-project"))
