"""Engine and session settings, and the defaults each mode starts from (one home for them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lfm2audio.sampling import GREEDY, SamplingParams

SessionMode = Literal["chat", "asr", "tts"]
AudioDecoderChoice = Literal["auto", "mimi", "detokenizer"]

DEFAULT_PROMPTS: dict[str, str] = {
    "chat": "Respond with interleaved text and audio.",
    "asr": "Perform ASR.",
    "tts": "Perform TTS.",
}

# What a server offers when a client asks for nothing (the liquid-audio README's settings).
DEFAULT_SAMPLING: dict[str, tuple[SamplingParams, SamplingParams]] = {  # mode -> (text, audio)
    "chat": (GREEDY, SamplingParams(1.0, 4)),
    "tts": (GREEDY, SamplingParams(0.8, 64)),
    "asr": (GREEDY, GREEDY),
}

DEFAULT_MAX_OUTPUT_TOKENS = 512
MIN_INPUT_SAMPLE_RATE, MAX_INPUT_SAMPLE_RATE = 8_000, 192_000


def tts_voice_prompt(voice: str) -> str:
    """The system prompt that asks LFM2-Audio's TTS for a voice described in words."""
    return f"Perform TTS.\nUse the following voice: {voice}"


@dataclass(frozen=True)
class EngineConfig:
    max_sessions: int = 8
    max_context: int = 4096  # positions per session
    prefill_chunk: int = 128  # positions prefilled per step
    audio_decoder: AudioDecoderChoice = "auto"
    max_input_seconds: float = 120.0  # buffered microphone audio per session
    # Capture the decode step as CUDA graphs per batch-size bucket (None: on for CUDA, off elsewhere).
    cuda_graphs: bool | None = None
    # Run the batched step on whole batch-size buckets with masks (what CUDA graphs replay) even without
    # graphs; by default rows are gathered per modality. For tests of the graph path on any device.
    bucketed_rows: bool = False
    # torch intra-op threads of the engine thread (None: what torch gives new threads). Only that thread
    # changes. Under OpenMP, more than 1 is slowed 2-3x when another thread that ran torch ops (the one
    # that loaded the model) still has its team: load with cpu_tuning.load_without_team, as the server does
    # (Engine() builds its own state that way).
    threads: int | None = None
    # torch intra-op threads of the prepare thread (mel features, the audio encoder), which works beside the
    # engine thread: 1 by default. With torch's count, bursts of turns under load waited on its thread team
    # (bench_load, 32 users on 2 cores: p95 time to first audio 2.1-2.6 s, against 0.93 s with 1).
    prepare_threads: int | None = 1

    def __post_init__(self) -> None:
        for name in ("threads", "prepare_threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        for name in ("max_sessions", "max_context", "prefill_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.audio_decoder not in ("auto", "mimi", "detokenizer"):
            raise ValueError(f"audio_decoder must be 'auto', 'mimi' or 'detokenizer', got {self.audio_decoder!r}")


@dataclass(frozen=True)
class SessionConfig:
    """How a session responds.

    ``chat``: interleaved text and audio (system prompt ``instructions``, default
    "Respond with interleaved text and audio."); ``asr``: sequential, text out;
    ``tts``: sequential, audio out, ``voice`` described in the system prompt.
    asr and tts turns are independent (each response sees only its system
    prompt and the new user turn); chat keeps the whole conversation.
    ``seed`` fixes the sampled stream: a row's random draws depend only on its
    seed and step (each response restarts from it), never on the rest of the
    batch. Its logits can still differ in the last float bits with the batch's
    size (CPU matrix kernels change their summation order with the row count),
    which can flip a decision that is a near-tie; greedy decoding is exposed to
    that in the same way.
    """

    mode: SessionMode = "chat"
    instructions: str | None = None
    voice: str | None = None
    text_sampling: SamplingParams = field(default_factory=SamplingParams)
    audio_sampling: SamplingParams = field(default_factory=SamplingParams)
    max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("chat", "asr", "tts"):
            raise ValueError(f"mode must be 'chat', 'asr' or 'tts', got {self.mode!r}")
        if not isinstance(self.max_output_tokens, int) or self.max_output_tokens < 1:
            raise ValueError(f"max_output_tokens must be a positive integer, got {self.max_output_tokens!r}")
        for name in ("text_sampling", "audio_sampling"):
            if not isinstance(getattr(self, name), SamplingParams):
                raise TypeError(f"{name} must be a SamplingParams")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an integer or None, got {type(self.seed).__name__}")

    @property
    def system_prompt(self) -> str:
        if self.instructions:
            return self.instructions
        if self.mode == "tts" and self.voice:
            return tts_voice_prompt(self.voice)
        return DEFAULT_PROMPTS[self.mode]

    @property
    def generation_mode(self) -> Literal["interleaved", "sequential"]:
        return "interleaved" if self.mode == "chat" else "sequential"
