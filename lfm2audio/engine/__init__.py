"""Batched multi-session engine: session pool, batched scheduler, event streams (no sockets here)."""

from lfm2audio.engine.config import DEFAULT_PROMPTS, DEFAULT_SAMPLING, EngineConfig, SessionConfig, SessionMode
from lfm2audio.engine.engine import Engine
from lfm2audio.engine.events import (
    OUTPUT_SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    AudioFrame,
    EmptyInputError,
    EngineError,
    Event,
    EventQueue,
    InputTooLargeError,
    PoolFullError,
    ResponseDone,
    ResponseInProgressError,
    ResponseStats,
    SessionClosedError,
    SessionEvent,
    TextDelta,
)
from lfm2audio.engine.prompt import ContextLimitError
from lfm2audio.engine.session import Session

__all__ = [
    "DEFAULT_PROMPTS",
    "DEFAULT_SAMPLING",
    "ContextLimitError",
    "SessionMode",
    "OUTPUT_SAMPLE_RATE",
    "SAMPLES_PER_FRAME",
    "AudioFrame",
    "EmptyInputError",
    "Engine",
    "EngineConfig",
    "EngineError",
    "Event",
    "EventQueue",
    "InputTooLargeError",
    "PoolFullError",
    "ResponseDone",
    "ResponseInProgressError",
    "ResponseStats",
    "Session",
    "SessionClosedError",
    "SessionConfig",
    "SessionEvent",
    "TextDelta",
]
