"""Client text frames as JSON, safely: whatever a client sends becomes either a plain JSON object or a
``ProtocolError`` (``invalid_request_error``) naming what was wrong, never an internal error.

What is refused, and why (docs/protocol.md, "Limits"):

- more than ``max_message_bytes`` of UTF-8 (bytes are counted, not characters);
- nesting deeper than ``MAX_DEPTH`` (the parser would hit Python's recursion limit near 1000);
- integers of more than ``MAX_INT_DIGITS`` digits (Python refuses to parse more than 4300);
- ``NaN``, ``Infinity`` and numbers that overflow to infinity (the server's own JSON must stay valid:
  browsers cannot parse a bare NaN);
- lone UTF-16 surrogates (``"\\ud800"``): they cannot be encoded as UTF-8, so no echo of them could be
  sent;
- strings longer than the documented caps where the server keeps or echoes them (``STRING_CAPS``):
  instructions, item text, voices, ids.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from lfm2audio_server.protocol import ProtocolError

MAX_DEPTH = 32
MAX_INT_DIGITS = 40
MAX_ID_CHARS = 256  # event_id, item ids, response ids: echoed in replies
MAX_INSTRUCTIONS_CHARS = 64 * 1024  # session.instructions, response.instructions
MAX_ITEM_TEXT_CHARS = 64 * 1024  # each text part of a conversation item
MAX_VOICE_CHARS = 1024
MAX_TOOLS_BYTES = 256 * 1024  # session.tools / response.tools, as sent

# A JSON escape of a UTF-16 surrogate: only such escapes can put a lone surrogate into a parsed string
# (the frame itself is valid UTF-8). Valid pairs match too; the walk tells them apart.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class _Bad(Exception):
    def __init__(self, code: str, message: str) -> None:
        self.code, self.message = code, message


def _constant(name: str) -> float:
    raise _Bad("invalid_json", f"{name} is not valid JSON (numbers must be finite)")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _Bad("invalid_value", f"number {text[:40]} is out of range (numbers must be finite)")
    return value


def _int(text: str) -> int:
    digits = len(text) - (text[0] == "-")
    if digits > MAX_INT_DIGITS:
        raise _Bad("invalid_value", f"an integer of {digits} digits is out of range (at most {MAX_INT_DIGITS})")
    return int(text)


def utf8_size(text: str) -> int:
    """Bytes of ``text`` as UTF-8 (what the client sent)."""
    return len(text.encode("utf-8", "surrogatepass"))


def loads(text: str | bytes, *, max_bytes: int) -> dict:
    """The client event in ``text`` as a dict; ProtocolError (with ``param`` when a field is to blame)."""
    size = len(text) if isinstance(text, bytes) else (len(text) if len(text) * 4 <= max_bytes else utf8_size(text))
    if size > max_bytes:
        raise ProtocolError("message_too_large", f"message of {size} bytes exceeds the {max_bytes}-byte limit")
    try:
        data = json.loads(text, parse_constant=_constant, parse_float=_float, parse_int=_int)
    except _Bad as e:
        raise ProtocolError(e.code, e.message) from None
    except RecursionError:
        raise ProtocolError("invalid_json", f"message nests deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as e:
        raise ProtocolError("invalid_json", f"message is not valid JSON: {e}") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError("invalid_json", f"message is not valid JSON: {type(e).__name__}") from None
    if not isinstance(data, dict):
        raise ProtocolError("invalid_event", "a client event must be a JSON object")
    check_tree(data, lone_surrogates=isinstance(text, bytes) or _SURROGATE_ESCAPE.search(text) is not None)
    check_caps(data)
    return data


def check_tree(data: Any, *, lone_surrogates: bool) -> None:
    """Nesting depth, and (when the text may hold them) lone surrogates in keys and strings."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ProtocolError(
                "invalid_value", f"'{path}' nests deeper than {MAX_DEPTH} levels", param=path or None
            )
        if isinstance(value, dict):
            for k, v in value.items():
                sub = f"{path}.{k}" if path else str(k)
                if lone_surrogates and _has_lone_surrogate(k):
                    raise ProtocolError("invalid_value", "a key holds a lone UTF-16 surrogate", param=_safe(path))
                stack.append((v, sub, depth + 1))
        elif isinstance(value, list):
            stack.extend((v, f"{path}.{i}", depth + 1) for i, v in enumerate(value))
        elif lone_surrogates and isinstance(value, str) and _has_lone_surrogate(value):
            raise ProtocolError(
                "invalid_value",
                f"'{_safe(path)}' holds a lone UTF-16 surrogate (not encodable as UTF-8)",
                param=_safe(path),
            )


def _has_lone_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _safe(path: str) -> str | None:
    """``path`` fit to echo: bounded, its own lone surrogates replaced."""
    if not path:
        return None
    return path.encode("utf-8", "replace").decode()[:200]


def _get(d: Any, *keys: str | int) -> Any:
    for k in keys:
        if isinstance(k, int):
            if not isinstance(d, list) or k >= len(d):
                return None
        elif not isinstance(d, dict):
            return None
        d = d[k] if isinstance(k, int) else d.get(k)
    return d


def _cap(value: Any, limit: int, param: str, what: str) -> None:
    if isinstance(value, str) and len(value) > limit:
        raise ProtocolError(
            "string_too_long", f"{what} of {len(value)} characters exceeds the limit of {limit}", param=param
        )


def check_caps(data: dict) -> None:
    """The documented size caps of strings the server keeps or echoes (docs/protocol.md, "Limits")."""
    for key in ("event_id", "previous_item_id", "item_id", "response_id"):
        _cap(data.get(key), MAX_ID_CHARS, key, key)
    _cap(_get(data, "item", "id"), MAX_ID_CHARS, "item.id", "item.id")
    for root in ("session", "response"):
        obj = data.get(root)
        if not isinstance(obj, dict):
            continue
        _cap(obj.get("instructions"), MAX_INSTRUCTIONS_CHARS, f"{root}.instructions", "instructions")
        voice = _get(obj, "audio", "output", "voice")
        _cap(voice if isinstance(voice, str) else None, MAX_VOICE_CHARS, f"{root}.audio.output.voice", "voice")
        if isinstance(voice, dict) and len(json.dumps(voice)) > MAX_VOICE_CHARS:
            raise ProtocolError(
                "string_too_long", f"voice exceeds {MAX_VOICE_CHARS} bytes", param=f"{root}.audio.output.voice"
            )
        _cap(_get(obj, "lfm2audio", "voice"), MAX_VOICE_CHARS, f"{root}.lfm2audio.voice", "voice")
        tools = obj.get("tools")
        if tools is not None and len(json.dumps(tools)) > MAX_TOOLS_BYTES:
            raise ProtocolError(
                "string_too_long", f"tool definitions exceed {MAX_TOOLS_BYTES} bytes", param=f"{root}.tools"
            )
    content = _get(data, "item", "content")
    if isinstance(content, list):
        for i, part in enumerate(content):
            if isinstance(part, dict):
                for key in ("text", "transcript"):
                    _cap(part.get(key), MAX_ITEM_TEXT_CHARS, f"item.content.{i}.{key}", "text")
