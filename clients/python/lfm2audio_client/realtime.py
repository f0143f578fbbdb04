"""An asyncio client for the server's WebSocket ``/v1/realtime`` (OpenAI Realtime protocol + lfm2audio extensions).

Audio goes both ways as binary WebSocket messages: the client sends raw PCM16 at 16 kHz
(``session.lfm2audio.binary_input``) and asks for one binary PCM16 frame per 80 ms of reply
(``binary_output``); events stay JSON. Binary frames are handed to callers as
``{"type": "lfm2audio.audio_frame", "response_index", "frame_index", "pcm"}`` events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from lfm2audio_client.audio import (
    FRAME_PCM16,
    OUTPUT_RATE,
    float_to_pcm16,
    parse_frame,
    pcm16_to_float,
    resample,
)

DEFAULT_URL = "ws://127.0.0.1:8000/v1/realtime"
SEND_RATE = 16_000  # what the client sends: the model's input rate
AUDIO_FRAME_EVENT = "lfm2audio.audio_frame"
KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."

Mode = Literal["chat", "asr", "tts"]


class RealtimeError(RuntimeError):
    """An ``error`` event from the server (or a refused / lost connection)."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.param = param


@dataclass
class Sampling:
    """Sampling of one stream; ``None`` fields take the server's per-mode default, temperature 0 is greedy."""

    temperature: float | None = None
    top_k: int | None = None

    def as_dict(self) -> dict[str, Any] | None:
        d = {k: v for k, v in (("temperature", self.temperature), ("top_k", self.top_k)) if v is not None}
        return d or None


@dataclass
class Response:
    """One response as it streams in, and its outcome once ``response.done`` arrived."""

    id: str
    index: int
    mode: str
    requested_at: float  # client clock (time.monotonic) of the end of the user's turn
    status: str = "in_progress"
    reason: str | None = None
    text: str = ""
    chunks: list[np.ndarray] = field(default_factory=list)
    first_text_at: float | None = None
    first_audio_at: float | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.status != "in_progress"

    @property
    def audio(self) -> np.ndarray:
        """The reply's 24 kHz float32 waveform."""
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, dtype=np.float32)

    @property
    def audio_seconds(self) -> float:
        return sum(len(c) for c in self.chunks) / OUTPUT_RATE

    @property
    def time_to_first_audio_s(self) -> float | None:
        """Client-measured: end of the user's turn to the first audio frame received."""
        return None if self.first_audio_at is None else self.first_audio_at - self.requested_at


