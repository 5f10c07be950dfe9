"""What each deployable reads from its environment, found by running its settings.

Each deployable's ``Settings.from_env`` is called with a mapping that records
every key it looks up: once with a minimal local environment and once with a
minimal production one, since some settings are read in one mode only (the
dev-token TTL, ``CHAT_PORT`` before ``PORT``, ...). A variable that takes one
of a fixed set of values (``chatcore.config.env_choice``) is found by giving
it a value outside any such set: the ``ConfigError`` names the allowed values.

Running the settings, rather than reading their source, keeps the
infrastructure checks in step with what the code does, however it is written.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from functools import cache

from chatcore.config import ConfigError

# Deployable -> its one settings module (see each deployable's README section).
SETTINGS_MODULES = {
    "socket_service": "socket_service.settings",
    "upload": "uploads.settings",
    "ai_stream": "aistream.settings",
}

# The smallest environments each settings module accepts, in each mode. Values are placeholders:
# nothing here reaches a network or a file.
LOCAL_ENV = {
    "GOOGLE_CLOUD_PROJECT": "demo-chat",
    "UPLOAD_BUCKET": "demo-chat-uploads",
    "UPLOAD_URL": "http://127.0.0.1:8081/",
    "JWT_SECRET": "local-test-secret-" + "x" * 32,
    "SIGNING_KEY_FILE": "/dev/null",
}
PRODUCTION_ENV = {
    "CHAT_ENV": "production",
    "GOOGLE_CLOUD_PROJECT": "demo-chat",
    "UPLOAD_BUCKET": "demo-chat-uploads",
    "UPLOAD_URL": "https://upload.example/",
    "CORS_ALLOWED_ORIGINS": "https://chat.example",
    "JWT_ALGORITHMS": "RS256",
    "JWT_JWKS_URL": "https://issuer.example/jwks",
    "JWT_ISSUER": "https://issuer.example",
    "JWT_AUDIENCE": "chat",
    "SIGNING_SERVICE_ACCOUNT": "chat@demo-chat.iam.gserviceaccount.com",
}
NOT_A_CHOICE = "not-any-of-the-allowed-values"


class RecordingEnv(dict):
    """An environment that remembers every name looked up in it, present or not."""

    def __init__(self, values: Mapping[str, str]):
        super().__init__(values)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def _settings_class(deployable: str):
    return importlib.import_module(SETTINGS_MODULES[deployable]).Settings


@cache
def _reads(deployable: str) -> frozenset[str]:
    settings = _settings_class(deployable)
    names: set[str] = set()
    for base in (LOCAL_ENV, PRODUCTION_ENV):
        env = RecordingEnv(base)
        settings.from_env(env)  # a minimal environment must be accepted; if not, this test says why
        names |= env.read
    return frozenset(names)


def env_names(deployable: str) -> set[str]:
    """Every environment variable the deployable's settings read, in either mode."""
    return set(_reads(deployable))


@cache
def _choices(deployable: str) -> dict[str, tuple[str, ...]]:
    settings = _settings_class(deployable)
    found = {}
    for name in sorted(_reads(deployable)):
        for base in (LOCAL_ENV, PRODUCTION_ENV):
            try:
                settings.from_env({**base, name: NOT_A_CHOICE})
            except ConfigError as error:
                match = re.match(rf"{re.escape(name)} must be one of (.+), got ", str(error))
                if match:
                    found[name] = tuple(match.group(1).split(", "))
                    break
            except Exception:
                continue
    return found


def env_choices(deployable: str) -> dict[str, tuple[str, ...]]:
    """Variable -> its allowed values, for the variables that take one of a fixed set."""
    return dict(_choices(deployable))
