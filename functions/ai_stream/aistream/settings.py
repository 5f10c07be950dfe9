"""Settings of the AI function; the only module that reads its environment.

Precedence: keyword overrides to ``Settings.from_env`` > environment >
defaults below. Every variable is listed in README.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

from chatcore import topology
from chatcore.config import (
    ENV_LOCAL,
    ENV_PRODUCTION,
    ENVIRONMENTS,
    GcpConfig,
    env_bool,
    env_choice,
    env_float,
    env_int,
    env_list,
    env_log_level,
    env_str,
    process_environ,
    with_overrides,
)
from chatcore.errors import ConfigError

PROVIDERS = ("offline", "gemini", "openai")
# A claim lapses after this many of a live worker's longest gaps between heartbeats (``claim_lease``).
CLAIM_RENEWALS = 4
DEFAULT_SYSTEM_PROMPT = ("You are a helpful assistant in a group chat. Answer the latest message. "
                         "Use Markdown when it helps.")


@dataclass(frozen=True)
class Settings:
    environment: str
    gcp: GcpConfig
    provider: str
    system_prompt: str
    offline_token_delay_ms: float
    openai_base_url: str
    openai_allowed_hosts: tuple[str, ...]
    openai_api_key: str
    openai_model: str
    openai_max_tokens_field: str
    openai_organization: str
    gemini_model: str
    gemini_api_key: str
    gemini_vertexai: bool
    gemini_location: str
    gemini_base_url: str
    provider_timeout_seconds: float
    max_reply_seconds: float
    max_output_tokens: int
    chunk_interval_ms: float
    chunk_max_chars: int
    checkpoint_interval_ms: float
    stop_poll_interval_ms: float
    history_budget_chars: int
    history_max_messages: int
    prompt_max_chars: int
    file_text_max_chars: int
    image_max_bytes: int
    global_tokens_per_hour: int
    uploads_bucket: str
    log_level: str
    gc_tuning: bool

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides) -> Settings:
        env = process_environ() if environ is None else environ
        environment = env_choice(env, "CHAT_ENV", ENV_LOCAL, ENVIRONMENTS)
        settings = cls(
            environment=environment,
            gcp=GcpConfig.from_env(env),
            provider=env_choice(env, "AI_PROVIDER", "offline", PROVIDERS),
            system_prompt=env_str(env, "AI_SYSTEM_PROMPT", DEFAULT_SYSTEM_PROMPT),
            offline_token_delay_ms=env_float(env, "OFFLINE_TOKEN_DELAY_MS", 20, minimum=0, maximum=10_000),
            openai_base_url=env_str(env, "OPENAI_BASE_URL", "https://api.openai.com/v1").rstrip("/"),
            openai_allowed_hosts=tuple(host.lower() for host in env_list(env, "OPENAI_ALLOWED_HOSTS",
                                                                         ("api.openai.com",))),
            openai_api_key=env_str(env, "OPENAI_API_KEY"),
            openai_model=env_str(env, "OPENAI_MODEL", "gpt-4o-mini"),
            openai_max_tokens_field=env_choice(env, "OPENAI_MAX_TOKENS_FIELD", "max_tokens",
                                               ("max_tokens", "max_completion_tokens")),
            openai_organization=env_str(env, "OPENAI_ORGANIZATION"),
            gemini_model=env_str(env, "GEMINI_MODEL", "gemini-2.5-flash"),
            gemini_api_key=env_str(env, "GEMINI_API_KEY"),
            gemini_vertexai=env_bool(env, "GEMINI_USE_VERTEXAI", not env_str(env, "GEMINI_API_KEY")),
            gemini_location=env_str(env, "GEMINI_LOCATION", "us-central1"),
            gemini_base_url=env_str(env, "GEMINI_BASE_URL"),
            provider_timeout_seconds=env_float(env, "PROVIDER_TIMEOUT_SECONDS", 30, minimum=0.1),
            max_reply_seconds=env_float(env, "AI_MAX_REPLY_SECONDS", 300, minimum=1),
            max_output_tokens=env_int(env, "AI_MAX_OUTPUT_TOKENS", 2048, minimum=1),
            chunk_interval_ms=env_float(env, "CHUNK_INTERVAL_MS", 100, minimum=0),
            chunk_max_chars=env_int(env, "CHUNK_MAX_CHARS", 2048, minimum=1),
            checkpoint_interval_ms=env_float(env, "CHECKPOINT_INTERVAL_MS", 1000, minimum=100),
            stop_poll_interval_ms=env_float(env, "STOP_POLL_INTERVAL_MS", 500, minimum=50),
            history_budget_chars=env_int(env, "HISTORY_BUDGET_CHARS", 24_000, minimum=100),
            history_max_messages=env_int(env, "HISTORY_MAX_MESSAGES", 50, minimum=1, maximum=500),
            prompt_max_chars=env_int(env, "PROMPT_MAX_CHARS", 48_000, minimum=100),
            file_text_max_chars=env_int(env, "FILE_TEXT_MAX_CHARS", 20_000, minimum=0),
            image_max_bytes=env_int(env, "IMAGE_MAX_BYTES", 5 * 1024 * 1024, minimum=0),
            global_tokens_per_hour=env_int(env, "AI_GLOBAL_TOKENS_PER_HOUR", 0, minimum=0),
            uploads_bucket=env_str(env, "UPLOAD_BUCKET", topology.load().uploads_bucket),
            log_level=env_log_level(env),
            gc_tuning=env_bool(env, "GC_TUNING", True),
        )
        return with_overrides(settings, overrides)

    @property
    def claim_lease(self) -> timedelta:
        """How long a reply's claim holds without a heartbeat before a redelivery may take it over.

        A live worker renews it at every checkpoint, and checkpoints are
        written at polls: ``CLAIM_RENEWALS`` of the longest gaps between two of
        them (6 s with the defaults). See ``ReplyStore.claim``."""
        return timedelta(milliseconds=CLAIM_RENEWALS * (self.checkpoint_interval_ms + self.stop_poll_interval_ms))

    def validate(self) -> None:
        if self.provider == "openai" and not self.openai_base_url.startswith(("http://", "https://")):
            raise ConfigError("OPENAI_BASE_URL must be an http(s) URL")
        if self.provider == "gemini" and not self.gemini_vertexai and not self.gemini_api_key:
            raise ConfigError("AI_PROVIDER=gemini needs GEMINI_API_KEY or GEMINI_USE_VERTEXAI=1")
        if self.environment == ENV_PRODUCTION:
            self._check_endpoints_for_production()

    def _check_endpoints_for_production(self) -> None:
        """The model endpoints production may send prompts and credentials to (review finding 4, issue 13)."""
        if self.gemini_base_url:
            # In Vertex mode the SDK sends the service account's bearer token to whatever URL this is.
            raise ConfigError("GEMINI_BASE_URL is for tests only; CHAT_ENV=production refuses it")
        url = urlsplit(self.openai_base_url)
        if (url.scheme != "https" or url.username is not None or url.password is not None
                or (url.hostname or "") not in self.openai_allowed_hosts):
            raise ConfigError("CHAT_ENV=production needs an https OPENAI_BASE_URL, without credentials, on a host "
                              f"of OPENAI_ALLOWED_HOSTS ({', '.join(self.openai_allowed_hosts) or 'none'})")
