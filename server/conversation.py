"""A connection's conversation items: ``conversation.item.create / truncate / delete / retrieve`` and the
conversation side of ``response.create`` (per-response options, out-of-band input).

The client's view of the items (ids, order, content) is ``ItemOrder``; the model's view is the engine
session's history, edited alongside with the same ids (``Session.add_message / delete_item /
truncate_item``), so a truncated reply is what the model remembers having said.
"""

from __future__ import annotations

from typing import Any, Protocol

from lfm2audio.engine import Session, SessionConfig
from lfm2audio_server.audio import AudioError, g711_from_base64, int16_to_float, pcm16_from_base64
from lfm2audio_server.client_events import (
    ItemCreateEvent,
    ItemIdEvent,
    ItemModel,
    ItemTruncateEvent,
    ResponseCreateEvent,
    check_tool_choice,
    check_tools,
)
from lfm2audio_server.config import ServerConfig
from lfm2audio_server.outbox import Outbox
from lfm2audio_server.protocol import (
    ItemOrder,
    ProtocolError,
    event,
    function_call_object,
    function_call_output_object,
    item_object,
    new_id,
)
from lfm2audio_server.responses import FRAME_SECONDS, ResponseOptions
from lfm2audio_server.settings import RealtimeSettings, resolve_max_tokens
from lfm2audio_server.tools import call_text, tool_response_text
from lfm2audio_server.vad import SAMPLE_RATE


class Connection(Protocol):
    """What the conversation needs of its connection (``connection.RealtimeConnection``)."""

    session: Session
    outbox: Outbox
    items: ItemOrder
    settings: RealtimeSettings
    cfg: ServerConfig

    def _engine_config(self, s: RealtimeSettings, **overrides: Any) -> SessionConfig: ...

# Content a voice model cannot take (images, files): accepted with a warning, left out of the prompt.
IGNORED_CONTENT = {"input_image", "input_file"}
TEXT_CONTENT = {"user": {"input_text"}, "system": {"input_text", "text"}, "assistant": {"output_text", "text"}}


