"""TTS voices: which system prompt a voice name or description produces, for every API of the server.

The checkpoint decides the form. LFM2.5-Audio (a checkpoint with ``audio_detokenizer/``) was trained
on four named speakers, asked for as ``Perform TTS. Use the UK female voice.``; LFM2-Audio takes a
free description, ``Perform TTS.\\nUse the following voice: <description>`` (the liquid-audio README's
TTS prompt). OpenAI's voice names are mapped onto the named speakers (for LFM2-Audio onto a
description of that speaker), so clients written for OpenAI work unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

VoiceStyle = Literal["named", "described"]

# LFM2.5-Audio's speakers, and the description each stands for on an LFM2-Audio checkpoint.
NAMED_VOICES: dict[str, str] = {
    "US male": "an American male voice with clear diction",
    "US female": "an American female voice with clear diction",
    "UK male": "a British male voice with clear diction",
    "UK female": "a British female voice with clear diction",
}
DEFAULT_NAMED_VOICE = "UK female"  # what LiveKit's LiquidAI plugin asks for by default

# OpenAI's voices, each to the named speaker closest to how OpenAI describes it (gender, accent).
OPENAI_VOICES: dict[str, str] = {
    "alloy": "US female",
    "ash": "US male",
    "ballad": "UK male",
    "cedar": "US male",
    "coral": "US female",
    "echo": "US male",
    "fable": "UK male",
    "marin": "US female",
    "nova": "US female",
    "onyx": "US male",
    "sage": "UK female",
    "shimmer": "UK female",
    "verse": "UK male",
}

NAMED_PROMPT = "Perform TTS. Use the {name} voice."
DESCRIBED_PROMPT = "Perform TTS.\nUse the following voice: {description}"
PLAIN_PROMPT = "Perform TTS."


class VoiceError(ValueError):
    """A voice this checkpoint cannot produce; the message says which voices it can."""


@dataclass(frozen=True)
class Voice:
    name: str | None  # a named speaker ("UK female"), or None for a free description
    description: str | None
    prompt: str  # the TTS system prompt


def voice_style(engine: Any) -> VoiceStyle:
    """``named`` for LFM2.5 checkpoints (they ship the audio detokenizer), else ``described``."""
    processor = getattr(engine, "processor", None)
    return "named" if getattr(processor, "detokenizer_path", None) is not None else "described"


def _key(name: str) -> str:
    return " ".join(name.replace("_", " ").replace("-", " ").split()).lower()


_PRESETS = {_key(n): n for n in NAMED_VOICES}


def preset_name(voice: str) -> str | None:
    """The named speaker of ``voice`` ("UK female", "uk_female", "alloy", ...), or None."""
    k = _key(voice)
    if k in _PRESETS:
        return _PRESETS[k]
    return OPENAI_VOICES.get(k)


def voice_names() -> list[str]:
    return list(NAMED_VOICES) + list(OPENAI_VOICES)


def resolve_voice(
    style: VoiceStyle,
    *,
    voice: str | None = None,
    description: str | None = None,
    free_voice: bool = False,
) -> Voice:
    """The TTS prompt of a voice name and/or a free description, on a checkpoint of ``style``.

    ``description`` (OpenAI's ``instructions``, lfm2audio's voice description) wins over ``voice`` on
    LFM2-Audio and is refused on LFM2.5, which knows only its named speakers. ``free_voice`` lets an
    unknown ``voice`` stand for a description (the realtime API's ``lfm2audio.voice``).
    """
    if voice is not None and not isinstance(voice, str):
        raise VoiceError(f"voice must be a string, got {type(voice).__name__}")
    voice = voice.strip() if voice else None
    description = description.strip() if description else None
    name = preset_name(voice) if voice else None
    if voice and name is None:
        if style == "described" and free_voice:
            description = description or voice
        else:
            raise VoiceError(
                f"unknown voice {voice!r}; this model's voices are: {', '.join(voice_names())}"
                + ("" if style == "named" else " (or describe one in instructions)")
            )
    if style == "named":
        if description:
            raise VoiceError(
                "this LFM2.5-Audio model speaks only its named voices "
                f"({', '.join(NAMED_VOICES)}); free voice descriptions need an LFM2-Audio model"
            )
        name = name or DEFAULT_NAMED_VOICE
        return Voice(name, None, NAMED_PROMPT.format(name=name))
    if description:
        return Voice(None, description, DESCRIBED_PROMPT.format(description=description))
    if name:
        desc = NAMED_VOICES[name]
        return Voice(name, desc, DESCRIBED_PROMPT.format(description=desc))
    return Voice(None, None, PLAIN_PROMPT)


def session_voice_prompt(style: VoiceStyle, *, voice: str | None = None, output_voice: Any = None) -> str | None:
    """The realtime API's TTS prompt. ``lfm2audio.voice``: a preset name, or a free description (kept as
    the description prompt on every checkpoint, as the extension always did); else ``audio.output.voice``:
    a preset name (VoiceError for others); None when neither is set (the engine's default prompt)."""
    if voice and voice.strip():
        if preset_name(voice) is None:
            return DESCRIBED_PROMPT.format(description=voice.strip())
        return resolve_voice(style, voice=voice).prompt
    if isinstance(output_voice, dict):
        output_voice = output_voice.get("id")
    if isinstance(output_voice, str) and output_voice.strip():
        return resolve_voice(style, voice=output_voice).prompt
    return None


def voice_list(style: VoiceStyle) -> list[dict]:
    """Every voice name with the prompt it produces on this checkpoint (GET /v1/audio/voices)."""
    out = []
    for name in voice_names():
        v = resolve_voice(style, voice=name)
        out.append({"id": name, "speaker": v.name, "prompt": v.prompt})
    return out
