"""What clients send: the OpenAI Realtime client events we accept, parsed and validated, and what a
``session.update`` does to the settings.

Client events are validated strictly (a string where a number belongs is an error, not coerced): a
malformed event is rejected as a whole, with an error naming the field. A well-formed ``session.update``
applies every field it can; each field whose value we do not support gets its own error (naming it)
and is left as it was, and ``session.updated`` shows the result. Fields OpenAI defines that mean
nothing for a local model (tracing, noise_reduction, truncation, include, prompt, ...) are accepted and
ignored so that stock clients work; everything under our ``lfm2audio`` extension key is checked and
unknown keys there are errors. The beta protocol's flat fields (``modalities``, ``input_audio_format``,
``output_audio_format``, ``turn_detection``, ``input_audio_transcription``, ``voice``) are mapped onto
their GA places.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lfm2audio.engine import OUTPUT_SAMPLE_RATE
from lfm2audio_server.audio import MAX_INPUT_RATE, MIN_INPUT_RATE
from lfm2audio_server.protocol import ProtocolError
from lfm2audio_server.settings import G711_RATE, SEMANTIC_SILENCE_MS, RealtimeSettings, Sampling, TurnDetection

# Client event models -------------------------------------------------------------------------------


class _Lenient(BaseModel):
    """OpenAI-defined objects: strict types, unknown (unsupported) fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class _Strict(BaseModel):
    """Our extension: strict types, unknown fields rejected."""

    model_config = ConfigDict(strict=True, extra="forbid")


def _bool_turn_detection(v: Any) -> Any:
    """``turn_detection: false`` (pipecat's way to turn it off) is null; ``true`` is the default server VAD."""
    if v is False:
        return None
    if v is True:
        return {"type": "server_vad"}
    return v


class AudioFormatModel(_Lenient):
    type: str = "audio/pcm"
    rate: int | None = None


class TurnDetectionModel(_Lenient):
    type: str
    eagerness: str | None = None  # semantic_vad
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    prefix_padding_ms: int | None = Field(default=None, ge=0, le=10_000)
    silence_duration_ms: int | None = Field(default=None, ge=0, le=60_000)
    create_response: bool | None = None
    interrupt_response: bool | None = None


class TranscriptionModel(_Lenient):
    model: str | None = None
    language: str | None = None
    prompt: str | None = None


class AudioInputModel(_Lenient):
    format: AudioFormatModel | None = None
    turn_detection: TurnDetectionModel | None = None
    transcription: TranscriptionModel | None = None

    @field_validator("turn_detection", mode="before")
    @classmethod
    def _turn_detection_bool(cls, v: Any) -> Any:
        return _bool_turn_detection(v)


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
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    lfm2audio: ExtensionModel | None = None
    # The beta protocol's flat fields, mapped onto the GA ones.
    modalities: list[Literal["text", "audio"]] | None = Field(default=None, min_length=1)
    input_audio_format: str | None = None
    output_audio_format: str | None = None
    turn_detection: TurnDetectionModel | None = None
    input_audio_transcription: TranscriptionModel | None = None
    voice: str | dict | None = None
    max_response_output_tokens: int | Literal["inf"] | None = None

    @field_validator("turn_detection", mode="before")
    @classmethod
    def _turn_detection_bool(cls, v: Any) -> Any:
        return _bool_turn_detection(v)


class SessionUpdateEvent(_Lenient):
    type: Literal["session.update"]
    event_id: str | None = None
    session: SessionFields


class ContentModel(_Lenient):
    type: str
    text: str | None = None
    audio: str | None = None  # input_audio: base64 PCM16 at the session's input format
    transcript: str | None = None


class ItemModel(_Lenient):
    id: str | None = None
    type: Literal["message", "function_call", "function_call_output"]
    role: str | None = None
    content: list[ContentModel] = Field(default_factory=list)
    status: str | None = None
    call_id: str | None = None  # function_call, function_call_output
    name: str | None = None  # function_call
    arguments: str | None = None  # function_call
    output: str | None = None  # function_call_output


class ItemCreateEvent(_Lenient):
    type: Literal["conversation.item.create"]
    event_id: str | None = None
    previous_item_id: str | None = None
    item: ItemModel


class ResponseParamsModel(_Lenient):
    max_output_tokens: int | Literal["inf"] | None = None
    max_response_output_tokens: int | Literal["inf"] | None = None  # beta name
    instructions: str | None = None
    metadata: dict[str, Any] | None = None
    output_modalities: list[Literal["text", "audio"]] | None = Field(default=None, min_length=1)
    modalities: list[Literal["text", "audio"]] | None = Field(default=None, min_length=1)  # beta name
    conversation: str | None = None  # "auto" (default) or "none": out of band
    input: list[ItemModel] | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    voice: str | dict | None = None
    audio: dict | None = None


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


class ItemTruncateEvent(_Lenient):
    type: Literal["conversation.item.truncate"]
    event_id: str | None = None
    item_id: str
    content_index: int = Field(default=0, ge=0)
    audio_end_ms: int = Field(ge=0)


