"""Settings of the upload functions; the only module that reads their environment.

Both targets (``request_upload`` and ``on_upload_finalized``) read the same
settings. Precedence: keyword overrides to ``Settings.from_env`` >
environment > defaults below. Every variable is listed in README.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from chatcore import topology
from chatcore.config import (
    ENV_LOCAL,
    ENV_PRODUCTION,
    ENVIRONMENTS,
    GcpConfig,
    UploadLimits,
    env_choice,
    env_int,
    env_list,
    env_log_level,
    env_str,
    process_environ,
    require_explicit_cors,
    with_overrides,
)
from chatcore.errors import ConfigError
from chatcore.identity.auth import AuthConfig
from chatcore.identity.signing import SigningConfig
from chatcore.store import uploads as uploads_mod


@dataclass(frozen=True)
class Settings:
    environment: str
    gcp: GcpConfig
    auth: AuthConfig
    limits: UploadLimits
    signing: SigningConfig
    bucket: str
    cors_allowed_origins: tuple[str, ...]
    uploads_per_window: int
    upload_window_seconds: int
    storage_quota_bytes: int
    retention_days: int
    max_caption_chars: int
    pending_ttl_seconds: int
    log_level: str

    @property
    def policy(self) -> uploads_mod.UploadPolicy:
        return uploads_mod.UploadPolicy(uploads_per_window=self.uploads_per_window,
                                        window_seconds=self.upload_window_seconds,
                                        storage_quota_bytes=self.storage_quota_bytes,
                                        retention_days=self.retention_days)

    @property
    def pending_ttl(self) -> timedelta:
        return timedelta(seconds=self.pending_ttl_seconds)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> Settings:
        env = process_environ() if environ is None else environ
        environment = env_choice(env, "CHAT_ENV", ENV_LOCAL, ENVIRONMENTS)
        local = environment == ENV_LOCAL
        settings = cls(
            environment=environment,
            gcp=GcpConfig.from_env(env),
            auth=AuthConfig.from_env(env),
            limits=UploadLimits.from_env(env),
            signing=SigningConfig.from_env(env),
            bucket=env_str(env, "UPLOAD_BUCKET", topology.load().uploads_bucket),
            cors_allowed_origins=env_list(env, "CORS_ALLOWED_ORIGINS", ("*",) if local else ()),
            uploads_per_window=env_int(env, "UPLOADS_PER_WINDOW", 30, minimum=1),
            upload_window_seconds=env_int(env, "UPLOAD_WINDOW_SECONDS", 60, minimum=1),
            storage_quota_bytes=env_int(env, "UPLOAD_USER_QUOTA_BYTES", uploads_mod.DEFAULT_STORAGE_QUOTA_BYTES,
                                        minimum=0),
            # Must be the bucket's lifecycle rule (Terraform sets both from var.upload_retention_days).
            retention_days=env_int(env, "UPLOAD_RETENTION_DAYS", uploads_mod.DEFAULT_RETENTION_DAYS, minimum=1),
            max_caption_chars=env_int(env, "MAX_MESSAGE_CHARS", 8000, minimum=1),
            pending_ttl_seconds=env_int(env, "UPLOAD_PENDING_TTL_SECONDS", uploads_mod.layout().pending_ttl_seconds,
                                        minimum=120),
            log_level=env_log_level(env),
        )
        return with_overrides(settings, overrides)

    def validate(self) -> None:
        if self.environment == ENV_PRODUCTION:
            require_explicit_cors(self.cors_allowed_origins)
            if not self.signing.endpoint.startswith("https://"):
                raise ConfigError("CHAT_ENV=production needs an https SIGNED_URL_ENDPOINT")
            self.auth.check_for_production()
        if self.pending_ttl_seconds <= self.signing.upload_ttl_seconds:
            # Otherwise an upload sent just before its URL expires would be refused as expired.
            raise ConfigError("UPLOAD_PENDING_TTL_SECONDS must be longer than UPLOAD_URL_TTL_SECONDS")
        if not self.limits.allowed_content_types:
            raise ConfigError("ALLOWED_CONTENT_TYPES must name at least one type")
