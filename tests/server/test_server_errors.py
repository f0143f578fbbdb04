"""Every kind of bad input gets an error event with a code, and the session goes on."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from rt_client import Client, pcm16_b64, run, setup, tone

BAD_INPUTS = [
    # (what is sent, expected code, expected param or None)
    ("{not json", "invalid_json", None),
    ("[1, 2]", "invalid_event", None),
    (json.dumps({"event_id": "e1"}), "invalid_event", "type"),
    (json.dumps({"type": "conversation.item.delete", "item_id": "x"}), "invalid_value", "item_id"),
    (json.dumps({"type": "conversation.item.retrieve", "item_id": "x"}), "item_retrieve_invalid_item_id", "item_id"),
    (
        json.dumps({"type": "conversation.item.truncate", "item_id": "x", "content_index": 0, "audio_end_ms": 5}),
        "invalid_value",
        "item_id",
    ),
    (json.dumps({"type": "no.such.event"}), "unknown_event_type", "type"),
    (json.dumps({"type": "input_audio_buffer.append"}), "invalid_value", "audio"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": 12}), "invalid_value", "audio"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "###not base64###"}), "invalid_base64", None),
    (
        json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}),
        "invalid_audio_length",
        None,
    ),
    (
        json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"rate": "16000"}}}}}),
        "invalid_value",
        "session.audio.input.format.rate",
    ),
    (
        json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"rate": 400000}}}}}),
        "unsupported_sample_rate",
        "session.audio.input.format.rate",
    ),
    (
        json.dumps({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/flac"}}}}}),
        "unsupported_audio_format",
        "session.audio.input.format.type",
    ),
    (
        json.dumps({"type": "session.update", "session": {"audio": {"output": {"format": {"rate": 16000}}}}}),
        "unsupported_sample_rate",
        "session.audio.output.format.rate",
    ),
    (
        json.dumps(
            {"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"type": "magic_vad"}}}}}
        ),
        "unsupported_value",
        "session.audio.input.turn_detection.type",
    ),
    (
        json.dumps(
            {
                "type": "session.update",
                "session": {"audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 2}}}},
            }
        ),
        "invalid_value",
        "session.audio.input.turn_detection.threshold",
    ),
    (
        json.dumps({"type": "session.update", "session": {"lfm2audio": {"mode": "sing"}}}),
        "invalid_value",
        "session.lfm2audio.mode",
    ),
    (
        json.dumps({"type": "session.update", "session": {"lfm2audio": {"bogus": 1}}}),
        "invalid_value",
        "session.lfm2audio.bogus",
    ),
    (
        json.dumps({"type": "session.update", "session": {"lfm2audio": {"sampling": {"audio": {"top_k": 0}}}}}),
        "invalid_value",
        "session.lfm2audio.sampling.audio.top_k",
    ),
    (
        json.dumps({"type": "session.update", "session": {"lfm2audio": {"binary_input": {"format": "mp3"}}}}),
        "invalid_value",
        "session.lfm2audio.binary_input.format",
    ),
    (
        json.dumps(
            {"type": "session.update", "session": {"lfm2audio": {"binary_input": {"format": "pcm16", "rate": 4000}}}}
        ),
        "unsupported_sample_rate",
        "session.lfm2audio.binary_input.rate",
    ),
    (
        json.dumps({"type": "session.update", "session": {"max_output_tokens": 0}}),
        "invalid_value",
        "session.max_output_tokens",
    ),
    (json.dumps({"type": "session.update", "session": {"type": "transcription"}}), "unsupported_value", "session.type"),
    (json.dumps({"type": "session.update", "session": "chat"}), "invalid_value", "session"),
    (
        json.dumps(
            {
                "type": "conversation.item.create",
                "item": {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "x"}]},
            }
        ),
        "invalid_value",
        "item.role",
    ),
    (
        json.dumps(
            {
                "type": "conversation.item.create",
                "item": {"type": "message", "role": "user", "content": [{"type": "output_text", "text": "x"}]},
            }
        ),
        "unsupported_content",
        "item.content.0.type",
    ),
    (json.dumps({"type": "conversation.item.create", "item": {"type": "function_call"}}), "invalid_value", None),
    (
        json.dumps({"type": "response.create", "response": {"max_output_tokens": -3}}),
        "invalid_value",
        "response.max_output_tokens",
    ),
    (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty", None),
    (json.dumps({"type": "response.cancel"}), "response_cancel_not_active", None),
    (b"\x00\x01\x02\x03", "binary_audio_not_configured", None),
]


async def _still_works(c: Client) -> None:
    """The session still runs a whole voice turn."""
    await setup(c, max_output_tokens=6)
    await c.send("input_audio_buffer.append", audio=pcm16_b64(tone(0.3)))
    await c.send("input_audio_buffer.commit")
    await c.wait_for("input_audio_buffer.committed")
    await c.send("response.create")
    done = await c.wait_for("response.done")
    assert done["response"]["status"] in ("completed", "incomplete")


def test_each_bad_input_gets_an_error_and_the_session_survives(server):
    async def go():
        async with await Client.connect(server.url) as c:
            await c.wait_for("session.created")
            for i, (message, code, param) in enumerate(BAD_INPUTS):
                if isinstance(message, str) and message.startswith('{"type"'):
                    message = json.dumps({**json.loads(message), "event_id": f"evt_{i}"})
                await c.send_raw(message)
                err = await c.wait_for("error")
                e = err["error"]
                assert (e["code"], e["param"]) == (code, param if param is not None else e["param"]), (message, e)
                if param is None and code in ("invalid_json", "invalid_base64"):
                    assert e["param"] is None
                assert e["type"] and e["message"]
                if isinstance(message, str) and message.startswith('{"type"'):
                    assert e["event_id"] == f"evt_{i}"
            # Nothing of the bad session.updates took effect.
            await c.send("session.update", session={})
            s = (await c.wait_for("session.updated"))["session"]
            assert s["audio"]["input"]["format"]["rate"] == 24000 and s["lfm2audio"]["mode"] == "chat"
            await _still_works(c)

    run(go())


def test_second_response_create_while_one_runs(server):
    async def go():
        async with await Client.connect(server.url) as c:
            await setup(c, max_output_tokens=400)
            await c.send(
                "conversation.item.create",
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
            )
            await c.send("response.create")
            await c.wait_for("response.created")
            await c.send("response.create", event_id="second")
            err = await c.wait_for("error")
            assert err["error"]["code"] == "conversation_already_has_active_response"
            assert err["error"]["event_id"] == "second"
            await c.send("response.cancel", response_id="resp_not_this_one")
            err = await c.wait_for("error")
            assert err["error"]["code"] == "response_cancel_not_active"
            done = await c.wait_for("response.done")
            assert done["response"]["status"] in ("completed", "incomplete")
            assert len(c.of("response.created")) == 1
            await _still_works(c)

    run(go())


@pytest.mark.parametrize("binary", [False, True])
def test_odd_length_pcm(server, binary):
    async def go():
        async with await Client.connect(server.url) as c:
            await setup(c, lfm2audio={"binary_input": {"format": "pcm16", "rate": 16000}})
            odd = np.zeros(100, "<i2").tobytes() + b"\x01"
            if binary:
                await c.send_raw(odd)
            else:
                await c.send("input_audio_buffer.append", audio=base64.b64encode(odd).decode())
            err = await c.wait_for("error")
            assert err["error"]["code"] == "invalid_audio_length"
            await _still_works(c)

    run(go())


def test_bad_opus(server):
    async def go():
        async with await Client.connect(server.url) as c:
            await setup(c, lfm2audio={"binary_input": {"format": "opus"}})
            await c.send_raw(b"\x05\x00ab")  # a length prefix longer than the message
            err = await c.wait_for("error")
            assert err["error"]["code"] == "invalid_opus"
            await c.send_raw(b"\x02\x00\xfb\xff")  # a 0-frame code-3 packet
            err = await c.wait_for("error")
            assert err["error"]["code"] == "invalid_opus"
            await _still_works(c)

    run(go())
