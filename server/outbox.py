"""A connection's outgoing messages: a bounded send queue and the task that writes it to the socket.

A client that stops reading makes the queue overflow; it is then dropped (close 1008
``send_queue_overflow``) instead of growing server memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING

from lfm2audio_server.metrics import Metrics
from lfm2audio_server.protocol import CLOSE_NORMAL, CLOSE_POLICY, ProtocolError, error_event

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

log = logging.getLogger("lfm2audio_server.session")

_CLOSE = object()  # queued after the last message: close the socket


class Outbox:
    def __init__(self, ws: WebSocket, metrics: Metrics, *, max_bytes: int, max_messages: int) -> None:
        self.ws = ws
        self.metrics = metrics
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        self._queue: asyncio.Queue = asyncio.Queue()
        self._queued_bytes = 0
        self.overflowed = asyncio.Event()  # set when the client stopped reading: drop it now
        self.closing = False
        self.close_code: int | None = None
        self.close_reason = ""

    def send(self, ev: dict) -> None:
        """Queue a server event (JSON text)."""
        self._enqueue(_json(ev))

    def send_bytes(self, data: bytes) -> None:
        """Queue a binary message."""
        self._enqueue(data)

    def send_error(self, err: ProtocolError) -> None:
        """Queue an ``error`` event (counted and logged); the session goes on."""
        self.metrics.errors.labels(err.code).inc()
        log.info("error event: %s: %s", err.code, err.message, extra={"error_code": err.code, "param": err.param})
        self.send(error_event(err))

    def close(self, code: int, reason: str, error: ProtocolError | None = None) -> None:
        """Send ``error`` (if any), then close the socket with ``code``/``reason`` after what is queued."""
        if self.closing:
            return
        self.closing = True
        self.close_code, self.close_reason = code, reason
        log.info("closing the session: %d %s", code, reason, extra={"close_code": code, "close_reason": reason})
        if error is not None:
            self.metrics.errors.labels(error.code).inc()
            self._enqueue(_json(error_event(error)), force=True)
        self._queue.put_nowait(_CLOSE)

    def _enqueue(self, item: str | bytes, *, force: bool = False) -> None:
        if self.overflowed.is_set():
            return
        n = len(item)
        if not force and (self._queued_bytes + n > self.max_bytes or self._queue.qsize() >= self.max_messages):
            self._overflow()
            return
        self._queued_bytes += n
        self._queue.put_nowait(item)

    def _overflow(self) -> None:
        log.warning(
            "client is not reading: send queue full (%d messages, %d bytes); dropping the connection",
            self._queue.qsize(),
            self._queued_bytes,
            extra={"error_code": "send_queue_overflow"},
        )
        self.metrics.errors.labels("send_queue_overflow").inc()
        self.closing = True
        self.close_code, self.close_reason = CLOSE_POLICY, "send_queue_overflow"
        self.overflowed.set()

    async def write(self) -> None:
        """Write the queue to the socket until the close is sent (a task of the connection)."""
        ws = self.ws
        while True:
            item = await self._queue.get()
            if item is _CLOSE:
                await ws.close(self.close_code or CLOSE_NORMAL, self.close_reason)
                return
            self._queued_bytes -= len(item)
            if isinstance(item, str):
                await ws.send_text(item)
            else:
                await ws.send_bytes(item)


def _json(ev: dict) -> str:
    return json.dumps(ev, separators=(",", ":"), ensure_ascii=False)
