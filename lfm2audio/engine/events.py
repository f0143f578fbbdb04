"""What the engine tells its callers: events, per-response stats, and the errors it raises.

Nothing here knows about sockets; a server turns these into its protocol.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

# Re-exported for callers of the engine (their home is lfm2audio.tokens).
from lfm2audio.tokens import OUTPUT_SAMPLE_RATE as OUTPUT_SAMPLE_RATE
from lfm2audio.tokens import SAMPLES_PER_FRAME as SAMPLES_PER_FRAME


class EngineError(RuntimeError):
    """Base of the engine's errors; ``code`` is a stable machine-readable name."""

    code = "engine_error"


class PoolFullError(EngineError):
    code = "session_limit_reached"


class ResponseInProgressError(EngineError):
    code = "response_in_progress"


class EmptyInputError(EngineError):
    code = "input_audio_buffer_commit_empty"


class SessionClosedError(EngineError):
    code = "session_closed"


class InputTooLargeError(EngineError):
    code = "input_too_large"


@dataclass(frozen=True)
class TextDelta:
    """One text token of a response and the text it completes (whole UTF-8 characters; may be empty)."""

    response_id: str
    text: str
    token_id: int


@dataclass(frozen=True)
class AudioFrame:
    """One 80 ms frame: its 8 codes and 1920 float32 samples at 24 kHz in [-1, 1].

    The end-of-audio frame (all codes 2048) is reported with ``end_of_audio``
    set and no samples: it closes a run of audio and is not sound.
    """

    response_id: str
    index: int
    codes: tuple[int, ...]
    pcm: np.ndarray
    end_of_audio: bool = False


@dataclass
class ResponseStats:
    prompt_positions: int = 0  # positions prefilled for this turn
    reused_positions: int = 0  # positions already in the session's cache
    text_tokens: int = 0
    audio_frames: int = 0
    time_to_first_token_s: float | None = None  # from response creation
    time_to_first_audio_s: float | None = None
    duration_s: float = 0.0
    real_time_factor: float | None = None  # duration / seconds of audio produced (< 1 is faster than real time)


@dataclass(frozen=True)
class ResponseDone:
    response_id: str
    status: Literal["completed", "cancelled", "incomplete", "failed"]
    reason: str | None  # "max_output_tokens", "context_limit", "client_cancelled", an error message, ...
    text: str
    stats: ResponseStats = field(default_factory=ResponseStats)


@dataclass(frozen=True)
class SessionEvent:
    """Something about the session itself, e.g. ``history_truncated`` when old turns were dropped."""

    kind: str
    detail: str = ""


Event = TextDelta | AudioFrame | ResponseDone | SessionEvent


class EventQueue:
    """Unbounded hand-off from the engine thread to one consumer, sync or asyncio.

    The engine never blocks on a slow consumer; the consumer (a server) decides
    what to do when it falls behind (``qsize``).
    """

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._waiter: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    def put(self, event: Event) -> None:
        self._q.put(event)
        with self._lock:
            waiter = self._waiter
        if waiter is not None:
            loop, flag = waiter
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:  # the consumer's loop is closed
                pass

    def get(self, timeout: float | None = None) -> Event:
        """Blocking get for threads; raises queue.Empty on timeout."""
        return self._q.get(timeout=timeout)

    def get_nowait(self) -> Event | None:
        try:
            return self._q.get_nowait()
        except queue.Empty:
            return None

    async def aget(self) -> Event:
        """Await the next event without blocking the event loop."""
        while True:
            event = self.get_nowait()
            if event is not None:
                return event
            loop = asyncio.get_running_loop()
            flag = asyncio.Event()
            with self._lock:
                self._waiter = (loop, flag)
            try:
                event = self.get_nowait()  # an event may have landed before the waiter was set
                if event is not None:
                    return event
                await flag.wait()
            finally:
                with self._lock:
                    self._waiter = None

    def qsize(self) -> int:
        return self._q.qsize()
