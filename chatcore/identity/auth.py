"""JWT verification with an explicit algorithm allow-list.

Supported, all at once if configured:
- HS256/HS384/HS512 with a shared secret (what the legacy app issued);
- RS256/ES256 (and the other RSA/EC sizes) with a public key given as PEM,
  or fetched from a JWKS URL (Identity Platform / Firebase style, cached).

The key is chosen by the token header's ``alg`` family, so an RSA public key
can never be used as an HMAC secret (the classic algorithm-confusion attack),
and ``alg: none`` is refused because it is never in the allow-list.
Tokens are never logged: errors carry only a short reason.
"""

from __future__ import annotations

import re
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import jwt

from .. import protocol
from ..config import env_float, env_list, env_str
from ..errors import ConfigError, InvalidArgument, Unauthenticated

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512")
MAX_LEEWAY_SECONDS = 60.0
# A key removed from the JWKS is refused at most this long after.
JWKS_LIFESPAN_SECONDS = 300.0
# An unknown kid refetches the key set at most this often.
JWKS_COOLDOWN_SECONDS = 30.0
REQUIRED_CLAIMS = ("exp", "iat", "sub")
# Query parameters that carry a token, compared case-insensitively.
QUERY_TOKEN_NAMES = frozenset({"token", "access_token", "id_token", "jwt", "auth", "authorization", "bearer"})
# A compact JWS: base64url header starting with '{"' ("eyJ"), payload and signature.
_JWT_SHAPE = re.compile(r"(?:(?i:bearer)\s+)?eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


@dataclass(frozen=True)
class AuthConfig:
    algorithms: tuple[str, ...] = ("HS256",)
    secret: str = ""
    public_key_pem: str = ""
    jwks_url: str = ""
    issuer: str = ""
    audience: str = ""
    leeway_seconds: float = 30.0

    def __post_init__(self):
        unknown = [a for a in self.algorithms if a not in HMAC_ALGORITHMS + ASYMMETRIC_ALGORITHMS]
        if unknown:
            raise ConfigError(f"JWT_ALGORITHMS has unsupported algorithms: {', '.join(unknown)}")
        if not self.algorithms:
            raise ConfigError("JWT_ALGORITHMS must name at least one algorithm")
        if any(a in HMAC_ALGORITHMS for a in self.algorithms) and len(self.secret) < 32:
            raise ConfigError("an HS* algorithm is allowed, so JWT_SECRET must be set (at least 32 characters)")
        if any(a in ASYMMETRIC_ALGORITHMS for a in self.algorithms) and not (self.public_key_pem or self.jwks_url):
            raise ConfigError("an RS*/ES* algorithm is allowed, so JWT_PUBLIC_KEY or JWT_JWKS_URL must be set")
        if not 0 <= self.leeway_seconds <= MAX_LEEWAY_SECONDS:
            raise ConfigError(f"JWT_LEEWAY_SECONDS must be between 0 and {MAX_LEEWAY_SECONDS:g}")

    @property
    def uses_public_keys(self) -> bool:
        """True when tokens may be checked with a public key (PEM or JWKS) rather than our own secret."""
        return bool(self.public_key_pem or self.jwks_url)

    def check_for_production(self) -> None:
        """Refuse public keys without both ``iss`` and ``aud`` checks (``ConfigError``).

        A public key set may sign other parties' tokens too: Google's
        securetoken JWKS signs the ID tokens of every Firebase project, with
        any ``sub``. Only the issuer and the audience tell ours apart.
        """
        if self.uses_public_keys and not (self.issuer and self.audience):
            raise ConfigError("CHAT_ENV=production with JWT_JWKS_URL or JWT_PUBLIC_KEY needs JWT_ISSUER and "
                              "JWT_AUDIENCE: a public key set may sign other projects' tokens too")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> AuthConfig:
        return cls(
            algorithms=env_list(environ, "JWT_ALGORITHMS", ("HS256",)),
            secret=env_str(environ, "JWT_SECRET"),
            public_key_pem=env_str(environ, "JWT_PUBLIC_KEY").replace("\\n", "\n"),
            jwks_url=env_str(environ, "JWT_JWKS_URL"),
            issuer=env_str(environ, "JWT_ISSUER"),
            audience=env_str(environ, "JWT_AUDIENCE"),
            leeway_seconds=env_float(environ, "JWT_LEEWAY_SECONDS", 30.0, minimum=0, maximum=MAX_LEEWAY_SECONDS),
        )

    def __repr__(self) -> str:  # never print the secret
        return (f"AuthConfig(algorithms={self.algorithms}, secret={'<set>' if self.secret else '<unset>'}, "
                f"public_key_pem={'<set>' if self.public_key_pem else '<unset>'}, jwks_url={self.jwks_url!r}, "
                f"issuer={self.issuer!r}, audience={self.audience!r}, leeway_seconds={self.leeway_seconds})")


@dataclass(frozen=True)
class Identity:
    user_id: str
    name: str
    expires_at: float


class TokenVerifier:
    """Verifies bearer tokens against an :class:`AuthConfig`."""

    def __init__(self, config: AuthConfig, *, jwks_client: jwt.PyJWKClient | None = None,
                 jwks_lifespan: float = JWKS_LIFESPAN_SECONDS, jwks_cooldown: float = JWKS_COOLDOWN_SECONDS):
        self.config = config
        self._jwks = jwks_client
        if self._jwks is None and config.jwks_url:
            # Only the key set is cached, for ``jwks_lifespan``; a token naming
            # an unknown kid refetches it, at most once per ``jwks_cooldown``
            # (tokens with made-up kids cannot make us hammer the URL). PyJWT's
            # per-kid cache (cache_keys=True) never expires: a key removed from
            # the set, a revoked one included, stayed accepted until a restart.
            self._jwks = jwt.PyJWKClient(config.jwks_url, cache_keys=False, cache_jwk_set=True,
                                         lifespan=jwks_lifespan, cooldown_duration=jwks_cooldown, timeout=5)

    def uses_network(self, token: str) -> bool:
        """True when verifying this token may fetch a JWKS document (run it off the event loop)."""
        try:
            alg = jwt.get_unverified_header(token).get("alg")
        except (jwt.PyJWTError, ValueError):  # ValueError: not ASCII (verify refuses it)
            return False
        return alg in ASYMMETRIC_ALGORITHMS and self._jwks is not None and not self.config.public_key_pem

    def verify(self, token: Any) -> Identity:
        if not isinstance(token, str) or not token:
            raise Unauthenticated("missing token")
        if not token.isascii():  # a JWT is base64url and dots
            raise Unauthenticated("malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("malformed token") from None
        alg = header.get("alg")
        if alg not in self.config.algorithms:
            raise Unauthenticated("token algorithm not allowed")
        key = self._key_for(alg, token)
        options = {"require": list(REQUIRED_CLAIMS), "verify_aud": bool(self.config.audience),
                   "verify_iss": bool(self.config.issuer)}
        try:
            claims = jwt.decode(
                token, key, algorithms=[alg], options=options,
                audience=self.config.audience or None, issuer=self.config.issuer or None,
                leeway=self.config.leeway_seconds,
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("token not yet valid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthenticated(f"token lacks the {exc.claim!r} claim") from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
            raise Unauthenticated("token issuer or audience not accepted") from None
        except (jwt.PyJWTError, TypeError, ValueError):
            # TypeError/ValueError: PyJWT refusing a key of the wrong type for
            # the header's alg (e.g. a JWKS RSA key named by an ES256 token).
            raise Unauthenticated("invalid token") from None
        try:
            sub = protocol.parse_user_id(claims.get("sub"))
        except InvalidArgument:
            raise Unauthenticated("token subject is not a usable user id") from None
        try:
            name = protocol.client_text(claims.get("name"), "name")
        except InvalidArgument:
            name = None  # a name the chat could not store or show: the user id stands in
        if not isinstance(name, str) or not name.strip():
            name = sub
        try:
            expires_at = float(claims["exp"])
        except OverflowError:  # a far-future integer PyJWT accepted
            expires_at = sys.float_info.max
        return Identity(user_id=sub, name=name[:100], expires_at=expires_at)

    def _key_for(self, alg: str, token: str):
        if alg in HMAC_ALGORITHMS:
            return self.config.secret
        if self.config.public_key_pem:
            return self.config.public_key_pem
        if self._jwks is not None:
            try:
                return self._jwks.get_signing_key_from_jwt(token).key
            except jwt.PyJWKClientConnectionError:
                raise Unauthenticated("signing keys unavailable") from None
            except jwt.PyJWTError:
                raise Unauthenticated("no signing key for this token") from None
        raise Unauthenticated("token algorithm not allowed")


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def handshake_token(auth: Any, environ: Mapping[str, Any]) -> str:
    """The token of a Socket.IO handshake: ``auth.token`` or the Authorization header.

    A token in the query string is refused outright (it leaks into access logs).
    """
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if any(key.lower() in QUERY_TOKEN_NAMES or any(_JWT_SHAPE.fullmatch(v.strip()) for v in values)
           for key, values in query.items()):
        raise Unauthenticated("tokens in the query string are not accepted; use the handshake auth payload")
    if isinstance(auth, dict) and auth.get("token"):
        token = auth["token"]
        if not isinstance(token, str):
            raise Unauthenticated("auth.token must be a string")
        return token
    token = bearer_token(environ.get("HTTP_AUTHORIZATION"))
    if token is None:
        raise Unauthenticated("missing token: send auth {token} in the handshake")
    return token


def issue_token(secret: str, user_id: str, *, name: str | None = None, ttl_seconds: int = 3600,
                algorithm: str = "HS256", extra: Mapping[str, Any] | None = None) -> str:
    """Sign an HS* token. Used by the local-development token endpoint and tests only."""
    now = int(time.time())
    claims = {"sub": user_id, "iat": now, "exp": now + ttl_seconds, "jti": uuid.uuid4().hex}
    if name:
        claims["name"] = name
    claims.update(extra or {})
    return jwt.encode(claims, secret, algorithm=algorithm)
