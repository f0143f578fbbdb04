"""A connection's responses: start them on the engine session, stream the engine's events to the client
as Realtime events (text deltas, audio deltas or binary frames), and finish them with response.done.

One response at a time. A response.create while a cancelled one is still stopping (within one engine
step) waits for it and starts right after. The engine marks its session idle before it emits
ResponseDone, so a response can be created as soon as that event arrives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lfm2audio.engine import (
    OUTPUT_SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    AudioFrame,
    EngineError,
    ResponseDone,
    ResponseInProgressError,
    ResponseStats,
    Session,
    SessionConfig,
    SessionEvent,
    TextDelta,
)
from lfm2audio_server.audio import (
    FORMAT_OPUS,
    FORMAT_PCM16,
    OpusFrameEncoder,
    Resampler,
    b64,
    float_to_pcm16,
    g711_encode,
    pack_frame,
    pack_packets,
)
from lfm2audio_server.engine_process import ENGINE_LOST
from lfm2audio_server.metrics import Metrics
from lfm2audio_server.outbox import Outbox
from lfm2audio_server.protocol import (
    CLOSE_INTERNAL_ERROR,
    ItemOrder,
    ProtocolError,
    content_event,
    content_part,
    engine_error,
    event,
    final_status,
    function_call_object,
    item_object,
    new_id,
    output_audio,
    response_object,
    status_details,
    usage_object,
)
from lfm2audio_server.settings import G711_RATE, RealtimeSettings, resolve_max_tokens
from lfm2audio_server.tools import TOOL_CALL_END, TOOL_CALL_START, ToolCallError, parse_tool_calls

log = logging.getLogger("lfm2audio_server.session")

FRAME_SECONDS = SAMPLES_PER_FRAME / OUTPUT_SAMPLE_RATE


@dataclass(frozen=True)
class ResponseOptions:
    """What a ``response.create`` asks beyond the session's settings."""

    max_tokens: int | None = None
    metadata: dict | None = None
    config: SessionConfig | None = None  # this response's engine settings (its own instructions)
    audio: bool | None = None  # output_modalities: None as the session says
    out_of_band: bool = False  # conversation "none": the reply is not kept in the conversation
    input_keys: tuple[str, ...] = ()  # an out-of-band response's own input items (in the history until it ends)


@dataclass
class ResponseInFlight:
    """The server's side of the response in progress: ids, what it sends, and its timing."""

    id: str
    index: int  # of the connection's responses (binary frames carry it)
    item_id: str
    mode: str
    audio: bool  # send audio deltas
    binary: str | None  # None (JSON base64) | pcm16 | opus
    started: float
    max_output_tokens: int
    options: ResponseOptions = field(default_factory=ResponseOptions)
    output_format: str = "pcm"
    text: list[str] = field(default_factory=list)
    call: list[str] | None = None  # the text of a tool call being generated (between the call tokens)
    calls: list[dict] = field(default_factory=list)  # function_call output items
    frames: int = 0  # frames sent (or, without audio output, generated)
    cancel_reason: str | None = None


