"""One realtime WebSocket session: a reader, a writer, an engine-event pump and a watchdog.

- The reader parses client messages and drives the engine session (appends, commits,
  responses) and the VAD; each bad message gets an ``error`` event and the session goes on.
- The pump awaits the engine session's events (``EventQueue.aget``; the model runs on the
  engine thread) and turns them into server events as soon as they arrive.
- The writer drains a bounded send queue into the socket. A client that stops reading
  makes the queue overflow; it is then dropped instead of growing server memory.
- The watchdog enforces the idle timeout and the maximum session duration.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from lfm2audio_server import protocol as P
from lfm2audio_server.audio import (
    FORMAT_OPUS,
    FORMAT_PCM16,
    AudioError,
    OpusFrameEncoder,
    OpusPacketDecoder,
    Resampler,
    b64,
    float_to_pcm16,
    int16_to_float,
    pack_frame,
    pack_packets,
    pcm16_from_base64,
    pcm16_from_bytes,
    unpack_packets,
)
from lfm2audio_server.engine_api import (
    AudioFrame,
    EmptyInputError,
    EngineError,
    InputTooLargeError,
    ResponseDone,
    ResponseInProgressError,
    SamplingParams,
    SessionConfig,
    SessionEvent,
    TextDelta,
)
from lfm2audio_server.protocol import ProtocolError, event
from lfm2audio_server.vad import VAD_EXECUTOR, SpeechAudio, SpeechStarted, SpeechStopped, StreamingVad, VadParams
from lfm2audio_server.voices import VoiceError, session_voice_prompt, voice_style

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

    from lfm2audio_server.app import ServerState

log = logging.getLogger("lfm2audio_server.session")

VAD_RATE = 16_000
_CLOSE = object()


@dataclass
class _Response:
    id: str
    index: int
    item_id: str
    mode: str
    audio: bool  # send audio deltas
    binary: str | None  # None (JSON base64) | pcm16 | opus
    started: float
    max_output_tokens: int
    text: list[str] = field(default_factory=list)
    frames: int = 0  # frames sent (or, without audio output, generated)
    text_deltas: int = 0
    first_audio: float | None = None
    first_token: float | None = None
    cancel_reason: str | None = None


class RealtimeConnection:
    def __init__(self, ws: WebSocket, state: ServerState, session: Any) -> None:
        self.ws = ws
        self.state = state
        self.cfg = state.config
        self.metrics = state.metrics
        self.session = session
        self.id: str = session.id
        self.settings = P.SessionSettings(model=state.model_name)
        self._engine_config: SessionConfig | None = None
        self._queue: asyncio.Queue = asyncio.Queue()
        self._queued_bytes = 0
        self._abort = asyncio.Event()
        self.closing = False
        self.close_code: int | None = None
        self.close_reason = ""
        self.created = time.monotonic()
        self.last_activity = self.created
        self._resampler = Resampler(VAD_RATE)
        td = self.settings.turn_detection  # server_vad by default, as OpenAI
        self._vad = StreamingVad(_vad_params(td)) if td is not None else None
        self._opus_in: OpusPacketDecoder | None = None
        self._opus_out: OpusFrameEncoder | None = None
        self.current: _Response | None = None
        self._responses = 0
        self._cancel_requested = False
        self._pending_create: tuple[int | None, float] | None = None
        self._starting = False
        self._speech_item: str | None = None
        self._last_item: str | None = None
        self._tasks: list[asyncio.Task] = []

    # Sending -------------------------------------------------------------------------------------

    def send(self, ev: dict) -> None:
        self._enqueue(json.dumps(ev, separators=(",", ":"), ensure_ascii=False))

    def _enqueue(self, item: str | bytes, *, force: bool = False) -> None:
        if self._abort.is_set():
            return
        n = len(item)
        if not force and (
            self._queued_bytes + n > self.cfg.send_queue_max_bytes
            or self._queue.qsize() >= self.cfg.send_queue_max_messages
        ):
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
        self.close_code, self.close_reason = 1008, "send_queue_overflow"
        self._abort.set()

    def send_error(self, err: ProtocolError) -> None:
        self.metrics.errors.labels(err.code).inc()
        log.info("error event: %s: %s", err.code, err.message, extra={"error_code": err.code, "param": err.param})
        self.send(P.error_event(err))

    def close(self, code: int, reason: str, error: ProtocolError | None = None) -> None:
        """Send ``error`` (if any), then close the socket with ``code``/``reason`` after what is queued."""
        if self.closing:
            return
        self.closing = True
        self.close_code, self.close_reason = code, reason
        log.info("closing the session: %d %s", code, reason, extra={"close_code": code, "close_reason": reason})
        if error is not None:
            self.metrics.errors.labels(error.code).inc()
            self._enqueue(json.dumps(P.error_event(error)), force=True)
        self._queue.put_nowait(_CLOSE)

    async def _writer(self) -> None:
        ws = self.ws
        while True:
            item = await self._queue.get()
            if item is _CLOSE:
                await ws.close(self.close_code or 1000, self.close_reason)
                return
            self._queued_bytes -= len(item)
            if isinstance(item, str):
                await ws.send_text(item)
            else:
                await ws.send_bytes(item)

    # Lifecycle -----------------------------------------------------------------------------------

    async def run(self) -> None:
        self.send(event("session.created", session=self._session_object()))
        log.info("session opened", extra={"client": _client(self.ws)})
        writer = asyncio.create_task(self._writer(), name=f"{self.id}-writer")
        reader = asyncio.create_task(self._reader(), name=f"{self.id}-reader")
        pump = asyncio.create_task(self._pump(), name=f"{self.id}-pump")
        watchdog = asyncio.create_task(self._watchdog(), name=f"{self.id}-watchdog")
        abort = asyncio.create_task(self._abort.wait())
        self._tasks = [writer, reader, pump, watchdog, abort]
        try:
            done, _ = await asyncio.wait({reader, writer, abort}, return_when=asyncio.FIRST_COMPLETED)
            if abort in done:
                writer.cancel()
                try:
                    await asyncio.wait_for(self.ws.close(self.close_code or 1008, self.close_reason), 1.0)
                except Exception:
                    pass
            elif writer in done and reader not in done:
                if writer.exception() is None:
                    # Close frame sent: give the client a moment to answer it.
                    await asyncio.wait({reader}, timeout=2.0)
            for t in done:
                if t is not abort and not t.cancelled() and t.exception() is not None:
                    exc = t.exception()
                    if not _is_disconnect(exc):
                        log.error("session task failed", exc_info=exc)
        finally:
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            try:
                self.session.close()
            except Exception:
                log.exception("closing the engine session failed")
            log.info(
                "session closed",
                extra={
                    "duration_s": round(time.monotonic() - self.created, 3),
                    "responses": self._responses,
                    "close_code": self.close_code,
                    "close_reason": self.close_reason,
                },
            )

    async def _watchdog(self) -> None:
        cfg = self.cfg
        while not self.closing:
            await asyncio.sleep(min(0.25, max(0.01, cfg.idle_timeout_s / 4)))
            now = time.monotonic()
            if now - self.created >= cfg.max_session_s:
                self._cancel("session_expired")
                self.close(
                    1008,
                    "session_expired",
                    ProtocolError(
                        "session_expired",
                        f"the session reached its maximum duration of {cfg.max_session_s:g} s",
                        type="invalid_request_error",
                    ),
                )
            elif self.current is None and now - self.last_activity >= cfg.idle_timeout_s:
                self.close(
                    1008,
                    "idle_timeout",
                    ProtocolError("idle_timeout", f"no activity for {cfg.idle_timeout_s:g} s; closing"),
                )

    # Reading -------------------------------------------------------------------------------------

    async def _reader(self) -> None:
        ws = self.ws
        limit = self.cfg.max_message_bytes
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                self.close_code = self.close_code or msg.get("code")
                return
            self.last_activity = time.monotonic()
            text, data = msg.get("text"), msg.get("bytes")
            size = len(text) if text is not None else len(data or b"")
            if size > limit:
                self.send_error(
                    ProtocolError(
                        "message_too_large", f"message of {size} bytes exceeds the {limit}-byte limit; it was ignored"
                    )
                )
                continue
            if self.closing:
                continue
            event_id = None
            try:
                if text is not None:
                    ev = P.parse_client_event(text)
                    event_id = getattr(ev, "event_id", None)
                    await self._dispatch(ev)
                elif data is not None:
                    await self._on_binary(data)
            except ProtocolError as e:
                e.event_id = e.event_id or event_id
                self.send_error(e)
            except AudioError as e:
                self.send_error(ProtocolError(e.code, str(e), event_id=event_id))
            except EngineError as e:
                self.send_error(_engine_error(e, event_id))
            except Exception as e:  # a bug of ours: report it, keep the session
                log.exception("failed to handle a client message")
                self.send_error(
                    ProtocolError(
                        "server_error", f"internal error: {type(e).__name__}", event_id=event_id, type="server_error"
                    )
                )

    async def _dispatch(self, ev: Any) -> None:
        t = ev.type
        if t == "input_audio_buffer.append":
            pcm = pcm16_from_base64(ev.audio)
            await self._ingest(int16_to_float(pcm), self.settings.input_rate)
        elif t == "session.update":
            self._session_update(ev.session)
        elif t == "input_audio_buffer.commit":
            tail = self._resampler.flush()
            if len(tail) and (self._vad is None or self._vad.speaking):
                try:
                    self._to_engine(tail)
                except ProtocolError:
                    pass  # the buffer is full; what it holds is committed
            if self._vad is not None:
                self._vad.end_turn()
            self._commit(self._speech_item)
            self._speech_item = None
        elif t == "input_audio_buffer.clear":
            self._resampler.reset()
            self.session.clear_audio()
            if self._vad is not None:
                self._vad.end_turn()
            self._speech_item = None
            self.send(event("input_audio_buffer.cleared"))
        elif t == "conversation.item.create":
            self._item_create(ev)
        elif t == "response.create":
            params = ev.response
            tokens = None if params is None else params.max_output_tokens
            if tokens is not None and tokens != "inf" and not 1 <= tokens <= self.cfg.max_output_tokens:
                raise ProtocolError(
                    "invalid_value",
                    f"max_output_tokens must be 'inf' or an integer from 1 to {self.cfg.max_output_tokens}",
                    param="response.max_output_tokens",
                )
            await self._create_response(None if tokens is None else self._resolve_tokens(tokens))
        elif t == "response.cancel":
            cur = self.current
            if ev.response_id is not None and (cur is None or ev.response_id != cur.id):
                raise ProtocolError(
                    "response_cancel_not_active", f"response {ev.response_id} is not in progress", param="response_id"
                )
            if not self._cancel("client_cancelled"):
                raise ProtocolError("response_cancel_not_active", "there is no response in progress to cancel")

    def _session_update(self, m: P.SessionModel) -> None:
        old = self.settings
        new = P.apply_session_update(old, m, max_output_tokens_cap=self.cfg.max_output_tokens)
        engine_config = self._make_engine_config(new)
        self.settings = new
        if engine_config != self._engine_config:
            self.session.update(engine_config)
            self._engine_config = engine_config
        if new.input_rate != old.input_rate:
            self._resampler.reset()
        if new.turn_detection != old.turn_detection:
            if new.turn_detection is None:
                self._vad = None
            else:
                self._vad = StreamingVad(_vad_params(new.turn_detection))
            self._speech_item = None
        if new.binary_input != old.binary_input:
            self._opus_in = OpusPacketDecoder(VAD_RATE) if new.binary_input and new.binary_input[0] == "opus" else None
        if new.binary_output == "opus" and self._opus_out is None:
            self._opus_out = OpusFrameEncoder()
        self.send(event("session.updated", session=self._session_object()))

    def _make_engine_config(self, s: P.SessionSettings) -> SessionConfig:
        t, a = s.effective_text_sampling(), s.effective_audio_sampling()
        instructions = s.instructions
        if s.mode == "tts" and instructions is None:
            try:
                style = voice_style(self.state.engine)
                instructions = session_voice_prompt(style, voice=s.voice, output_voice=s.output_voice)
            except VoiceError as e:
                raise ProtocolError("invalid_value", str(e), param="session.audio.output.voice") from None
        try:
            return SessionConfig(
                mode=s.mode,
                instructions=instructions,
                voice=s.voice,
                text_sampling=SamplingParams(temperature=t.temperature, top_k=t.top_k),
                audio_sampling=SamplingParams(temperature=a.temperature, top_k=a.top_k),
                max_output_tokens=self._resolve_tokens(s.max_output_tokens),
                seed=s.seed,
            )
        except (TypeError, ValueError) as e:
            raise ProtocolError("invalid_value", str(e), param="session") from None

    def _resolve_tokens(self, v: int | str) -> int:
        return self.cfg.max_output_tokens if v == "inf" else min(int(v), self.cfg.max_output_tokens)

    def _session_object(self) -> dict:
        default = None
        if self.settings.instructions is None:
            cfg = self._engine_config or self._make_engine_config(self.settings)
            default = getattr(cfg, "system_prompt", None)
        return P.session_object(self.settings, self.id, default_instructions=default)

    # Audio in ------------------------------------------------------------------------------------

    async def _on_binary(self, data: bytes) -> None:
        bi = self.settings.binary_input
        if bi is None:
            raise ProtocolError(
                "binary_audio_not_configured",
                "binary audio needs a declared format first: session.update with "
                "session.lfm2audio.binary_input = {format: 'pcm16', rate: ...} or {format: 'opus'}",
            )
        if bi[0] == "pcm16":
            await self._ingest(int16_to_float(pcm16_from_bytes(data)), bi[1] or self.settings.input_rate)
        else:
            assert self._opus_in is not None
            pcm = self._opus_in.decode(unpack_packets(data))
            await self._ingest(pcm, VAD_RATE)

    async def _ingest(self, pcm: np.ndarray, rate: int) -> None:
        if len(pcm) == 0:
            return
        self.metrics.input_audio.inc(len(pcm) / rate)
        x = self._resampler(pcm, rate)
        if not len(x):
            return
        if self._vad is None:
            self._to_engine(x)
            return
        outputs = await asyncio.get_running_loop().run_in_executor(VAD_EXECUTOR, self._vad.feed, x)
        for out in outputs:
            if isinstance(out, SpeechAudio):
                try:
                    self._to_engine(out.pcm)
                except ProtocolError as e:
                    self.send_error(e)
            elif isinstance(out, SpeechStarted):
                self._speech_item = P.new_id("item")
                self.send(
                    event(
                        "input_audio_buffer.speech_started",
                        audio_start_ms=out.audio_start_ms,
                        item_id=self._speech_item,
                    )
                )
                td = self.settings.turn_detection
                if td is not None and td.interrupt_response and self.current is not None:
                    self._cancel("turn_detected")
            elif isinstance(out, SpeechStopped):
                item = self._speech_item or P.new_id("item")
                self._speech_item = None
                self.send(event("input_audio_buffer.speech_stopped", audio_end_ms=out.audio_end_ms, item_id=item))
                try:
                    self._commit(item)
                except EngineError as e:
                    self.send_error(_engine_error(e, None))
                    continue
                td = self.settings.turn_detection
                if td is None or td.create_response:
                    try:
                        await self._create_response(None)
                    except ProtocolError as e:
                        self.send_error(e)

    def _to_engine(self, x: np.ndarray) -> None:
        limit = self.cfg.max_input_audio_s
        if self.session.buffered_audio_seconds + len(x) / VAD_RATE > limit:
            raise ProtocolError(
                "input_audio_buffer_full",
                f"the input audio buffer holds at most {limit:g} s; commit or clear it (audio dropped)",
            )
        try:
            self.session.append_audio(x, VAD_RATE)
        except InputTooLargeError as e:
            raise ProtocolError("input_audio_buffer_full", str(e)) from None

    def _commit(self, item_id: str | None) -> None:
        self.session.commit_audio()
        item_id = item_id or P.new_id("item")
        prev, self._last_item = self._last_item, item_id
        self.send(event("input_audio_buffer.committed", previous_item_id=prev, item_id=item_id))
        item = P.user_item(item_id, [{"type": "input_audio", "transcript": None}])
        self.send(event("conversation.item.added", previous_item_id=prev, item=item))
        self.send(event("conversation.item.done", previous_item_id=prev, item=item))

    def _item_create(self, ev: P.ItemCreateEvent) -> None:
        item = ev.item
        if item.role != "user":
            raise ProtocolError(
                "unsupported_item", f"only user messages can be created, not role {item.role!r}", param="item.role"
            )
        texts = []
        for i, c in enumerate(item.content):
            if c.type != "input_text" or c.text is None:
                raise ProtocolError(
                    "unsupported_content",
                    f"content type {c.type!r} is not supported here; send audio with input_audio_buffer.append",
                    param=f"item.content.{i}.type",
                )
            if not c.text:
                raise ProtocolError("invalid_value", "text must not be empty", param=f"item.content.{i}.text")
            texts.append(c.text)
        for t in texts:
            self.session.add_text(t)
        item_id = item.id or P.new_id("item")
        prev, self._last_item = self._last_item, item_id
        out = P.user_item(item_id, [{"type": "input_text", "text": t} for t in texts])
        self.send(event("conversation.item.added", previous_item_id=prev, item=out))
        self.send(event("conversation.item.done", previous_item_id=prev, item=out))

    # Responses -----------------------------------------------------------------------------------

    async def _create_response(self, max_tokens: int | None) -> None:
        if self.state.draining:
            raise ProtocolError("server_shutting_down", "the server is shutting down; no new responses")
        now = time.monotonic()
        if self.current is not None and self._cancel_requested and self._pending_create is None:
            # The running response was cancelled and ends within one engine step: start right after.
            self._pending_create = (max_tokens, now)
            return
        if self.current is not None or self._starting:
            raise ProtocolError(
                "conversation_already_has_active_response",
                "a response is in progress; wait for response.done or send response.cancel",
            )
        await self._start(max_tokens, now)

    async def _start(self, max_tokens: int | None, started: float) -> None:
        if self._engine_config is None:
            self._engine_config = self._make_engine_config(self.settings)
            self.session.update(self._engine_config)
        self._starting = True
        try:
            # The engine may hand us a ResponseDone a moment before it marks the session idle.
            deadline = time.monotonic() + 1.0
            while self.session.responding and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            rid = self.session.create_response(max_output_tokens=max_tokens)
        except ResponseInProgressError:
            raise ProtocolError("conversation_already_has_active_response", "a response is still in progress") from None
        finally:
            self._starting = False
        self._open(rid, started, max_tokens or self._engine_config.max_output_tokens)

    async def _start_pending(self, max_tokens: int | None, started: float) -> None:
        try:
            if self.state.draining:
                raise ProtocolError("server_shutting_down", "the server is shutting down; no new responses")
            await self._start(max_tokens, started)
        except ProtocolError as e:
            self.send_error(e)
        except EngineError as e:
            self.send_error(_engine_error(e, None))

    def _open(self, rid: str, started: float | None = None, max_tokens: int | None = None) -> _Response:
        cur = self.current
        if cur is not None and cur.id == rid:
            return cur
        s = self.settings
        r = _Response(
            id=rid,
            index=self._responses,
            item_id=P.new_id("item"),
            mode=s.mode,
            audio=s.sends_audio,
            binary=s.binary_output,
            started=started or time.monotonic(),
            max_output_tokens=max_tokens or self._resolve_tokens(s.max_output_tokens),
        )
        self._responses += 1
        self.current = r
        self._cancel_requested = False
        audio_out = r.mode != "asr"
        self.send(
            event(
                "response.created",
                response={
                    "id": rid,
                    "object": "realtime.response",
                    "status": "in_progress",
                    "status_details": None,
                    "output": [],
                    "conversation_id": self.id,
                    "output_modalities": ["audio"] if r.audio else ["text"],
                    "max_output_tokens": r.max_output_tokens,
                    "audio": {
                        "output": {"format": {"type": "audio/pcm", "rate": P.OUTPUT_RATE}, "voice": s.output_voice}
                    },
                    "usage": None,
                    "lfm2audio": {"response_index": r.index, "mode": r.mode, "binary_output": r.binary},
                },
            )
        )
        item = P.assistant_item(r.item_id, [], "in_progress")
        self.send(event("response.output_item.added", response_id=rid, output_index=0, item=item))
        prev, self._last_item = self._last_item, r.item_id
        self.send(event("conversation.item.added", previous_item_id=prev, item=item))
        part = {"type": "audio", "transcript": ""} if audio_out else {"type": "text", "text": ""}
        self.send(
            event(
                "response.content_part.added",
                response_id=rid,
                item_id=r.item_id,
                output_index=0,
                content_index=0,
                part=part,
            )
        )
        return r

    def _cancel(self, reason: str) -> bool:
        cur = self.current
        if cur is None:
            return False
        if not self._cancel_requested:
            self._cancel_requested = True
            cur.cancel_reason = reason
            self.session.cancel()
        return True

    async def _pump(self) -> None:
        queue = self.session.events
        while True:
            ev = await queue.aget()
            self.last_activity = time.monotonic()
            try:
                if isinstance(ev, AudioFrame):
                    self._on_audio(ev)
                elif isinstance(ev, TextDelta):
                    self._on_text(ev)
                elif isinstance(ev, ResponseDone):
                    self._on_done(ev)
                elif isinstance(ev, SessionEvent):
                    self.send(event("lfm2audio.session_event", kind=ev.kind, detail=ev.detail))
            except Exception:
                log.exception("failed to forward an engine event")

    def _muted(self, r: _Response) -> bool:
        """After a cancel (response.cancel, barge-in, shutdown) nothing more of the response is sent:
        what the engine still produces before it stops is kept in its history, not streamed."""
        return self._cancel_requested and r is self.current

    def _on_text(self, ev: TextDelta) -> None:
        r = self._open(ev.response_id)
        now = time.monotonic()
        if r.first_token is None:
            r.first_token = now
        if not ev.text or self._muted(r):
            return
        r.text.append(ev.text)
        r.text_deltas += 1
        kind = "response.output_text.delta" if r.mode == "asr" else "response.output_audio_transcript.delta"
        self.send(event(kind, response_id=r.id, item_id=r.item_id, output_index=0, content_index=0, delta=ev.text))

    def _on_audio(self, ev: AudioFrame) -> None:
        pcm = ev.pcm
        if getattr(ev, "end_of_audio", False) or pcm is None or len(pcm) == 0:
            return
        r = self._open(ev.response_id)
        now = time.monotonic()
        if r.first_token is None:
            r.first_token = now
        index = r.frames
        r.frames += 1
        if not r.audio or self._muted(r):
            return
        if r.first_audio is None:
            r.first_audio = now
            self.metrics.ttfa.observe(now - r.started)
        self.metrics.frames.inc()
        if r.binary == "pcm16":
            self._enqueue(pack_frame(FORMAT_PCM16, r.index, index, float_to_pcm16(pcm)))
        elif r.binary == "opus":
            if self._opus_out is None:
                self._opus_out = OpusFrameEncoder()
            packets = self._opus_out.encode(pcm)
            self._enqueue(pack_frame(FORMAT_OPUS, r.index, index, pack_packets(packets)))
        else:
            self.send(
                event(
                    "response.output_audio.delta",
                    response_id=r.id,
                    item_id=r.item_id,
                    output_index=0,
                    content_index=0,
                    delta=b64(float_to_pcm16(pcm)),
                )
            )

    def _on_done(self, ev: ResponseDone) -> None:
        r = self._open(ev.response_id)
        text = "".join(r.text) if r.text else ev.text
        status, reason = ev.status, ev.reason
        if status == "cancelled":
            reason = r.cancel_reason or reason
        elif status == "completed" and reason == "max_output_tokens":
            status = "incomplete"  # OpenAI's meaning: cut off by the token limit
        common = {"response_id": r.id, "item_id": r.item_id, "output_index": 0, "content_index": 0}
        if r.mode == "asr":
            self.send(event("response.output_text.done", **common, text=text))
            part = {"type": "text", "text": text}
            content = {"type": "output_text", "text": text}
        else:
            if r.audio:
                self.send(event("response.output_audio.done", **common))
            self.send(event("response.output_audio_transcript.done", **common, transcript=text))
            part = {"type": "audio", "transcript": text}
            content = {"type": "output_audio", "transcript": text}
        self.send(event("response.content_part.done", **common, part=part))
        item = P.assistant_item(r.item_id, [content], "completed" if status == "completed" else "incomplete")
        self.send(event("response.output_item.done", response_id=r.id, output_index=0, item=item))
        self.send(event("conversation.item.done", item=item))

        st = ev.stats
        now = time.monotonic()
        audio_s = r.frames * 0.08
        duration = now - r.started
        if status == "failed":
            details: dict | None = {
                "type": "failed",
                "error": {"type": "server_error", "code": "engine_error", "message": reason},
            }
        elif status == "completed":
            details = None
        else:
            details = {"type": status, "reason": reason}
        stats = {
            "response_index": r.index,
            "mode": r.mode,
            "time_to_first_token_ms": _ms(r.first_token, r.started),
            "time_to_first_audio_ms": _ms(r.first_audio, r.started),
            "duration_ms": round(duration * 1000, 1),
            "audio_seconds": round(audio_s, 3),
            "real_time_factor": round(duration / audio_s, 4) if audio_s else None,
            "engine": {
                "prompt_positions": st.prompt_positions,
                "reused_positions": st.reused_positions,
                "text_tokens": st.text_tokens,
                "audio_frames": st.audio_frames,
                "time_to_first_token_ms": _s_ms(st.time_to_first_token_s),
                "time_to_first_audio_ms": _s_ms(st.time_to_first_audio_s),
                "duration_ms": _s_ms(st.duration_s),
                "real_time_factor": None if st.real_time_factor is None else round(st.real_time_factor, 4),
                "reason": ev.reason,
            },
        }
        output_tokens = st.text_tokens + st.audio_frames
        self.send(
            event(
                "response.done",
                response={
                    "id": r.id,
                    "object": "realtime.response",
                    "status": status,
                    "status_details": details,
                    "output": [item],
                    "conversation_id": self.id,
                    "output_modalities": ["audio"] if r.audio else ["text"],
                    "max_output_tokens": r.max_output_tokens,
                    "usage": {
                        "total_tokens": st.prompt_positions + st.reused_positions + output_tokens,
                        "input_tokens": st.prompt_positions + st.reused_positions,
                        "output_tokens": output_tokens,
                        "input_token_details": {"cached_tokens": st.reused_positions},
                        "output_token_details": {"text_tokens": st.text_tokens, "audio_tokens": st.audio_frames},
                    },
                    "lfm2audio": stats,
                },
            )
        )
        m = self.metrics
        m.responses.labels(r.mode, status).inc()
        m.text_tokens.inc(st.text_tokens)
        if r.first_token is not None:
            m.ttft.observe(r.first_token - r.started)
        if audio_s:
            m.rtf.observe(duration / audio_s)
        log.info(
            "response done",
            extra={
                "response_id": r.id,
                "status": status,
                "reason": reason,
                "frames": r.frames,
                "text_tokens": st.text_tokens,
                "lfm2audio": stats,
            },
        )
        self.current = None
        self._cancel_requested = False
        pending, self._pending_create = self._pending_create, None
        if pending is not None and not self.closing:
            task = asyncio.get_running_loop().create_task(self._start_pending(*pending))
            self._tasks.append(task)


def _vad_params(td: P.TurnDetection) -> VadParams:
    return VadParams(td.threshold, td.prefix_padding_ms, td.silence_duration_ms)


def _ms(t: float | None, t0: float) -> float | None:
    return None if t is None else round((t - t0) * 1000, 1)


def _s_ms(s: float | None) -> float | None:
    return None if s is None else round(s * 1000, 1)


def _engine_error(e: EngineError, event_id: str | None) -> ProtocolError:
    code = getattr(e, "code", "engine_error")
    if isinstance(e, ResponseInProgressError):
        code = "conversation_already_has_active_response"
    elif isinstance(e, InputTooLargeError):
        code = "input_audio_buffer_full"
    elif isinstance(e, EmptyInputError):
        code = "input_audio_buffer_commit_empty"
    return ProtocolError(code, str(e), event_id=event_id)


def _is_disconnect(exc: BaseException) -> bool:
    from starlette.websockets import WebSocketDisconnect

    return isinstance(exc, WebSocketDisconnect | ConnectionError | OSError) or type(exc).__name__ in (
        "ClientDisconnected",
    )


def _client(ws: Any) -> str | None:
    c = getattr(ws, "client", None)
    return f"{c.host}:{c.port}" if c else None
