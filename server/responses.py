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
    SessionEvent,
    TextDelta,
)
from lfm2audio_server.audio import (
    FORMAT_OPUS,
    FORMAT_PCM16,
    OpusFrameEncoder,
    b64,
    float_to_pcm16,
    pack_frame,
    pack_packets,
)
from lfm2audio_server.metrics import Metrics
from lfm2audio_server.outbox import Outbox
from lfm2audio_server.protocol import (
    ItemOrder,
    ProtocolError,
    content_event,
    content_part,
    engine_error,
    event,
    final_status,
    item_object,
    new_id,
    output_audio,
    response_object,
    status_details,
    usage_object,
)
from lfm2audio_server.settings import RealtimeSettings, resolve_max_tokens

log = logging.getLogger("lfm2audio_server.session")

FRAME_SECONDS = SAMPLES_PER_FRAME / OUTPUT_SAMPLE_RATE


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
    text: list[str] = field(default_factory=list)
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
        self._pending_create: tuple[int | None, float] | None = None
        self._starting = False
        self._opus: OpusFrameEncoder | None = None

    def prepare(self, settings: RealtimeSettings) -> None:
        """New settings: make the Opus encoder before the first frame needs it."""
        if settings.binary_output == "opus" and self._opus is None:
            self._opus = OpusFrameEncoder()

    # Starting and stopping ------------------------------------------------------------------------

    def create(self, max_tokens: int | None) -> None:
        """``response.create`` (or the end of a VAD turn); ProtocolError when one is in progress."""
        if self.draining():
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
        self._start(max_tokens, now)

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

    def _start(self, max_tokens: int | None, started: float) -> None:
        self._starting = True
        try:
            rid = self.session.create_response(max_output_tokens=max_tokens)
        except ResponseInProgressError:
            raise ProtocolError("conversation_already_has_active_response", "a response is still in progress") from None
        finally:
            self._starting = False
        self._open(rid, started, max_tokens or self.session.config.max_output_tokens)

    def _start_pending(self, max_tokens: int | None, started: float) -> None:
        try:
            if self.draining():
                raise ProtocolError("server_shutting_down", "the server is shutting down; no new responses")
            self._start(max_tokens, started)
        except ProtocolError as e:
            self.outbox.send_error(e)
        except EngineError as e:
            self.outbox.send_error(engine_error(e, None))

    def _open(self, rid: str, started: float | None = None, max_tokens: int | None = None) -> ResponseInFlight:
        cur = self.current
        if cur is not None and cur.id == rid:
            return cur
        s = self.settings()
        r = ResponseInFlight(
            id=rid,
            index=self.count,
            item_id=new_id("item"),
            mode=s.mode,
            audio=s.sends_audio,
            binary=s.binary_output,
            started=started or time.monotonic(),
            max_output_tokens=max_tokens or resolve_max_tokens(s.max_output_tokens, self.max_output_tokens),
        )
        self.count += 1
        self.current = r
        self._cancel_requested = False
        response = response_object(
            rid,
            self.session.id,
            "in_progress",
            sends_audio=r.audio,
            max_output_tokens=r.max_output_tokens,
            output=[],
            extension={"response_index": r.index, "mode": r.mode, "binary_output": r.binary},
            output_audio=output_audio(s.output_voice),
        )
        send = self.outbox.send
        send(event("response.created", response=response))
        item = item_object(r.item_id, "assistant", [], "in_progress")
        send(event("response.output_item.added", response_id=rid, output_index=0, item=item))
        send(event("conversation.item.added", previous_item_id=self.items.append(r.item_id), item=item))
        send(content_event("response.content_part.added", rid, r.item_id, part=content_part(r.mode, "")[0]))
        return r

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
        if not ev.text or self._muted(r):
            return
        r.text.append(ev.text)
        kind = "response.output_text.delta" if r.mode == "asr" else "response.output_audio_transcript.delta"
        self.outbox.send(content_event(kind, r.id, r.item_id, delta=ev.text))

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
        if r.binary == "pcm16":
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
        text = "".join(r.text) if r.text else ev.text
        status, reason = final_status(ev.status, ev.reason, r.cancel_reason)
        send = self.outbox.send
        if r.mode == "asr":
            send(content_event("response.output_text.done", r.id, r.item_id, text=text))
        else:
            if r.audio:
                send(content_event("response.output_audio.done", r.id, r.item_id))
            send(content_event("response.output_audio_transcript.done", r.id, r.item_id, transcript=text))
        part, content = content_part(r.mode, text)
        send(content_event("response.content_part.done", r.id, r.item_id, part=part))
        item = item_object(r.item_id, "assistant", [content], "completed" if status == "completed" else "incomplete")
        send(event("response.output_item.done", response_id=r.id, output_index=0, item=item))
        send(event("conversation.item.done", item=item))

        st = ev.stats
        stats = _stats(r, st, ev.reason)
        response = response_object(
            r.id,
            self.session.id,
            status,
            sends_audio=r.audio,
            max_output_tokens=r.max_output_tokens,
            output=[item],
            extension=stats,
            status_details=status_details(status, reason),
            usage=usage_object(st),
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
