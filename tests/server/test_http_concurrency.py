"""16 concurrent HTTP requests (8 transcriptions, 8 greedy speeches) give what each gives alone, and
share engine steps: each engine runs far fewer steps for the batch than for the requests one by one.

Transcriptions run on checkpoint/ (whose greedy ASR stream is text) and speech on the TTS weights
(whose greedy TTS stream is audio), so the 16 requests go to two servers, one engine each, at once.
"""

from __future__ import annotations

import asyncio

import httpx2 as httpx
import numpy as np
import pytest
from http_helpers import GREEDY_SPEECH, golden_wave, wav_bytes
from live_server import serve
from rt_client import synthetic_speech

N = 8
TOKENS = 24


@pytest.fixture(scope="module")
def engines(checkpoint_dir, tts_checkpoint_dir):
    from lfm2audio.engine import Engine, EngineConfig

    out = []
    for ck in (checkpoint_dir, tts_checkpoint_dir):
        eng = Engine.from_pretrained(ck, config=EngineConfig(max_sessions=N, max_context=1024))
        eng.start()
        out.append(eng)
    yield out
    for eng in out:
        eng.stop()


def _inputs(golden) -> tuple[list[bytes], list[str]]:
    waves = [wav_bytes(golden_wave(golden), 16_000)]
    waves += [wav_bytes(synthetic_speech(1.0 + 0.2 * i, seed=i), 16_000) for i in range(N - 1)]
    texts = [f"Sentence number {i} of the batch, spoken." for i in range(N)]
    return waves, texts


async def _transcribe(client: httpx.AsyncClient, url: str, wav: bytes) -> str:
    r = await client.post(url, files={"file": ("a.wav", wav)}, data={"max_tokens": str(TOKENS)})
    assert r.status_code == 200, r.text
    return r.json()["text"]


async def _speak(client: httpx.AsyncClient, url: str, text: str) -> bytes:
    body = {
        "input": text,
        "voice": "alloy",
        "response_format": "pcm",
        "lfm2audio": {**GREEDY_SPEECH, "max_tokens": TOKENS},
    }
    out = b""
    async with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        async for chunk in r.aiter_bytes():
            out += chunk
    return out


def test_sixteen_concurrent_requests_match_their_solo_outputs(engines, golden):
    asr_engine, tts_engine = engines
    waves, texts = _inputs(golden)
    with serve(asr_engine) as asr, serve(tts_engine) as tts:
        t_url, s_url = asr.http + "/v1/audio/transcriptions", tts.http + "/v1/audio/speech"

        async def alone():
            async with httpx.AsyncClient(timeout=120) as c:
                return [await _transcribe(c, t_url, w) for w in waves], [await _speak(c, s_url, t) for t in texts]

        async def together():
            async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=2 * N)) as c:
                jobs = [_transcribe(c, t_url, w) for w in waves] + [_speak(c, s_url, t) for t in texts]
                out = await asyncio.gather(*jobs)
                return out[:N], out[N:]

        steps0 = (asr_engine.steps, tts_engine.steps)
        solo_text, solo_audio = asyncio.run(alone())
        steps1 = (asr_engine.steps, tts_engine.steps)
        batch_text, batch_audio = asyncio.run(together())
        steps2 = (asr_engine.steps, tts_engine.steps)

    assert all(solo_text) and len(set(solo_text)) > 1, "distinct, non-empty transcripts"
    assert batch_text == solo_text
    assert all(len(a) > 0 and len(a) % 3840 == 0 for a in solo_audio)
    for a, b in zip(batch_audio, solo_audio, strict=True):
        x, y = np.frombuffer(a, "<i2").astype(np.int32), np.frombuffer(b, "<i2").astype(np.int32)
        assert len(x) == len(y) and np.abs(x - y).max() <= 2  # float rounding of batched vs lone rows
    for k in range(2):
        solo, batch = steps1[k] - steps0[k], steps2[k] - steps1[k]
        assert batch < solo / 3, f"engine {k}: {batch} steps for the batch vs {solo} one by one"
