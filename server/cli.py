"""``lfm2audio-server``: run the realtime server with uvicorn, draining gracefully on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from lfm2audio_server.app import create_app
from lfm2audio_server.config import ConfigError, load_config
from lfm2audio_server.logging import configure_logging
from lfm2audio_server.uvicorn_server import GracefulServer, uvicorn_config

__all__ = ["GracefulServer", "main", "uvicorn_config"]

log = logging.getLogger("lfm2audio_server")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = load_config(argv)
    except ConfigError as e:
        print(f"lfm2audio-server: {e}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    if config.workers:
        from lfm2audio_server import supervisor

        return supervisor.run(config)
    app = create_app(config)
    server = GracefulServer(uvicorn_config(app, config), app.state.server)
    log.info(
        "starting",
        extra={
            "host": config.host,
            "port": config.port,
            "model": config.model,
            "auth": bool(config.api_keys),
            "max_sessions": config.max_sessions,
        },
    )
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
