"""JWT verification (chatcore.identity.auth) and the environment readers it uses (chatcore.config).

Every key is generated at test time with ``cryptography``. The JWKS case is
served by a real HTTP server on 127.0.0.1 speaking the JWKS JSON format.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import secrets
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm

from chatcore.config import env_bool, env_choice, env_float, env_int, env_list, env_str
from chatcore.errors import ConfigError, Unauthenticated
from chatcore.identity.auth import (
    MAX_LEEWAY_SECONDS,
    AuthConfig,
    Identity,
    TokenVerifier,
    bearer_token,
    handshake_token,
    issue_token,
)
from tests.fakes.local_http import JsonHandler, ThreadedServer

SECRET = secrets.token_urlsafe(48)


# -- keys and tokens ------------------------------------------------------
def _public_pem(private_key) -> str:
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


def claims(sub: str = "alice", *, ttl: int = 600, **extra) -> dict:
    now = int(time.time())
    body = {"sub": sub, "iat": now, "exp": now + ttl}
    body.update(extra)
    return {k: v for k, v in body.items() if v is not None}


def hs_token(body: dict | None = None, secret: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(body if body is not None else claims(), secret, algorithm=alg)


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def hand_made_token(header: dict, body: dict, sign=None) -> str:
    """A compact JWS built by hand, for tokens PyJWT refuses to produce."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(body).encode())}"
    signature = sign(signing_input.encode()) if sign else b""
    return f"{signing_input}.{b64url(signature)}"


def hs_verifier(**kwargs) -> TokenVerifier:
    return TokenVerifier(AuthConfig(algorithms=("HS256",), secret=SECRET, **kwargs))


# -- a real JWKS endpoint ---------------------------------------------------
class JwksServer(ThreadedServer):
    """Serves ``/jwks.json`` (the keys given) and ``/broken`` (HTTP 500) on a free port."""

    def __init__(self, jwks: dict):
        self.jwks = jwks
        self.requests: list[str] = []
        server = self

        class Handler(JsonHandler):
            def do_GET(self):  # noqa: N802 (http.server API)
                server.requests.append(self.path)
                if self.path == "/jwks.json":
                    self.send_json(200, server.jwks)
                else:
                    self.send_error(500, "broken on purpose")

        super().__init__(Handler, name="jwks-server")


@pytest.fixture(scope="module")
def jwks_server(ec_key, rsa_key):
    ec_jwk = ECAlgorithm.to_jwk(ec_key.public_key(), as_dict=True)
    ec_jwk.update({"kid": "ec-1", "use": "sig", "alg": "ES256"})
    rsa_jwk = jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
    rsa_jwk.update({"kid": "rsa-1", "use": "sig", "alg": "RS256"})
    with JwksServer({"keys": [rsa_jwk, ec_jwk]}) as server:
        yield server


# -- HS256 ----------------------------------------------------------------
def test_hs256_token_with_the_secret_is_accepted():
    body = claims("alice", name="Alice")
    identity = hs_verifier().verify(hs_token(body))
    assert identity == Identity(user_id="alice", name="Alice", expires_at=float(body["exp"]))


@pytest.mark.parametrize("alg", ["HS384", "HS512"])
def test_other_hmac_sizes_when_allowed(alg):
    verifier = TokenVerifier(AuthConfig(algorithms=("HS256", alg), secret=SECRET))
    assert verifier.verify(hs_token(alg=alg)).user_id == "alice"


def test_issue_token_round_trips():
    token = issue_token(SECRET, "bob", name="Bob", ttl_seconds=120)
    identity = hs_verifier().verify(token)
    assert (identity.user_id, identity.name) == ("bob", "Bob")
    assert 110 <= identity.expires_at - time.time() <= 121
    assert isinstance(jwt.decode(token, SECRET, algorithms=["HS256"])["jti"], str)


# -- RS256 with a PEM public key ---------------------------------------------
def test_rs256_with_pem_public_key(rsa_key):
    verifier = TokenVerifier(AuthConfig(algorithms=("RS256",), public_key_pem=_public_pem(rsa_key)))
    token = jwt.encode(claims("carol"), rsa_key, algorithm="RS256")
    assert verifier.verify(token).user_id == "carol"
    assert verifier.uses_network(token) is False


