"""Run the socket service: ``python -m socket_service``.

aiohttp's runner handles SIGTERM (Cloud Run's stop signal) and SIGINT: it
stops accepting, runs the app's shutdown hooks, then exits.
"""

from __future__ import annotations

import sys

from aiohttp import web

from chatcore import jsonlog
from chatcore.errors import ConfigError

from .app import create_app
from .settings import Settings


def main() -> int:
    try:
        settings = Settings.from_env()
    except ConfigError as err:
        print(f"socket_service: configuration error: {err}", file=sys.stderr)
        return 2
    jsonlog.configure(settings.log_level, settings.gcp.project_id)
    app = create_app(settings)
    web.run_app(app, host=settings.host, port=settings.port, print=None, access_log=None,
                shutdown_timeout=settings.shutdown_grace_seconds, handle_signals=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