class RealtimeClient:
    """One realtime session.

    >>> async with await RealtimeClient.connect(url, api_key=key) as c:
    ...     await c.configure(mode="asr")
    ...     await c.send_audio(samples, rate)
    ...     r = await c.respond()
    """

    def __init__(self, ws: Any, session: dict[str, Any]) -> None:
        self.ws = ws
        self.session = session
        self.responses: dict[int, Response] = {}
        self._queue: asyncio.Queue[dict[str, Any] | BaseException] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())
        self._turn_end = time.monotonic()
        self._closed = False

    # Connecting ---------------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls, url: str = DEFAULT_URL, *, api_key: str | None = None, open_timeout: float = 30.0
    ) -> RealtimeClient:
        """Open the WebSocket and wait for ``session.created``; a refusal raises RealtimeError."""
        import websockets

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        try:
            ws = await websockets.connect(
                url,
                additional_headers=headers,
                subprotocols=["realtime"],  # type: ignore[list-item]
                open_timeout=open_timeout,
                max_size=16 * 1024 * 1024,
            )
        except OSError as e:
            raise RealtimeError("connection_failed", f"cannot connect to {url}: {e}") from None
        except websockets.exceptions.InvalidStatus as e:
            # Server conditions (session limit, model loading, draining) answer the upgrade with HTTP 503
            # and an OpenAI-style error body.
            code, message = "connection_refused", f"{url} refused the WebSocket: {e}"
            with contextlib.suppress(Exception):
                err = json.loads(e.response.body)["error"]
                code, message = err["code"], f"{err['message']} (HTTP {e.response.status_code})"
            raise RealtimeError(code, message) from None
        try:
            first = json.loads(await asyncio.wait_for(ws.recv(), open_timeout))
        except (TimeoutError, websockets.ConnectionClosed) as e:
            await ws.close()
            raise RealtimeError("connection_failed", f"no session from {url}: {e}") from None
        if first.get("type") == "error":
            await ws.close()
            err = first.get("error") or {}
            raise RealtimeError(err.get("code", "error"), err.get("message", ""), err.get("param"))
        if first.get("type") != "session.created":
            await ws.close()
            raise RealtimeError("protocol_error", f"expected session.created, got {first.get('type')!r}")
        return cls(ws, first["session"])

    async def __aenter__(self) -> RealtimeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader

    # Sending ------------------------------------------------------------------------------------

    async def send(self, type: str, **fields: Any) -> None:
        await self.ws.send(json.dumps({"type": type, **fields}))

    async def configure(
        self,
        *,
        mode: Mode = "chat",
        instructions: str | None = None,
        voice: str | None = None,
        max_output_tokens: int | Literal["inf"] | None = None,
        text_sampling: Sampling | None = None,
        audio_sampling: Sampling | None = None,
        seed: int | None = None,
        server_vad: bool | dict[str, Any] = False,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """``session.update``: mode, prompt, sampling, turn detection, binary PCM16 both ways.

        ``server_vad``: False for manual turns (``commit`` + ``respond``), True (or a dict of
        ``turn_detection`` settings) for the server's voice activity detection, which commits
        turns, starts responses and interrupts them (barge-in) by itself.
        """
        td: dict[str, Any] | None = None
        if server_vad:
            td = {"type": "server_vad", **(server_vad if isinstance(server_vad, dict) else {})}
        ext: dict[str, Any] = {
            "mode": mode,
            "binary_input": {"format": "pcm16", "rate": SEND_RATE},
            "binary_output": {"format": "pcm16"},
        }
        if voice is not None:
            ext["voice"] = voice
        sampling = {
            k: s.as_dict() for k, s in (("text", text_sampling), ("audio", audio_sampling)) if s and s.as_dict()
        }
        if sampling:
            ext["sampling"] = sampling
        if seed is not None:
            ext["seed"] = seed
        body: dict[str, Any] = {
            "type": "realtime",
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": SEND_RATE}, "turn_detection": td}},
            "lfm2audio": ext,
        }
        if instructions is not None:
            body["instructions"] = instructions
        if max_output_tokens is not None:
            body["max_output_tokens"] = max_output_tokens
        await self.send("session.update", session=body)
        ev = await self.wait_for("session.updated", timeout=timeout)
        self.session = ev["session"]
        return self.session

    async def send_audio(self, samples: np.ndarray, rate: int, *, chunk_s: float = 0.1, pace: float = 0.0) -> None:
        """Append mono float audio at any rate (resampled to 16 kHz), in ``chunk_s`` binary messages.

        ``pace`` > 0 sleeps ``pace * chunk_s`` between chunks (1.0: as fast as a microphone).
        """
        x = resample(np.asarray(samples, dtype=np.float32), rate, SEND_RATE)
        step = max(1, int(chunk_s * SEND_RATE))
        for i in range(0, len(x), step):
            await self.ws.send(float_to_pcm16(x[i : i + step]))
            if pace > 0:
                await asyncio.sleep(pace * chunk_s)

    async def send_pcm16(self, data: bytes) -> None:
        """Append raw 16 kHz PCM16 (e.g. a microphone block)."""
        await self.ws.send(data)

    async def commit(self) -> None:
        """End the user's audio turn."""
        self._turn_end = time.monotonic()
        await self.send("input_audio_buffer.commit")

    async def clear(self) -> None:
        await self.send("input_audio_buffer.clear")

    async def add_text(self, text: str) -> None:
        """A user text message (the text to speak, in TTS mode)."""
        self._turn_end = time.monotonic()
        await self.send(
            "conversation.item.create",
            item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]},
        )

    async def create_response(self, max_output_tokens: int | Literal["inf"] | None = None) -> None:
        params = {} if max_output_tokens is None else {"response": {"max_output_tokens": max_output_tokens}}
        await self.send("response.create", **params)

    async def cancel(self) -> None:
        await self.send("response.cancel")

    # Receiving ----------------------------------------------------------------------------------

    async def _read(self) -> None:
        import websockets

        try:
            async for msg in self.ws:
                if isinstance(msg, bytes):
                    fmt, response_index, frame_index, payload = parse_frame(msg)
                    if fmt != FRAME_PCM16:
                        continue  # we only ask for PCM16
                    ev: dict[str, Any] = {
                        "type": AUDIO_FRAME_EVENT,
                        "response_index": response_index,
                        "frame_index": frame_index,
                        "pcm": pcm16_to_float(payload),
                    }
                else:
                    ev = json.loads(msg)
                self._track(ev)
                self._queue.put_nowait(ev)
            code, reason = self.ws.close_code, self.ws.close_reason
            closed = RealtimeError("connection_closed", f"the server closed the session ({code} {reason})")
            self._queue.put_nowait(closed)
        except websockets.ConnectionClosed as e:
            self._queue.put_nowait(RealtimeError("connection_closed", f"connection lost: {e}"))
        except Exception as e:  # a malformed message: report it to whoever waits
            self._queue.put_nowait(e)

    def _track(self, ev: dict[str, Any]) -> None:
        t = ev.get("type")
        now = time.monotonic()
        if t == "input_audio_buffer.speech_stopped":
            self._turn_end = now
        elif t == "response.created":
            r = ev["response"]
            index = r.get("lfm2audio", {}).get("response_index", len(self.responses))
            mode = r.get("lfm2audio", {}).get("mode", "chat")
            self.responses[index] = Response(id=r["id"], index=index, mode=mode, requested_at=self._turn_end)
        elif t in ("response.output_audio_transcript.delta", "response.output_text.delta"):
            r = self._by_id(ev.get("response_id"))
            if r is not None:
                r.text += ev.get("delta", "")
                r.first_text_at = r.first_text_at or now
        elif t == AUDIO_FRAME_EVENT:
            r = self.responses.get(ev["response_index"])
            if r is not None:
                r.chunks.append(ev["pcm"])
                r.first_audio_at = r.first_audio_at or now
        elif t == "response.done":
            body = ev["response"]
            r = self._by_id(body["id"])
            if r is not None:
                r.status = body.get("status", "completed")
                details = body.get("status_details") or {}
                r.reason = details.get("reason") or (details.get("error") or {}).get("message")
                r.stats = body.get("lfm2audio") or {}
                r.usage = body.get("usage") or {}

    def _by_id(self, response_id: str | None) -> Response | None:
        for r in reversed(self.responses.values()):
            if r.id == response_id:
                return r
        return None

    async def recv(self, timeout: float | None = None) -> dict[str, Any]:
        """The next event (JSON events as dicts, binary audio as ``lfm2audio.audio_frame`` events)."""
        item = await asyncio.wait_for(self._queue.get(), timeout)
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)  # every later recv fails the same way
            raise item
        return item

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Every event until the connection closes."""
        while True:
            try:
                yield await self.recv()
            except RealtimeError as e:
                if e.code == "connection_closed":
                    return
                raise

    async def wait_for(self, type: str, *, timeout: float = 30.0) -> dict[str, Any]:
        """Skip events until one of ``type``; an ``error`` event on the way raises RealtimeError."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {type} within {timeout:g} s")
            ev = await self.recv(left)
            if ev["type"] == type:
                return ev
            if ev["type"] == "error":
                err = ev["error"]
                raise RealtimeError(err.get("code", "error"), err.get("message", ""), err.get("param"))

    async def respond(
        self,
        *,
        max_output_tokens: int | Literal["inf"] | None = None,
        on_text: Callable[[str], None] | None = None,
        on_audio: Callable[[np.ndarray], None] | None = None,
        create: bool = True,
        timeout: float = 300.0,
    ) -> Response:
        """Ask for a response (unless ``create`` is False: the server VAD started one) and stream it
        to ``on_text`` / ``on_audio`` until ``response.done``."""
        if create:
            await self.create_response(max_output_tokens)
        deadline = time.monotonic() + timeout
        current: Response | None = None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the response did not finish within {timeout:g} s")
            ev = await self.recv(left)
            t = ev["type"]
            if t == "error":
                err = ev["error"]
                raise RealtimeError(err.get("code", "error"), err.get("message", ""), err.get("param"))
            if t == "response.created":
                current = self.responses[ev["response"].get("lfm2audio", {}).get("response_index", 0)]
            elif current is None:
                continue
            elif t in ("response.output_audio_transcript.delta", "response.output_text.delta"):
                if on_text is not None and ev.get("response_id") == current.id:
                    on_text(ev.get("delta", ""))
            elif t == AUDIO_FRAME_EVENT:
                if on_audio is not None and ev["response_index"] == current.index:
                    on_audio(ev["pcm"])
            elif t == "response.done" and ev["response"]["id"] == current.id:
                return current
