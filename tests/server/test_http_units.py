"""HTTP API building blocks without a server: voices, upload decoding, speech encoding, admission."""

from __future__ import annotations

import asyncio
import io
import wave

import numpy as np
import pytest
import soundfile as sf

from lfm2audio.engine import PoolFullError
from lfm2audio_server.audio_files import AudioFileError, SpeechEncoder, decode_audio, encode_whole
from lfm2audio_server.http_engine import APIError, SlotQueue
from lfm2audio_server.voices import VoiceError, resolve_voice, voice_list


def test_named_voices_produce_lfm25_prompts():
    assert resolve_voice("named", voice="UK female").prompt == "Perform TTS. Use the UK female voice."
    assert resolve_voice("named", voice="us_male").prompt == "Perform TTS. Use the US male voice."
    assert resolve_voice("named", voice="alloy").name == "US female"  # OpenAI names map onto the speakers
    assert resolve_voice("named", voice="Shimmer").name == "UK female"
    assert resolve_voice("named").prompt == "Perform TTS. Use the UK female voice."  # the default speaker
    with pytest.raises(VoiceError, match="unknown voice 'robot'.*UK female"):
        resolve_voice("named", voice="robot")
    with pytest.raises(VoiceError, match="named voices"):
        resolve_voice("named", voice="alloy", description="a calm voice")


def test_described_voices_produce_lfm2_prompts():
    v = resolve_voice("described", description="a calm female voice with clear diction.")
    assert v.prompt == "Perform TTS.\nUse the following voice: a calm female voice with clear diction."
    assert resolve_voice("described", voice="UK male").prompt.endswith("a British male voice with clear diction")
    assert resolve_voice("described").prompt == "Perform TTS."
    # The realtime API's lfm2audio.voice is a free description on LFM2-Audio.
    assert resolve_voice("described", voice="a deep voice", free_voice=True).description == "a deep voice"
    with pytest.raises(VoiceError, match="describe one in instructions"):
        resolve_voice("described", voice="a deep voice")
    ids = [v["id"] for v in voice_list("named")]
    assert ids[:4] == ["US male", "US female", "UK male", "UK female"] and "marin" in ids


def _file(x: np.ndarray, rate: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("fmt", "subtype", "tol"),
    [
        ("WAV", "FLOAT", 0.0),
        ("WAV", "PCM_16", 1e-4),
        ("WAV", "PCM_24", 1e-6),
        ("FLAC", "PCM_16", 1e-4),
        ("OGG", "VORBIS", None),
        ("OGG", "OPUS", None),
        ("MP3", "MPEG_LAYER_III", None),
    ],
)
def test_uploads_decode_whatever_their_format(fmt, subtype, tol):
    rate = 48_000 if subtype == "OPUS" else 22_050
    t = np.arange(rate) / rate
    x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    stereo = np.stack([x, x], axis=1)
    pcm, got_rate = decode_audio(_file(stereo, rate, fmt, subtype))
    assert got_rate == rate and pcm.dtype == np.float32 and pcm.ndim == 1
    if tol is not None:
        assert len(pcm) == len(x) and np.abs(pcm - x).max() <= tol
    else:  # lossy codecs: about the right length and loudness
        assert abs(len(pcm) - len(x)) < 0.1 * rate
        assert abs(np.sqrt(np.mean(pcm**2)) - 0.3 / np.sqrt(2)) < 0.05


def test_bad_uploads_are_refused_with_reasons():
    with pytest.raises(AudioFileError, match="empty"):
        decode_audio(b"")
    with pytest.raises(AudioFileError, match="could not decode.*supported: wav"):
        decode_audio(b"this is not audio at all" * 10)
    with pytest.raises(AudioFileError, match="MP4/M4A"):
        decode_audio(b"\x00\x00\x00\x20ftypM4A " + b"\x00" * 100)


