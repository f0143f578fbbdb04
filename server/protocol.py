"""The OpenAI Realtime protocol subset we speak, server side: errors and close codes, and the objects
and events the server sends (session, items, responses). What clients send is in ``client_events``.

Builders take plain values and return the JSON-ready dicts; nothing here holds state or does I/O.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from lfm2audio.engine import (
    OUTPUT_SAMPLE_RATE,
    EmptyInputError,
    EngineError,
    InputTooLargeError,
    ResponseInProgressError,
    ResponseStats,
)
from lfm2audio_server.settings import G711_RATE, RealtimeSettings, Sampling

# WebSocket close codes (see docs/protocol.md).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # server shutting down
CLOSE_INVALID_DATA = 1007  # a text frame that is not UTF-8 (sent by the WebSocket layer)
CLOSE_POLICY = 1008  # auth, origin, limits, a client that stopped reading
CLOSE_TOO_BIG = 1009  # a message over twice max_message_bytes (sent by the WebSocket layer)
CLOSE_INTERNAL_ERROR = 1011  # the engine process ended: the session cannot go on
CLOSE_TRY_AGAIN = 1013  # session limit reached, model not ready


class ProtocolError(Exception):
    """Something wrong with what a client sent: becomes an ``error`` event; the session goes on."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        param: str | None = None,
        event_id: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        # Messages and params may quote what the client sent: bounded, and always encodable as UTF-8.
        message, param = _echoable(message, 1000), None if param is None else _echoable(param, 200)
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.event_id = event_id
        self.type = type


def _echoable(text: str, limit: int) -> str:
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.encode("utf-8", "replace").decode()


def engine_error(e: EngineError, event_id: str | None) -> ProtocolError:
    """An engine refusal as the protocol's error (the engine knows no protocol codes)."""
    code = getattr(e, "code", "engine_error")
    if isinstance(e, ResponseInProgressError):
        code = "conversation_already_has_active_response"
    elif isinstance(e, InputTooLargeError):
        code = "input_audio_buffer_full"
    elif isinstance(e, EmptyInputError):
        code = "input_audio_buffer_commit_empty"
    return ProtocolError(code, str(e), event_id=event_id)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class ItemOrder:
    """The conversation's items in order, as the client sees them (what ``conversation.item.retrieve``
    answers): each new item names the one before it (``previous_item_id``). The model's view of them
    is the engine session's history, edited alongside (same ids)."""

    def __init__(self) -> None:
        self._items: dict[str, dict | None] = {}  # id -> item object (None until known), in order

    @property
    def last(self) -> str | None:
        return next(reversed(self._items), None)

    def append(self, item_id: str, item: dict | None = None) -> str | None:
        """Record ``item_id`` as the newest item; returns the one before it."""
        previous = self.last
        self._items.pop(item_id, None)
        self._items[item_id] = item
        return previous

    def insert(self, item_id: str, item: dict, after: str | None) -> str | None:
        """Place ``item_id`` after ``after`` (None: at the end; "root": first); returns its predecessor."""
        if after is None or after == self.last:
            return self.append(item_id, item)
        ids = [i for i in self._items if i != item_id]
        at = 0 if after == "root" else ids.index(after) + 1
        ids.insert(at, item_id)
        old = self._items
        self._items = {i: (item if i == item_id else old[i]) for i in ids}
        return None if at == 0 else ids[at - 1]

    def set(self, item_id: str, item: dict) -> None:
        if item_id in self._items:
            self._items[item_id] = item

    def get(self, item_id: str) -> dict | None:
        return self._items.get(item_id)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._items

    def delete(self, item_id: str) -> bool:
        return self._items.pop(item_id, 0) != 0


# Session ------------------------------------------------------------------------------------------


FORMAT_TYPES = {"pcm": "audio/pcm", "pcmu": "audio/pcmu", "pcma": "audio/pcma"}


def audio_format(fmt: str, rate: int) -> dict:
    return {"type": FORMAT_TYPES[fmt], "rate": rate if fmt == "pcm" else G711_RATE}


def output_audio(voice: Any, fmt: str = "pcm") -> dict:
    """The output audio format (24 kHz PCM16 or 8 kHz G.711) and OpenAI's voice setting (echoed)."""
    return {"format": audio_format(fmt, OUTPUT_SAMPLE_RATE), "voice": voice}


def turn_detection_object(td: Any) -> dict | None:
    if td is None:
        return None
    obj = {
        "type": td.type,
        "threshold": td.threshold,
        "prefix_padding_ms": td.prefix_padding_ms,
        "silence_duration_ms": td.silence_duration_ms,
        "create_response": td.create_response,
        "interrupt_response": td.interrupt_response,
    }
    if td.type == "semantic_vad":
        obj["eagerness"] = td.eagerness
    return obj


