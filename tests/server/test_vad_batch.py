"""Batched Silero VAD: one forward for many streams gives each stream what it would get alone."""

from __future__ import annotations

import asyncio

import numpy as np
from rt_client import synthetic_speech, tone

from lfm2audio_server.vad import (
    WINDOW,
    SpeechStarted,
    SpeechStopped,
    StreamingVad,
    VadBatcher,
    VadParams,
    forward_batch,
    load_model,
)

RATE = 16_000


def _signals() -> list[np.ndarray]:
    """Different audio per stream (speech at different times, a tone, noise, silence), 3 s each."""
    n = 3 * RATE
    silence = np.zeros(n, np.float32)
    rng = np.random.default_rng(0)
    out = []
    for k, lead in enumerate((0.2, 0.8, 1.4)):
        x = silence.copy()
        s = synthetic_speech(1.2, RATE, seed=k)
        x[int(lead * RATE) : int(lead * RATE) + len(s)] = s
        out.append(x)
    out.append(tone(3.0, RATE))
    out.append((0.05 * rng.standard_normal(n)).astype(np.float32))
    out.append(silence)
    return out


def test_batched_forward_matches_each_stream_alone():
    model = load_model()
    signals = _signals()
    alone = [StreamingVad(VadParams()) for _ in signals]
    batched = [StreamingVad(VadParams()) for _ in signals]
    p_alone = np.zeros((len(signals), len(signals[0]) // WINDOW))
    p_batch = np.zeros_like(p_alone)
    for j in range(p_alone.shape[1]):
        windows = [x[j * WINDOW : (j + 1) * WINDOW] for x in signals]
        for i, (s, w) in enumerate(zip(alone, windows, strict=True)):
            p_alone[i, j] = forward_batch(model, [s], [w])[0]
        p_batch[:, j] = forward_batch(model, batched, windows)
    assert np.abs(p_batch - p_alone).max() < 1e-5
    # The streams really differ: each speech stream crosses 0.5, the tone and silence never do.
    assert all(p_alone[i].max() > 0.9 for i in range(3)) and p_alone[3].max() < 0.5 and p_alone[5].max() < 0.5
    # And the state is per stream: a stream's probabilities do not depend on who shares its batch.
    again = [StreamingVad(VadParams()) for _ in range(2)]
    pairs = np.array(
        [forward_batch(model, again, [x[j * WINDOW : (j + 1) * WINDOW] for x in (signals[0], signals[5])])
         for j in range(p_alone.shape[1])]
    )  # fmt: skip
    assert np.abs(pairs[:, 0] - p_alone[0]).max() < 1e-5 and np.abs(pairs[:, 1] - p_alone[5]).max() < 1e-5


def _summary(outputs: list) -> list:
    return [
        (type(o).__name__, o.audio_start_ms if isinstance(o, SpeechStarted) else
         o.audio_end_ms if isinstance(o, SpeechStopped) else len(o.pcm))
        for o in outputs
    ]  # fmt: skip


def test_batcher_gives_the_same_turns_as_feeding_alone():
    """Six sessions feed at once, in chunks of different sizes (some shorter than a window, some many
    windows): the batcher's decisions equal each stream fed alone, with fewer forwards than windows."""
    params = VadParams(threshold=0.5, prefix_padding_ms=200, silence_duration_ms=400)
    signals = _signals()
    chunks = [320, 480, 1000, 4800, 512, 16000]

    expected = []
    for x, step in zip(signals, chunks, strict=True):
        vad = StreamingVad(params)
        expected.append(_summary([o for i in range(0, len(x), step) for o in vad.feed(x[i : i + step])]))

    batcher = VadBatcher()

    async def session(x: np.ndarray, step: int) -> list:
        vad = StreamingVad(params)
        out = []
        for i in range(0, len(x), step):
            out += await vad.feed_batched(x[i : i + step], batcher)
            await asyncio.sleep(0)
        return _summary(out)

    async def all_sessions() -> list:
        return await asyncio.gather(*(session(x, step) for x, step in zip(signals, chunks, strict=True)))

    got = asyncio.run(all_sessions())
    assert got == expected
    assert sum(k == "SpeechStarted" for e in expected for k, _ in e) == 3  # the three speech streams
    total = sum(len(x) // WINDOW for x in signals)
    assert batcher.windows == total
    assert batcher.forwards < total / 2  # streams shared forwards
