"""The Python realtime client and ``lfm2audio-client`` against a real server (tiny golden checkpoint, in-process)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from live_server import espeak, serve

from lfm2audio_client import RealtimeClient, RealtimeError, Sampling, read_wav
from lfm2audio_client.audio import float_to_pcm16, resample, to_mono
from lfm2audio_client.cli import main
from lfm2audio_client.live import converse

GREEDY = Sampling(temperature=0)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    return espeak("What is the weather like today?", tmp_path_factory.mktemp("speech") / "q.wav", lead_s=0.2)


def test_chat_turn_streams_text_and_audio(server, speech):
    async def go():
        async with await RealtimeClient.connect(server.url) as c:
            session = await c.configure(mode="chat", max_output_tokens=40, text_sampling=GREEDY, audio_sampling=GREEDY)
            assert session["lfm2audio"]["binary_input"] == {"format": "pcm16", "rate": 16_000}
            assert session["lfm2audio"]["binary_output"] == {"format": "pcm16"}
            x, sr = read_wav(speech)
            await c.send_audio(to_mono(x), sr)  # 22050 Hz, resampled by the client
            await c.commit()
            texts, chunks = [], []
            r = await c.respond(on_text=texts.append, on_audio=chunks.append)
            assert r.status == "incomplete" and r.reason == "max_output_tokens"
            assert r.text and "".join(texts) == r.text
            assert chunks and all(len(ch) == 1920 for ch in chunks)
            assert np.array_equal(r.audio, np.concatenate(chunks))
            assert r.usage["output_tokens"] == 40
            assert r.usage["output_token_details"]["audio_tokens"] == len(chunks)
            assert 0 < r.time_to_first_audio_s < 30
            assert r.stats["time_to_first_audio_ms"] is not None

            # A second turn continues the conversation (its prompt reuses the cached history).
            await c.send_audio(to_mono(x), sr)
            await c.commit()
            r2 = await c.respond(max_output_tokens=12)
            assert r2.index == 1 and r2.usage["input_token_details"]["cached_tokens"] > 0

    asyncio.run(go())


def test_asr_and_errors(server, speech):
    async def go():
        async with await RealtimeClient.connect(server.url) as c:
            await c.configure(mode="asr", max_output_tokens=10, text_sampling=GREEDY)
            x, sr = read_wav(speech)
            await c.send_audio(to_mono(x), sr)
            await c.commit()
            r = await c.respond()
            assert r.mode == "asr" and r.text and not r.chunks
            with pytest.raises(RealtimeError) as e:  # nothing buffered
                await c.commit()
                await c.wait_for("input_audio_buffer.committed")
            assert e.value.code == "input_audio_buffer_commit_empty"

    asyncio.run(go())


def test_api_key(engine, speech):
    async def go(url: str):
        with pytest.raises(RealtimeError) as e:
            await RealtimeClient.connect(url)
        assert e.value.code == "invalid_api_key"
        with pytest.raises(RealtimeError):
            await RealtimeClient.connect(url, api_key="wrong")
        async with await RealtimeClient.connect(url, api_key="s3cret") as c:
            await c.configure(mode="asr")

    with serve(engine, api_keys=("s3cret",)) as s:
        asyncio.run(go(s.url))


def test_cli_chat_and_asr(server, speech, tmp_path, capsys):
    out = tmp_path / "reply.wav"
    argv = ["chat", str(speech), str(speech), "--url", server.url, "-o", str(out), "--max-output-tokens", "30"]
    assert main([*argv, "--text-temperature", "0", "--audio-temperature", "0"]) == 0
    cap = capsys.readouterr()
    assert cap.out.count("assistant: ") == 2 and len(cap.out) > 30
    assert "mode chat" in cap.err and "reply-1.wav" in cap.err and "first audio" in cap.err
    for name in ("reply-1.wav", "reply-2.wav"):
        y, rate = read_wav(tmp_path / name)
        assert rate == 24_000 and y.shape[1] > 0 and y.shape[1] % 1920 == 0

    assert main(["asr", str(speech), "--url", server.url, "--max-output-tokens", "8", "-q"]) == 0
    cap = capsys.readouterr()
    assert cap.out.strip() and cap.err == ""

    assert main(["chat", "--url", server.url]) == 2  # neither files nor --mic
    assert main(["chat", str(tmp_path / "nope.wav"), "--url", server.url]) == 2
    assert main(["asr", str(speech), "--url", "ws://127.0.0.1:9/v1/realtime"]) == 1
    assert "cannot connect" in capsys.readouterr().err


# Run in a fresh interpreter whose import system refuses torch and the packages that need it: the
# client (a separate package from the model library) must import and work without them.
_WITHOUT_TORCH = """
import sys

class _Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "lfm2audio", "lfm2audio_server"):
            raise ImportError(f"the Python client imported {name}")

