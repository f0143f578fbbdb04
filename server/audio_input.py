"""A connection's input audio: decode (base64 PCM16, binary PCM16 or Opus), resample to 16 kHz, run the
server VAD, feed the engine session's input buffer, and commit user turns.

With server VAD only speech reaches the engine; each detected start and end of speech is reported to the
client, and handed to the connection (``on_turn``), which decides about barge-in and new responses.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import numpy as np

from lfm2audio.engine import EngineError, InputTooLargeError, Session
from lfm2audio_server.audio import (
    OpusPacketDecoder,
    Resampler,
    g711_from_base64,
    int16_to_float,
    pcm16_from_base64,
    pcm16_from_bytes,
    unpack_packets,
)
from lfm2audio_server.metrics import Metrics
from lfm2audio_server.outbox import Outbox
from lfm2audio_server.protocol import ItemOrder, ProtocolError, engine_error, event, item_object, new_id
from lfm2audio_server.settings import RealtimeSettings, TurnDetection
from lfm2audio_server.vad import (
    SAMPLE_RATE,
    VAD_BATCHER,
    SpeechAudio,
    SpeechStarted,
    SpeechStopped,
    StreamingVad,
    VadParams,
)

# What the connection is told: speech started (barge-in), or a turn was committed at the end of speech.
TurnCallback = Callable[[SpeechStarted | SpeechStopped], Awaitable[None]]
# And each committed user turn's item id and audio (16 kHz float32), for input transcription.
CommitCallback = Callable[[str, np.ndarray], None]


class AudioInput:
    def __init__(
        self,
        session: Session,
        outbox: Outbox,
        metrics: Metrics,
        items: ItemOrder,
        settings: RealtimeSettings,
        *,
        max_input_audio_s: float,
        on_turn: TurnCallback,
        on_commit: CommitCallback | None = None,
    ) -> None:
        self.session = session
        self.outbox = outbox
        self.metrics = metrics
        self.items = items
        self.settings = settings
        self.max_input_audio_s = max_input_audio_s
        self.on_turn = on_turn
        self.on_commit = on_commit
        self._resampler = Resampler(SAMPLE_RATE)
        td = settings.turn_detection  # server_vad by default, as OpenAI
        self._vad = StreamingVad(_vad_params(td)) if td is not None else None
        self._opus: OpusPacketDecoder | None = None
        self._speech_item: str | None = None  # the item id announced with speech_started

    def apply(self, new: RealtimeSettings) -> None:
        """New settings (after session.update): restart what they change."""
        old, self.settings = self.settings, new
        if new.input_rate != old.input_rate:
            self._resampler.reset()
        if new.turn_detection != old.turn_detection:
            self._vad = None if new.turn_detection is None else StreamingVad(_vad_params(new.turn_detection))
            self._speech_item = None
        if new.binary_input != old.binary_input:
            opus = new.binary_input is not None and new.binary_input[0] == "opus"
            self._opus = OpusPacketDecoder(SAMPLE_RATE) if opus else None

    # Client messages ------------------------------------------------------------------------------

    async def append_base64(self, audio: str) -> None:
        """``input_audio_buffer.append``: base64 PCM16 at the session's input rate, or 8 kHz G.711."""
        fmt = self.settings.input_format
        pcm = pcm16_from_base64(audio) if fmt == "pcm" else g711_from_base64(audio, fmt)
        await self._ingest(int16_to_float(pcm), self.settings.input_rate)

    async def append_binary(self, data: bytes) -> None:
        """A binary message: PCM16 or length-prefixed Opus packets, as session.update declared."""
        declared = self.settings.binary_input
        if declared is None:
            raise ProtocolError(
                "binary_audio_not_configured",
                "binary audio needs a declared format first: session.update with "
                "session.lfm2audio.binary_input = {format: 'pcm16', rate: ...} or {format: 'opus'}",
            )
        if declared[0] == "pcm16":
            await self._ingest(int16_to_float(pcm16_from_bytes(data)), declared[1] or self.settings.input_rate)
        else:
            assert self._opus is not None
            await self._ingest(self._opus.decode(unpack_packets(data)), SAMPLE_RATE)

    def commit(self) -> None:
        """``input_audio_buffer.commit``: what the resampler still holds, then the buffer, becomes a user turn."""
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

    def clear(self) -> None:
        """``input_audio_buffer.clear``."""
        self._resampler.reset()
        self.session.clear_audio()
        if self._vad is not None:
            self._vad.end_turn()
        self._speech_item = None
        self.outbox.send(event("input_audio_buffer.cleared"))

    # Audio path -----------------------------------------------------------------------------------

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
        outputs = await self._vad.feed_batched(x, VAD_BATCHER)
        for out in outputs:
            if isinstance(out, SpeechAudio):
                try:
                    self._to_engine(out.pcm)
                except ProtocolError as e:
                    self.outbox.send_error(e)
            elif isinstance(out, SpeechStarted):
                self._speech_item = new_id("item")
                self.outbox.send(
                    event(
                        "input_audio_buffer.speech_started",
                        audio_start_ms=out.audio_start_ms,
                        item_id=self._speech_item,
                    )
                )
                await self.on_turn(out)
            elif isinstance(out, SpeechStopped):
                item = self._speech_item or new_id("item")
                self._speech_item = None
                self.outbox.send(
                    event("input_audio_buffer.speech_stopped", audio_end_ms=out.audio_end_ms, item_id=item)
                )
                try:
                    self._commit(item)
                except EngineError as e:
                    self.outbox.send_error(engine_error(e, None))
                    continue
                await self.on_turn(out)

    def _to_engine(self, x: np.ndarray) -> None:
        limit = self.max_input_audio_s
        # Audio committed without a response yet counts too: a session holds at most this much.
        held = self.session.buffered_audio_seconds + self.session.pending_audio_seconds
        if held + len(x) / SAMPLE_RATE > limit:
            raise ProtocolError(
                "input_audio_buffer_full",
                f"a session holds at most {limit:g} s of input audio (buffered and committed without a "
                "response); create a response, or commit or clear the buffer (audio dropped)",
            )
        try:
            self.session.append_audio(x, SAMPLE_RATE)
        except InputTooLargeError as e:
            raise ProtocolError("input_audio_buffer_full", str(e)) from None

    def _commit(self, item_id: str | None) -> None:
        item_id = item_id or new_id("item")
        audio = self.session.commit_audio(item_id=item_id)
        item = item_object(item_id, "user", [{"type": "input_audio", "transcript": None}], "completed")
        prev = self.items.append(item_id, item)
        self.outbox.send(event("input_audio_buffer.committed", previous_item_id=prev, item_id=item_id))
        self.outbox.send(event("conversation.item.added", previous_item_id=prev, item=item))
        self.outbox.send(event("conversation.item.done", previous_item_id=prev, item=item))
        if self.on_commit is not None:
            self.on_commit(item_id, audio)


def _vad_params(td: TurnDetection) -> VadParams:
    return VadParams(td.threshold, td.prefix_padding_ms, td.silence_duration_ms)
