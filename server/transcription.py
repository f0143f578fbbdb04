"""Input audio transcription by LFM2-Audio itself: each committed user turn is also run through the model in
ASR mode, and the text is streamed as ``conversation.item.input_audio_transcription.delta`` / ``.completed``.

The ASR runs on a hidden second engine session of the connection (opened on the first turn to
transcribe, closed with the connection): a row of the same batched engine step as every other session,
not a second model or a second connection. It takes one slot of the engine's pool while it lives, so a
session with transcription uses two slots; when the pool is full the turn's transcription fails with
``conversation.item.input_audio_transcription.failed`` and the conversation goes on. Turns are
transcribed one at a time, in order.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

import numpy as np

from lfm2audio.engine import EngineError, ResponseDone, Session, SessionConfig, TextDelta
from lfm2audio_server.outbox import Outbox
from lfm2audio_server.protocol import ItemOrder, event

log = logging.getLogger("lfm2audio_server.session")

ASR = SessionConfig(mode="asr", max_output_tokens=256)


class Transcriber:
    def __init__(self, open_session: Callable[[SessionConfig], Session], outbox: Outbox, items: ItemOrder) -> None:
        self._open = open_session
        self.outbox = outbox
        self.items = items
        self.session: Session | None = None
        self._queue: deque[tuple[str, np.ndarray]] = deque()
        self._wake = asyncio.Event()

    def submit(self, item_id: str, audio: np.ndarray) -> None:
        """Transcribe the committed user audio of ``item_id`` (16 kHz float32)."""
        self._queue.append((item_id, audio))
        self._wake.set()

    async def run(self) -> None:
        """The connection's transcription task: one ASR response at a time."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                item_id, audio = self._queue.popleft()
                try:
                    await self._transcribe(item_id, audio)
                except EngineError as e:
                    self._failed(item_id, getattr(e, "code", "engine_error"), str(e))

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None

    async def _transcribe(self, item_id: str, audio: np.ndarray) -> None:
        if self.session is None:
            self.session = self._open(ASR)
        s = self.session
        s.append_audio(audio, 16_000)
        s.commit_audio()
        s.create_response()
        text: list[str] = []
        while True:
            ev = await s.events.aget()
            if isinstance(ev, TextDelta) and ev.text:
                text.append(ev.text)
                self.outbox.send(
                    event(
                        "conversation.item.input_audio_transcription.delta",
                        item_id=item_id,
                        content_index=0,
                        delta=ev.text,
                    )
                )
            elif isinstance(ev, ResponseDone):
                if ev.status == "failed":
                    self._failed(item_id, "transcription_failed", ev.reason or "the transcription failed")
                    return
                transcript = "".join(text).strip()
                self._store(item_id, transcript)
                self.outbox.send(
                    event(
                        "conversation.item.input_audio_transcription.completed",
                        item_id=item_id,
                        content_index=0,
                        transcript=transcript,
                        usage={"type": "duration", "seconds": round(len(audio) / 16_000, 3)},
                    )
                )
                return

    def _store(self, item_id: str, transcript: str) -> None:
        item = self.items.get(item_id)
        if item is not None:
            for c in item.get("content", []):
                if c.get("type") == "input_audio":
                    c["transcript"] = transcript

    def _failed(self, item_id: str, code: str, message: str) -> None:
        log.warning("input transcription failed: %s", message)
        self.outbox.send(
            event(
                "conversation.item.input_audio_transcription.failed",
                item_id=item_id,
                content_index=0,
                error={"type": "server_error", "code": code, "message": message, "param": None},
            )
        )
