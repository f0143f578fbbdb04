"""The per-session handle callers hold, and the small interface it needs from whatever runs it.

A ``Session`` is thread-safe: a web server calls it from its event loop while
the engine thread steps. Buffered microphone audio is resampled to 16 kHz as
it arrives; everything that touches the model is handed to the ``SessionHost``
(the engine) through ``submit_response`` / ``cancel_response`` / ``close_session``.
"""

from __future__ import annotations

import threading
import uuid
from typing import Protocol

import numpy as np

from lfm2audio.engine.config import SessionConfig
from lfm2audio.engine.events import (
    EmptyInputError,
    EventQueue,
    InputTooLargeError,
    ResponseInProgressError,
    SessionClosedError,
)
from lfm2audio.engine.input_audio import InputAudioBuffer
from lfm2audio.tokens import INPUT_SAMPLE_RATE

# What a user turn is made of, in order: ("audio", 16 kHz float32 array) or ("text", str).
UserPart = tuple[str, object]


class SessionHost(Protocol):
    """What a session asks of the engine that owns its slot."""

    def submit_response(
        self, session: Session, response_id: str, parts: list[UserPart], config: SessionConfig, max_tokens: int
    ) -> None: ...

    def cancel_response(self, session: Session) -> None: ...

    def close_session(self, session: Session) -> threading.Event: ...


class Session:
    """A caller's handle on one conversation in the engine."""

    def __init__(self, host: SessionHost, slot: int, config: SessionConfig, max_input_seconds: float) -> None:
        self.id = "sess_" + uuid.uuid4().hex[:20]
        self.slot = slot
        self.events = EventQueue()
        self._host = host
        self._config = config
        self._lock = threading.Lock()
        self._audio = InputAudioBuffer(max_input_seconds)
        self._pending: list[UserPart] = []
        self._closed = False
        self._response_id: str | None = None

    # Configuration ----------------------------------------------------------------

    @property
    def config(self) -> SessionConfig:
        return self._config

    def update(self, config: SessionConfig) -> None:
        """New settings, used from the next response on."""
        self._check_open()
        if not isinstance(config, SessionConfig):
            raise TypeError("config must be a SessionConfig")
        with self._lock:
            self._config = config

    # Input ------------------------------------------------------------------------

    def append_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        self._check_open()
        with self._lock:
            self._audio.append(pcm, sample_rate)

    @property
    def buffered_audio_seconds(self) -> float:
        return self._audio.samples / INPUT_SAMPLE_RATE

    @property
    def pending_audio_seconds(self) -> float:
        """Committed audio of the pending user turn (not yet sent with a response)."""
        with self._lock:
            return sum(len(v) for k, v in self._pending if k == "audio") / INPUT_SAMPLE_RATE  # type: ignore[arg-type]

    def clear_audio(self) -> None:
        with self._lock:
            self._audio.clear()

    def commit_audio(self) -> None:
        """Buffered audio becomes an utterance of the pending user turn."""
        self._check_open()
        with self._lock:
            if self._audio.samples < 160:
                raise EmptyInputError("input audio buffer is empty (or shorter than 10 ms)")
            # The pending turn's audio is bounded as the buffer is: commits without a response cannot
            # pile up memory (a turn longer than that could not fit the context anyway).
            held = sum(len(v) for k, v in self._pending if k == "audio")  # type: ignore[arg-type]
            if held + self._audio.samples > self._audio.max_samples:
                raise InputTooLargeError(
                    f"the pending user turn would hold more than {self._audio.max_samples / INPUT_SAMPLE_RATE:.0f} s"
                    " of audio; create a response or clear the buffer"
                )
            self._pending.append(("audio", self._audio.take()))

    def add_text(self, text: str) -> None:
        """A user text message, part of the pending user turn."""
        self._check_open()
        if not isinstance(text, str) or not text:
            raise ValueError("text must be a non-empty string")
        with self._lock:
            self._pending.append(("text", text))

    # Responses ----------------------------------------------------------------------

    @property
    def responding(self) -> bool:
        return self._response_id is not None

    @property
    def response_id(self) -> str | None:
        """The id of the response in progress, if any."""
        return self._response_id

    def create_response(self, *, max_output_tokens: int | None = None) -> str:
        """Start generating; events arrive on ``events``. Returns the response id."""
        self._check_open()
        with self._lock:
            if self._response_id is not None:
                raise ResponseInProgressError(f"response {self._response_id} is still in progress")
            if max_output_tokens is not None and (not isinstance(max_output_tokens, int) or max_output_tokens < 1):
                raise ValueError(f"max_output_tokens must be a positive integer, got {max_output_tokens!r}")
            response_id = "resp_" + uuid.uuid4().hex[:20]
            self._response_id = response_id
            parts, self._pending = self._pending, []
            config = self._config
        self._host.submit_response(self, response_id, parts, config, max_output_tokens or config.max_output_tokens)
        return response_id

    def cancel(self) -> bool:
        """Stop the running response within one engine step; False when none runs."""
        if self._response_id is None:
            return False
        self._host.cancel_response(self)
        return True

    def mark_idle(self) -> None:
        """Called by the host just before it emits a response's ResponseDone."""
        with self._lock:
            self._response_id = None

    # Lifetime -----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, *, wait: bool = False, timeout: float = 10.0) -> None:
        """Free the session's slot (its running response is cancelled).

        The slot is released by the engine thread within one step; ``wait``
        blocks until then (do not wait from an event loop: it can take a step).
        """
        if not self._closed:
            self._closed = True
            done = self._host.close_session(self)
            if wait:
                done.wait(timeout)

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosedError(f"session {self.id} is closed")