def test_rs256_signed_by_another_key_is_refused(rsa_key, other_rsa_key):
    verifier = TokenVerifier(AuthConfig(algorithms=("RS256",), public_key_pem=_public_pem(rsa_key)))
    token = jwt.encode(claims("carol"), other_rsa_key, algorithm="RS256")
    with pytest.raises(Unauthenticated, match="^invalid token$"):
        verifier.verify(token)


def test_public_key_from_env_with_escaped_newlines(rsa_key):
    pem = _public_pem(rsa_key)
    config = AuthConfig.from_env({"JWT_ALGORITHMS": "RS256", "JWT_PUBLIC_KEY": pem.replace("\n", "\\n")})
    assert config.public_key_pem.strip() == pem.strip()
    token = jwt.encode(claims("dave"), rsa_key, algorithm="RS256")
    assert TokenVerifier(config).verify(token).user_id == "dave"


# -- ES256 with keys from a JWKS URL -------------------------------------------
def test_es256_with_jwks_url(jwks_server, ec_key):
    verifier = TokenVerifier(AuthConfig(algorithms=("ES256", "RS256"), jwks_url=jwks_server.base + "/jwks.json"))
    token = jwt.encode(claims("erin", name="Erin"), ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    assert verifier.uses_network(token) is True
    before = len(jwks_server.requests)
    assert verifier.verify(token) == Identity("erin", "Erin", float(jwt.decode(
        token, ec_key.public_key(), algorithms=["ES256"])["exp"]))
    assert jwks_server.requests[before:] == ["/jwks.json"]
    # A second token is verified from the cached key set: no new request.
    assert verifier.verify(jwt.encode(claims("frank"), ec_key, algorithm="ES256",
                                      headers={"kid": "ec-1"})).user_id == "frank"
    assert len(jwks_server.requests) == before + 1


def test_jwks_rsa_key_also_served(jwks_server, rsa_key):
    verifier = TokenVerifier(AuthConfig(algorithms=("ES256", "RS256"), jwks_url=jwks_server.base + "/jwks.json"))
    token = jwt.encode(claims("gina"), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    assert verifier.verify(token).user_id == "gina"


def test_jwks_token_signed_by_unknown_key_is_refused(jwks_server):
    verifier = TokenVerifier(AuthConfig(algorithms=("ES256",), jwks_url=jwks_server.base + "/jwks.json"))
    stranger = ec.generate_private_key(ec.SECP256R1())
    wrong_kid = jwt.encode(claims(), stranger, algorithm="ES256", headers={"kid": "nope"})
    with pytest.raises(Unauthenticated, match="^no signing key for this token$"):
        verifier.verify(wrong_kid)
    # Right kid, wrong key: the signature check fails.
    forged = jwt.encode(claims(), stranger, algorithm="ES256", headers={"kid": "ec-1"})
    with pytest.raises(Unauthenticated, match="^invalid token$"):
        verifier.verify(forged)


def test_jwks_key_of_the_wrong_type_for_the_alg_is_refused(jwks_server, ec_key, rsa_key):
    # The kid names a key of another family than the header's alg: refused
    # as an invalid token (PyJWT raises TypeError here, not a PyJWTError).
    verifier = TokenVerifier(AuthConfig(algorithms=("ES256", "RS256"), jwks_url=jwks_server.base + "/jwks.json"))
    es_naming_rsa = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "rsa-1"})
    rs_naming_ec = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "ec-1"})
    for token in (es_naming_rsa, rs_naming_ec):
        with pytest.raises(Unauthenticated, match="^invalid token$"):
            verifier.verify(token)


def test_jwks_endpoint_failure_is_reported_as_unavailable_keys(jwks_server, ec_key):
    verifier = TokenVerifier(AuthConfig(algorithms=("ES256",), jwks_url=jwks_server.base + "/broken"))
    token = jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "ec-1"})
    with pytest.raises(Unauthenticated, match="^signing keys unavailable$"):
        verifier.verify(token)


def test_pem_takes_precedence_over_jwks(jwks_server, rsa_key):
    config = AuthConfig(algorithms=("RS256",), public_key_pem=_public_pem(rsa_key),
                        jwks_url=jwks_server.base + "/jwks.json")
    verifier = TokenVerifier(config)
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "rsa-1"})
    before = len(jwks_server.requests)
    assert verifier.uses_network(token) is False
    assert verifier.verify(token).user_id == "alice"
    assert len(jwks_server.requests) == before


