"""Server VAD turn detection (Silero) and barge-in."""

from __future__ import annotations

import asyncio

import numpy as np
from rt_client import Client, pcm16_b64, run, setup, synthetic_speech, tone

from lfm2audio_server.vad import VAD_EXECUTOR, SpeechAudio, SpeechStarted, SpeechStopped, StreamingVad, VadParams

RATE = 16_000
VAD_ON = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 200, "silence_duration_ms": 400}


def _silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


def test_streaming_vad_detects_synthetic_speech_not_tones():
    vad = StreamingVad(VadParams(threshold=0.5, prefix_padding_ms=200, silence_duration_ms=400))
    signal = np.concatenate([_silence(0.5), synthetic_speech(1.5, RATE), _silence(1.0)])
    out = []
    for i in range(0, len(signal), 1000):  # chunks that do not align with the 512-sample windows
        out += VAD_EXECUTOR.submit(vad.feed, signal[i : i + 1000]).result()  # as the server runs it
    kinds = [type(o) for o in out]
    assert kinds.count(SpeechStarted) == 1 and kinds.count(SpeechStopped) == 1
    start = next(o for o in out if isinstance(o, SpeechStarted)).audio_start_ms
    end = next(o for o in out if isinstance(o, SpeechStopped)).audio_end_ms
    assert 200 <= start <= 800  # speech begins at 500 ms; detection lags a little, minus 200 ms padding
    assert 2000 <= end <= 2800  # speech ends at 2000 ms, plus 400 ms of silence
    audio = sum(len(o.pcm) for o in out if isinstance(o, SpeechAudio))
    assert abs(audio / RATE - (end - start) / 1000) < 0.1  # the turn's audio spans start..end

    vad = StreamingVad(VadParams())
    out = VAD_EXECUTOR.submit(vad.feed, np.concatenate([tone(1.0, RATE), _silence(0.5)])).result()
    assert not any(isinstance(o, SpeechStarted) for o in out)


async def _send_audio(c: Client, x: np.ndarray, chunk_s: float = 0.1) -> None:
    step = int(chunk_s * RATE)
    for i in range(0, len(x), step):
        await c.send("input_audio_buffer.append", audio=pcm16_b64(x[i : i + step]))


def test_server_vad_turn(server):
    async def go():
        async with await Client.connect(server.url) as c:
            await setup(
                c,
                max_output_tokens=12,
                audio={"input": {"format": {"type": "audio/pcm", "rate": RATE}, "turn_detection": VAD_ON}},
            )
            await _send_audio(c, np.concatenate([_silence(0.5), synthetic_speech(1.2, RATE), _silence(0.8)]))
            started = await c.wait_for("input_audio_buffer.speech_started")
            stopped = await c.wait_for("input_audio_buffer.speech_stopped")
            assert stopped["item_id"] == started["item_id"]
            assert 200 <= started["audio_start_ms"] <= 800 and 1700 <= stopped["audio_end_ms"] <= 2500
            committed = await c.wait_for("input_audio_buffer.committed")
            assert committed["item_id"] == started["item_id"]
            # create_response defaults to true: the response starts by itself.
            await c.wait_for("response.created")
            done = await c.wait_for("response.done")
            assert done["response"]["usage"]["input_tokens"] > 0
            assert c.of("response.output_audio.delta")
            # Silence alone starts nothing.
            await _send_audio(c, _silence(1.0))
            await asyncio.sleep(0.3)
            await c.send("input_audio_buffer.clear")
            await c.wait_for("input_audio_buffer.cleared")
            assert len(c.of("input_audio_buffer.speech_started")) == 1

    run(go())


