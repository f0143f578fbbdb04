"""What clients send: the OpenAI Realtime client events we accept, parsed and validated, and what a
``session.update`` does to the settings.

Client events are validated strictly (a string where a number belongs is an error, not coerced).
Fields OpenAI defines that we do not implement (tools, tracing, noise_reduction, transcription, ...)
are accepted and ignored so that stock clients work; everything under our ``lfm2audio`` extension key
is checked and unknown keys there are errors.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lfm2audio.engine import OUTPUT_SAMPLE_RATE
from lfm2audio_server.audio import MAX_INPUT_RATE, MIN_INPUT_RATE
from lfm2audio_server.protocol import ProtocolError
from lfm2audio_server.settings import RealtimeSettings, Sampling, TurnDetection

# Client event models -------------------------------------------------------------------------------


class _Lenient(BaseModel):
    """OpenAI-defined objects: strict types, unknown (unsupported) fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class _Strict(BaseModel):
    """Our extension: strict types, unknown fields rejected."""

    model_config = ConfigDict(strict=True, extra="forbid")


class AudioFormatModel(_Lenient):
    type: str = "audio/pcm"
    rate: int | None = None


class TurnDetectionModel(_Lenient):
    type: str
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    prefix_padding_ms: int | None = Field(default=None, ge=0, le=10_000)
    silence_duration_ms: int | None = Field(default=None, ge=0, le=60_000)
    create_response: bool | None = None
    interrupt_response: bool | None = None


class AudioInputModel(_Lenient):
    format: AudioFormatModel | None = None
    turn_detection: TurnDetectionModel | None = None


class AudioOutputModel(_Lenient):
    format: AudioFormatModel | None = None
    voice: str | dict | None = None
    speed: float | None = None


class AudioModel(_Lenient):
    input: AudioInputModel | None = None
    output: AudioOutputModel | None = None


class SamplingModel(_Strict):
    temperature: float | None = Field(default=None, ge=0.0, le=10.0)
    top_k: int | None = Field(default=None, ge=1)


class SamplingPairModel(_Strict):
    text: SamplingModel | None = None
    audio: SamplingModel | None = None


class BinaryInputModel(_Strict):
    format: Literal["pcm16", "opus"]
    rate: int | None = None


class BinaryOutputModel(_Strict):
    format: Literal["pcm16", "opus"]


class ExtensionModel(_Strict):
    mode: Literal["chat", "asr", "tts"] | None = None
    voice: str | None = None
    sampling: SamplingPairModel | None = None
    seed: int | None = Field(default=None, ge=0, le=2**62)
    binary_input: BinaryInputModel | None = None
    binary_output: BinaryOutputModel | None = None


class SessionFields(_Lenient):
    """The ``session`` object of a ``session.update`` event."""

    type: str | None = None
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: int | Literal["inf"] | None = None
    output_modalities: list[Literal["text", "audio"]] | None = Field(default=None, min_length=1)
    audio: AudioModel | None = None
    lfm2audio: ExtensionModel | None = None


class SessionUpdateEvent(_Lenient):
    type: Literal["session.update"]
    event_id: str | None = None
    session: SessionFields


class ContentModel(_Lenient):
    type: str
    text: str | None = None


class ItemModel(_Lenient):
    id: str | None = None
    type: Literal["message"]
    role: str
    content: list[ContentModel] = Field(min_length=1)


class ItemCreateEvent(_Lenient):
    type: Literal["conversation.item.create"]
    event_id: str | None = None
    previous_item_id: str | None = None
    item: ItemModel


class ResponseParamsModel(_Lenient):
    max_output_tokens: int | Literal["inf"] | None = None
    instructions: str | None = None


class ResponseCreateEvent(_Lenient):
    type: Literal["response.create"]
    event_id: str | None = None
    response: ResponseParamsModel | None = None


class AppendEvent(_Lenient):
    type: Literal["input_audio_buffer.append"]
    event_id: str | None = None
    audio: str


class SimpleEvent(_Lenient):
    type: str
    event_id: str | None = None


class ResponseCancelEvent(_Lenient):
    type: Literal["response.cancel"]
    event_id: str | None = None
    response_id: str | None = None


ClientEvent = (
    SessionUpdateEvent | AppendEvent | SimpleEvent | ItemCreateEvent | ResponseCreateEvent | ResponseCancelEvent
)

CLIENT_EVENTS: dict[str, type[ClientEvent]] = {
    "session.update": SessionUpdateEvent,
    "input_audio_buffer.append": AppendEvent,
    "input_audio_buffer.commit": SimpleEvent,
    "input_audio_buffer.clear": SimpleEvent,
    "conversation.item.create": ItemCreateEvent,
    "response.create": ResponseCreateEvent,
    "response.cancel": ResponseCancelEvent,
}


def _param_from(errors: list[dict]) -> str | None:
    locs = [tuple(str(x) for x in e["loc"]) for e in errors]
    if not locs:
        return None
    common: list[str] = []
    if len(locs) > 1:
        for parts in zip(*locs, strict=False):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
    loc = common or list(locs[0])
    return ".".join(loc) or None


