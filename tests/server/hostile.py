"""Helpers of the hostile-client tests (regressions, fuzz, soak): a client that parses strictly, a
capture of error-level log records, and a client that stops reading."""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

import websockets
from rt_client import TIMEOUT, Client

# The loggers a client's mistake could reach (uvicorn's own included).
LOGGERS = ("", "uvicorn", "uvicorn.error", "lfm2audio_server", "lfm2audio")


def strict_json(text: str) -> Any:
    """What a browser's JSON.parse accepts: no NaN/Infinity, and text that is valid UTF-8."""

    def bad(name: str) -> None:
        raise AssertionError(f"the server sent {name}, which is not JSON")

    text.encode("utf-8")  # raises on a lone surrogate
    return json.loads(text, parse_constant=bad)


class StrictClient(Client):
    """A realtime client that fails the test on any server message a browser could not parse."""

    async def recv(self, timeout: float = TIMEOUT) -> dict | bytes:
        import asyncio

        msg = await asyncio.wait_for(self.ws.recv(), timeout)
        if isinstance(msg, bytes):
            self.binary.append(msg)
            return msg
        ev = strict_json(msg)
        self.events.append(ev)
        return ev


class ErrorLog(logging.Handler):
    """Error-level records of the loggers above, while installed (a context manager)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def __enter__(self) -> ErrorLog:
        for name in LOGGERS:
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for name in LOGGERS:
            logging.getLogger(name).removeHandler(self)

    def lines(self) -> list[str]:
        return sorted({f"{r.name}: {r.getMessage()}" for r in self.records})


async def closed(c: Client, timeout: float = TIMEOUT) -> tuple[int | None, str | None]:
    """Read until the server closes; the close code and reason."""
    try:
        while True:
            await c.recv(timeout)
    except websockets.ConnectionClosed as e:
        return (e.rcvd.code, e.rcvd.reason) if e.rcvd else (None, None)


async def dead_reader(port: int, url: str, messages: list[dict]) -> Any:
    """A client that sends ``messages`` and then reads nothing: a tiny receive buffer and a websockets
    queue of one message, so the server's writes block soon."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    ws = await websockets.connect(url, sock=sock, max_queue=1, open_timeout=TIMEOUT)
    for m in messages:
        await ws.send(json.dumps(m))
    return ws


def talk(text: str, max_output_tokens: int | str = 1500) -> list[dict]:
    """Events that start a long response to ``text`` (manual turns)."""
    return [
        {
            "type": "session.update",
            "session": {"max_output_tokens": max_output_tokens, "audio": {"input": {"turn_detection": None}}},
        },
        {
            "type": "conversation.item.create",
            "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
        },
        {"type": "response.create"},
    ]
