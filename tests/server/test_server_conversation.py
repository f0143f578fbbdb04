"""Conversation items and response options, with the exact events the server answers: item create (every
role, previous_item_id), retrieve, delete, truncate; metadata echo, text-only and out-of-band responses;
semantic_vad and partial session.update; G.711 in and out; input transcription; a tool call round trip."""

from __future__ import annotations

import base64
import json

from rt_client import Client, pcm16_b64, run, setup, synthetic_speech

from lfm2audio_server.audio import g711_encode


def _msg(role: str, kind: str, text: str, item_id: str | None = None) -> dict:
    item = {"type": "message", "role": role, "content": [{"type": kind, "text": text}]}
    return item | ({"id": item_id} if item_id else {})


def _types(c: Client, start: int) -> list[str]:
    return [e["type"] for e in c.events[start:]]


def test_create_with_every_role_retrieve_and_delete(server):
    async def go():
        async with await Client.connect(server.url) as c:
            await c.wait_for("session.created")
            await setup(c, max_output_tokens=4)
            await c.send("conversation.item.create", item=_msg("system", "input_text", "Be brief.", "sys1"))
            added = await c.wait_for("conversation.item.added")
            assert added["previous_item_id"] is None
            assert added["item"] == {
                "id": "sys1", "object": "realtime.item", "type": "message", "role": "system",
                "status": "completed", "content": [{"type": "input_text", "text": "Be brief."}],
            }  # fmt: skip
            await c.wait_for("conversation.item.done")
            await c.send("conversation.item.create", item=_msg("user", "input_text", "Hello", "u1"))
            assert (await c.wait_for("conversation.item.added"))["previous_item_id"] == "sys1"
            await c.send("conversation.item.create", item=_msg("assistant", "output_text", "Hi!", "a1"))
            a1 = await c.wait_for("conversation.item.added")
            assert a1["previous_item_id"] == "u1" and a1["item"]["role"] == "assistant"
            # Placed after the system message: previous_item_id is honoured.
            await c.send(
                "conversation.item.create", previous_item_id="sys1", item=_msg("user", "input_text", "first", "u0")
            )
            assert (await c.wait_for("conversation.item.added", item={**_msg("user", "input_text", "first", "u0"),
                    "object": "realtime.item", "status": "completed"}))["previous_item_id"] == "sys1"  # fmt: skip
            # An image: accepted with a warning, not an error.
            img = {"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}
            await c.send("conversation.item.create", item=img | {"id": "img1"})
            warn = await c.wait_for("lfm2audio.warning")
            assert warn["code"] == "content_ignored" and warn["param"] == "item.content.0"
            # A user audio message (base64 PCM16 at the session's input rate), placed after u1.
            audio = base64.b64encode((synthetic_speech(0.6, rate=24000) * 32767).astype("<i2").tobytes()).decode()
            au = {"type": "message", "role": "user", "content": [{"type": "input_audio", "audio": audio}]}
            await c.send("conversation.item.create", previous_item_id="u1", item=au | {"id": "au1"})
            shown = {**au, "id": "au1", "object": "realtime.item", "status": "completed"}
            shown["content"] = [{"type": "input_audio", "transcript": None}]  # the audio itself is not echoed
            added_au = await c.wait_for("conversation.item.added", item=shown)
            assert added_au["previous_item_id"] == "u1"
            await c.send("conversation.item.retrieve", item_id="a1")
            got = await c.wait_for("conversation.item.retrieved")
            assert got["item"]["content"] == [{"type": "output_text", "text": "Hi!"}]
            await c.send("conversation.item.delete", item_id="a1")
            assert (await c.wait_for("conversation.item.deleted"))["item_id"] == "a1"
            await c.send("conversation.item.retrieve", item_id="a1", event_id="rci_a1")
            err = await c.wait_for("error")
            assert err["error"]["code"] == "item_retrieve_invalid_item_id" and err["error"]["event_id"] == "rci_a1"
            await c.send("response.create")
            done = await c.wait_for("response.done")
            assert done["response"]["status"] in ("completed", "incomplete")
            assert [e for e in c.of("error")] == [err]

    run(go())


def test_truncate_metadata_text_only_and_out_of_band(server):
    async def go():
        async with await Client.connect(server.url) as c:
            await c.wait_for("session.created")
            await setup(c, max_output_tokens=40)
            await c.send("conversation.item.create", item=_msg("user", "input_text", "Tell me a story"))
            await c.send("response.create", response={"metadata": {"client_event_id": "ev1"}})
            created = await c.wait_for("response.created")
            assert created["response"]["metadata"] == {"client_event_id": "ev1"}
            done = await c.wait_for("response.done")
            assert done["response"]["metadata"] == {"client_event_id": "ev1"}
            item = done["response"]["output"][0]
            assert c.of("response.output_audio.delta"), "the reply needs audio for the truncate"
            await c.send("conversation.item.truncate", item_id=item["id"], content_index=0, audio_end_ms=100)
            t = await c.wait_for("conversation.item.truncated")
            assert {k: t[k] for k in ("item_id", "content_index", "audio_end_ms")} == {
                "item_id": item["id"], "content_index": 0, "audio_end_ms": 100,
            }  # fmt: skip

            # Text only: the model's text as output_text, no audio.
            start = len(c.events)
            await c.send("conversation.item.create", item=_msg("user", "input_text", "Go on"))
            await c.send("response.create", response={"output_modalities": ["text"], "max_output_tokens": 12})
            done2 = await c.wait_for("response.done")
            kinds = _types(c, start)
            assert "response.output_audio.delta" not in kinds and "response.output_audio_transcript.delta" not in kinds
            assert done2["response"]["output_modalities"] == ["text"]
            assert done2["response"]["output"][0]["content"][0]["type"] == "output_text"
            # The truncated reply was edited in the history: the cache was rebuilt from the system prompt.
            engine = done2["response"]["lfm2audio"]  # the engine's figures
            assert engine["reused_positions"] < done["response"]["usage"]["input_tokens"]

            # Out of band: no conversation items, no conversation id; the conversation goes on unchanged.
            start = len(c.events)
            await c.send(
                "response.create",
                response={
                    "conversation": "none", "metadata": {"topic": "x"}, "max_output_tokens": 6,
                    "input": [_msg("user", "input_text", "Summarise")],
                },
            )  # fmt: skip
            oob = await c.wait_for("response.done")
            assert oob["response"]["conversation_id"] is None and oob["response"]["metadata"] == {"topic": "x"}
            assert "conversation.item.added" not in _types(c, start)
            await c.send("conversation.item.retrieve", item_id=oob["response"]["output"][0]["id"])
            assert (await c.wait_for("error"))["error"]["code"] == "item_retrieve_invalid_item_id"
            assert len(c.of("error")) == 1

    run(go())


def test_semantic_vad_partial_update_and_beta_fields(server):
    async def go():
        async with await Client.connect(server.url) as c:
            await c.wait_for("session.created")
            td = {"type": "semantic_vad", "eagerness": "high", "create_response": True, "interrupt_response": True}
            await c.send(
                "session.update",
                event_id="up1",
                session={
                    "type": "realtime", "instructions": "Be kind.",
                    "audio": {"input": {"turn_detection": td, "format": {"type": "audio/flac"}}},
                },
            )  # fmt: skip
            err = await c.wait_for("error")
            assert (err["error"]["code"], err["error"]["param"], err["error"]["event_id"]) == (
                "unsupported_audio_format", "session.audio.input.format.type", "up1",
            )  # fmt: skip
            s = (await c.wait_for("session.updated"))["session"]
            assert s["instructions"] == "Be kind."  # applied although another field was rejected
            assert s["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
            got = s["audio"]["input"]["turn_detection"]
            assert (got["type"], got["eagerness"], got["silence_duration_ms"]) == ("semantic_vad", "high", 300)
            # Beta flat fields map onto their GA places.
            await c.send(
                "session.update",
                session={
                    "modalities": ["text", "audio"], "input_audio_format": "g711_ulaw",
                    "output_audio_format": "g711_alaw", "turn_detection": None,
                    "input_audio_transcription": {"model": "whisper-1"}, "voice": "alloy",
                },
            )  # fmt: skip
            s = (await c.wait_for("session.updated"))["session"]
            a = s["audio"]
            assert a["input"]["format"] == {"type": "audio/pcmu", "rate": 8000}
            assert a["output"]["format"] == {"type": "audio/pcma", "rate": 8000} and a["output"]["voice"] == "alloy"
            assert a["input"]["turn_detection"] is None
            assert a["input"]["transcription"]["model"] == "whisper-1"
            assert s["output_modalities"] == ["audio"]
            assert len(c.of("error")) == 1

    run(go())


def test_g711_in_and_out_with_transcription(server):
    async def go():
        async with await Client.connect(server.url) as c:
            await c.wait_for("session.created")
            await setup(
                c,
                max_output_tokens=30,
                audio={
                    "input": {"format": {"type": "audio/pcmu"}, "transcription": {"model": "gpt-4o-transcribe"}},
                    "output": {"format": {"type": "audio/pcmu"}},
                },
            )
            speech = synthetic_speech(1.0, rate=8000)
            await c.send("input_audio_buffer.append", audio=base64.b64encode(g711_encode(speech, "pcmu")).decode())
            await c.send("input_audio_buffer.commit")
            committed = await c.wait_for("input_audio_buffer.committed")
            await c.send("response.create")
            done = await c.wait_for("response.done")
            frames = done["response"]["lfm2audio"]["audio_seconds"]
            payload = b"".join(base64.b64decode(e["delta"]) for e in c.of("response.output_audio.delta"))
            assert frames > 0
            # One byte a sample at 8 kHz (the resampler holds back a few ms at the end).
            assert abs(len(payload) - frames * 8000) < 0.05 * frames * 8000 + 200
            done_t = await c.wait_for("conversation.item.input_audio_transcription.completed", timeout=60)
            assert done_t["item_id"] == committed["item_id"] and isinstance(done_t["transcript"], str)
            deltas = [e["delta"] for e in c.of("conversation.item.input_audio_transcription.delta")]
            assert "".join(deltas).strip() == done_t["transcript"]
            await c.send("conversation.item.retrieve", item_id=committed["item_id"])
            item = (await c.wait_for("conversation.item.retrieved"))["item"]
            assert item["content"][0]["transcript"] == done_t["transcript"]
            assert c.of("error") == []

    run(go())


def _connection(server, session_id: str):
    return next(conn for conn in server.state.connections if conn.id == session_id)


def test_tool_call_round_trip(server):
    """A scripted reply (the engine's forced-token test hook) calls a tool; its output goes back as a
    tool message and the next response runs on it."""
    tools = [{"type": "function", "name": "get_weather", "description": "Weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]  # fmt: skip

    async def go():
        async with await Client.connect(server.url) as c:
            sid = (await c.wait_for("session.created"))["session"]["id"]
            s = await setup(c, max_output_tokens=60, tools=tools, tool_choice="auto")
            assert s["session"]["tools"][0]["name"] == "get_weather"
            assert "List of tools: <|tool_list_start|>" not in (s["session"]["instructions"] or "")
            conn = _connection(server, sid)
            engine = server.state.engine
            text = engine.processor.text
            call = '<|tool_call_start|>[get_weather(city="Paris")]<|tool_call_end|><|im_end|>'
            script = text.encode(call, add_special_tokens=False)
            engine.force_text_tokens(conn.session, script)
            # The tool list is in the system prompt the model sees.
            assert "<|tool_list_start|>" in conn.engine_config.system_prompt
            listed = conn.engine_config.system_prompt.split("<|tool_list_start|>")[1].split("<|tool_list_end|>")[0]
            assert json.loads(listed)[0]["name"] == "get_weather"
            await c.send("conversation.item.create", item=_msg("user", "input_text", "Weather in Paris?"))
            await c.send("response.create")
            done = await c.wait_for("response.done")
            args_done = await c.wait_for("response.function_call_arguments.done")
            assert args_done["name"] == "get_weather" and json.loads(args_done["arguments"]) == {"city": "Paris"}
            delta = await c.wait_for("response.function_call_arguments.delta")
            assert delta["call_id"] == args_done["call_id"] and delta["item_id"] == args_done["item_id"]
            call = done["response"]["output"][1]
            assert call["type"] == "function_call" and call["call_id"] == args_done["call_id"]
            assert call["arguments"] == args_done["arguments"] and call["status"] == "completed"
            transcript = done["response"]["output"][0]["content"][0]["transcript"]
            assert "get_weather" not in transcript  # the call is not spoken
            await c.send(
                "conversation.item.create",
                item={"type": "function_call_output", "call_id": call["call_id"], "output": '{"temp": 21}'},
            )
            added = await c.wait_for("conversation.item.added", previous_item_id=call["id"])
            assert added["item"]["type"] == "function_call_output" and added["item"]["output"] == '{"temp": 21}'
            await c.send("response.create", response={"max_output_tokens": 6})
            nxt = await c.wait_for("response.done")
            assert nxt["response"]["status"] in ("completed", "incomplete")
            if not hasattr(engine, "_slots"):
                return  # an engine process (LFM2AUDIO_TEST_ENGINE=process): its history is not in reach
            # The tool turn is in the history the next response was built on.
            turns = engine._slots[conn.session.slot].history.turns
            tool = [t for t in turns if t.role == "tool"]
            assert len(tool) == 1
            ids = [int(i.value) for i in tool[0].items]
            assert text.decode(ids, skip_special_tokens=False).startswith(
                '<|im_start|>tool\n<|tool_response_start|>{"temp": 21}<|tool_response_end|>'
            )
            assert c.of("error") == []

    run(go())


def test_transcription_fails_cleanly_when_no_engine_slot_is_free(checkpoint_dir):
    """The hidden ASR session needs a slot of its own: with none free the turn's transcription fails
    (``.failed``, session_limit_reached) and the conversation goes on."""
    from live_server import serve, start_engine

    engine = start_engine(checkpoint_dir, max_sessions=1, warmup=False)
    try:
        with serve(engine, max_sessions=1) as s:

            async def go():
                async with await Client.connect(s.url) as c:
                    await c.wait_for("session.created")
                    await setup(c, max_output_tokens=4, audio={"input": {"transcription": {"model": "x"}}})
                    await c.send("input_audio_buffer.append", audio=pcm16_b64(synthetic_speech(0.5, rate=24000)))
                    await c.send("input_audio_buffer.commit")
                    committed = await c.wait_for("input_audio_buffer.committed")
                    await c.send("response.create")
                    failed = await c.wait_for("conversation.item.input_audio_transcription.failed")
                    assert failed["item_id"] == committed["item_id"]
                    assert failed["error"]["code"] == "session_limit_reached"
                    done = await c.wait_for("response.done")
                    assert done["response"]["status"] in ("completed", "incomplete")
                    assert c.of("error") == []

            run(go())
    finally:
        engine.stop()