def parse_client_event(text: str | bytes | dict) -> ClientEvent:
    """A validated client event, or ProtocolError (invalid_json, invalid_event, unknown_event_type, invalid_value).

    The connection passes what ``json_guard.loads`` made of the frame (a dict, checked for size, depth,
    numbers and surrogates); text is parsed here as plain JSON."""
    if isinstance(text, dict):
        data: Any = text
    else:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ProtocolError("invalid_json", f"message is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ProtocolError("invalid_event", "a client event must be a JSON object")
    event_id = data.get("event_id") if isinstance(data.get("event_id"), str) else None
    etype = data.get("type")
    if not isinstance(etype, str):
        raise ProtocolError("invalid_event", "the event has no string 'type'", param="type", event_id=event_id)
    model = CLIENT_EVENTS.get(etype)
    if model is None:
        raise ProtocolError(
            "unknown_event_type",
            f"unknown or unsupported event type {etype!r}; supported: {', '.join(CLIENT_EVENTS)}",
            param="type",
            event_id=event_id,
        )
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        first = errors[0]
        param = _param_from(errors)
        msg = f"invalid '{param}': {first['msg']}" if param else first["msg"]
        raise ProtocolError("invalid_value", msg, param=param, event_id=event_id) from None


def apply_session_update(s: RealtimeSettings, m: SessionFields, *, max_output_tokens_cap: int) -> RealtimeSettings:
    """The settings after ``m``; raises ProtocolError (nothing changes) when a value is unsupported."""
    changes: dict[str, Any] = {}
    if m.type is not None and m.type != "realtime":
        raise ProtocolError(
            "unsupported_value", f"session type {m.type!r} is not supported (only 'realtime')", param="session.type"
        )
    if "instructions" in m.model_fields_set:
        changes["instructions"] = m.instructions or None
    if m.max_output_tokens is not None:
        v = m.max_output_tokens
        if v != "inf" and not 1 <= v <= max_output_tokens_cap:
            raise ProtocolError(
                "invalid_value",
                f"max_output_tokens must be 'inf' or an integer from 1 to {max_output_tokens_cap}, got {v}",
                param="session.max_output_tokens",
            )
        changes["max_output_tokens"] = v
    if m.output_modalities is not None:
        changes["output_modalities"] = tuple(dict.fromkeys(m.output_modalities))
    audio = m.audio
    if audio is not None and audio.input is not None:
        inp = audio.input
        if inp.format is not None:
            changes["input_rate"] = _input_format(inp.format, s.input_rate, "session.audio.input.format")
        if "turn_detection" in inp.model_fields_set:
            td = inp.turn_detection
            if td is None:
                changes["turn_detection"] = None
            elif td.type != "server_vad":
                raise ProtocolError(
                    "unsupported_value",
                    f"turn_detection type {td.type!r} is not supported (use 'server_vad' or null)",
                    param="session.audio.input.turn_detection.type",
                )
            else:
                given = {k: v for k, v in td.model_dump(exclude={"type"}).items() if v is not None}
                changes["turn_detection"] = TurnDetection(**given)
    if audio is not None and audio.output is not None:
        out = audio.output
        if out.format is not None:
            if out.format.type != "audio/pcm":
                raise ProtocolError(
                    "unsupported_audio_format",
                    f"output audio format {out.format.type!r} is not supported (only 'audio/pcm')",
                    param="session.audio.output.format.type",
                )
            if out.format.rate not in (None, OUTPUT_SAMPLE_RATE):
                raise ProtocolError(
                    "unsupported_sample_rate",
                    f"output audio is {OUTPUT_SAMPLE_RATE} Hz PCM16, got rate {out.format.rate}",
                    param="session.audio.output.format.rate",
                )
        if "voice" in out.model_fields_set:
            changes["output_voice"] = out.voice
    ext = m.lfm2audio
    if ext is not None:
        if ext.mode is not None:
            changes["mode"] = ext.mode
        if "voice" in ext.model_fields_set:
            changes["voice"] = ext.voice or None
        if ext.sampling is not None:
            if "text" in ext.sampling.model_fields_set:
                t = ext.sampling.text
                changes["text_sampling"] = None if t is None else Sampling(t.temperature, t.top_k)
            if "audio" in ext.sampling.model_fields_set:
                a = ext.sampling.audio
                changes["audio_sampling"] = None if a is None else Sampling(a.temperature, a.top_k)
        if "seed" in ext.model_fields_set:
            changes["seed"] = ext.seed
        if "binary_input" in ext.model_fields_set:
            bi = ext.binary_input
            if bi is None:
                changes["binary_input"] = None
            elif bi.format == "pcm16":
                rate = bi.rate if bi.rate is not None else changes.get("input_rate", s.input_rate)
                _check_rate(rate, "session.lfm2audio.binary_input.rate")
                changes["binary_input"] = ("pcm16", rate)
            else:
                changes["binary_input"] = ("opus", None)
        if "binary_output" in ext.model_fields_set:
            changes["binary_output"] = None if ext.binary_output is None else ext.binary_output.format
    return replace(s, **changes)


def _check_rate(rate: object, param: str) -> int:
    if not isinstance(rate, int) or not MIN_INPUT_RATE <= rate <= MAX_INPUT_RATE:
        raise ProtocolError(
            "unsupported_sample_rate",
            f"input sample rate must be an integer from {MIN_INPUT_RATE} to {MAX_INPUT_RATE} Hz, got {rate}",
            param=param + ("" if param.endswith("rate") else ".rate"),
        )
    return rate


def _input_format(f: AudioFormatModel, current: int, param: str) -> int:
    if f.type != "audio/pcm":
        raise ProtocolError(
            "unsupported_audio_format",
            f"input audio format {f.type!r} is not supported (only 'audio/pcm'; Opus goes in binary messages)",
            param=param + ".type",
        )
    return current if f.rate is None else _check_rate(f.rate, param + ".rate")
