"""One exception root for the whole project.

Business code raises :class:`ChatError` subclasses; the edges (Socket.IO
acks, HTTP responses, Pub/Sub handlers) translate them with ``code`` and
``http_status``. Nothing else should know about status codes.
"""


class ChatError(Exception):
    """Root of every error that is reported to a client."""

    code = "internal"
    http_status = 500
    default_message = "internal error"

    def __init__(self, message: str | None = None):
        super().__init__(message or self.default_message)
        self.message = message or self.default_message

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


class InvalidArgument(ChatError):
    code = "invalid_argument"
    http_status = 400
    default_message = "invalid argument"


class Unauthenticated(ChatError):
    code = "unauthenticated"
    http_status = 401
    default_message = "authentication required"


class Forbidden(ChatError):
    code = "forbidden"
    http_status = 403
    default_message = "not allowed"


class NotFound(ChatError):
    code = "not_found"
    http_status = 404
    default_message = "not found"


class TooLarge(ChatError):
    code = "too_large"
    http_status = 413
    default_message = "too large"


class RateLimited(ChatError):
    code = "rate_limited"
    http_status = 429
    default_message = "too many requests"


class Unavailable(ChatError):
    """A backend is slow, stalled or down. ``retry_after`` (seconds) tells the client when to try again."""

    code = "unavailable"
    http_status = 503
    default_message = "temporarily unavailable"

    def __init__(self, message: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class ConfigError(Exception):
    """Settings are missing or inconsistent; the process must not start."""