# -- time claims -----------------------------------------------------------
def test_expired_token_is_refused():
    now = int(time.time())
    token = hs_token({"sub": "alice", "iat": now - 3600, "exp": now - 120})
    with pytest.raises(Unauthenticated, match="^token expired$"):
        hs_verifier(leeway_seconds=30).verify(token)


def test_expiry_within_leeway_is_accepted():
    now = int(time.time())
    token = hs_token({"sub": "alice", "iat": now - 3600, "exp": now - 10})
    assert hs_verifier(leeway_seconds=30).verify(token).user_id == "alice"
    with pytest.raises(Unauthenticated, match="^token expired$"):
        hs_verifier(leeway_seconds=0).verify(token)


def test_token_not_yet_valid_nbf_is_refused():
    token = hs_token(claims(nbf=int(time.time()) + 300))
    with pytest.raises(Unauthenticated, match="^token not yet valid$"):
        hs_verifier().verify(token)


def test_token_issued_in_the_future_is_refused():
    now = int(time.time())
    token = hs_token({"sub": "alice", "iat": now + 300, "exp": now + 900})
    with pytest.raises(Unauthenticated, match="^token not yet valid$"):
        hs_verifier().verify(token)


@pytest.mark.parametrize("missing", ["exp", "iat", "sub"])
def test_required_claims_each_refused_when_missing(missing):
    body = claims()
    del body[missing]
    with pytest.raises(Unauthenticated, match=f"^token lacks the '{missing}' claim$"):
        hs_verifier().verify(hs_token(body))


@pytest.mark.parametrize("bad_exp", ["soon", [1], {"at": 1}])
def test_non_numeric_exp_is_refused(bad_exp):
    body = claims()
    body["exp"] = bad_exp
    with pytest.raises(Unauthenticated):
        hs_verifier().verify(hs_token(body))


def test_far_future_exp_gives_a_finite_expiry():
    # PyJWT accepts any integer exp; a huge one must not crash the caller.
    token = hs_token(claims(exp=10 ** 400))
    identity = hs_verifier().verify(token)
    assert identity.user_id == "alice"
    assert identity.expires_at > time.time() + 10 ** 9
    assert identity.expires_at != float("inf")


# -- signatures and algorithms ------------------------------------------------
def test_wrong_secret_is_refused():
    with pytest.raises(Unauthenticated, match="^invalid token$"):
        hs_verifier().verify(hs_token(secret=secrets.token_urlsafe(48)))


def test_tampered_payload_is_refused():
    header, _, signature = hs_token(claims("alice")).split(".")
    forged_body = b64url(json.dumps(claims("mallory")).encode())
    with pytest.raises(Unauthenticated, match="^invalid token$"):
        hs_verifier().verify(f"{header}.{forged_body}.{signature}")


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_refused(alg):
    token = hand_made_token({"alg": alg, "typ": "JWT"}, claims())
    with pytest.raises(Unauthenticated, match="^token algorithm not allowed$"):
        hs_verifier().verify(token)


def test_alg_none_cannot_be_allowed():
    with pytest.raises(ConfigError, match="none"):
        AuthConfig(algorithms=("none",), secret=SECRET)


def test_algorithm_confusion_rsa_public_key_as_hmac_secret_is_refused(rsa_key):
    pem = _public_pem(rsa_key)
    verifier = TokenVerifier(AuthConfig(algorithms=("HS256", "RS256"), secret=SECRET, public_key_pem=pem))
    # A genuine RS256 token passes, so the RSA key is really configured...
    assert verifier.verify(jwt.encode(claims(), rsa_key, algorithm="RS256")).user_id == "alice"
    # ...but an HS256 token whose HMAC key is that public PEM does not.
    for key in (pem.encode(), pem.strip().encode()):
        forged = hand_made_token({"alg": "HS256", "typ": "JWT"}, claims("mallory"),
                                 sign=lambda data, k=key: hmac.new(k, data, hashlib.sha256).digest())
        with pytest.raises(Unauthenticated, match="^invalid token$"):
            verifier.verify(forged)


def test_algorithm_outside_the_allow_list_is_refused(rsa_key):
    with pytest.raises(Unauthenticated, match="^token algorithm not allowed$"):
        hs_verifier().verify(hs_token(alg="HS512"))
    rs_only = TokenVerifier(AuthConfig(algorithms=("RS256",), public_key_pem=_public_pem(rsa_key)))
    with pytest.raises(Unauthenticated, match="^token algorithm not allowed$"):
        rs_only.verify(hs_token())
    with pytest.raises(Unauthenticated, match="^token algorithm not allowed$"):
        rs_only.verify(jwt.encode(claims(), rsa_key, algorithm="PS256"))