class ItemIdEvent(_Lenient):
    """conversation.item.delete and conversation.item.retrieve."""

    type: Literal["conversation.item.delete", "conversation.item.retrieve"]
    event_id: str | None = None
    item_id: str


ClientEvent = (
    SessionUpdateEvent
    | AppendEvent
    | SimpleEvent
    | ItemCreateEvent
    | ResponseCreateEvent
    | ResponseCancelEvent
    | ItemTruncateEvent
    | ItemIdEvent
)

CLIENT_EVENTS: dict[str, type[ClientEvent]] = {
    "session.update": SessionUpdateEvent,
    "input_audio_buffer.append": AppendEvent,
    "input_audio_buffer.commit": SimpleEvent,
    "input_audio_buffer.clear": SimpleEvent,
    "conversation.item.create": ItemCreateEvent,
    "conversation.item.truncate": ItemTruncateEvent,
    "conversation.item.delete": ItemIdEvent,
    "conversation.item.retrieve": ItemIdEvent,
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


def apply_session_update(
    s: RealtimeSettings, m: SessionFields, *, max_output_tokens_cap: int
) -> tuple[RealtimeSettings, list[ProtocolError]]:
    """The settings after ``m``, and an error for each field left unchanged because its value is not
    supported (every other field is applied)."""
    changes: dict[str, Any] = {}
    errors: list[ProtocolError] = []

    def field(fn: Callable[[], None]) -> None:
        try:
            fn()
        except ProtocolError as e:
            errors.append(e)

    def session_type() -> None:
        if m.type is not None and m.type != "realtime":
            raise ProtocolError(
                "unsupported_value", f"session type {m.type!r} is not supported (only 'realtime')", param="session.type"
            )

    def max_tokens(v: int | str | None, param: str) -> None:
        if v is None:
            return
        if v != "inf" and not 1 <= v <= max_output_tokens_cap:  # type: ignore[operator]
            raise ProtocolError(
                "invalid_value",
                f"max_output_tokens must be 'inf' or an integer from 1 to {max_output_tokens_cap}, got {v}",
                param=param,
            )
        changes["max_output_tokens"] = v

    field(session_type)
    if "instructions" in m.model_fields_set:
        changes["instructions"] = m.instructions or None
    field(lambda: max_tokens(m.max_response_output_tokens, "session.max_response_output_tokens"))
    field(lambda: max_tokens(m.max_output_tokens, "session.max_output_tokens"))
    for mods in (m.modalities, m.output_modalities):
        if mods is not None:
            # A voice model always speaks and writes its transcript: ["text", "audio"] means audio.
            changes["output_modalities"] = ("audio",) if "audio" in mods else ("text",)
    if m.tools is not None:
        field(lambda: changes.__setitem__("tools", check_tools(m.tools, "session.tools")))
    if "tool_choice" in m.model_fields_set and m.tool_choice is not None:
        field(lambda: changes.__setitem__("tool_choice", check_tool_choice(m.tool_choice, "session.tool_choice")))

    audio = m.audio
    inp = audio.input if audio is not None else None
    out = audio.output if audio is not None else None

    def input_format(f: AudioFormatModel | str, param: str) -> None:
        fmt, rate = _input_format(f, s.input_rate, param)
        changes["input_format"], changes["input_rate"] = fmt, rate

    def output_format(f: AudioFormatModel | str, param: str) -> None:
        changes["output_format"] = _output_format(f, param)

    def turn_detection(td: TurnDetectionModel | None, param: str) -> None:
        changes["turn_detection"] = _turn_detection(td, param)

    if m.input_audio_format is not None:
        field(lambda: input_format(m.input_audio_format, "session.input_audio_format"))  # type: ignore[arg-type]
    if m.output_audio_format is not None:
        field(lambda: output_format(m.output_audio_format, "session.output_audio_format"))  # type: ignore[arg-type]
    if "turn_detection" in m.model_fields_set:
        field(lambda: turn_detection(m.turn_detection, "session.turn_detection"))
    if "input_audio_transcription" in m.model_fields_set:
        changes["transcription"] = _transcription(m.input_audio_transcription)
    if "voice" in m.model_fields_set:
        changes["output_voice"] = m.voice
    if inp is not None:
        if inp.format is not None:
            field(lambda: input_format(inp.format, "session.audio.input.format"))  # type: ignore[arg-type]
        if "turn_detection" in inp.model_fields_set:
            field(lambda: turn_detection(inp.turn_detection, "session.audio.input.turn_detection"))
        if "transcription" in inp.model_fields_set:
            changes["transcription"] = _transcription(inp.transcription)
    if out is not None:
        if out.format is not None:
            field(lambda: output_format(out.format, "session.audio.output.format"))  # type: ignore[arg-type]
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

        def binary_input() -> None:
            bi = ext.binary_input
            if bi is None:
                changes["binary_input"] = None
            elif bi.format == "pcm16":
                rate = bi.rate if bi.rate is not None else changes.get("input_rate", s.input_rate)
                _check_rate(rate, "session.lfm2audio.binary_input.rate")
                changes["binary_input"] = ("pcm16", rate)
            else:
                changes["binary_input"] = ("opus", None)

        if "binary_input" in ext.model_fields_set:
            field(binary_input)
        if "binary_output" in ext.model_fields_set:
            changes["binary_output"] = None if ext.binary_output is None else ext.binary_output.format
    return replace(s, **changes), errors


def _transcription(t: TranscriptionModel | None) -> dict | None:
    return None if t is None else t.model_dump()


def _turn_detection(td: TurnDetectionModel | None, param: str) -> TurnDetection | None:
    if td is None:
        return None
    given = {k: v for k, v in td.model_dump(exclude={"type", "eagerness"}).items() if v is not None}
    if td.type == "server_vad":
        return TurnDetection(**given)
    if td.type == "semantic_vad":
        eagerness = td.eagerness or "auto"
        if eagerness not in SEMANTIC_SILENCE_MS:
            raise ProtocolError(
                "invalid_value",
                f"eagerness must be one of {', '.join(SEMANTIC_SILENCE_MS)}, got {eagerness!r}",
                param=param + ".eagerness",
            )
        given["silence_duration_ms"] = SEMANTIC_SILENCE_MS[eagerness]
        return TurnDetection(**given, type="semantic_vad", eagerness=eagerness)
    raise ProtocolError(
        "unsupported_value",
        f"turn_detection type {td.type!r} is not supported (use 'server_vad', 'semantic_vad' or null)",
        param=param + ".type",
    )


def check_tools(tools: list[dict], param: str) -> tuple[dict, ...]:
    """Function tools as OpenAI defines them (``type: function``, ``name``, ``parameters``)."""
    out = []
    for i, t in enumerate(tools):
        if t.get("type", "function") != "function" or not isinstance(t.get("name"), str) or not t["name"]:
            raise ProtocolError(
                "unsupported_value",
                f"tool {i}: only function tools with a name are supported",
                param=f"{param}.{i}",
            )
        out.append(
            {
                "type": "function",
                "name": t["name"],
                "description": t.get("description") or "",
                "parameters": t.get("parameters") or {"type": "object", "properties": {}},
            }
        )
    return tuple(out)


def check_tool_choice(choice: str | dict, param: str) -> str | dict:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "name": choice["name"]}
    raise ProtocolError(
        "invalid_value", "tool_choice must be 'auto', 'none', 'required' or {type: function, name}", param=param
    )


