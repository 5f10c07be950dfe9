"""Structured JSON logs on stdout, in the shape Cloud Logging understands.

Each record is one line: ``{"severity", "message", "logger", "time", ...}``
plus any ``extra={"labels": {...}}`` or ``extra={"trace": "..."}``. Tokens
and signed URLs must never be passed to a logger.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

_SEVERITY = {"WARNING": "WARNING", "ERROR": "ERROR", "CRITICAL": "CRITICAL", "INFO": "INFO", "DEBUG": "DEBUG"}


class JsonFormatter(logging.Formatter):
    def __init__(self, project_id: str = ""):
        super().__init__()
        self.project_id = project_id

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "severity": _SEVERITY.get(record.levelname, "DEFAULT"),
            "message": record.getMessage(),
            "logger": record.name,
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
        }
        labels = getattr(record, "labels", None)
        if labels:
            entry["logging.googleapis.com/labels"] = {k: str(v) for k, v in labels.items()}
        trace = getattr(record, "trace", None)
        if trace and self.project_id:
            entry["logging.googleapis.com/trace"] = f"projects/{self.project_id}/traces/{trace}"
        if record.exc_info:
            entry["stack_trace"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str = "INFO", project_id: str = "") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(project_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The engine.io/socket.io loggers are chatty at INFO and can echo payloads.
    for noisy in ("engineio", "socketio", "aiohttp.access", "google", "grpc", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