@pytest.mark.parametrize("fmt", ["pcm", "wav", "opus", "flac", "mp3"])
def test_speech_encoder_output_decodes_to_the_frames(fmt):
    rng = np.random.default_rng(0)
    frames = [(0.2 * np.sin(np.arange(1920) / 5 + i)).astype(np.float32) for i in range(10)]
    frames[3] = rng.uniform(-0.5, 0.5, 1920).astype(np.float32)
    enc = SpeechEncoder(fmt)  # type: ignore[arg-type]
    pieces = [enc.push(f) for f in frames]
    tail = enc.finish()
    data = b"".join(pieces) + tail
    if fmt in ("pcm", "wav", "opus"):
        assert all(pieces), "streaming formats emit bytes for every frame"
    else:
        assert not any(pieces) and tail, "flac/mp3 are written whole at the end"
    want = np.concatenate(frames)
    if fmt == "pcm":
        got = np.frombuffer(data, "<i2").astype(np.float32) / 32767
        assert np.abs(got - want).max() < 1e-4
        return
    got, rate = sf.read(io.BytesIO(data), dtype="float32")
    if fmt == "opus":  # Opus decodes at 48 kHz whatever the input rate
        assert rate == 48_000 and abs(len(got) - 2 * len(want)) <= 2 * 1920
        return
    assert rate == 24_000
    if fmt in ("wav", "flac"):
        assert len(got) == len(want) and np.abs(got - want).max() < 1e-4
    else:
        assert abs(len(got) - len(want)) <= 1920


def test_streamed_wav_header_reads_in_stdlib_wave():
    enc = SpeechEncoder("wav")
    data = enc.push(np.zeros(1920, np.float32)) + enc.push(np.ones(1920, np.float32) * 0.5) + enc.finish()
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24_000, 1, 2)
        got = np.frombuffer(w.readframes(10**9), "<i2")
    assert len(got) == 3840 and got[-1] == 16384
    whole = encode_whole(np.zeros(480, np.float32), "wav")
    with wave.open(io.BytesIO(whole)) as w:
        assert w.getnframes() == 480


class _FakePool:
    """Only the admission queue is under test here: a pool of ``free`` slots."""

    max_sessions = 1

    def __init__(self, free: int) -> None:
        self.free = free

    def open_session(self, config):
        if self.free <= 0:
            raise PoolFullError("full")
        self.free -= 1
        return object()


def test_slot_queue_waits_in_order_and_refuses_when_full():
    async def go():
        pool = _FakePool(0)
        q = SlotQueue(max_waiting=2, timeout_s=5.0)
        a = asyncio.create_task(q.open(pool, None))
        b = asyncio.create_task(q.open(pool, None))
        await asyncio.sleep(0.05)
        assert q.waiting == 2
        with pytest.raises(APIError) as full:
            await q.open(pool, None)  # a third waiter is over max_waiting
        assert full.value.status == 503 and full.value.retry_after == 1
        pool.free = 1
        await asyncio.sleep(0.05)
        assert a.done() and not b.done(), "the first to wait gets the first free slot"
        pool.free = 1
        await asyncio.wait_for(b, 1.0)
        q2 = SlotQueue(max_waiting=4, timeout_s=0.1)
        with pytest.raises(APIError, match="slots are busy"):
            await q2.open(_FakePool(0), None)

    asyncio.run(go())


def test_realtime_sessions_use_the_same_voice_mapping(server):
    """audio.output.voice and lfm2audio.voice go through voices.py in the realtime API too."""
    from rt_client import Client, run, setup

    async def go():
        async with await Client.connect(server.url) as c:
            upd = await setup(c, lfm2audio={"mode": "tts"}, audio={"output": {"voice": "shimmer"}})
            assert upd["session"]["instructions"] == "Perform TTS. Use the UK female voice."
            upd = await setup(c, lfm2audio={"mode": "tts", "voice": "us_male"})
            assert upd["session"]["instructions"] == "Perform TTS. Use the US male voice."
            await c.send(
                "session.update",
                session={"type": "realtime", "audio": {"output": {"voice": "robot"}}, "lfm2audio": {"voice": None}},
            )
            err = await c.wait_for("error")
            assert err["error"]["code"] == "invalid_value" and "unknown voice 'robot'" in err["error"]["message"]

    run(go())
