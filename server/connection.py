"""One realtime WebSocket session: a reader, a writer, an engine-event pump and a watchdog.

- The reader parses client messages and dispatches them: settings here, audio to ``AudioInput``,
  responses to ``Responses``; each bad message gets an ``error`` event and the session goes on.
- The pump (``Responses.pump``) awaits the engine session's events (the model runs on the engine
  thread) and turns them into server events as soon as they arrive.
- The writer (``Outbox.write``) drains the bounded send queue into the socket.
- The watchdog enforces the idle timeout and the maximum session duration.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from lfm2audio.engine import DEFAULT_PROMPTS, EngineError, Session, SessionConfig
from lfm2audio.sampling import SamplingParams
from lfm2audio_server import json_guard
from lfm2audio_server.audio import AudioError
from lfm2audio_server.audio_input import AudioInput
from lfm2audio_server.client_events import (
    AppendEvent,
    ClientEvent,
    ItemCreateEvent,
    ItemIdEvent,
    ItemTruncateEvent,
    ResponseCancelEvent,
    ResponseCreateEvent,
    SessionFields,
    SessionUpdateEvent,
    apply_session_update,
    parse_client_event,
)
from lfm2audio_server.config import ServerConfig
from lfm2audio_server.conversation import Conversation
from lfm2audio_server.metrics import Metrics
from lfm2audio_server.outbox import CLOSE_DEADLINE_S, Outbox, abort_transport
from lfm2audio_server.protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_POLICY,
    ItemOrder,
    ProtocolError,
    engine_error,
    event,
    session_object,
)
from lfm2audio_server.responses import Responses
from lfm2audio_server.settings import RealtimeSettings, resolve_max_tokens
from lfm2audio_server.tools import tool_system_prompt
from lfm2audio_server.transcription import Transcriber
from lfm2audio_server.vad import SpeechStarted, SpeechStopped
from lfm2audio_server.voices import VoiceError, VoiceStyle, session_voice_prompt

if TYPE_CHECKING:
    from starlette.websockets import WebSocket

log = logging.getLogger("lfm2audio_server.session")


class RealtimeConnection:
    """One client's WebSocket and its engine session. It sees only what it needs of the server: the
    config, the metrics and whether the server is draining (``draining()``, asked at each new response)."""

    def __init__(
        self,
        ws: WebSocket,
        session: Session,
        config: ServerConfig,
        metrics: Metrics,
        *,
        model_name: str,
        draining: Callable[[], bool],
        voice_style: VoiceStyle = "described",
        open_session: Callable[[SessionConfig], Session] | None = None,
    ) -> None:
        self.ws = ws
        self.voice_style = voice_style
        self.cfg = config
        self.metrics = metrics
        self.session = session
        self.id: str = session.id
        self.settings = RealtimeSettings(model=model_name)
        self.engine_config = self._engine_config(self.settings)
        session.update(self.engine_config)
        self.outbox = Outbox(
            ws,
            metrics,
            max_bytes=config.send_queue_max_bytes,
            max_messages=config.send_queue_max_messages,
            send_timeout_s=config.send_timeout_s,
        )
        items = ItemOrder()
        self.items = items
        self.audio = AudioInput(
            session,
            self.outbox,
            metrics,
            items,
            self.settings,
            max_input_audio_s=config.max_input_audio_s,
            on_turn=self._on_turn,
            on_commit=self._on_commit,
        )
        self.responses = Responses(
            session,
            self.outbox,
            metrics,
            items,
            settings=lambda: self.settings,
            max_output_tokens=config.max_output_tokens,
            draining=draining,
        )
        self.transcriber = None if open_session is None else Transcriber(open_session, self.outbox, items)
        self.conversation = Conversation(self)
        self.created = time.monotonic()
        self.last_activity = self.created
        self.ending = False  # run() is tearing down: the slot is about to be free

    # What the server asks of a connection ----------------------------------------------------------

    @property
    def responding(self) -> bool:
        """A response is in progress (from response.created to response.done)."""
        return self.responses.current is not None

    def cancel_response(self, reason: str) -> bool:
        """Stop the response in progress (its response.done says ``reason``); False when none runs."""
        return self.responses.cancel(reason)

    def shutdown(self) -> None:
        """The server is going away: tell the client, close with 1001 after what is queued."""
        self.outbox.close(
            CLOSE_GOING_AWAY,
            "server_shutdown",
            ProtocolError("server_shutting_down", "the server is shutting down", type="server_error"),
        )

    # Lifecycle -------------------------------------------------------------------------------------

    async def run(self) -> None:
        out = self.outbox
        out.send(event("session.created", session=self._session_object()))
        log.info("session opened", extra={"client": _client(self.ws)})
        writer = asyncio.create_task(out.write(), name=f"{self.id}-writer")
        reader = asyncio.create_task(self._reader(), name=f"{self.id}-reader")
        pump = asyncio.create_task(self.responses.pump(self._touch), name=f"{self.id}-pump")
        watchdog = asyncio.create_task(self._watchdog(), name=f"{self.id}-watchdog")
        dead = asyncio.create_task(out.dead.wait())
        tasks = [writer, reader, pump, watchdog, dead]
        if self.transcriber is not None:
            tasks.append(asyncio.create_task(self.transcriber.run(), name=f"{self.id}-transcriber"))
        try:
            done, _ = await asyncio.wait({reader, writer, dead}, return_when=asyncio.FIRST_COMPLETED)
            if out.dead.is_set():
                # Not reading (queue overflow, a write blocked too long, a close that did not go out):
                # a close frame cannot reach it; drop the TCP connection.
                writer.cancel()
                abort_transport(self.ws)
            elif writer in done and reader not in done and writer.exception() is None:
                # Close frame sent: give the client a moment to answer it, then drop the connection.
                await asyncio.wait({reader}, timeout=CLOSE_DEADLINE_S)
                if not reader.done():
                    abort_transport(self.ws)
            for t in done:
                if t is not dead and not t.cancelled() and t.exception() is not None:
                    exc = t.exception()
                    if not _is_disconnect(exc):
                        log.error("session task failed", exc_info=exc)
        finally:
            self.ending = True
            try:
                self.session.close()  # the engine slot is free for the next connection from here on
                if self.transcriber is not None:
                    self.transcriber.close()
            except Exception:
                log.exception("closing the engine session failed")
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._release()
            log.info(
                "session closed",
                extra={
                    "duration_s": round(time.monotonic() - self.created, 3),
                    "responses": self.responses.count,
                    "close_code": out.close_code,
                    "close_reason": out.close_reason,
                },
            )

    def _release(self) -> None:
        """Break the references that tie the connection's parts to it, so that a closed session's
        memory (audio buffers, the Opus and VAD state) goes at once, not at the next gc."""
        self.audio.on_turn = _closed_on_turn
        self.audio.on_commit = None
        self.responses.settings = _closed_settings(self.settings)
        self.responses.draining = _never
        self.conversation.conn = None  # type: ignore[assignment]

    def _touch(self) -> None:
        self.last_activity = time.monotonic()

    async def _watchdog(self) -> None:
        cfg, out = self.cfg, self.outbox
        while not out.dead.is_set():
            await asyncio.sleep(min(0.25, max(0.01, cfg.idle_timeout_s / 4)))
            now = time.monotonic()
            out.check_deadlines(now)
            if out.closing:
                continue
            if now - self.created >= cfg.max_session_s:
                self.responses.cancel("session_expired")
                out.close(
                    CLOSE_POLICY,
                    "session_expired",
                    ProtocolError(
                        "session_expired",
                        f"the session reached its maximum duration of {cfg.max_session_s:g} s",
                        type="invalid_request_error",
                    ),
                )
            elif not self.responding and now - self.last_activity >= cfg.idle_timeout_s:
                out.close(
                    CLOSE_POLICY,
                    "idle_timeout",
                    ProtocolError("idle_timeout", f"no activity for {cfg.idle_timeout_s:g} s; closing"),
                )

    # Reading ---------------------------------------------------------------------------------------

    async def _reader(self) -> None:
        ws, out = self.ws, self.outbox
        limit = self.cfg.max_message_bytes
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                out.close_code = out.close_code or msg.get("code")
                return
            self._touch()
            text, data = msg.get("text"), msg.get("bytes")
            if data is not None and len(data) > limit:
                out.send_error(
                    ProtocolError(
                        "message_too_large",
                        f"message of {len(data)} bytes exceeds the {limit}-byte limit; it was ignored",
                    )
                )
                continue
            if out.closing:
                continue
            event_id = None
            try:
                if text is not None:
                    ev = parse_client_event(json_guard.loads(text, max_bytes=limit))
                    event_id = getattr(ev, "event_id", None)
                    await self._dispatch(ev)
                elif data is not None:
                    await self.audio.append_binary(data)
            except ProtocolError as e:
                e.event_id = e.event_id or event_id
                out.send_error(e)
            except AudioError as e:
                out.send_error(ProtocolError(e.code, str(e), event_id=event_id))
            except EngineError as e:
                out.send_error(engine_error(e, event_id))
            except Exception as e:  # a bug of ours: report it, keep the session
                log.exception("failed to handle a client message")
                out.send_error(
                    ProtocolError(
                        "server_error", f"internal error: {type(e).__name__}", event_id=event_id, type="server_error"
                    )
                )

    async def _dispatch(self, ev: ClientEvent) -> None:
        if isinstance(ev, AppendEvent):
            await self.audio.append_base64(ev.audio)
        elif isinstance(ev, SessionUpdateEvent):
            self._session_update(ev.session, ev.event_id)
        elif isinstance(ev, ItemCreateEvent):
            self.conversation.create(ev)
        elif isinstance(ev, ItemTruncateEvent):
            self.conversation.truncate(ev)
        elif isinstance(ev, ItemIdEvent):
            if ev.type == "conversation.item.delete":
                self.conversation.delete(ev)
            else:
                self.conversation.retrieve(ev)
        elif isinstance(ev, ResponseCreateEvent):
            self.responses.create(self.conversation.response_options(ev))
        elif isinstance(ev, ResponseCancelEvent):
            cur = self.responses.current
            if ev.response_id is not None and (cur is None or ev.response_id != cur.id):
                raise ProtocolError(
                    "response_cancel_not_active", f"response {ev.response_id} is not in progress", param="response_id"
                )
            if not self.responses.cancel("client_cancelled"):
                raise ProtocolError("response_cancel_not_active", "there is no response in progress to cancel")
        elif ev.type == "input_audio_buffer.commit":
            self.audio.commit()
        elif ev.type == "input_audio_buffer.clear":
            self.audio.clear()

    async def _on_turn(self, turn: SpeechStarted | SpeechStopped) -> None:
        """Server VAD: speech started (barge-in cancels the response) or a turn was committed."""
        td = self.settings.turn_detection
        if isinstance(turn, SpeechStarted):
            if td is not None and td.interrupt_response and self.responding:
                self.responses.cancel("turn_detected")
        elif td is None or td.create_response:
            try:
                self.responses.create()
            except ProtocolError as e:
                self.outbox.send_error(e)

    # Settings and items ----------------------------------------------------------------------------

    def _on_commit(self, item_id: str, audio) -> None:
        if self.transcriber is not None and self.settings.transcription is not None:
            self.transcriber.submit(item_id, audio)

    def _session_update(self, fields: SessionFields, event_id: str | None = None) -> None:
        new, errors = apply_session_update(self.settings, fields, max_output_tokens_cap=self.cfg.max_output_tokens)
        for e in errors:
            e.event_id = event_id
            self.outbox.send_error(e)
        engine_config = self._engine_config(new)
        self.settings = new
        if engine_config != self.engine_config:
            self.session.update(engine_config)
            self.engine_config = engine_config
        self.audio.apply(new)
        self.responses.prepare(new)
        self.outbox.send(event("session.updated", session=self._session_object()))

    def _engine_config(
        self, s: RealtimeSettings, *, instructions: str | None = None, tools: tuple | None = None, tool_choice=None
    ) -> SessionConfig:
        t, a = s.effective_text_sampling(), s.effective_audio_sampling()
        instructions = instructions if instructions is not None else s.instructions
        tools = s.tools if tools is None else tools
        tool_choice = s.tool_choice if tool_choice is None else tool_choice
        if tools and tool_choice != "none" and s.mode == "chat":
            instructions = tool_system_prompt(instructions or DEFAULT_PROMPTS["chat"], tools)
        if s.mode == "tts" and instructions is None:
            try:
                instructions = session_voice_prompt(self.voice_style, voice=s.voice, output_voice=s.output_voice)
            except VoiceError as e:
                raise ProtocolError("invalid_value", str(e), param="session.audio.output.voice") from None
        try:
            return SessionConfig(
                mode=s.mode,
                instructions=instructions,
                voice=s.voice,
                text_sampling=SamplingParams(temperature=t.temperature, top_k=t.top_k),
                audio_sampling=SamplingParams(temperature=a.temperature, top_k=a.top_k),
                max_output_tokens=resolve_max_tokens(s.max_output_tokens, self.cfg.max_output_tokens),
                seed=s.seed,
            )
        except (TypeError, ValueError) as e:
            raise ProtocolError("invalid_value", str(e), param="session") from None

    def _session_object(self) -> dict:
        no_tools = self._engine_config(self.settings, tools=())  # the tool list is shown as tools
        default = no_tools.system_prompt if self.settings.instructions is None else None
        return session_object(self.settings, self.id, default_instructions=default)


async def _closed_on_turn(turn: SpeechStarted | SpeechStopped) -> None:
    return None


def _closed_settings(settings: RealtimeSettings) -> Callable[[], RealtimeSettings]:
    return lambda: settings


def _never() -> bool:
    return False


def _is_disconnect(exc: BaseException) -> bool:
    from starlette.websockets import WebSocketDisconnect

    return isinstance(exc, WebSocketDisconnect | ConnectionError | OSError) or type(exc).__name__ in (
        "ClientDisconnected",
    )


def _client(ws: WebSocket) -> str | None:
    c = getattr(ws, "client", None)
    return f"{c.host}:{c.port}" if c else None
