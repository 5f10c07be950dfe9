"""Settings of the socket service (socket_service/settings.py), read from a given environ mapping."""

from __future__ import annotations

import secrets

import pytest

from chatcore.config import DEFAULT_ALLOWED_CONTENT_TYPES
from chatcore.errors import ConfigError
from socket_service import settings as settings_module
from socket_service.settings import Settings

SECRET = secrets.token_urlsafe(48)
LOCAL = {"GOOGLE_CLOUD_PROJECT": "chat-unit", "JWT_SECRET": SECRET}
PRODUCTION = {**LOCAL, "CHAT_ENV": "production", "CORS_ALLOWED_ORIGINS": "https://chat.example.com",
              "UPLOAD_URL": "https://upload.example.com/request"}


def load(base: dict | None = None, **env: str) -> Settings:
    return Settings.from_env({**(LOCAL if base is None else base), **env})


# -- defaults -----------------------------------------------------------------
def test_local_defaults():
    s = load()
    assert s.environment == "local" and s.is_local
    assert (s.host, s.port) == ("127.0.0.1", 8080)
    assert s.dev_tokens is True
    assert s.cors_allowed_origins == ("*",)
    assert s.upload_url == "http://127.0.0.1:8081/"
    assert s.ai_provider == "offline"
    assert s.max_message_chars == 8000
    assert s.max_http_buffer_size == 1_000_000
    assert s.bus_pack_window_ms == 2.0
    assert s.log_level == "info"
    assert s.gc_tuning is True
    assert s.gcp.project_id == "chat-unit"
    assert s.gcp.firestore_database == "(default)"
    assert s.auth.algorithms == ("HS256",) and s.auth.secret == SECRET
    assert s.upload_limits.max_upload_bytes == 25 * 1024 * 1024
    assert s.upload_limits.allowed_content_types == DEFAULT_ALLOWED_CONTENT_TYPES


def test_production_defaults():
    s = load(PRODUCTION)
    assert s.environment == "production" and not s.is_local
    assert s.host == "0.0.0.0"
    assert s.dev_tokens is False
    assert s.cors_allowed_origins == ("https://chat.example.com",)


def test_settings_are_frozen():
    s = load()
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]


def test_emulator_hosts_are_recorded():
    s = load(PUBSUB_EMULATOR_HOST=" 127.0.0.1:8085 ", FIRESTORE_EMULATOR_HOST="127.0.0.1:8086")
    assert (s.gcp.pubsub_emulator_host, s.gcp.firestore_emulator_host) == ("127.0.0.1:8085", "127.0.0.1:8086")


def test_none_reads_the_process_environment(monkeypatch):
    seen = []

    def fake_environ():
        seen.append(True)
        return {**LOCAL, "CHAT_PORT": "9123"}

    monkeypatch.setattr(settings_module, "process_environ", fake_environ)
    assert Settings.from_env().port == 9123
    assert seen == [True]


# -- production safety ------------------------------------------------------------
@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_production_refuses_dev_tokens(value):
    with pytest.raises(ConfigError, match="DEV_TOKENS"):
        load(PRODUCTION, DEV_TOKENS=value)


def test_production_refuses_dev_tokens_given_as_override():
    with pytest.raises(ConfigError, match="DEV_TOKENS"):
        Settings.from_env(PRODUCTION, dev_tokens=True)


@pytest.mark.parametrize("origins", ["*", "", " , ", "https://chat.example.com,*", " * "])
def test_production_refuses_wildcard_or_empty_cors(origins):
    with pytest.raises(ConfigError, match="CORS_ALLOWED_ORIGINS"):
        load(PRODUCTION, CORS_ALLOWED_ORIGINS=origins)


def test_production_refuses_unset_cors():
    env = dict(PRODUCTION)
    del env["CORS_ALLOWED_ORIGINS"]
    with pytest.raises(ConfigError, match="CORS_ALLOWED_ORIGINS"):
        load(env)


def test_production_needs_an_upload_url():
    env = dict(PRODUCTION)
    del env["UPLOAD_URL"]
    with pytest.raises(ConfigError, match="UPLOAD_URL"):
        load(env)


def test_production_accepts_several_origins():
    s = load(PRODUCTION, CORS_ALLOWED_ORIGINS="https://a.example, https://b.example")
    assert s.cors_allowed_origins == ("https://a.example", "https://b.example")


def test_dev_tokens_need_an_hmac_algorithm():
    env = {"GOOGLE_CLOUD_PROJECT": "p", "JWT_ALGORITHMS": "RS256", "JWT_JWKS_URL": "https://keys.example/jwks"}
    with pytest.raises(ConfigError, match="DEV_TOKENS"):
        load(env)
    assert load(env, DEV_TOKENS="0").dev_tokens is False


