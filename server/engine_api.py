"""The engine names the server uses, in one place."""

from __future__ import annotations

from lfm2audio.engine.events import (
    OUTPUT_SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    AudioFrame,
    EmptyInputError,
    EngineError,
    InputTooLargeError,
    PoolFullError,
    ResponseDone,
    ResponseInProgressError,
    SessionClosedError,
    SessionEvent,
    TextDelta,
)
from lfm2audio.sampling import SamplingParams

try:
    from lfm2audio.engine import Engine, EngineConfig, Session, SessionConfig
except ImportError:  # the package may not re-export them
    from lfm2audio.engine.engine import Engine, EngineConfig
    from lfm2audio.engine.session import Session, SessionConfig

__all__ = [
    "OUTPUT_SAMPLE_RATE",
    "SAMPLES_PER_FRAME",
    "AudioFrame",
    "EmptyInputError",
    "Engine",
    "EngineConfig",
    "EngineError",
    "InputTooLargeError",
    "PoolFullError",
    "ResponseDone",
    "ResponseInProgressError",
    "SamplingParams",
    "Session",
    "SessionClosedError",
    "SessionConfig",
    "SessionEvent",
    "TextDelta",
]
