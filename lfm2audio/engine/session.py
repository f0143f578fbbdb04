"""The per-session handle callers hold, and the small interface it needs from whatever runs it.

A ``Session`` is thread-safe: a web server calls it from its event loop while
the engine thread steps. Buffered microphone audio is resampled to 16 kHz as
it arrives; everything that touches the model is handed to the ``SessionHost``
(the engine) through ``submit_response`` / ``cancel_response`` / ``close_session``.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass
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


# Edits of a session's conversation history. Items are named by the caller's keys (``item_id`` of
# add_text / commit_audio / create_response / add_message); the engine applies an edit between
# responses (one that arrives while a response runs waits for its end) and re-prefills the cache from
# the first changed position.


@dataclass(frozen=True)
class AddTurn:
    """A whole turn of ``role`` (user, assistant, system, tool) placed after the turn holding item
    ``after`` (None: at the end; "root": right after the system prompt). ``keys`` name the parts;
    ``whole`` tags the turn's header and end with the first key too (so deleting it removes the turn)."""

    role: str
    parts: tuple[UserPart, ...]
    keys: tuple[str | None, ...]
    after: str | None = None
    whole: bool = True


@dataclass(frozen=True)
class DeleteItem:
    key: str


@dataclass(frozen=True)
class TruncateItem:
    """Keep the first ``audio_frames`` audio frames of item ``key`` (and what came before them); the
    rest of that item (the audio the listener never heard, and the text after it) is dropped."""

    key: str
    audio_frames: int


HistoryEdit = AddTurn | DeleteItem | TruncateItem


class SessionHost(Protocol):
    """What a session asks of the engine that owns its slot."""

    def submit_response(
        self,
        session: Session,
        response_id: str,
        parts: list[UserPart],
        config: SessionConfig,
        max_tokens: int,
        *,
        part_keys: list[str | None] | None = None,
        item_key: str | None = None,
    ) -> None: ...

    def submit_edit(self, session: Session, edit: HistoryEdit) -> None: ...

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
        self._pending_keys: list[str | None] = []
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

    def commit_audio(self, *, item_id: str | None = None) -> np.ndarray:
        """Buffered audio becomes an utterance of the pending user turn (named ``item_id`` for edits);
        returns that audio (16 kHz float32)."""
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
            audio = self._audio.take()
            self._pending.append(("audio", audio))
            self._pending_keys.append(item_id)
        return audio

    def add_text(self, text: str, *, item_id: str | None = None) -> None:
        """A user text message, part of the pending user turn."""
        self._check_open()
        if not isinstance(text, str) or not text:
            raise ValueError("text must be a non-empty string")
        with self._lock:
            self._pending.append(("text", text))
            self._pending_keys.append(item_id)

    # History edits ------------------------------------------------------------------

    def add_message(
        self, role: str, parts: list[UserPart], *, item_id: str, after: str | None = None
    ) -> None:
        """A whole message of ``role`` (user, assistant, system or tool) into the history, after item
        ``after`` (None: at the end; "root": first after the system prompt). Pending user parts are
        placed first, as a user turn of their own, so the history keeps the order things came in."""
        self._check_open()
        if role not in ("user", "assistant", "system", "tool"):
            raise ValueError(f"role must be user, assistant, system or tool, got {role!r}")
        for kind, value in parts:
            if kind not in ("text", "audio") or (kind == "text" and (not isinstance(value, str) or not value)):
                raise ValueError("parts must be ('text', non-empty str) or ('audio', 16 kHz float32 array)")
        with self._lock:
            pending, keys = self._take_pending()
        if pending:
            self._host.submit_edit(self, AddTurn("user", tuple(pending), tuple(keys), None, whole=False))
        self._host.submit_edit(self, AddTurn(role, tuple(parts), (item_id,) * len(parts), after))

    def delete_item(self, item_id: str) -> None:
        """Remove item ``item_id`` (a pending user part, or what the history holds of it)."""
        self._check_open()
        with self._lock:
            if item_id in self._pending_keys:
                i = self._pending_keys.index(item_id)
                del self._pending[i], self._pending_keys[i]
                return
        self._host.submit_edit(self, DeleteItem(item_id))

    def truncate_item(self, item_id: str, audio_frames: int) -> None:
        """Keep only the first ``audio_frames`` audio frames of assistant item ``item_id`` (see TruncateItem)."""
        self._check_open()
        if not isinstance(audio_frames, int) or audio_frames < 0:
            raise ValueError(f"audio_frames must be a non-negative integer, got {audio_frames!r}")
        self._host.submit_edit(self, TruncateItem(item_id, audio_frames))

    def _take_pending(self) -> tuple[list[UserPart], list[str | None]]:
        parts, keys = self._pending, self._pending_keys
        self._pending, self._pending_keys = [], []
        return parts, keys

    # Responses ----------------------------------------------------------------------

    @property
    def responding(self) -> bool:
        return self._response_id is not None

    @property
    def response_id(self) -> str | None:
        """The id of the response in progress, if any."""
        return self._response_id

    def create_response(
        self,
        *,
        max_output_tokens: int | None = None,
        item_id: str | None = None,
        config: SessionConfig | None = None,
        take_pending: bool = True,
    ) -> str:
        """Start generating; events arrive on ``events``. Returns the response id. ``item_id`` names the
        reply in the history (for edits); ``config`` replaces the session's settings for this response;
        ``take_pending=False`` leaves the pending user parts for a later response."""
        self._check_open()
        with self._lock:
            if self._response_id is not None:
                raise ResponseInProgressError(f"response {self._response_id} is still in progress")
            if max_output_tokens is not None and (not isinstance(max_output_tokens, int) or max_output_tokens < 1):
                raise ValueError(f"max_output_tokens must be a positive integer, got {max_output_tokens!r}")
            response_id = "resp_" + uuid.uuid4().hex[:20]
            self._response_id = response_id
            if config is not None and not isinstance(config, SessionConfig):
                raise TypeError("config must be a SessionConfig")
            parts, keys = self._take_pending() if take_pending else ([], [])
            config = config or self._config
        self._host.submit_response(
            self, response_id, parts, config, max_output_tokens or config.max_output_tokens,
            part_keys=keys, item_key=item_id,
        )  # fmt: skip
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

    def mark_responding(self, response_id: str) -> None:
        """For a relay that submits to the host on this session's behalf (a session of another process,
        ``lfm2audio_server.engine_process``): response ``response_id`` is now in progress."""
        with self._lock:
            self._response_id = response_id

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
