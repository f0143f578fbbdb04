"""Voice turns over the wire (JSON + base64), chat / asr / tts, against the real engine."""

from __future__ import annotations

import base64

import numpy as np
from rt_client import Client, pcm16_b64, run, setup, synthetic_speech, tone

FRAME_BYTES = 1920 * 2


async def _voice_turn(c: Client, audio: np.ndarray, rate: int = 24_000) -> dict:
    # Send in 100 ms chunks, as a microphone would.
    step = rate // 10
    for i in range(0, len(audio), step):
        await c.send("input_audio_buffer.append", audio=pcm16_b64(audio[i : i + step]))
    await c.send("input_audio_buffer.commit")
    committed = await c.wait_for("input_audio_buffer.committed")
    item = await c.wait_for("conversation.item.added")
    assert item["item"]["id"] == committed["item_id"] and item["item"]["role"] == "user"
    await c.send("response.create")
    return await c.wait_for("response.done")


def test_chat_voice_turn(server):
    async def go():
        async with await Client.connect(server.url) as c:
            created = await c.wait_for("session.created")
            assert created["session"]["type"] == "realtime"
            assert created["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"  # OpenAI default
            await setup(c, max_output_tokens=40)
            done = await _voice_turn(c, tone(1.0))
            resp = done["response"]
            assert resp["status"] in ("completed", "incomplete")
            rid = resp["id"]

            transcript = c.of("response.output_audio_transcript.delta")
            audio = c.of("response.output_audio.delta")
            assert transcript and audio
            assert all(e["response_id"] == rid for e in transcript + audio)
            for e in audio:
                assert len(base64.b64decode(e["delta"])) == FRAME_BYTES  # one 80 ms frame each
            text = "".join(e["delta"] for e in transcript)
            assert c.of("response.output_audio_transcript.done")[0]["transcript"] == text
            assert resp["output"][0]["content"][0]["transcript"] == text
            assert c.of("response.output_audio.done")

            # OpenAI's lifecycle order.
            types = [e["type"] for e in c.events]
            order = [
                "response.created",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_audio.done",
                "response.output_audio_transcript.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.done",
            ]
            assert [types.index(t) for t in order] == sorted(types.index(t) for t in order)
            # Deltas are interleaved text and audio, streamed before the end.
            assert types.index("response.output_audio.delta") < types.index("response.output_audio.done")

            usage = resp["usage"]
            assert usage["output_token_details"]["audio_tokens"] == len(audio)
            assert usage["output_tokens"] <= 40
            stats = resp["lfm2audio"]
            assert stats["time_to_first_audio_ms"] is not None and stats["real_time_factor"] is not None

            # Second turn (text) reuses the cached conversation.
            await c.send(
                "conversation.item.create",
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
            )
            await c.wait_for("conversation.item.added")
            await c.send("response.create", response={"max_output_tokens": 10})
            done2 = await c.wait_for("response.done")
            assert done2["response"]["usage"]["input_token_details"]["cached_tokens"] > 0
            assert done2["response"]["usage"]["output_tokens"] <= 10
            assert done2["response"]["lfm2audio"]["response_index"] == 1

    run(go())


def test_asr_turn(server):
    async def go():
        async with await Client.connect(server.url) as c:
            upd = await setup(
                c,
                lfm2audio={"mode": "asr"},
                max_output_tokens=20,
                audio={"input": {"format": {"type": "audio/pcm", "rate": 16000}}},
            )
            assert upd["session"]["output_modalities"] == ["text"]
            assert upd["session"]["instructions"] == "Perform ASR."
            done = await _voice_turn(c, synthetic_speech(1.0, 16_000), rate=16_000)
            assert done["response"]["status"] in ("completed", "incomplete")
            deltas = c.of("response.output_text.delta")
            assert deltas and not c.of("response.output_audio.delta")
            assert not c.of("response.output_audio_transcript.delta")
            text = "".join(e["delta"] for e in deltas)
            assert c.of("response.output_text.done")[0]["text"] == text
            assert done["response"]["output"][0]["content"][0] == {"type": "output_text", "text": text}
            assert done["response"]["output_modalities"] == ["text"]

    run(go())


def test_tts_turn(tts_server):
    async def go():
        async with await Client.connect(tts_server.url) as c:
            upd = await setup(c, lfm2audio={"mode": "tts", "voice": "A calm female voice."}, max_output_tokens=60)
            assert upd["session"]["instructions"] == "Perform TTS.\nUse the following voice: A calm female voice."
            await c.send(
                "conversation.item.create",
                item={
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "The quick brown fox."}],
                },
            )
            await c.send("response.create")
            done = await c.wait_for("response.done")
            assert done["response"]["status"] in ("completed", "incomplete")
            audio = c.of("response.output_audio.delta")
            assert len(audio) >= 3
            assert all(len(base64.b64decode(e["delta"])) == FRAME_BYTES for e in audio)
            pcm = np.frombuffer(b"".join(base64.b64decode(e["delta"]) for e in audio), "<i2")
            assert np.abs(pcm).max() > 0

    run(go())


def test_input_rates_and_chunking(server):
    """8, 16, 44.1 and 48 kHz input; odd-sized chunks; audio is resampled and the turn runs."""

    async def go():
        async with await Client.connect(server.url) as c:
            for rate in (8000, 44100, 48000):
                await setup(c, max_output_tokens=4, audio={"input": {"format": {"type": "audio/pcm", "rate": rate}}})
                x = tone(0.5, rate)
                for i in range(0, len(x), 777):
                    await c.send("input_audio_buffer.append", audio=pcm16_b64(x[i : i + 777]))
                await c.send("input_audio_buffer.commit")
                await c.wait_for("input_audio_buffer.committed")
                await c.send("response.create")
                done = await c.wait_for("response.done")
                assert done["response"]["usage"]["input_tokens"] > 0

    run(go())


def test_clear_buffer(server):
    async def go():
        async with await Client.connect(server.url) as c:
            await setup(c)
            await c.send("input_audio_buffer.append", audio=pcm16_b64(tone(0.5)))
            await c.send("input_audio_buffer.clear")
            await c.wait_for("input_audio_buffer.cleared")
            await c.send("input_audio_buffer.commit")
            err = await c.wait_for("error")
            assert err["error"]["code"] == "input_audio_buffer_commit_empty"

    run(go())


def test_text_only_output_modality(server):
    """output_modalities ["text"] in chat mode: the model's text streams as output_text (as OpenAI's text
    replies), audio deltas are dropped."""

    async def go():
        async with await Client.connect(server.url) as c:
            upd = await setup(c, max_output_tokens=30, output_modalities=["text"])
            assert upd["session"]["output_modalities"] == ["text"]
            await c.send("input_audio_buffer.append", audio=pcm16_b64(tone(0.5)))
            await c.send("input_audio_buffer.commit")
            await c.send("response.create")
            done = await c.wait_for("response.done")
            assert c.of("response.output_text.delta") and not c.of("response.output_audio.delta")
            assert not c.of("response.output_audio.done") and not c.of("response.output_audio_transcript.delta")
            assert done["response"]["output"][0]["content"][0]["type"] == "output_text"
            assert done["response"]["output_modalities"] == ["text"]
            assert done["response"]["usage"]["output_token_details"]["audio_tokens"] > 0  # generated, not sent

    run(go())