class Conversation:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    @property
    def items(self):
        return self.conn.items

    # conversation.item.create -----------------------------------------------------------------

    def create(self, ev: ItemCreateEvent) -> None:
        item, after = ev.item, ev.previous_item_id
        if after is not None and after != "root" and after not in self.items:
            raise ProtocolError(
                "invalid_value",
                f"previous_item_id {after!r} is not an item of the conversation",
                param="previous_item_id",
            )
        item_id = item.id or new_id("item")
        if item_id in self.items:
            raise ProtocolError(
                "item_create_duplicate_item_id", f"an item with id {item_id!r} already exists", param="item.id"
            )
        role, parts, shown = self._parts(item, "item")
        session = self.conn.session
        if role == "user" and after is None and all(k == "text" for k, _ in parts):
            for _, text in parts:  # joins the pending user turn (with committed audio, as OpenAI's)
                session.add_text(text, item_id=item_id)
        elif parts:
            session.add_message(role, parts, item_id=item_id, after=after)
        prev = self.items.insert(item_id, shown | {"id": item_id}, after)
        stored = self.items.get(item_id)
        self.conn.outbox.send(event("conversation.item.added", previous_item_id=prev, item=stored))
        self.conn.outbox.send(event("conversation.item.done", previous_item_id=prev, item=stored))

    def _parts(self, item: ItemModel, param: str) -> tuple[str, list[tuple[str, object]], dict]:
        """(engine role, engine parts, the item as the client sees it)."""
        if item.type == "function_call_output":
            if item.call_id is None or item.output is None:
                raise ProtocolError("invalid_value", "function_call_output needs call_id and output", param=param)
            shown = function_call_output_object("", item.call_id, item.output)
            return "tool", [("text", tool_response_text(item.output))], shown
        if item.type == "function_call":
            if not item.name or item.call_id is None:
                raise ProtocolError("invalid_value", "function_call needs name and call_id", param=param)
            shown = function_call_object("", item.call_id, item.name, item.arguments or "{}", "completed")
            return "assistant", [("text", call_text(item.name, item.arguments or "{}"))], shown
        role = item.role
        if role not in TEXT_CONTENT:
            raise ProtocolError(
                "invalid_value", f"role must be user, assistant or system, got {role!r}", param=f"{param}.role"
            )
        if not item.content:
            raise ProtocolError("invalid_value", "a message needs content", param=f"{param}.content")
        parts: list[tuple[str, object]] = []
        shown_content = []
        for i, c in enumerate(item.content):
            where = f"{param}.content.{i}"
            if c.type in IGNORED_CONTENT:
                self.conn.outbox.send(
                    event(
                        "lfm2audio.warning",
                        code="content_ignored",
                        message=f"{c.type} content is accepted but not shown to the model (it takes text and audio)",
                        param=where,
                    )
                )
                shown_content.append({"type": c.type})
            elif c.type in TEXT_CONTENT[role]:
                if not c.text:
                    raise ProtocolError("invalid_value", "text must not be empty", param=f"{where}.text")
                parts.append(("text", c.text))
                shown_content.append({"type": c.type, "text": c.text})
            elif c.type == "input_audio" and role == "user":
                if not c.audio:
                    raise ProtocolError("invalid_value", "input_audio needs base64 audio", param=f"{where}.audio")
                parts.append(("audio", self._audio(c.audio, f"{where}.audio")))
                shown_content.append({"type": "input_audio", "transcript": c.transcript})
            elif c.type == "output_audio" and role == "assistant" and c.transcript:
                parts.append(("text", c.transcript))  # what was said; the audio itself is not replayed
                shown_content.append({"type": "output_audio", "transcript": c.transcript})
            else:
                raise ProtocolError(
                    "unsupported_content",
                    f"content type {c.type!r} is not supported in a {role} message",
                    param=f"{where}.type",
                )
        shown = item_object("", role, shown_content, "completed")  # type: ignore[arg-type]
        return role, parts, shown

    def _audio(self, b64: str, param: str):
        s = self.conn.settings
        try:
            pcm = pcm16_from_base64(b64) if s.input_format == "pcm" else g711_from_base64(b64, s.input_format)
        except AudioError as e:
            raise ProtocolError(e.code, str(e), param=param) from None
        if len(pcm) == 0:
            raise ProtocolError("invalid_value", "input_audio is empty", param=param)
        import soxr

        x = int16_to_float(pcm)
        return x if s.input_rate == SAMPLE_RATE else soxr.resample(x, s.input_rate, SAMPLE_RATE).astype("float32")

    # truncate / delete / retrieve -------------------------------------------------------------

    def truncate(self, ev: ItemTruncateEvent) -> None:
        item = self.items.get(ev.item_id)
        if item is None:
            raise ProtocolError("invalid_value", f"no item {ev.item_id!r} in the conversation", param="item_id")
        if item.get("role") != "assistant" or item.get("type") != "message":
            raise ProtocolError("invalid_value", "only assistant messages with audio can be truncated", param="item_id")
        if ev.content_index != 0:
            raise ProtocolError("invalid_value", "the item has one content part (index 0)", param="content_index")
        # Frames the listener heard, the one playing at audio_end_ms included; past the end it keeps all.
        frames = -(-ev.audio_end_ms // round(FRAME_SECONDS * 1000))
        self.conn.session.truncate_item(ev.item_id, frames)
        self.conn.outbox.send(
            event(
                "conversation.item.truncated",
                item_id=ev.item_id,
                content_index=ev.content_index,
                audio_end_ms=ev.audio_end_ms,
            )
        )

    def delete(self, ev: ItemIdEvent) -> None:
        if ev.item_id not in self.items:
            raise ProtocolError("invalid_value", f"no item {ev.item_id!r} in the conversation", param="item_id")
        self.conn.session.delete_item(ev.item_id)
        self.items.delete(ev.item_id)
        self.conn.outbox.send(event("conversation.item.deleted", item_id=ev.item_id))

    def retrieve(self, ev: ItemIdEvent) -> None:
        item = self.items.get(ev.item_id)
        if item is None:
            raise ProtocolError(
                "item_retrieve_invalid_item_id", f"no item {ev.item_id!r} in the conversation", param="item_id"
            )
        self.conn.outbox.send(event("conversation.item.retrieved", item=item))

    # response.create ---------------------------------------------------------------------------

    def response_options(self, ev: ResponseCreateEvent) -> ResponseOptions:
        conn = self.conn
        r = ev.response
        if r is None:
            return ResponseOptions()
        cap = conn.cfg.max_output_tokens
        tokens = r.max_output_tokens if r.max_output_tokens is not None else r.max_response_output_tokens
        if tokens is not None and tokens != "inf" and not 1 <= tokens <= cap:
            raise ProtocolError(
                "invalid_value",
                f"max_output_tokens must be 'inf' or an integer from 1 to {cap}",
                param="response.max_output_tokens",
            )
        if r.conversation not in (None, "auto", "none"):
            raise ProtocolError(
                "invalid_value", "conversation must be 'auto' or 'none'", param="response.conversation"
            )
        out_of_band = r.conversation == "none"
        mods = r.output_modalities or r.modalities
        tools = None if r.tools is None else check_tools(r.tools, "response.tools")
        choice = None if r.tool_choice is None else check_tool_choice(r.tool_choice, "response.tool_choice")
        config = None
        if r.instructions is not None or tools is not None or choice is not None:
            config = conn._engine_config(conn.settings, instructions=r.instructions, tools=tools, tool_choice=choice)
        keys: list[str] = []
        if r.input:
            if not out_of_band:
                raise ProtocolError(
                    "invalid_value", "input items are for out-of-band responses (conversation: 'none')",
                    param="response.input",
                )  # fmt: skip
            for i, item in enumerate(r.input):
                role, parts, _ = self._parts(item, f"response.input.{i}")
                key = new_id("oob")
                if parts:
                    conn.session.add_message(role, parts, item_id=key)
                    keys.append(key)
        return ResponseOptions(
            max_tokens=None if tokens is None else resolve_max_tokens(tokens, cap),
            metadata=r.metadata,
            config=config,
            audio=None if mods is None else "audio" in mods,
            out_of_band=out_of_band,
            input_keys=tuple(keys),
        )
