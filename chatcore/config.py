"""Typed reading of environment variables, shared by every deployable's settings.

Each deployable has exactly one ``settings.py`` that calls these readers on
the ``environ`` mapping it is given; no other module reads the environment.
Precedence: an explicit override passed to ``Settings.from_env(environ,
**overrides)`` wins over the environment, which wins over the default.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

ENV_LOCAL = "local"
ENV_PRODUCTION = "production"
ENVIRONMENTS = (ENV_LOCAL, ENV_PRODUCTION)


def env_str(environ: Mapping[str, str], name: str, default: str = "") -> str:
    return environ.get(name, default).strip()


def env_int(environ: Mapping[str, str], name: str, default: int, *, minimum: int | None = None,
            maximum: int | None = None) -> int:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}")
    return value


def env_float(environ: Mapping[str, str], name: str, default: float, *, minimum: float | None = None,
              maximum: float | None = None) -> float:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if math.isnan(value):  # NaN passes every comparison below
        raise ConfigError(f"{name} must be a number, got {raw!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be <= {maximum}, got {value}")
    return value


def env_bool(environ: Mapping[str, str], name: str, default: bool) -> bool:
    raw = environ.get(name)
    if raw is None:
        return default
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ConfigError(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def env_list(environ: Mapping[str, str], name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
    raw = environ.get(name)
    if raw is None:
        return default
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def env_choice(environ: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env_str(environ, name, default).lower()
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value



def env_log_level(environ: Mapping[str, str]) -> str:
    """``LOG_LEVEL`` of every process: debug, info (the default), warning or error."""
    return env_choice(environ, "LOG_LEVEL", "info", ("debug", "info", "warning", "error"))


def require_explicit_cors(origins: tuple[str, ...]) -> None:
    """In production, browsers may call only from origins named one by one."""
    if not origins or "*" in origins:
        raise ConfigError("CHAT_ENV=production needs explicit CORS_ALLOWED_ORIGINS (no '*')")


def with_overrides(settings: T, overrides: Mapping[str, Any]) -> T:
    """A process's settings read from the environment, with ``overrides`` (tests) applied, validated."""
    settings = replace(settings, **overrides)
    settings.validate()
    return settings

@dataclass(frozen=True)
class GcpConfig:
    """Where the Google Cloud services are. Emulator hosts are read by the
    client libraries themselves; they are recorded here so that settings can
    be printed and checked in one place."""

    project_id: str
    firestore_database: str = "(default)"
    firestore_emulator_host: str = ""
    pubsub_emulator_host: str = ""
    storage_emulator_host: str = ""
    # Pub/Sub keeps an ordering key's order only between messages published in one region:
    # every publisher talks to this region's endpoint (empty: the global endpoint).
    pubsub_region: str = ""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> GcpConfig:
        project = env_str(environ, "GOOGLE_CLOUD_PROJECT")
        if not project:
            raise ConfigError("GOOGLE_CLOUD_PROJECT is required")
        region = env_str(environ, "PUBSUB_REGION")
        if region and not REGION_ID.fullmatch(region):
            raise ConfigError(f"PUBSUB_REGION must be a Google Cloud region id such as europe-west1, got {region!r}")
        return cls(
            project_id=project,
            firestore_database=env_str(environ, "FIRESTORE_DATABASE", "(default)"),
            firestore_emulator_host=env_str(environ, "FIRESTORE_EMULATOR_HOST"),
            pubsub_emulator_host=env_str(environ, "PUBSUB_EMULATOR_HOST"),
            storage_emulator_host=env_str(environ, "STORAGE_EMULATOR_HOST"),
            pubsub_region=region,
        )

    @property
    def pubsub_client_options(self) -> dict | None:
        """``client_options`` for every Pub/Sub publisher client: the region's endpoint, or None (the default).

        None with the emulator: google-cloud-pubsub points its clients at
        ``PUBSUB_EMULATOR_HOST`` by itself."""
        if not self.pubsub_region or self.pubsub_emulator_host:
            return None
        return {"api_endpoint": f"{self.pubsub_region}-pubsub.googleapis.com:443"}


# A region id (europe-west1, northamerica-northeast2): what may go into a Pub/Sub endpoint's host name.
REGION_ID = re.compile(r"[a-z]+-[a-z]+[0-9]{1,2}")


def process_environ() -> Mapping[str, str]:
    """The real environment; only ``settings`` modules call this."""
    return os.environ


DEFAULT_ALLOWED_CONTENT_TYPES = (
    "image/png", "image/jpeg", "image/gif", "image/webp",
    "application/pdf", "text/plain", "text/markdown", "text/csv", "application/json",
)


@dataclass(frozen=True)
class UploadLimits:
    """Upload limits; the upload function enforces them, the socket service advertises them."""

    max_upload_bytes: int = 25 * 1024 * 1024
    allowed_content_types: tuple[str, ...] = DEFAULT_ALLOWED_CONTENT_TYPES

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> UploadLimits:
        return cls(
            max_upload_bytes=env_int(environ, "MAX_UPLOAD_BYTES", cls.max_upload_bytes, minimum=1),
            allowed_content_types=env_list(environ, "ALLOWED_CONTENT_TYPES", DEFAULT_ALLOWED_CONTENT_TYPES),
        )