_FORMAT_NAMES = {
    "audio/pcm": "pcm",
    "pcm16": "pcm",
    "audio/pcmu": "pcmu",
    "g711_ulaw": "pcmu",
    "audio/pcma": "pcma",
    "g711_alaw": "pcma",
}


def _format_name(f: AudioFormatModel | str, param: str, what: str) -> tuple[str, int | None, str]:
    type_, rate = (f, None) if isinstance(f, str) else (f.type, f.rate)
    fmt = _FORMAT_NAMES.get(type_)
    if fmt is None:
        raise ProtocolError(
            "unsupported_audio_format",
            f"{what} audio format {type_!r} is not supported (audio/pcm, audio/pcmu or audio/pcma; "
            "beta names pcm16, g711_ulaw, g711_alaw)",
            param=param if isinstance(f, str) else param + ".type",
        )
    if fmt != "pcm" and rate not in (None, G711_RATE):
        raise ProtocolError(
            "unsupported_sample_rate", f"G.711 audio is {G711_RATE} Hz, got rate {rate}", param=param + ".rate"
        )
    return fmt, rate, type_


def _check_rate(rate: object, param: str) -> int:
    if not isinstance(rate, int) or not MIN_INPUT_RATE <= rate <= MAX_INPUT_RATE:
        raise ProtocolError(
            "unsupported_sample_rate",
            f"input sample rate must be an integer from {MIN_INPUT_RATE} to {MAX_INPUT_RATE} Hz, got {rate}",
            param=param + ("" if param.endswith("rate") else ".rate"),
        )
    return rate


def _input_format(f: AudioFormatModel | str, current: int, param: str) -> tuple[str, int]:
    """(format, rate) of an input format; Opus goes in binary messages (session.lfm2audio.binary_input)."""
    fmt, rate, _ = _format_name(f, param, "input")
    if fmt != "pcm":
        return fmt, G711_RATE
    if isinstance(f, str):  # beta pcm16: 24 kHz
        return fmt, 24_000
    return fmt, current if rate is None else _check_rate(rate, param + ".rate")


def _output_format(f: AudioFormatModel | str, param: str) -> str:
    fmt, rate, _ = _format_name(f, param, "output")
    if fmt == "pcm" and rate not in (None, OUTPUT_SAMPLE_RATE):
        raise ProtocolError(
            "unsupported_sample_rate",
            f"output PCM audio is {OUTPUT_SAMPLE_RATE} Hz PCM16, got rate {rate}",
            param=param + ".rate",
        )
    return fmt
