"""LiveKit's clients against the HTTP API: livekit-plugins-openai's STT and TTS pointed at the server, and
the requests of LiveKit's LiquidAI plugin (written for llama.cpp's llama-liquid-audio-server),
reproduced from its source and parsed the way it parses them.

The LiquidAI plugin is not on PyPI's index here, so its two calls are rebuilt from the plugin's
stt.py/tts.py (livekit/agents, livekit-plugins/livekit-plugins-liquidai): an ``openai.AsyncClient``
with ``max_retries=0``, streamed ``chat.completions.create`` with model "LFM2.5-Audio",
``extra_body={"reset_context": True}``, ``max_tokens`` 512 (STT) / 2048 (TTS); STT joins
``delta.content``; TTS stops at ``finish_reason == "stop"`` and reads ``delta.audio_chunk.get("data")``
as base64 float32, converted to int16 with ``clip(x * 32767)``.
"""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import openai
import pytest
from http_helpers import golden_wave
from live_server import serve
from livekit import rtc
from livekit.agents import APIConnectOptions
from livekit.plugins import openai as lk_openai

KEY = "sk-lfm2audio-livekit"
MAX_TOKENS = 40  # the server's cap: every client's own max_tokens is cut to it


@pytest.fixture(scope="module")
def asr_server(engine):
    with serve(engine, api_keys=(KEY,), max_output_tokens=MAX_TOKENS) as s:
        yield s


@pytest.fixture(scope="module")
def speech_server(tts_engine):
    with serve(tts_engine, api_keys=(KEY,), max_output_tokens=MAX_TOKENS) as s:
        yield s


def speech_frames(golden) -> list[rtc.AudioFrame]:
    """The golden utterance as LiveKit hands it to an STT: 10 ms int16 frames at 16 kHz."""
    x = (np.clip(golden_wave(golden), -1, 1) * 32767).astype(np.int16)
    return [rtc.AudioFrame(x[i : i + 160].tobytes(), 16_000, 1, len(x[i : i + 160])) for i in range(0, len(x), 160)]


def reference_transcript(server, golden) -> str:
    """/v1/audio/transcriptions of the same int16 WAV the plugins send."""
    wav = rtc.combine_audio_frames(speech_frames(golden)).to_wav_bytes()
    c = openai.OpenAI(api_key=KEY, base_url=f"{server.http}/v1", max_retries=0)
    return c.audio.transcriptions.create(model="whisper-1", file=("file.wav", wav)).text


def test_livekit_openai_stt(asr_server, golden):
    async def go():
        stt = lk_openai.STT(model="whisper-1", base_url=f"{asr_server.http}/v1", api_key=KEY, language="en")
        try:
            ev = await stt.recognize(speech_frames(golden), conn_options=APIConnectOptions(max_retry=0, timeout=30))
        finally:
            await stt.aclose()
        return ev

    ev = asyncio.run(go())
    want = reference_transcript(asr_server, golden)
    assert want and ev.alternatives[0].text == want
    assert ev.alternatives[0].language == "en"


@pytest.mark.parametrize(("model", "fmt"), [("tts-1", "pcm"), ("gpt-4o-mini-tts", "mp3")])
def test_livekit_openai_tts(speech_server, model, fmt):
    """tts-1 streams raw audio; gpt-4o-mini-tts asks for server-sent events (here with a whole mp3)."""

    async def go():
        tts = lk_openai.TTS(
            model=model, voice="ash", base_url=f"{speech_server.http}/v1", api_key=KEY, response_format=fmt
        )
        try:
            stream = tts.synthesize("Hello from LiveKit.", conn_options=APIConnectOptions(max_retry=0, timeout=30))
            frames = [ev.frame async for ev in stream]
        finally:
            await tts.aclose()
        return frames

    frames = asyncio.run(go())
    assert frames and {f.sample_rate for f in frames} == {24_000}
    samples = sum(f.samples_per_channel for f in frames)
    # At most MAX_TOKENS steps, most of them 80 ms frames (mp3 decoding may add or trim a few ms).
    assert 24_000 * 0.08 * 5 <= samples <= 24_000 * 0.08 * MAX_TOKENS + 2000


def liquidai_client(server) -> openai.AsyncClient:
    return openai.AsyncClient(max_retries=0, api_key=KEY, base_url=f"{server.http}/v1")


def test_liquidai_plugin_stt_requests(asr_server, golden):
    async def go():
        client = liquidai_client(asr_server)
        wav = rtc.combine_audio_frames(speech_frames(golden)).to_wav_bytes()
        messages = [
            {"role": "system", "content": "Perform ASR."},
            {
                "role": "user",
                "content": [
                    {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}
                ],
            },
        ]
        response = await client.chat.completions.create(
            model="LFM2.5-Audio", messages=messages, stream=True, max_tokens=512, extra_body={"reset_context": True}
        )
        chunks = []
        async for chunk in response:
            if chunk.choices and chunk.choices[0].delta.content:
                chunks.append(chunk.choices[0].delta.content)
        await client.close()
        return "".join(chunks)

    text = asyncio.run(go())
    assert text and text == reference_transcript(asr_server, golden)


def test_liquidai_plugin_tts_requests(speech_server):
    async def go():
        client = liquidai_client(speech_server)
        messages = [
            {"role": "system", "content": "Perform TTS. Use the UK female voice."},
            {"role": "user", "content": "Hello from the LiquidAI plugin."},
        ]
        response = await client.chat.completions.create(
            model="LFM2.5-Audio", messages=messages, stream=True, max_tokens=2048, extra_body={"reset_context": True}
        )
        pushed, stopped, after_stop = [], False, 0
        async for chunk in response:
            if stopped:
                after_stop += 1
                continue
            if chunk.choices and chunk.choices[0].finish_reason == "stop":
                stopped = True
                continue
            delta = chunk.choices[0].delta if chunk.choices else None
            if delta is None:
                continue
            if hasattr(delta, "audio_chunk") and delta.audio_chunk:
                data = delta.audio_chunk.get("data")
                if data:
                    f = np.frombuffer(base64.b64decode(data), dtype=np.float32)
                    pushed.append(np.clip(f * 32767, -32768, 32767).astype(np.int16))
        await client.close()
        return pushed, stopped, after_stop

    pushed, stopped, after_stop = asyncio.run(go())
    # The server's cap of MAX_TOKENS steps ends the turn with "length", so no "stop" chunk comes: the plugin
    # then reads the whole stream, as it does when llama.cpp ends a turn on its token limit.
    assert not stopped and after_stop == 0
    assert len(pushed) >= 5 and all(len(p) == 1920 for p in pushed)
    audio = np.concatenate(pushed)
    assert np.abs(audio).max() > 0