def test_barge_in_cancels_and_next_turn_runs(server):
    async def go():
        async with await Client.connect(server.url) as c:
            await setup(
                c,
                max_output_tokens=1500,
                audio={"input": {"format": {"type": "audio/pcm", "rate": RATE}, "turn_detection": VAD_ON}},
            )
            # A long response from a text turn...
            await c.send(
                "conversation.item.create",
                item={
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "Tell me a long story."}],
                },
            )
            await c.send("response.create")
            first = await c.wait_for("response.created")
            await c.wait_for("response.output_audio.delta")
            # ...interrupted by the user speaking.
            await _send_audio(c, np.concatenate([synthetic_speech(1.0, RATE, seed=3), _silence(0.7)]))
            await c.wait_for("input_audio_buffer.speech_started")
            done = await c.wait_for("response.done")
            assert done["response"]["id"] == first["response"]["id"]
            assert done["response"]["status"] == "cancelled"
            assert done["response"]["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
            assert done["response"]["usage"]["output_tokens"] < 1500
            # Nothing of the interrupted response is streamed after speech_started.
            rid = first["response"]["id"]
            cut = next(i for i, e in enumerate(c.events) if e["type"] == "input_audio_buffer.speech_started")
            late = [e for e in c.events[cut:] if e["type"].endswith(".delta") and e.get("response_id") == rid]
            assert not late
            transcript = "".join(
                e["delta"] for e in c.events if e["type"].endswith("transcript.delta") and e["response_id"] == rid
            )
            assert done["response"]["output"][0]["content"][0]["transcript"] == transcript
            # The user's turn then gets its own response (the truncated one stays in history).
            await c.wait_for("input_audio_buffer.speech_stopped")
            second = await c.wait_for("response.created")
            assert second["response"]["id"] != first["response"]["id"]
            await c.send("response.cancel")
            done2 = await c.wait_for("response.done")
            assert done2["response"]["status"] == "cancelled"
            assert done2["response"]["status_details"]["reason"] == "client_cancelled"
            assert done2["response"]["usage"]["input_token_details"]["cached_tokens"] > 0

    run(go())


def test_barge_in_off(server):
    """interrupt_response false: speech during a response does not cancel it."""

    async def go():
        async with await Client.connect(server.url) as c:
            td = {**VAD_ON, "interrupt_response": False, "create_response": False}
            await setup(
                c,
                max_output_tokens=200,
                audio={"input": {"format": {"type": "audio/pcm", "rate": RATE}, "turn_detection": td}},
            )
            await c.send(
                "conversation.item.create",
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
            )
            await c.send("response.create")
            await c.wait_for("response.output_audio.delta")
            await _send_audio(c, np.concatenate([synthetic_speech(1.0, RATE), _silence(0.6)]))
            await c.wait_for("input_audio_buffer.speech_started")
            done = await c.wait_for("response.done")
            assert done["response"]["status"] != "cancelled"
            await c.wait_for("input_audio_buffer.committed")
            await asyncio.sleep(0.2)
            assert len(c.of("response.created")) == 1  # create_response false

    run(go())


def test_manual_cancel_then_create(server):
    """response.cancel followed at once by response.create: the new response starts after the cancelled
    one ends, without a conversation_already_has_active_response error."""

    async def go():
        async with await Client.connect(server.url) as c:
            await setup(c, max_output_tokens=1000)
            await c.send(
                "conversation.item.create",
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
            )
            await c.send("response.create")
            await c.wait_for("response.output_audio_transcript.delta")
            await c.send("response.cancel")
            await c.send("response.create", response={"max_output_tokens": 5})
            done = await c.wait_for("response.done")
            assert done["response"]["status"] == "cancelled"
            done2 = await c.wait_for("response.done")
            assert done2["response"]["max_output_tokens"] == 5
            assert not c.of("error")

    run(go())


def test_default_session_uses_server_vad(server):
    """Without any session.update: server_vad at 24 kHz input, as OpenAI's default."""

    async def go():
        async with await Client.connect(server.url) as c:
            await c.wait_for("session.created")
            speech = synthetic_speech(1.0, 24_000, seed=5)
            x = np.concatenate([np.zeros(12_000, np.float32), speech, np.zeros(19_200, np.float32)])
            for i in range(0, len(x), 2400):
                await c.send("input_audio_buffer.append", audio=pcm16_b64(x[i : i + 2400]))
            await c.wait_for("input_audio_buffer.speech_started")
            await c.wait_for("input_audio_buffer.committed")
            await c.wait_for("response.created")
            await c.send("response.cancel")
            done = await c.wait_for("response.done")
            assert done["response"]["status"] in ("cancelled", "completed", "incomplete")

    run(go())
