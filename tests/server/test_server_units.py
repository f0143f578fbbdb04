"""Units without a server: configuration, audio wire formats, protocol parsing."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from lfm2audio_server.audio import (
    FORMAT_OPUS,
    HEADER_SIZE,
    AudioError,
    OpusFrameEncoder,
    OpusPacketDecoder,
    Resampler,
    ogg_crc,
    ogg_packets,
    opus_packet_samples,
    pack_frame,
    pack_packets,
    pcm16_from_base64,
    unpack_frame,
    unpack_packets,
)
from lfm2audio_server.client_events import apply_session_update, parse_client_event
from lfm2audio_server.config import ConfigError, ServerConfig, load_config
from lfm2audio_server.protocol import ProtocolError, session_object
from lfm2audio_server.settings import RealtimeSettings, Sampling


def test_config_flags_env_defaults(tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# team keys\nkey-a\n\nkey-b\n")
    env = {
        "LFM2AUDIO_PORT": "9000",
        "LFM2AUDIO_MAX_SESSIONS": "3",
        "LFM2AUDIO_API_KEY": "env1,env2",
        "LFM2AUDIO_ALLOWED_ORIGINS": "https://a.example, https://b.example",
        "LFM2AUDIO_SHUTDOWN_GRACE": "2.5",
    }
    c = load_config(["--port", "9100", "--api-key-file", str(keys), "--dtype", "bfloat16"], env)
    assert c.port == 9100  # flag beats env
    assert c.max_sessions == 3 and c.shutdown_grace_s == 2.5  # env beats default
    assert c.api_keys == ("env1", "env2", "key-a", "key-b")
    assert c.allowed_origins == ("https://a.example", "https://b.example")
    assert c.dtype == "bfloat16" and c.model == "LiquidAI/LFM2-Audio-1.5B" and c.warmup
    c = load_config(["--api-key", "x", "--api-key", "y", "--no-warmup", "--model", "/m"], {})
    assert c.api_keys == ("x", "y") and not c.warmup and c.model == "/m"
    assert load_config([], {"LFM2AUDIO_NO_WARMUP": "1"}).warmup is False
    with pytest.raises(ConfigError):
        load_config([], {"LFM2AUDIO_PORT": "eighty"})
    with pytest.raises(ConfigError):
        ServerConfig(max_sessions=0)
    with pytest.raises(ConfigError):
        ServerConfig(dtype="int8")
    with pytest.raises(SystemExit):
        load_config(["--bogus"], {})


def test_pcm_and_base64():
    assert pcm16_from_base64("AAD/fw==").tolist() == [0, 32767]
    with pytest.raises(AudioError) as e:
        pcm16_from_base64("AAD")
    assert e.value.code == "invalid_base64"
    with pytest.raises(AudioError) as e:
        pcm16_from_base64("AAAA")  # 3 bytes
    assert e.value.code == "invalid_audio_length"


def test_frame_layout():
    frame = pack_frame(FORMAT_OPUS, 7, 300, b"payload")
    assert frame[:HEADER_SIZE] == b"LF\x01\x02" + struct.pack("<II", 7, 300)
    assert unpack_frame(frame) == (FORMAT_OPUS, 7, 300, b"payload")
    assert unpack_packets(pack_packets([b"a", b"bcd"])) == [b"a", b"bcd"]
    with pytest.raises(AudioError):
        unpack_packets(b"\x09\x00abc")


def test_opus_wire_round_trip():
    enc = OpusFrameEncoder(24_000)
    dec = OpusPacketDecoder(24_000)
    t = np.arange(1920 * 12) / 24_000
    x = (0.4 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
    out = []
    for i in range(0, len(x), 1920):
        packets = enc.encode(x[i : i + 1920])
        assert len(packets) == 2 and all(opus_packet_samples(p) == 1920 for p in packets)  # two 40 ms packets
        out.append(dec.decode(unpack_packets(pack_packets(packets))))
    y = np.concatenate(out)
    assert len(y) == len(x)
    # Same tone after the codec delay.
    lag = max(range(0, 1000), key=lambda k: float(np.dot(y[k : k + 4800], x[:4800])))
    corr = np.corrcoef(y[lag : lag + 4800], x[:4800])[0, 1]
    assert corr > 0.95


def test_ogg_crc_matches_sphn():
    import sphn

    pages = sphn.OpusStreamWriter(24_000).append_pcm(np.zeros(1920, np.float32))
    first_len = 27 + pages[26] + sum(pages[27 : 27 + pages[26]])
    page = bytearray(pages[:first_len])
    crc = struct.unpack_from("<I", page, 22)[0]
    page[22:26] = b"\0\0\0\0"
    assert ogg_crc(bytes(page)) == crc
    assert ogg_packets(pages)[0].startswith(b"OpusHead")


def test_resampler_flush_keeps_every_sample():
    r = Resampler(16_000)
    x = np.random.default_rng(0).standard_normal(24_000).astype(np.float32) * 0.1
    got = sum(len(r(x[i : i + 1000], 24_000)) for i in range(0, len(x), 1000)) + len(r.flush())
    assert abs(got - 16_000) <= 2


def test_parse_client_events():
    ev = parse_client_event('{"type": "response.create", "event_id": "e", "response": {"max_output_tokens": "inf"}}')
    assert ev.response.max_output_tokens == "inf"
    with pytest.raises(ProtocolError) as e:
        parse_client_event('{"type": "session.update", "event_id": "e9", "session": {"instructions": 3}}')
    assert (e.value.code, e.value.param, e.value.event_id) == ("invalid_value", "session.instructions", "e9")
    with pytest.raises(ProtocolError) as e:
        parse_client_event('{"type": "session.update", "session": {"max_output_tokens": "lots"}}')
    assert e.value.param == "session.max_output_tokens"


def test_session_update_semantics():
    s = RealtimeSettings(model="m")
    upd = parse_client_event(
        '{"type": "session.update", "session": {"type": "realtime", "tools": [], "tracing": "auto",'
        '"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000},'
        '"turn_detection": {"type": "server_vad", "silence_duration_ms": 300}}},'
        '"lfm2audio": {"mode": "tts", "voice": "warm", "binary_input": {"format": "pcm16"}}}}'
    )
    s2, errors = apply_session_update(s, upd.session, max_output_tokens_cap=100)
    assert errors == []
    assert s2.input_rate == 16000 and s2.turn_detection.silence_duration_ms == 300
    assert s2.turn_detection.prefix_padding_ms == 300  # OpenAI's default for what was not given
    assert s2.mode == "tts" and s2.voice == "warm" and s2.binary_input == ("pcm16", 16000)
    assert s2.effective_audio_sampling() == Sampling(0.8, 64)
    obj = session_object(s2, "sess_1")
    assert obj["lfm2audio"]["binary_input"] == {"format": "pcm16", "rate": 16000}
    off = parse_client_event('{"type": "session.update", "session": {"audio": {"input": {"turn_detection": null}}}}')
    assert apply_session_update(s2, off.session, max_output_tokens_cap=100)[0].turn_detection is None
    # A rejected field is named and left as it was; the others are applied.
    big = parse_client_event('{"type": "session.update", "session": {"max_output_tokens": 101, "instructions": "x"}}')
    s3, errors = apply_session_update(s, big.session, max_output_tokens_cap=100)
    assert [e.param for e in errors] == ["session.max_output_tokens"]
    assert s3.max_output_tokens == s.max_output_tokens and s3.instructions == "x"


def test_the_server_engine_load_leaves_its_objects_out_of_the_collectors_sight(checkpoint_dir):
    """default_engine_factory freezes what loading left alive (imports, modules, tokenizer), so that a
    full collection, which holds the GIL and so stalls the engine thread, does not rescan it."""
    import gc

    from lfm2audio_server.app import default_engine_factory

    frozen = gc.get_freeze_count()
    try:
        engine = default_engine_factory(ServerConfig(model=str(checkpoint_dir), device="cpu", max_sessions=2))
        assert gc.get_freeze_count() > frozen + 1000
        assert engine.max_sessions == 2
    finally:
        gc.unfreeze()
