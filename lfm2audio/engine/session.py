"""Session configuration and the per-session handle callers hold.

A ``Session`` is thread-safe: a web server calls it from its event loop while
the engine thread steps. Buffered microphone audio is resampled to 16 kHz as
it arrives; everything that touches the model is handed to the engine thread.
"""

from __future__ import annotations

import threading
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from lfm2audio.engine.events import (
    EmptyInputError,
    EventQueue,
    InputTooLargeError,
    ResponseInProgressError,
    SessionClosedError,
)
from lfm2audio.sampling import SamplingParams

if TYPE_CHECKING:
    from lfm2audio.engine.engine import Engine

Mode = Literal["chat", "asr", "tts"]
INPUT_SAMPLE_RATE = 16_000

DEFAULT_PROMPTS = {
    "chat": "Respond with interleaved text and audio.",
    "asr": "Perform ASR.",
    "tts": "Perform TTS.",
}


@dataclass(frozen=True)
class SessionConfig:
    """How a session responds.

    ``chat``: interleaved text and audio (system prompt ``instructions``, default
    "Respond with interleaved text and audio."); ``asr``: sequential, text out;
    ``tts``: sequential, audio out, ``voice`` described in the system prompt.
    asr and tts turns are independent (each response sees only its system
    prompt and the new user turn); chat keeps the whole conversation.
    """

    mode: Mode = "chat"
    instructions: str | None = None
    voice: str | None = None
    text_sampling: SamplingParams = field(default_factory=SamplingParams)
    audio_sampling: SamplingParams = field(default_factory=SamplingParams)
    max_output_tokens: int = 512
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("chat", "asr", "tts"):
            raise ValueError(f"mode must be 'chat', 'asr' or 'tts', got {self.mode!r}")
        if not isinstance(self.max_output_tokens, int) or self.max_output_tokens < 1:
            raise ValueError(f"max_output_tokens must be a positive integer, got {self.max_output_tokens!r}")

    @property
    def system_prompt(self) -> str:
        if self.instructions:
            return self.instructions
        if self.mode == "tts" and self.voice:
            return f"Perform TTS.\nUse the following voice: {self.voice}"
        return DEFAULT_PROMPTS[self.mode]

    @property
    def generation_mode(self) -> Literal["interleaved", "sequential"]:
        return "interleaved" if self.mode == "chat" else "sequential"


class InputAudioBuffer:
    """Microphone audio at 16 kHz, resampled incrementally as chunks arrive."""

    def __init__(self, max_seconds: float) -> None:
        self.max_samples = int(max_seconds * INPUT_SAMPLE_RATE)
        self._chunks: list[np.ndarray] = []
        self._samples = 0
        self._rate: int | None = None
        self._resampler = None

    @property
    def samples(self) -> int:
        return self._samples

    def append(self, pcm: np.ndarray, sample_rate: int) -> None:
        pcm = as_float_mono(pcm)
        if not isinstance(sample_rate, int) or not 8_000 <= sample_rate <= 192_000:
            raise ValueError(f"sample_rate must be an integer from 8000 to 192000, got {sample_rate!r}")
        if sample_rate != self._rate:
            self._flush_resampler()
            self._rate = sample_rate
            if sample_rate != INPUT_SAMPLE_RATE:
                import soxr

                self._resampler = soxr.ResampleStream(sample_rate, INPUT_SAMPLE_RATE, 1, dtype="float32")
        out = self._resampler.resample_chunk(pcm) if self._resampler is not None else pcm
        if self._samples + len(out) > self.max_samples:
            raise InputTooLargeError(
                f"input audio buffer would exceed {self.max_samples / INPUT_SAMPLE_RATE:.0f} s; commit or clear it"
            )
        self._chunks.append(np.asarray(out, dtype=np.float32))
        self._samples += len(out)

    def _flush_resampler(self) -> None:
        if self._resampler is not None:
            tail = self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
            if len(tail):
                self._chunks.append(np.asarray(tail, dtype=np.float32))
                self._samples += len(tail)
        self._resampler = None

    def take(self) -> np.ndarray:
        """All buffered audio (16 kHz float32), leaving the buffer empty."""
        self._flush_resampler()
        self._rate = None
        wave = np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.float32)
        self.clear()
        return wave

    def clear(self) -> None:
        self._chunks, self._samples = [], 0
        self._resampler, self._rate = None, None


def as_float_mono(pcm: np.ndarray) -> np.ndarray:
    """Mono float32 in [-1, 1] from float or int16 samples ((samples,) or (channels, samples))."""
    pcm = np.asarray(pcm)
    if pcm.ndim == 2:
        pcm = pcm.astype(np.float32).mean(0) if pcm.dtype != np.int16 else pcm.mean(0).astype(np.int16)
    if pcm.ndim != 1:
        raise ValueError(f"audio must be (samples,) or (channels, samples), got shape {pcm.shape}")
    if pcm.dtype == np.int16:
        return pcm.astype(np.float32) / 32768.0
    if not np.issubdtype(pcm.dtype, np.floating):
        raise ValueError(f"audio must be float or int16, got {pcm.dtype}")
    return pcm.astype(np.float32, copy=False)


@dataclass
class PendingUserTurn:
    """What the user said since the last response: audio utterances and text, in order."""

    parts: list[tuple[str, object]] = field(default_factory=list)


class Session:
    """A caller's handle on one conversation in the engine."""

    def __init__(self, engine: Engine, slot: int, config: SessionConfig, max_input_seconds: float) -> None:
        self.id = "sess_" + uuid.uuid4().hex[:20]
        self.slot = slot
        self.events = EventQueue()
        self._engine = engine
        self._config = config
        self._lock = threading.Lock()
        self._audio = InputAudioBuffer(max_input_seconds)
        self._pending = PendingUserTurn()
        self._closed = False
        self._response_id: str | None = None

    # Configuration ----------------------------------------------------------------

    @property
    def config(self) -> SessionConfig:
        return self._config

    def update(self, config: SessionConfig) -> None:
        """New settings, used from the next response on."""
        self._check_open()
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

    def clear_audio(self) -> None:
        with self._lock:
            self._audio.clear()

    def commit_audio(self) -> None:
        """Buffered audio becomes an utterance of the pending user turn."""
        self._check_open()
        with self._lock:
            if self._audio.samples < 160:
                raise EmptyInputError("input audio buffer is empty (or shorter than 10 ms)")
            self._pending.parts.append(("audio", self._audio.take()))

    def add_text(self, text: str) -> None:
        """A user text message, part of the pending user turn."""
        self._check_open()
        if not isinstance(text, str) or not text:
            raise ValueError("text must be a non-empty string")
        with self._lock:
            self._pending.parts.append(("text", text))

    # Responses ----------------------------------------------------------------------

    @property
    def responding(self) -> bool:
        return self._response_id is not None

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
            parts, self._pending = self._pending.parts, PendingUserTurn()
            config = self._config
        self._engine._submit(self, response_id, parts, config, max_output_tokens or config.max_output_tokens)
        return response_id

    def cancel(self) -> bool:
        """Stop the running response within one engine step; False when none runs."""
        if self._response_id is None:
            return False
        self._engine._cancel(self)
        return True

    def _response_finished(self) -> None:
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
            done = self._engine._close(self)
            if wait:
                done.wait(timeout)

    def _check_open(self) -> None:
        if self._closed:
            raise SessionClosedError(f"session {self.id} is closed")
