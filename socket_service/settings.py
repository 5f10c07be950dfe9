"""Settings of the socket service; the only module that reads its environment.

Precedence: keyword overrides given to ``Settings.from_env`` > environment >
defaults below. Every variable is listed, with its meaning, in README.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlparse

from chatcore import topology
from chatcore.config import (
    ENV_LOCAL,
    ENV_PRODUCTION,
    ENVIRONMENTS,
    GcpConfig,
    UploadLimits,
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_list,
    env_log_level,
    env_str,
    process_environ,
    require_explicit_cors,
    with_overrides,
)
from chatcore.errors import ConfigError
from chatcore.identity.auth import HMAC_ALGORITHMS, AuthConfig
from chatcore.identity.signing import SigningConfig
from chatcore.store.quotas import QuotaPolicy

from .headers import SELF, origin_of

AI_PROVIDERS = ("offline", "gemini", "openai")


@dataclass(frozen=True)
class Settings:
    environment: str
    host: str
    port: int
    gcp: GcpConfig
    auth: AuthConfig
    dev_tokens: bool
    dev_token_ttl_seconds: int
    cors_allowed_origins: tuple[str, ...]
    frame_ancestors: tuple[str, ...]
    token_parent_origins: tuple[str, ...]
    max_message_chars: int
    max_http_buffer_size: int
    upload_url: str
    upload_limits: UploadLimits
    uploads_bucket: str
    signing: SigningConfig
    ai_provider: str
    bus_pack_window_ms: float
    events_per_second: float
    event_burst: int
    auth_timeout_seconds: float
    max_connections_per_user: int
    http_requests_per_second: float
    http_request_burst: int
    malformed_frame_warnings: int
    malformed_frame_window_seconds: float
    ai_max_concurrent_per_user: int
    ai_messages_per_window: int
    ai_window_seconds: int
    ai_max_reply_seconds: int
    reply_stale_seconds: int
    reply_pending_stale_seconds: int
    reply_sweep_seconds: float
    bus_startup_retry_seconds: float
    instance_heartbeat_seconds: float
    instance_stale_seconds: float
    shutdown_grace_seconds: float
    request_deadline_seconds: float
    upload_stall_seconds: float
    gc_tuning: bool
    log_level: str

    @property
    def is_local(self) -> bool:
        return self.environment == ENV_LOCAL

    @property
    def quota(self) -> QuotaPolicy:
        # A reply no longer holds a slot once it is older than its longest legitimate life: pending until
        # the pending sweep, then streaming for its maximum duration, then silent until the stale sweep.
        # Every end of a reply (the sweeps included) frees its slot before that; this bound only covers a
        # release that was lost.
        return QuotaPolicy(max_concurrent=self.ai_max_concurrent_per_user,
                           messages_per_window=self.ai_messages_per_window, window_seconds=self.ai_window_seconds,
                           stale_after=timedelta(seconds=self.reply_pending_stale_seconds + self.ai_max_reply_seconds
                                                 + self.reply_stale_seconds))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> Settings:
        env = process_environ() if environ is None else environ
        environment = env_choice(env, "CHAT_ENV", ENV_LOCAL, ENVIRONMENTS)
        local = environment == ENV_LOCAL
        # CHAT_PORT (make dev, tests) wins over PORT (what Cloud Run sets).
        port_variable = "CHAT_PORT" if env_str(env, "CHAT_PORT") else "PORT"
        port = env_int(env, port_variable, 8080, minimum=1, maximum=65535)
        frame_ancestors = env_list(env, "FRAME_ANCESTORS", (SELF,) if local else ())
        settings = cls(
            environment=environment,
            host=env_str(env, "CHAT_HOST", "127.0.0.1" if local else "0.0.0.0"),
            port=port,
            gcp=GcpConfig.from_env(env),
            auth=AuthConfig.from_env(env),
            dev_tokens=env_bool(env, "DEV_TOKENS", local),
            dev_token_ttl_seconds=env_int(env, "DEV_TOKEN_TTL_SECONDS", 3600, minimum=5, maximum=86400),
            cors_allowed_origins=env_list(env, "CORS_ALLOWED_ORIGINS", ("*",) if local else ()),
            frame_ancestors=frame_ancestors,
            # Parents that may hand the page a token with postMessage: by default every framer.
            token_parent_origins=env_list(env, "TOKEN_PARENT_ORIGINS", frame_ancestors),
            max_message_chars=env_int(env, "MAX_MESSAGE_CHARS", 8000, minimum=1),
            max_http_buffer_size=env_int(env, "MAX_HTTP_BUFFER_SIZE", 1_000_000, minimum=1024),
            upload_url=env_str(env, "UPLOAD_URL", "http://127.0.0.1:8081/" if local else ""),
            upload_limits=UploadLimits.from_env(env),
            uploads_bucket=env_str(env, "UPLOAD_BUCKET", topology.load().uploads_bucket),
            signing=SigningConfig.from_env(env),
            ai_provider=env_choice(env, "AI_PROVIDER", "offline", AI_PROVIDERS),
            bus_pack_window_ms=env_float(env, "BUS_PACK_WINDOW_MS", 2.0, minimum=0, maximum=100),
            events_per_second=env_float(env, "EVENTS_PER_SECOND", 20.0, minimum=0.1),
            event_burst=env_int(env, "EVENT_BURST", 40, minimum=1),
            auth_timeout_seconds=env_float(env, "AUTH_TIMEOUT_SECONDS", 5.0, minimum=0.5, maximum=60),
            max_connections_per_user=env_int(env, "MAX_CONNECTIONS_PER_USER", 20, minimum=1),
            http_requests_per_second=env_float(env, "HTTP_REQUESTS_PER_SECOND", 5.0, minimum=0.01),
            http_request_burst=env_int(env, "HTTP_REQUEST_BURST", 30, minimum=1),
            malformed_frame_warnings=env_int(env, "MALFORMED_FRAME_WARNINGS", 10, minimum=1),
            malformed_frame_window_seconds=env_float(env, "MALFORMED_FRAME_WINDOW_SECONDS", 60.0, minimum=0.1),
            ai_max_concurrent_per_user=env_int(env, "AI_MAX_CONCURRENT_PER_USER", 2, minimum=1),
            ai_messages_per_window=env_int(env, "AI_MESSAGES_PER_WINDOW", 30, minimum=1),
            ai_window_seconds=env_int(env, "AI_WINDOW_SECONDS", 60, minimum=1),
            ai_max_reply_seconds=env_int(env, "AI_MAX_REPLY_SECONDS", 300, minimum=5),
            reply_stale_seconds=env_int(env, "REPLY_STALE_SECONDS", 60, minimum=2),
            # A pending reply waits for its AI request's delivery: push retries back off up to 600 s,
            # and the function may cold-start; 15 minutes covers both.
            reply_pending_stale_seconds=env_int(env, "REPLY_PENDING_STALE_SECONDS", 900, minimum=2),
            reply_sweep_seconds=env_float(env, "REPLY_SWEEP_SECONDS", 10.0, minimum=0.5),
            # IAM grants of a fresh deployment take minutes to apply: subscribing is retried this long.
            bus_startup_retry_seconds=env_float(env, "BUS_STARTUP_RETRY_SECONDS", 300.0, minimum=0, maximum=3600),
            instance_heartbeat_seconds=env_float(env, "INSTANCE_HEARTBEAT_SECONDS", 60.0, minimum=1, maximum=3600),
            instance_stale_seconds=env_float(env, "INSTANCE_STALE_SECONDS", 600.0, minimum=3, maximum=86400),
            shutdown_grace_seconds=env_float(env, "SHUTDOWN_GRACE_SECONDS", 8.0, minimum=0, maximum=60),
            request_deadline_seconds=env_float(env, "REQUEST_DEADLINE_SECONDS", 10.0, minimum=0.5, maximum=60),
            upload_stall_seconds=env_float(env, "UPLOAD_STALL_SECONDS", 30.0, minimum=1, maximum=600),
            gc_tuning=env_bool(env, "GC_TUNING", True),
            log_level=env_log_level(env),
        )
        return with_overrides(settings, overrides)

    def validate(self) -> None:
        if self.environment == ENV_PRODUCTION:
            if self.dev_tokens:
                raise ConfigError("DEV_TOKENS is enabled but CHAT_ENV=production: refusing to start")
            require_explicit_cors(self.cors_allowed_origins)
            self.auth.check_for_production()
        bad = [o for o in self.frame_ancestors if o != SELF and origin_of(o) != o]
        if bad:
            raise ConfigError(f"FRAME_ANCESTORS takes origins (https://host[:port]) or 'self', not {bad}")
        unframing = [o for o in self.token_parent_origins if o not in self.frame_ancestors]
        if unframing:
            raise ConfigError(f"TOKEN_PARENT_ORIGINS must be among FRAME_ANCESTORS (only a framer is a parent), "
                              f"not {unframing}")
        if self.dev_tokens and not any(a in HMAC_ALGORITHMS for a in self.auth.algorithms):
            raise ConfigError("DEV_TOKENS needs an HS* algorithm in JWT_ALGORITHMS and a JWT_SECRET")
        if self.reply_pending_stale_seconds < self.reply_stale_seconds:
            raise ConfigError("REPLY_PENDING_STALE_SECONDS must be at least REPLY_STALE_SECONDS (a pending reply "
                              "waits for its request's delivery, which takes longer than a heartbeat)")
        if self.instance_stale_seconds < 3 * self.instance_heartbeat_seconds:
            raise ConfigError("INSTANCE_STALE_SECONDS must be at least 3 x INSTANCE_HEARTBEAT_SECONDS: a live "
                              "instance that missed one heartbeat must not look stopped")
        parsed = urlparse(self.upload_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ConfigError("UPLOAD_URL must be an absolute http(s) URL")