@pytest.mark.parametrize("token", [None, "", 42, b"abc", "not-a-jwt", "a.b.c", "....", "eyJ.eyJ.x"])
def test_garbage_is_refused(token):
    with pytest.raises(Unauthenticated):
        hs_verifier().verify(token)


@pytest.mark.parametrize("sub", ["", "   ", "a/b", "x" * 257, 123])
def test_unusable_subject_is_refused(sub):
    with pytest.raises(Unauthenticated):
        hs_verifier().verify(hs_token(claims(sub=sub)))


# -- issuer and audience ----------------------------------------------------
def test_issuer_and_audience_checked_when_configured():
    verifier = hs_verifier(issuer="https://issuer.example", audience="chat")
    good = claims(iss="https://issuer.example", aud="chat")
    assert verifier.verify(hs_token(good)).user_id == "alice"
    assert verifier.verify(hs_token({**good, "aud": ["other", "chat"]})).user_id == "alice"
    for bad in ({**good, "iss": "https://evil.example"}, {**good, "aud": "other"}):
        with pytest.raises(Unauthenticated, match="^token issuer or audience not accepted$"):
            verifier.verify(hs_token(bad))
    for missing in ("iss", "aud"):
        body = dict(good)
        del body[missing]
        with pytest.raises(Unauthenticated, match=f"'{missing}'"):
            verifier.verify(hs_token(body))


def test_issuer_and_audience_ignored_when_not_configured():
    token = hs_token(claims(iss="https://anyone.example", aud="whatever"))
    assert hs_verifier().verify(token).user_id == "alice"


# -- display name ------------------------------------------------------------
@pytest.mark.parametrize("name, expected", [
    (None, "alice"), ("", "alice"), ("   ", "alice"), (17, "alice"), ("Alice", "Alice"), ("A" * 300, "A" * 100),
])
def test_name_falls_back_to_sub(name, expected):
    assert hs_verifier().verify(hs_token(claims("alice", name=name))).name == expected


# -- configuration -----------------------------------------------------------
def test_leeway_above_the_maximum_is_refused():
    assert MAX_LEEWAY_SECONDS == 60
    assert AuthConfig(secret=SECRET, leeway_seconds=60).leeway_seconds == 60
    for leeway in (60.5, 61, 3600, -1):
        with pytest.raises(ConfigError, match="JWT_LEEWAY_SECONDS"):
            AuthConfig(secret=SECRET, leeway_seconds=leeway)
    for raw in ("61", "-1", "nan", "soon"):
        with pytest.raises(ConfigError, match="JWT_LEEWAY_SECONDS"):
            AuthConfig.from_env({"JWT_SECRET": SECRET, "JWT_LEEWAY_SECONDS": raw})


def test_config_refusals():
    with pytest.raises(ConfigError, match="JWT_SECRET"):
        AuthConfig(algorithms=("HS256",), secret="short")
    with pytest.raises(ConfigError, match="JWT_PUBLIC_KEY or JWT_JWKS_URL"):
        AuthConfig(algorithms=("RS256",))
    with pytest.raises(ConfigError, match="unsupported algorithms: XS1"):
        AuthConfig(algorithms=("HS256", "XS1"), secret=SECRET)
    with pytest.raises(ConfigError, match="at least one"):
        AuthConfig(algorithms=())
    with pytest.raises(ConfigError, match="at least one"):
        AuthConfig.from_env({"JWT_ALGORITHMS": " , ", "JWT_SECRET": SECRET})


def test_config_from_env(rsa_key):
    config = AuthConfig.from_env({
        "JWT_ALGORITHMS": "HS256, RS256", "JWT_SECRET": f"  {SECRET}  ", "JWT_PUBLIC_KEY": _public_pem(rsa_key),
        "JWT_ISSUER": "iss", "JWT_AUDIENCE": "aud", "JWT_LEEWAY_SECONDS": "12.5",
    })
    assert config.algorithms == ("HS256", "RS256")
    assert config.secret == SECRET
    assert (config.issuer, config.audience, config.leeway_seconds) == ("iss", "aud", 12.5)
    defaults = AuthConfig.from_env({"JWT_SECRET": SECRET})
    assert (defaults.algorithms, defaults.leeway_seconds, defaults.jwks_url) == (("HS256",), 30.0, "")


