"""LLM providers behind one interface (``base.Provider``), chosen by ``AI_PROVIDER``."""

from __future__ import annotations

from ..settings import Settings
from .base import Attachment, Provider, ProviderError, Turn

__all__ = ["Attachment", "Provider", "ProviderError", "Turn", "create_provider"]


def create_provider(settings: Settings) -> Provider:
    if settings.provider == "offline":
        from .offline import OfflineProvider

        return OfflineProvider(token_delay=settings.offline_token_delay_ms / 1000)
    if settings.provider == "openai":
        from .openai_compat import OpenAICompatibleProvider

        return OpenAICompatibleProvider(
            base_url=settings.openai_base_url, api_key=settings.openai_api_key, model=settings.openai_model,
            max_output_tokens=settings.max_output_tokens, timeout=settings.provider_timeout_seconds,
            max_tokens_field=settings.openai_max_tokens_field,
            organization=settings.openai_organization or None)
    if settings.provider == "gemini":
        from .gemini import GeminiProvider

        return GeminiProvider(
            model=settings.gemini_model, api_key=settings.gemini_api_key or None,
            vertexai=settings.gemini_vertexai, project=settings.gcp.project_id,
            location=settings.gemini_location, base_url=settings.gemini_base_url or None,
            max_output_tokens=settings.max_output_tokens, timeout=settings.provider_timeout_seconds)
    raise ValueError(f"unknown provider {settings.provider!r}")