sys.meta_path.insert(0, _Refuse())
"""


def _without_torch(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH + code, *args], capture_output=True, text=True, timeout=120
    )


def test_client_imports_without_torch():
    r = _without_torch(
        "import lfm2audio_client, lfm2audio_client.audio, lfm2audio_client.cli, lfm2audio_client.live, "
        "lfm2audio_client.realtime\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'lfm2audio')], sorted(sys.modules)\n"
        "print('imported')"
    )
    assert r.returncode == 0 and r.stdout.strip() == "imported", r.stderr
    # The guard itself works: importing torch in that interpreter fails.
    r = _without_torch("import torch")
    assert r.returncode != 0 and "the Python client imported torch" in r.stderr


def test_cli_without_torch_talks_to_the_server(server, speech):
    r = _without_torch(
        "from lfm2audio_client.cli import main\nsys.exit(main(sys.argv[1:]))",
        *["asr", str(speech), "--url", server.url, "--max-output-tokens", "8", "-q"],
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and r.stderr == ""


def test_cli_tts(tts_server, tmp_path, capsys):
    out = tmp_path / "hello.wav"
    argv = ["tts", "The quick brown fox jumps over the lazy dog.", "--voice", "A calm female voice."]
    argv += ["--url", tts_server.url, "-o", str(out), "--max-output-tokens", "40", "--audio-temperature", "0"]
    assert main([*argv, "--text-temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "mode tts" in err and "s audio" in err
    y, rate = read_wav(out)
    assert rate == 24_000 and y.shape[1] >= 1920 and y.shape[1] % 1920 == 0


def test_cli_mic_needs_sounddevice(server, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sounddevice", None)  # as if not installed
    assert main(["chat", "--mic", "--url", server.url, "--no-playback"]) == 1
    assert "sounddevice" in capsys.readouterr().err


class FakePlayer:
    def __init__(self) -> None:
        self.log: list[tuple[str, float]] = []

    def play(self, pcm: np.ndarray) -> None:
        self.log.append(("play", time.monotonic()))

    def flush(self) -> None:
        self.log.append(("flush", time.monotonic()))


def test_hands_free_conversation_with_barge_in(server, speech):
    """Server VAD takes the turns; speaking over a reply stops its playback and cancels it."""
    x, sr = read_wav(speech)
    voice = resample(to_mono(x), sr, 16_000)
    silence = np.zeros(int(0.9 * 16_000), np.float32)
    block = 320  # 20 ms, as a microphone delivers them

    async def go():
        async with await RealtimeClient.connect(server.url) as c:
            await c.configure(
                mode="chat",
                max_output_tokens="inf",  # the first reply is still going when the user speaks again
                server_vad={"silence_duration_ms": 400, "prefix_padding_ms": 200},
                text_sampling=GREEDY,  # deterministic: this reply does not end by itself early
                audio_sampling=GREEDY,
            )

            async def microphone() -> AsyncIterator[bytes]:
                async def say(audio: np.ndarray) -> AsyncIterator[bytes]:
                    for i in range(0, len(audio), block):
                        yield float_to_pcm16(audio[i : i + block])
                        await asyncio.sleep(block / 16_000)

                async for b in say(np.concatenate([voice, silence])):
                    yield b
                while not any(r.chunks for r in c.responses.values()):  # until the reply is audible
                    yield float_to_pcm16(np.zeros(block, np.float32))
                    await asyncio.sleep(block / 16_000)
                await c.send("session.update", session={"max_output_tokens": 12})  # for the next reply
                async for b in say(np.concatenate([voice, silence, silence])):
                    yield b

            player = FakePlayer()
            done = await asyncio.wait_for(converse(c, microphone(), player=player, max_responses=2), 120)
            return done, player

    (first, second), player = asyncio.run(go())
    assert first.status == "cancelled" and first.reason == "turn_detected"
    assert first.chunks and second.index == first.index + 1
    assert second.status in ("completed", "incomplete") and second.reason in (None, "max_output_tokens")
    kinds = [k for k, _ in player.log]
    assert "flush" in kinds
    barge = kinds.index("flush", kinds.index("play"))  # the first flush after the first reply played
    # Between the barge-in and the second reply, nothing of the first reply is played.
    played_after = kinds[barge + 1 :].count("play")
    assert played_after == len(second.chunks)


def test_session_limit_is_reported(engine):
    async def go(url: str):
        async with await RealtimeClient.connect(url):
            with pytest.raises(RealtimeError) as e:
                await RealtimeClient.connect(url)
            assert e.value.code == "session_limit_reached"

    with serve(engine, max_sessions=1) as s:
        asyncio.run(go(s.url))


def test_converse_ends_after_its_source(server, speech):
    """A finite source (a file played in real time): the turn is detected, answered, and converse returns."""
    x, sr = read_wav(speech)
    audio = np.concatenate([resample(to_mono(x), sr, 16_000), np.zeros(8000, np.float32)])

    async def source() -> AsyncIterator[bytes]:
        for i in range(0, len(audio), 640):
            yield float_to_pcm16(audio[i : i + 640])
            await asyncio.sleep(0.04)

    async def go():
        async with await RealtimeClient.connect(server.url) as c:
            await c.configure(mode="asr", max_output_tokens=8, server_vad={"silence_duration_ms": 300})
            return await asyncio.wait_for(converse(c, source()), 60)

    (r,) = asyncio.run(go())
    assert r.mode == "asr" and r.text and r.done
