"""How the server runs under uvicorn: its settings, and a server class that drains on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import signal
import socket
from typing import Any

import uvicorn
from fastapi import FastAPI

from lfm2audio_server.app import ServerState
from lfm2audio_server.config import ServerConfig
from lfm2audio_server.logging import uvicorn_log_config

log = logging.getLogger("lfm2audio_server")


def uvicorn_config(app: FastAPI, config: ServerConfig, **overrides: Any) -> uvicorn.Config:
    """The uvicorn settings the server needs (WebSocket size limit, permessage-deflate, no uvicorn logging setup)."""
    kwargs: dict[str, Any] = {
        "host": config.host,
        "port": config.port,
        "ws": "websockets-sansio",
        "ws_max_size": config.ws_max_size,
        "ws_per_message_deflate": config.ws_per_message_deflate,
        "ws_ping_interval": 20.0,
        "ws_ping_timeout": 20.0,
        "log_config": uvicorn_log_config(),
        "log_level": config.log_level.lower(),
        "access_log": False,
        "lifespan": "on",
        "timeout_graceful_shutdown": 5,
    }
    kwargs.update(overrides)
    return uvicorn.Config(app, **kwargs)


class GracefulServer(uvicorn.Server):
    """On the first SIGTERM/SIGINT: /ready turns 503, new sessions are refused, in-flight responses get
    ``shutdown_grace_s`` to finish (then are cancelled), sockets close with 1001; then uvicorn exits.
    A second signal cuts the grace period short."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        self._drain_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self._drain_task is not None or self._loop is None:
            self.state.hurry()  # a second signal: no more grace
            return super().handle_exit(sig, frame)
        name = signal.Signals(sig).name

        async def drain() -> None:
            try:
                await self.state.drain()
            finally:
                self.should_exit = True

        def start() -> None:
            log.info("received %s: draining", name)
            self._drain_task = self._loop.create_task(drain())

        self._drain_task = asyncio.Future(loop=self._loop)  # placeholder: a second signal goes to uvicorn
        # A fresh context: the signal may land while a session's task runs, and its session id must not leak
        # into the drain's log lines.
        self._loop.call_soon_threadsafe(start, context=contextvars.Context())