def test_repr_never_shows_the_secret(rsa_key):
    pem = _public_pem(rsa_key)
    config = AuthConfig(algorithms=("HS256", "RS256"), secret=SECRET, public_key_pem=pem)
    for text in (repr(config), str(config), f"{config}", repr([config])):
        assert SECRET not in text
        assert SECRET[:8] not in text
        assert "BEGIN PUBLIC KEY" not in text
        assert "secret=<set>" in text
    assert "secret=<unset>" in repr(AuthConfig(algorithms=("RS256",), public_key_pem=pem))


# -- handshake token ----------------------------------------------------------
def test_handshake_token_reads_auth_token_first():
    assert handshake_token({"token": "from-auth"}, {"HTTP_AUTHORIZATION": "Bearer from-header"}) == "from-auth"


@pytest.mark.parametrize("auth", [None, {}, {"token": ""}, {"token": None}, "not-a-dict", ["token"]])
def test_handshake_token_falls_back_to_bearer_header(auth):
    assert handshake_token(auth, {"HTTP_AUTHORIZATION": "Bearer  from-header "}) == "from-header"


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", "Basic dXNlcjpwdw==", "from-header"])
def test_handshake_without_any_token_is_refused(header):
    environ = {} if header is None else {"HTTP_AUTHORIZATION": header}
    with pytest.raises(Unauthenticated, match="^missing token"):
        handshake_token(None, environ)


def test_handshake_non_string_auth_token_is_refused():
    with pytest.raises(Unauthenticated, match="must be a string"):
        handshake_token({"token": {"nested": True}}, {})


@pytest.mark.parametrize("query_param", [
    "token", "access_token", "jwt", "Token", "ACCESS_TOKEN", "id_token", "auth", "authorization", "bearer",
    "t",  # any name: the value has the shape of a JWT
])
def test_handshake_refuses_any_token_in_the_query_string(query_param):
    token = hs_token()
    environ = {"QUERY_STRING": f"EIO=4&transport=websocket&{query_param}={token}",
               "HTTP_AUTHORIZATION": f"Bearer {token}"}
    with pytest.raises(Unauthenticated, match="query string") as info:
        handshake_token({"token": token}, environ)
    assert token not in str(info.value)


def test_handshake_accepts_an_ordinary_socketio_query():
    environ = {"QUERY_STRING": "EIO=4&transport=polling&t=P1a2b3c&sid=AbCd_123-xy&room=conv.1.2"}
    assert handshake_token({"token": "tok"}, environ) == "tok"


def test_bearer_token_parsing():
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer abc") == "abc"
    assert bearer_token("  BEARER   abc  ") == "abc"
    for value in (None, "", "Bearer", "Token abc", "abc"):
        assert bearer_token(value) is None


# -- tokens never leak ----------------------------------------------------------
def _failing_tokens(rsa_key) -> list[str]:
    now = int(time.time())
    return [
        hs_token({"sub": "alice", "iat": now - 3600, "exp": now - 600}),                    # expired
        hs_token(claims(nbf=now + 600)),                                                  # not yet valid
        hs_token({"sub": "alice", "exp": now + 600}),                                     # no iat
        hs_token(secret=secrets.token_urlsafe(48)),                                       # wrong secret
        hs_token(alg="HS512"),                                                            # not allowed
        hand_made_token({"alg": "none"}, claims()),                                       # alg none
        jwt.encode(claims(), rsa_key, algorithm="RS256"),                                 # not allowed here
        hs_token(claims(sub="a/b")),                                                      # bad subject
        hs_token(claims(iss="https://evil.example", aud="chat")),                         # wrong issuer
        hs_token()[:-5] + "AAAAA",                                                        # broken signature
        "eyJhbGciOiJIUzI1NiJ9.not-json.sig",                                              # malformed
    ]


def test_error_messages_never_contain_the_token(rsa_key, caplog):
    verifier = hs_verifier(issuer="https://issuer.example", audience="chat")
    caplog.set_level(logging.DEBUG)
    tokens = _failing_tokens(rsa_key)
    for token in tokens:
        with pytest.raises(Unauthenticated) as info:
            verifier.verify(token)
        err = info.value
        signature = token.rsplit(".", 1)[-1]
        for text in (str(err), err.message, repr(err), json.dumps(err.to_dict())):
            assert token not in text
            assert len(signature) < 8 or signature not in text
        # The PyJWT error (whose arguments may hold claims) is not chained to ours.
        assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)
    assert not any(token in caplog.text for token in tokens)