class Responses:
    def __init__(
        self,
        session: Session,
        outbox: Outbox,
        metrics: Metrics,
        items: ItemOrder,
        *,
        settings: Callable[[], RealtimeSettings],
        max_output_tokens: int,
        draining: Callable[[], bool],
    ) -> None:
        self.session = session
        self.outbox = outbox
        self.metrics = metrics
        self.items = items
        self.settings = settings  # the connection's current settings
        self.max_output_tokens = max_output_tokens  # the server's cap
        self.draining = draining
        self.current: ResponseInFlight | None = None
        self.count = 0
        self._cancel_requested = False
        self._pending_create: tuple[ResponseOptions, float] | None = None
        self._starting = False
        self._opus: OpusFrameEncoder | None = None
        self._g711: Resampler | None = None

    def prepare(self, settings: RealtimeSettings) -> None:
        """New settings: make the Opus encoder before the first frame needs it."""
        if settings.binary_output == "opus" and self._opus is None:
            self._opus = OpusFrameEncoder()

    # Starting and stopping ------------------------------------------------------------------------

    def create(self, opts: ResponseOptions | None = None) -> None:
        """``response.create`` (or the end of a VAD turn); ProtocolError when one is in progress."""
        opts = opts or ResponseOptions()
        if self.draining():
            raise ProtocolError("server_shutting_down", "the server is shutting down; no new responses")
        now = time.monotonic()
        if self.current is not None and self._cancel_requested and self._pending_create is None:
            # The running response was cancelled and ends within one engine step: start right after.
            self._pending_create = (opts, now)
            return
        if self.current is not None or self._starting:
            raise ProtocolError(
                "conversation_already_has_active_response",
                "a response is in progress; wait for response.done or send response.cancel",
            )
        self._start(opts, now)

    def cancel(self, reason: str) -> bool:
        """Stop the response in progress (its response.done says ``reason``); False when none runs."""
        cur = self.current
        if cur is None:
            return False
        if not self._cancel_requested:
            self._cancel_requested = True
            cur.cancel_reason = reason
            self.session.cancel()
        return True

    def _start(self, opts: ResponseOptions, started: float) -> None:
        self._starting = True
        item_id = new_id("item")
        try:
            rid = self.session.create_response(
                max_output_tokens=opts.max_tokens, item_id=item_id, config=opts.config,
                take_pending=not opts.out_of_band,
            )  # fmt: skip
        except ResponseInProgressError:
            raise ProtocolError("conversation_already_has_active_response", "a response is still in progress") from None
        finally:
            self._starting = False
        if opts.out_of_band:
            # Applied when the reply ends (edits wait for the response): the conversation never keeps them.
            for key in (*opts.input_keys, item_id):
                self.session.delete_item(key)
        config = opts.config or self.session.config
        self._open(rid, started, opts.max_tokens or config.max_output_tokens, opts, item_id)

    def _start_pending(self, opts: ResponseOptions, started: float) -> None:
        try:
            if self.draining():
                raise ProtocolError("server_shutting_down", "the server is shutting down; no new responses")
            self._start(opts, started)
        except ProtocolError as e:
            self.outbox.send_error(e)
        except EngineError as e:
            self.outbox.send_error(engine_error(e, None))

    def _open(
        self,
        rid: str,
        started: float | None = None,
        max_tokens: int | None = None,
        opts: ResponseOptions | None = None,
        item_id: str | None = None,
    ) -> ResponseInFlight:
        cur = self.current
        if cur is not None and cur.id == rid:
            return cur
        s = self.settings()
        opts = opts or ResponseOptions()
        r = ResponseInFlight(
            id=rid,
            index=self.count,
            item_id=item_id or new_id("item"),
            mode=s.mode,
            audio=s.sends_audio if opts.audio is None else (opts.audio and s.mode != "asr"),
            binary=s.binary_output,
            started=started or time.monotonic(),
            max_output_tokens=max_tokens or resolve_max_tokens(s.max_output_tokens, self.max_output_tokens),
            options=opts,
            output_format=s.output_format,
        )
        self.count += 1
        self.current = r
        self._cancel_requested = False
        response = response_object(
            rid,
            None if opts.out_of_band else self.session.id,
            "in_progress",
            sends_audio=r.audio,
            max_output_tokens=r.max_output_tokens,
            output=[],
            extension={"response_index": r.index, "mode": r.mode, "binary_output": r.binary},
            output_audio=output_audio(s.output_voice, s.output_format),
            metadata=opts.metadata,
        )
        send = self.outbox.send
        send(event("response.created", response=response))
        item = item_object(r.item_id, "assistant", [], "in_progress")
        send(event("response.output_item.added", response_id=rid, output_index=0, item=item))
        if not opts.out_of_band:
            send(event("conversation.item.added", previous_item_id=self.items.append(r.item_id, item), item=item))
        send(content_event("response.content_part.added", rid, r.item_id, part=self._part(r, "")[0]))
        return r

    @staticmethod
    def _part(r: ResponseInFlight, text: str) -> tuple[dict, dict]:
        return content_part("asr" if not r.audio else r.mode, text)

    # Engine events --------------------------------------------------------------------------------

    async def pump(self, on_event: Callable[[], None]) -> None:
        """Forward the engine session's events as they arrive (a task of the connection)."""
        queue = self.session.events
        while True:
            ev = await queue.aget()
            on_event()
            try:
                if isinstance(ev, AudioFrame):
                    self._on_audio(ev)
                elif isinstance(ev, TextDelta):
                    self._on_text(ev)
                elif isinstance(ev, ResponseDone):
                    self._on_done(ev)
                elif isinstance(ev, SessionEvent) and ev.kind == ENGINE_LOST:
                    self.outbox.close(
                        CLOSE_INTERNAL_ERROR,
                        "engine_unavailable",
                        ProtocolError(
                            "engine_unavailable",
                            "the engine process ended; this session's conversation is lost: reconnect",
                            type="server_error",
                        ),
                    )
                elif isinstance(ev, SessionEvent):
                    self.outbox.send(event("lfm2audio.session_event", kind=ev.kind, detail=ev.detail))
            except Exception:
                log.exception("failed to forward an engine event")

    def _muted(self, r: ResponseInFlight) -> bool:
        """After a cancel (response.cancel, barge-in, shutdown) nothing more of the response is sent:
        what the engine still produces before it stops is kept in its history, not streamed."""
        return self._cancel_requested and r is self.current

    def _on_text(self, ev: TextDelta) -> None:
        r = self._open(ev.response_id)
        if ev.token_id == TOOL_CALL_START and r.mode == "chat":
            r.call = []
            return
        if ev.token_id == TOOL_CALL_END and r.call is not None:
            text, r.call = "".join(r.call), None
            if not self._muted(r):
                self._function_calls(r, text)
            return
        if r.call is not None:
            r.call.append(ev.text)
            return
        if not ev.text or self._muted(r):
            return
        r.text.append(ev.text)
        kind = "response.output_audio_transcript.delta" if r.audio else "response.output_text.delta"
        self.outbox.send(content_event(kind, r.id, r.item_id, delta=ev.text))

    def _function_calls(self, r: ResponseInFlight, text: str) -> None:
        """A tool call the model wrote: one function_call output item per call, with its arguments."""
        send = self.outbox.send
        try:
            calls = parse_tool_calls(text)
        except ToolCallError as e:
            log.warning("unparsable tool call: %s", e)
            send(event("lfm2audio.warning", code="tool_call_unparsable", message=str(e), param=None))
            return
        for name, arguments in calls:
            index = 1 + len(r.calls)
            item_id, call_id = new_id("item"), new_id("call")
            item = function_call_object(item_id, call_id, name, "", "in_progress")
            send(event("response.output_item.added", response_id=r.id, output_index=index, item=item))
            if not r.options.out_of_band:
                send(event("conversation.item.added", previous_item_id=self.items.append(item_id, item), item=item))
            ids = {"response_id": r.id, "item_id": item_id, "output_index": index, "call_id": call_id}
            send(event("response.function_call_arguments.delta", **ids, delta=arguments))
            send(event("response.function_call_arguments.done", **ids, name=name, arguments=arguments))
            done = function_call_object(item_id, call_id, name, arguments, "completed")
            send(event("response.output_item.done", response_id=r.id, output_index=index, item=done))
            if not r.options.out_of_band:
                self.items.set(item_id, done)
                send(event("conversation.item.done", item=done))
            r.calls.append(done)

    def _on_audio(self, ev: AudioFrame) -> None:
        pcm = ev.pcm
        if ev.end_of_audio or pcm is None or len(pcm) == 0:
            return
        r = self._open(ev.response_id)
        index = r.frames
        r.frames += 1
        if not r.audio or self._muted(r):
            return
        self.metrics.frames.inc()
        if r.output_format != "pcm" and r.binary is None:
            if self._g711 is None:
                self._g711 = Resampler(G711_RATE)
            payload = g711_encode(self._g711(pcm, OUTPUT_SAMPLE_RATE), r.output_format)
            self.outbox.send(content_event("response.output_audio.delta", r.id, r.item_id, delta=b64(payload)))
        elif r.binary == "pcm16":
            self.outbox.send_bytes(pack_frame(FORMAT_PCM16, r.index, index, float_to_pcm16(pcm)))
        elif r.binary == "opus":
            if self._opus is None:
                self._opus = OpusFrameEncoder()
            packets = self._opus.encode(pcm)
            self.outbox.send_bytes(pack_frame(FORMAT_OPUS, r.index, index, pack_packets(packets)))
        else:
            self.outbox.send(
                content_event("response.output_audio.delta", r.id, r.item_id, delta=b64(float_to_pcm16(pcm)))
            )

    def _on_done(self, ev: ResponseDone) -> None:
        r = self._open(ev.response_id)
        text = "".join(r.text) if r.text or r.calls else ev.text
        status, reason = final_status(ev.status, ev.reason, r.cancel_reason)
        send = self.outbox.send
        if not r.audio:
            send(content_event("response.output_text.done", r.id, r.item_id, text=text))
        else:
            send(content_event("response.output_audio.done", r.id, r.item_id))
            send(content_event("response.output_audio_transcript.done", r.id, r.item_id, transcript=text))
        part, content = self._part(r, text)
        send(content_event("response.content_part.done", r.id, r.item_id, part=part))
        item = item_object(r.item_id, "assistant", [content], "completed" if status == "completed" else "incomplete")
        item_audio = r.audio and r.frames > 0
        if item_audio:
            item["lfm2audio"] = {"audio_ms": round(r.frames * FRAME_SECONDS * 1000)}
        send(event("response.output_item.done", response_id=r.id, output_index=0, item=item))
        if not r.options.out_of_band:
            self.items.set(r.item_id, item)
            send(event("conversation.item.done", item=item))
        if self._g711 is not None:
            self._g711.reset()

        st = ev.stats
        stats = _stats(r, st, ev.reason)
        response = response_object(
            r.id,
            None if r.options.out_of_band else self.session.id,
            status,
            sends_audio=r.audio,
            max_output_tokens=r.max_output_tokens,
            output=[item, *r.calls],
            extension=stats,
            status_details=status_details(status, reason),
            usage=usage_object(st),
            metadata=r.options.metadata,
        )
        send(event("response.done", response=response))
        m = self.metrics
        m.responses.labels(r.mode, status).inc()
        m.text_tokens.inc(st.text_tokens)
        # The engine's figures (from the request reaching the engine): computed once, there.
        if st.time_to_first_token_s is not None:
            m.ttft.observe(st.time_to_first_token_s)
        if st.time_to_first_audio_s is not None and r.audio:
            m.ttfa.observe(st.time_to_first_audio_s)
        if st.real_time_factor is not None:
            m.rtf.observe(st.real_time_factor)
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
        if pending is not None and not self.outbox.closing:
            self._start_pending(*pending)


def _stats(r: ResponseInFlight, st: ResponseStats, engine_reason: str | None) -> dict:
    """response.done's ``lfm2audio`` object: the engine's figures for the response (timed from the
    moment the request reached the engine, i.e. response.create or the end of speech)."""
    audio_s = st.audio_frames * FRAME_SECONDS
    return {
        "response_index": r.index,
        "mode": r.mode,
        "prompt_positions": st.prompt_positions,
        "reused_positions": st.reused_positions,
        "text_tokens": st.text_tokens,
        "audio_frames": st.audio_frames,
        "time_to_first_token_ms": _s_ms(st.time_to_first_token_s),
        "time_to_first_audio_ms": _s_ms(st.time_to_first_audio_s),
        "duration_ms": _s_ms(st.duration_s),
        "audio_seconds": round(audio_s, 3),
        "real_time_factor": None if st.real_time_factor is None else round(st.real_time_factor, 4),
        "reason": engine_reason,
    }


def _s_ms(s: float | None) -> float | None:
    return None if s is None else round(s * 1000, 1)
