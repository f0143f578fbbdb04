"""The official openai SDK's realtime client completes a voice turn against the server."""

from __future__ import annotations

import pytest
from live_server import serve
from openai import AsyncOpenAI
from rt_client import pcm16_b64, run, tone

KEY = "sk-lfm2audio-sdk-test"


@pytest.fixture(scope="module")
def sdk_server(engine):
    with serve(engine, api_keys=(KEY,)) as s:
        yield s


def test_openai_sdk_voice_turn(sdk_server):
    async def go():
        client = AsyncOpenAI(api_key=KEY, base_url=f"http://127.0.0.1:{sdk_server.port}/v1")
        seen: list[str] = []
        transcript, audio_chunks = [], []
        async with client.realtime.connect(model="LiquidAI/LFM2-Audio-1.5B") as conn:
            await conn.session.update(
                session={
                    "type": "realtime",
                    "instructions": "Respond with interleaved text and audio.",
                    "max_output_tokens": 30,
                    "audio": {
                        "input": {"format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": None},
                        "output": {"format": {"type": "audio/pcm", "rate": 24000}},
                    },
                    "lfm2audio": {"sampling": {"audio": {"temperature": 0.8, "top_k": 8}}, "seed": 7},
                }
            )
            await conn.input_audio_buffer.append(audio=pcm16_b64(tone(1.0)))
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            async for event in conn:
                seen.append(event.type)
                if event.type == "session.updated":
                    assert event.session.max_output_tokens == 30
                    ext = event.session.model_extra["lfm2audio"]  # the extension key survives the SDK
                    assert ext["seed"] == 7 and ext["sampling"]["audio"] == {"temperature": 0.8, "top_k": 8}
                elif event.type == "response.output_audio_transcript.delta":
                    transcript.append(event.delta)
                elif event.type == "response.output_audio.delta":
                    audio_chunks.append(event.delta)
                elif event.type == "error":
                    raise AssertionError(event.error)
                elif event.type == "response.done":
                    done = event
                    break
        assert "session.created" in seen and "input_audio_buffer.committed" in seen
        assert transcript and audio_chunks
        assert done.response.status in ("completed", "incomplete")
        assert done.response.usage.output_tokens <= 30
        assert done.response.output[0].content[0].transcript == "".join(transcript)

    run(go())