@pytest.mark.parametrize("value", ["staging", "prod", "1"])
def test_unknown_environment_is_refused(value):
    with pytest.raises(ConfigError, match="CHAT_ENV"):
        load(CHAT_ENV=value)


def test_environment_name_is_case_insensitive():
    assert load(PRODUCTION, CHAT_ENV="Production").environment == "production"


def test_project_is_required():
    with pytest.raises(ConfigError, match="GOOGLE_CLOUD_PROJECT"):
        load({"JWT_SECRET": SECRET})


# -- ports -------------------------------------------------------------------------
def test_chat_port_overrides_port():
    assert load(PORT="9000").port == 9000
    assert load(CHAT_PORT="9100").port == 9100
    assert load(PORT="9000", CHAT_PORT="9100").port == 9100
    assert load(PORT="9000", CHAT_PORT="").port == 9000


def test_overrides_win_over_the_environment():
    s = Settings.from_env({**LOCAL, "CHAT_PORT": "9100"}, port=9999, host="0.0.0.0")
    assert (s.port, s.host) == (9999, "0.0.0.0")


# -- typed values ------------------------------------------------------------------
@pytest.mark.parametrize("name, raw", [
    ("CHAT_PORT", "http"), ("CHAT_PORT", "0"), ("CHAT_PORT", "65536"), ("CHAT_PORT", "80.5"),
    ("PORT", "eighty"), ("PORT", "-1"),
    ("MAX_MESSAGE_CHARS", "0"), ("MAX_MESSAGE_CHARS", "lots"),
    ("MAX_HTTP_BUFFER_SIZE", "10"), ("MAX_UPLOAD_BYTES", "1e6"),
    ("DEV_TOKEN_TTL_SECONDS", "1"), ("EVENT_BURST", "x"),
])
def test_bad_integers_name_the_variable(name, raw):
    with pytest.raises(ConfigError, match=name):
        load(**{name: raw})


@pytest.mark.parametrize("name, raw", [
    ("BUS_PACK_WINDOW_MS", "fast"), ("BUS_PACK_WINDOW_MS", "101"), ("BUS_PACK_WINDOW_MS", "nan"),
    ("EVENTS_PER_SECOND", "0"), ("SHUTDOWN_GRACE_SECONDS", "61"), ("JWT_LEEWAY_SECONDS", "120"),
])
def test_bad_numbers_name_the_variable(name, raw):
    with pytest.raises(ConfigError, match=name):
        load(**{name: raw})


@pytest.mark.parametrize("name", ["DEV_TOKENS", "GC_TUNING"])
@pytest.mark.parametrize("raw", ["2", "maybe", "enabled"])
def test_bad_booleans_name_the_variable(name, raw):
    with pytest.raises(ConfigError, match=name):
        load(**{name: raw})


@pytest.mark.parametrize("raw, expected", [("1", True), ("TRUE", True), ("on", True), ("0", False),
                                           ("false", False), ("No", False)])
def test_booleans(raw, expected):
    assert load(GC_TUNING=raw).gc_tuning is expected


@pytest.mark.parametrize("name, raw", [("AI_PROVIDER", "gpt"), ("LOG_LEVEL", "verbose")])
def test_bad_choices_name_the_variable(name, raw):
    with pytest.raises(ConfigError, match=name):
        load(**{name: raw})


def test_typed_values_are_parsed():
    s = load(MAX_MESSAGE_CHARS="100", BUS_PACK_WINDOW_MS="0", AI_PROVIDER="Gemini", LOG_LEVEL="DEBUG",
             ALLOWED_CONTENT_TYPES="image/png, text/plain", MAX_UPLOAD_BYTES="1024")
    assert s.max_message_chars == 100
    assert s.bus_pack_window_ms == 0.0
    assert (s.ai_provider, s.log_level) == ("gemini", "debug")
    assert s.upload_limits.allowed_content_types == ("image/png", "text/plain")
    assert s.upload_limits.max_upload_bytes == 1024


# -- upload URL ----------------------------------------------------------------------
@pytest.mark.parametrize("url", ["/upload", "upload.example.com/request", "ftp://upload.example.com/",
                                 "http://", "https:///path", "javascript:alert(1)"])
def test_upload_url_must_be_absolute(url):
    with pytest.raises(ConfigError, match="UPLOAD_URL"):
        load(UPLOAD_URL=url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8081/", "https://upload.example.com/request"])
def test_absolute_upload_urls_are_accepted(url):
    assert load(UPLOAD_URL=url).upload_url == url
