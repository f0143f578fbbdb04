"""A realtime session's settings, as the client set them with ``session.update`` (plain values, no I/O).

``client_events`` turns a ``session.update`` into new settings; ``protocol.session_object`` shows them
to the client; the connection turns them into the engine's ``SessionConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lfm2audio.engine import DEFAULT_SAMPLING

BinaryFormat = Literal["pcm16", "opus"]
AudioFormat = Literal["pcm", "pcmu", "pcma"]  # audio/pcm (PCM16), audio/pcmu (G.711 mu-law), audio/pcma (A-law)
G711_RATE = 8_000

# semantic_vad runs as our server VAD: the end of a turn waits for this much silence, by eagerness
# (a low eagerness lets the user pause longer). The model itself does not judge turn ends.
SEMANTIC_SILENCE_MS = {"low": 1200, "medium": 700, "auto": 700, "high": 300}


@dataclass(frozen=True)
class TurnDetection:
    """``server_vad`` turn detection (OpenAI's defaults); ``semantic_vad`` maps onto it (``eagerness``
    sets the silence window, see SEMANTIC_SILENCE_MS)."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True
    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    eagerness: str | None = None


@dataclass(frozen=True)
class Sampling:
    temperature: float | None = None
    top_k: int | None = None


# liquid-audio's recommended settings (text greedy unless the client says otherwise): the engine's
# per-mode defaults (their one home), as the protocol's plain values.
DEFAULT_AUDIO_SAMPLING = {mode: Sampling(a.temperature, a.top_k) for mode, (_, a) in DEFAULT_SAMPLING.items()}
DEFAULT_TEXT_SAMPLING = Sampling(DEFAULT_SAMPLING["chat"][0].temperature, DEFAULT_SAMPLING["chat"][0].top_k)


@dataclass(frozen=True)
class RealtimeSettings:
    model: str = ""
    mode: Literal["chat", "asr", "tts"] = "chat"
    instructions: str | None = None
    voice: str | None = None  # lfm2audio: TTS voice description
    output_voice: Any = None  # OpenAI audio.output.voice, echoed, not used
    max_output_tokens: int | Literal["inf"] = "inf"
    output_modalities: tuple[str, ...] = ("audio",)
    input_rate: int = 24_000
    input_format: AudioFormat = "pcm"
    output_format: AudioFormat = "pcm"
    transcription: dict | None = None  # audio.input.transcription as given (any model: LFM2-Audio's ASR runs it)
    tools: tuple[dict, ...] = ()  # function tools (OpenAI's shape: type, name, description, parameters)
    tool_choice: Any = "auto"
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)
    text_sampling: Sampling | None = None  # None: the mode's default
    audio_sampling: Sampling | None = None
    seed: int | None = None
    binary_input: tuple[BinaryFormat, int | None] | None = None
    binary_output: BinaryFormat | None = None

    def effective_text_sampling(self) -> Sampling:
        return self.text_sampling or DEFAULT_TEXT_SAMPLING

    def effective_audio_sampling(self) -> Sampling:
        return self.audio_sampling or DEFAULT_AUDIO_SAMPLING[self.mode]

    @property
    def sends_audio(self) -> bool:
        return self.mode != "asr" and "audio" in self.output_modalities


def resolve_max_tokens(value: int | Literal["inf"], cap: int) -> int:
    """A client's ``max_output_tokens`` ("inf" or a number) as a count, at most the server's ``cap``."""
    return cap if value == "inf" else min(int(value), cap)
