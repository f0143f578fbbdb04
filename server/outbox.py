"""A connection's outgoing messages: a bounded send queue and the task that writes it to the socket.

A client that stops reading is dropped instead of growing server memory or holding its engine slot:

- the queue is measured in bytes (UTF-8 of text frames) and messages; when either limit is passed the
  connection is dropped (1008 ``send_queue_overflow``);
- a single write that stays blocked for ``send_timeout_s`` (the client's TCP window is shut) drops it
  too (``send_timeout``), whether or not the queue is full and whatever the WebSocket layer's keepalive
  did meanwhile;
- a close that has not gone out within ``CLOSE_DEADLINE_S`` of being asked for is given up.

In each case ``dead`` is set and the connection aborts the transport (see ``abort_transport``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from lfm2audio_server.metrics import Metrics
from lfm2audio_server.protocol import CLOSE_NORMAL, CLOSE_POLICY, ProtocolError, error_event

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

log = logging.getLogger("lfm2audio_server.session")

_CLOSE = object()  # queued after the last message: close the socket

CLOSE_DEADLINE_S = 2.0  # from close() to the close frame written, and then to the client's answer


class Outbox:
    def __init__(
        self, ws: WebSocket, metrics: Metrics, *, max_bytes: int, max_messages: int, send_timeout_s: float = 30.0
    ) -> None:
        self.ws = ws
        self.metrics = metrics
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        self.send_timeout_s = send_timeout_s
        self._queue: asyncio.Queue = asyncio.Queue()
        self._queued_bytes = 0
        self.dead = asyncio.Event()  # set when the client stopped reading: drop it now
        self.closing = False
        self.closing_since: float | None = None
        self.layer_closing_since: float | None = None  # the WebSocket layer began closing the socket
        self.sending_since: float | None = None  # a write in progress (blocked while the client reads nothing)
        self.close_code: int | None = None
        self.close_reason = ""

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

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
        self.closing_since = time.monotonic()
        self.close_code, self.close_reason = code, reason
        log.info("closing the session: %d %s", code, reason, extra={"close_code": code, "close_reason": reason})
        if error is not None:
            self.metrics.errors.labels(error.code).inc()
            self._enqueue(_json(error_event(error)), force=True)
        self._queue.put_nowait(_CLOSE)

    def _enqueue(self, item: str | bytes, *, force: bool = False) -> None:
        if self.dead.is_set():
            return
        n = len(item) if isinstance(item, bytes) else len(item.encode("utf-8"))
        if not force and (self._queued_bytes + n > self.max_bytes or self._queue.qsize() >= self.max_messages):
            self.drop("send_queue_overflow")
            return
        self._queued_bytes += n
        self._queue.put_nowait((n, item))

    def check_deadlines(self, now: float) -> None:
        """Drop the client when a write has been blocked too long, or a close did not go out in time
        (called by the connection's watchdog)."""
        if self.dead.is_set():
            return
        if self.layer_closing_since is None and _transport_closing(self.ws):
            # The WebSocket layer is closing the socket itself (its keepalive ping timed out, a protocol
            # error), though no close of ours is queued: it gets CLOSE_DEADLINE_S to finish (below).
            self.layer_closing_since = now
        if self.sending_since is not None and now - self.sending_since > self.send_timeout_s:
            self.drop("send_timeout")
        elif self.layer_closing_since is not None and now - self.layer_closing_since > CLOSE_DEADLINE_S:
            # Its graceful close waits for the client to take what is buffered, forever if it reads
            # nothing; whether or not a write of ours is blocked meanwhile (the writer may be idle,
            # waiting for the engine), the client is gone.
            self.drop("close_timeout")
        elif self.closing_since is not None and now - self.closing_since > CLOSE_DEADLINE_S + self.send_timeout_s:
            self.drop("close_timeout")
        elif self.closing_since is not None and self.sending_since is not None:
            if now - max(self.closing_since, self.sending_since) > CLOSE_DEADLINE_S:
                self.drop("close_timeout")  # closing, and the writer is stuck: do not wait for the send timeout

    def drop(self, reason: str) -> None:
        """The client is not reading: give up on it now (the connection aborts the transport)."""
        if self.dead.is_set():
            return
        log.warning(
            "client is not reading (%s: %d messages, %d bytes queued); dropping the connection",
            reason,
            self._queue.qsize(),
            self._queued_bytes,
            extra={"error_code": reason},
        )
        self.metrics.errors.labels(reason).inc()
        self.closing = True
        self.close_code, self.close_reason = CLOSE_POLICY, reason
        self.dead.set()

    async def write(self) -> None:
        """Write the queue to the socket until the close is sent (a task of the connection)."""
        ws = self.ws
        while True:
            entry = await self._queue.get()
            self.sending_since = time.monotonic()
            try:
                if entry is _CLOSE:
                    await ws.close(self.close_code or CLOSE_NORMAL, self.close_reason)
                    return
                n, item = entry
                self._queued_bytes -= n
                if isinstance(item, str):
                    await ws.send_text(item)
                else:
                    await ws.send_bytes(item)
            except RuntimeError:
                # The WebSocket layer closed the socket itself (keepalive timeout, a protocol error): the
                # client is gone; it is not an error of ours.
                self.closing = True
                self.close_code = self.close_code or CLOSE_POLICY
                self.dead.set()
                return
            finally:
                self.sending_since = None


def _json(ev: dict[str, Any]) -> str:
    """Valid JSON whatever ``ev`` holds: no NaN or infinity, nothing that is not UTF-8 (client input is
    checked on the way in, by json_guard; this is the last line)."""
    try:
        text = json.dumps(ev, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        log.warning("an event held a non-finite number; sent without it", extra={"event_type": ev.get("type")})
        text = json.dumps(_finite(ev), separators=(",", ":"), ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode()
    return text


def _finite(v: Any) -> Any:
    if isinstance(v, float):
        return v if v == v and v not in (float("inf"), float("-inf")) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_finite(x) for x in v]
    return v


def _transport(ws: Any) -> Any:
    """The asyncio transport under ``ws``, or None. uvicorn's WebSocket protocols pass their bound
    ``receive`` as the ASGI receive callable, which leads to it; another server gives None."""
    proto = getattr(getattr(ws, "_receive", None), "__self__", None)
    return getattr(proto, "transport", None)


def _transport_closing(ws: Any) -> bool:
    t = _transport(ws)
    return bool(t is not None and hasattr(t, "is_closing") and t.is_closing())


def abort_transport(ws: Any) -> bool:
    """Drop the TCP connection under ``ws`` at once (a close frame cannot reach a client that reads
    nothing; a graceful transport close would wait for it forever). False when it cannot be reached."""
    transport = _transport(ws)
    if transport is None or not hasattr(transport, "abort"):
        return False
    transport.abort()
    return True