def test_handshake_errors_never_contain_the_token():
    token = hs_token()
    for auth, environ in (({"token": 5}, {}), (None, {"QUERY_STRING": f"access_token={token}"}),
                          (None, {"HTTP_AUTHORIZATION": f"Basic {token}"})):
        with pytest.raises(Unauthenticated) as info:
            handshake_token(auth, environ)
        assert token not in str(info.value)


# -- chatcore.config readers ------------------------------------------------------
def test_env_readers():
    env = {"S": "  text ", "I": " 42 ", "F": "2.5", "B1": "Yes", "B0": "off", "L": " a, b ,,c ", "C": "Info",
           "EMPTY": "  "}
    assert env_str(env, "S") == "text"
    assert env_str(env, "MISSING", "dflt") == "dflt"
    assert env_int(env, "I", 0) == 42
    assert env_int(env, "EMPTY", 7) == 7
    assert env_float(env, "F", 0.0) == 2.5
    assert env_bool(env, "B1", False) is True
    assert env_bool(env, "B0", True) is False
    assert env_bool(env, "MISSING", True) is True
    assert env_list(env, "L") == ("a", "b", "c")
    assert env_list(env, "MISSING", ("x",)) == ("x",)
    assert env_choice(env, "C", "debug", ("debug", "info")) == "info"


@pytest.mark.parametrize("reader, raw", [
    (lambda e: env_int(e, "SOME_INT", 1), "1.5"),
    (lambda e: env_int(e, "SOME_INT", 1, minimum=2), "1"),
    (lambda e: env_int(e, "SOME_INT", 1, maximum=2), "3"),
    (lambda e: env_float(e, "SOME_INT", 1.0), "fast"),
    (lambda e: env_float(e, "SOME_INT", 1.0, minimum=0, maximum=10), "nan"),
    (lambda e: env_float(e, "SOME_INT", 1.0, maximum=10), "inf"),
    (lambda e: env_bool(e, "SOME_INT", True), "maybe"),
    (lambda e: env_choice(e, "SOME_INT", "a", ("a", "b")), "c"),
])
def test_env_reader_errors_name_the_variable(reader, raw):
    with pytest.raises(ConfigError, match="SOME_INT"):
        reader({"SOME_INT": raw})


def test_jwks_key_rotation_accepts_both_keys_until_the_old_one_leaves_the_set(ec_key):
    """Rotation: old and new kid both work while both are published; the old one is refused once removed.

    The verifier caches the key set for ``jwks_lifespan`` (300 s in service;
    0.2 s here), so a removed key is refused at the next refresh; an unknown
    kid refetches the set at most once per ``jwks_cooldown`` (30 s; 0 here).
    """
    new_key = ec.generate_private_key(ec.SECP256R1())

    def jwk(key, kid):
        data = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
        data.update({"kid": kid, "use": "sig", "alg": "ES256"})
        return data

    old_jwk, new_jwk = jwk(ec_key, "2026-11"), jwk(new_key, "2026-12")
    old_token = jwt.encode(claims("olga"), ec_key, algorithm="ES256", headers={"kid": "2026-11"})
    new_token = jwt.encode(claims("nina"), new_key, algorithm="ES256", headers={"kid": "2026-12"})
    with JwksServer({"keys": [old_jwk]}) as server:
        verifier = TokenVerifier(AuthConfig(algorithms=("ES256",), jwks_url=server.base + "/jwks.json"),
                                 jwks_lifespan=0.2, jwks_cooldown=0)
        assert verifier.verify(old_token).user_id == "olga"
        server.jwks = {"keys": [old_jwk, new_jwk]}
        assert verifier.verify(new_token).user_id == "nina", "an unknown kid refetches the set"
        assert verifier.verify(old_token).user_id == "olga"
        server.jwks = {"keys": [new_jwk]}
        time.sleep(0.3)  # past the key set's lifespan: the next verification refetches it
        with pytest.raises(Unauthenticated):
            verifier.verify(old_token)
        assert verifier.verify(new_token).user_id == "nina"