def _sampling_dict(s: Sampling) -> dict:
    return {"temperature": s.temperature, "top_k": s.top_k}


def session_object(s: RealtimeSettings, session_id: str, *, default_instructions: str | None = None) -> dict:
    td = s.turn_detection
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": s.model,
        "output_modalities": ["text"] if s.mode == "asr" else list(s.output_modalities),
        "instructions": s.instructions if s.instructions is not None else default_instructions,
        "max_output_tokens": s.max_output_tokens,
        "tools": list(s.tools),
        "tool_choice": s.tool_choice,
        "audio": {
            "input": {
                "format": audio_format(s.input_format, s.input_rate),
                "turn_detection": turn_detection_object(td),
                "transcription": s.transcription,
                "noise_reduction": None,
            },
            "output": {**output_audio(s.output_voice, s.output_format), "speed": 1.0},
        },
        "lfm2audio": {
            "mode": s.mode,
            "voice": s.voice,
            "sampling": {
                "text": _sampling_dict(s.effective_text_sampling()),
                "audio": _sampling_dict(s.effective_audio_sampling()),
            },
            "seed": s.seed,
            "binary_input": None
            if s.binary_input is None
            else {"format": s.binary_input[0], "rate": s.binary_input[1]},
            "binary_output": None if s.binary_output is None else {"format": s.binary_output},
        },
    }


# Events ---------------------------------------------------------------------------------------------


def event(type: str, **fields: Any) -> dict:
    return {"type": type, "event_id": new_id("event"), **fields}


def error_object(err: ProtocolError) -> dict:
    return {"type": err.type, "code": err.code, "message": err.message, "param": err.param}


def error_event(err: ProtocolError) -> dict:
    return event("error", error={**error_object(err), "event_id": err.event_id})


def item_object(
    item_id: str, role: Literal["user", "assistant", "system"], content: list[dict], status: str
) -> dict:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "role": role,
        "status": status,
        "content": content,
    }


def function_call_object(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


def function_call_output_object(item_id: str, call_id: str, output: str) -> dict:
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "function_call_output",
        "status": "completed",
        "call_id": call_id,
        "output": output,
    }


# Responses ----------------------------------------------------------------------------------------


def content_part(mode: str, text: str) -> tuple[dict, dict]:
    """``(part, item content)`` of a response's one content part: text for ASR, audio with its
    transcript otherwise."""
    if mode == "asr":
        return {"type": "text", "text": text}, {"type": "output_text", "text": text}
    return {"type": "audio", "transcript": text}, {"type": "output_audio", "transcript": text}


def content_event(type: str, response_id: str, item_id: str, **fields: Any) -> dict:
    """An event about the one content part of a response's one output item."""
    return event(type, response_id=response_id, item_id=item_id, output_index=0, content_index=0, **fields)


def response_object(
    response_id: str,
    conversation_id: str | None,
    status: str,
    *,
    sends_audio: bool,
    max_output_tokens: int,
    output: list[dict],
    extension: dict,
    status_details: dict | None = None,
    usage: dict | None = None,
    output_audio: dict | None = None,
    metadata: dict | None = None,
) -> dict:
    """A response object; response.created's also names its ``output_audio`` (see ``output_audio``)."""
    obj = {
        "id": response_id,
        "object": "realtime.response",
        "status": status,
        "status_details": status_details,
        "output": output,
        "conversation_id": conversation_id,
        "output_modalities": ["audio"] if sends_audio else ["text"],
        "max_output_tokens": max_output_tokens,
        "metadata": metadata,
        "usage": usage,
        "lfm2audio": extension,
    }
    if output_audio is not None:
        obj["audio"] = {"output": output_audio}
    return obj


def final_status(status: str, reason: str | None, cancel_reason: str | None) -> tuple[str, str | None]:
    """The engine's end of a response in OpenAI's terms: a cancel says why it was asked for, and a
    completion cut off by the token limit is ``incomplete``."""
    if status == "cancelled":
        return status, cancel_reason or reason
    if status == "completed" and reason == "max_output_tokens":
        return "incomplete", reason
    return status, reason


def status_details(status: str, reason: str | None) -> dict | None:
    if status == "failed":
        return {"type": "failed", "error": {"type": "server_error", "code": "engine_error", "message": reason}}
    if status == "completed":
        return None
    return {"type": status, "reason": reason}


def usage_object(st: ResponseStats) -> dict:
    input_tokens = st.prompt_positions + st.reused_positions
    output_tokens = st.text_tokens + st.audio_frames
    return {
        "total_tokens": input_tokens + output_tokens,
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "input_token_details": {"cached_tokens": st.reused_positions},
        "output_token_details": {"text_tokens": st.text_tokens, "audio_tokens": st.audio_frames},
    }
