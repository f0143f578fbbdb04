"""Bad requests get clear 4xx errors in OpenAI's shape; full engines answer 503 with Retry-After;
a client that goes away frees its slot; none of it disturbs the server."""

from __future__ import annotations

import base64
import json
import threading
import time

import httpx2 as httpx
import pytest
from http_helpers import wav_bytes
from live_server import serve
from rt_client import TIMEOUT, tone

KEY = "sk-lfm2audio-errors"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def srv(engine):
    with serve(engine, api_keys=(KEY,), http_max_body_bytes=300_000, http_queue_timeout_s=0.3) as s:
        yield s


@pytest.fixture(scope="module")
def tts_srv(tts_engine):
    with serve(tts_engine, api_keys=(KEY,), http_queue_timeout_s=5.0) as s:
        yield s


def post(server, path: str, **kw) -> httpx.Response:
    return httpx.post(server.http + path, headers={**AUTH, **kw.pop("headers", {})}, timeout=TIMEOUT, **kw)


def error_of(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err["message"]


def test_the_api_needs_a_key_even_beside_the_web_client(srv):
    assert srv.state.config.resolved_static_dir() is not None  # the web client is served at /
    r = httpx.post(srv.http + "/v1/audio/speech", json={"input": "hi", "voice": "alloy"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(srv.http + "/v1/models").status_code == 401
    assert httpx.get(srv.http + "/v1/models", headers=AUTH).status_code == 200


def test_speech_field_errors(srv):
    ok = {"input": "Hello.", "voice": "alloy"}
    assert "not valid JSON" in error_of(post(srv, "/v1/audio/speech", content=b"{nope"), 400, "invalid_json")
    error_of(post(srv, "/v1/audio/speech", json={"voice": "alloy"}), 400, param="input")
    error_of(post(srv, "/v1/audio/speech", json={**ok, "input": "x" * 4097}), 400, param="input")
    assert "aac" in post(srv, "/v1/audio/speech", json={**ok, "response_format": "aac"}).text
    assert "speed" in error_of(post(srv, "/v1/audio/speech", json={**ok, "speed": 1.5}), 400, param="speed")
    msg = error_of(post(srv, "/v1/audio/speech", json={**ok, "voice": "robot"}), 400, "invalid_voice", "voice")
    assert "UK female" in msg
    # The tiny checkpoint is LFM2.5-style (it ships audio_detokenizer/): free descriptions are refused.
    msg = error_of(post(srv, "/v1/audio/speech", json={**ok, "instructions": "a calm voice"}), 400, "invalid_voice")
    assert "named voices" in msg
    error_of(post(srv, "/v1/audio/speech", json={**ok, "lfm2audio": {"sampling": {"audio": {"top_k": 0}}}}), 400)


def test_transcription_errors(srv):
    wav = wav_bytes(tone(0.5, 16_000), 16_000)
    r = post(srv, "/v1/audio/transcriptions", json={"file": "x"})
    error_of(r, 400, "invalid_content_type")
    error_of(post(srv, "/v1/audio/transcriptions", data={"model": "m"}, files={"x": ("a", b"1")}), 400, param="file")
    r = post(srv, "/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF....not a wav file" * 20)})
    assert "could not decode" in error_of(r, 400, "invalid_audio_file", "file")
    r = post(srv, "/v1/audio/transcriptions", files={"file": ("a.wav", wav)}, data={"response_format": "srt"})
    error_of(r, 400, param="response_format")
    r = post(
        srv, "/v1/audio/transcriptions", files={"file": ("a.wav", wav)}, data={"timestamp_granularities[]": "word"}
    )
    error_of(r, 400)
    r = post(srv, "/v1/audio/transcriptions", files={"file": ("a.wav", wav)}, data={"temperature": "hot"})
    error_of(r, 400, param="temperature")
    big = wav_bytes(tone(6.0, 16_000), 16_000)  # 384 kB > the 300 kB limit of this server
    assert "limit" in error_of(post(srv, "/v1/audio/transcriptions", files={"file": ("a.wav", big)}), 413)


def test_chat_errors(srv):
    audio = base64.b64encode(wav_bytes(tone(0.5, 16_000), 16_000)).decode()
    user = {"role": "user", "content": "Hello"}
    chat = "/v1/chat/completions"
    history = [user, {"role": "assistant", "content": "Hi"}, user]
    error_of(post(srv, chat, json={"messages": history}), 400, "unsupported_message", "messages[1]")
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    assert "image_url" in error_of(post(srv, chat, json={"messages": [image]}), 400)
    error_of(post(srv, chat, json={"messages": [user], "tools": [{"type": "function"}]}), 400, param="tools")
    error_of(post(srv, chat, json={"messages": [user], "n": 2}), 400, param="n")
    bad = {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "!!", "format": "wav"}}]}
    error_of(post(srv, chat, json={"messages": [bad]}), 400, "invalid_base64")
    good = {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}]}
    body = {"messages": [good], "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}
    error_of(post(srv, chat, json={**body, "stream": True}), 400, param="audio.format")
    tts = [{"role": "system", "content": "Perform TTS."}, user]
    error_of(post(srv, chat, json={"messages": tts, "modalities": ["text"]}), 400, param="modalities")
    error_of(post(srv, chat, json={"messages": []}), 400, param="messages")
    r = httpx.get(srv.http + "/v1/models/whisper-1", headers=AUTH)
    error_of(r, 404, "model_not_found")


def test_errors_are_counted_and_the_server_goes_on(srv):
    post(srv, "/v1/audio/speech", json={"input": "Hello.", "voice": "robot"})
    metrics = httpx.get(srv.http + "/metrics", headers=AUTH).text
    assert 'lfm2audio_errors_total{code="invalid_voice"}' in metrics
    r = post(srv, "/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    metrics = httpx.get(srv.http + "/metrics", headers=AUTH).text
    assert 'lfm2audio_responses_total{mode="asr",status="incomplete"}' in metrics


def _hold_all_slots(engine) -> list:
    held = []
    while True:
        try:
            held.append(engine.open_session())
        except Exception:
            return held


def test_full_engine_queues_then_refuses_with_retry_after(srv, engine):
    wav = wav_bytes(tone(0.5, 16_000), 16_000)
    held = _hold_all_slots(engine)
    try:
        assert held
        r = post(srv, "/v1/audio/transcriptions", files={"file": ("a.wav", wav)}, data={"max_tokens": "3"})
        error_of(r, 503, "session_limit_reached")
        assert r.headers["retry-after"] == "1"
        # A request queued while a slot frees up within its wait gets served.
        timer = threading.Timer(0.1, held.pop().close)
        timer.start()
        # (this server's queue timeout is 0.3 s)
        r = post(srv, "/v1/audio/transcriptions", files={"file": ("a.wav", wav)}, data={"max_tokens": "3"})
        assert r.status_code == 200, r.text
    finally:
        for s in held:
            s.close()


def test_a_client_that_disconnects_frees_its_slot(tts_srv, tts_engine):
    body = {"input": "A long answer.", "voice": "alloy", "response_format": "pcm", "lfm2audio": {"max_tokens": 2000}}
    before = tts_engine.active_sessions
    with httpx.stream("POST", tts_srv.http + "/v1/audio/speech", json=body, headers=AUTH, timeout=TIMEOUT) as r:
        assert r.status_code == 200
        first = next(r.iter_bytes())
        assert first
        # The request holds at most its one slot (a short reply may already have finished and freed it).
        assert tts_engine.active_sessions <= before + 1
    deadline = time.monotonic() + 10
    while tts_engine.active_sessions > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tts_engine.active_sessions == before, "the response was cancelled and its slot freed"


def test_streamed_errors_before_the_first_byte_are_http_errors(srv):
    """A turn the engine cannot start (here: longer than the context) is refused before streaming begins."""
    text = "word " * 3000  # > max_context 2048 positions of the test engine
    body = {"messages": [{"role": "user", "content": text}], "stream": True}
    r = post(srv, "/v1/chat/completions", json=body)
    error_of(r, 400, "context_length_exceeded")
    assert "context" in json.loads(r.text)["error"]["message"]


def test_browser_preflight_and_voices(engine):
    """With allowed origins, a browser's CORS preflight (no key) is answered; the real request needs the key."""
    with serve(engine, api_keys=(KEY,), allowed_origins=("http://app.example",)) as s:
        pre = httpx.options(
            s.http + "/v1/audio/speech",
            headers={
                "Origin": "http://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://app.example"
        assert httpx.get(s.http + "/v1/audio/voices").status_code == 401
        voices = httpx.get(s.http + "/v1/audio/voices", headers=AUTH).json()
        assert voices["voice_style"] == "named"
        assert {"id": "alloy", "speaker": "US female", "prompt": "Perform TTS. Use the US female voice."} in voices[
            "data"
        ]


def test_a_client_gone_before_the_first_byte_frees_its_slot(tts_srv, tts_engine):
    import socket

    body = json.dumps(
        {"input": "Never heard.", "voice": "alloy", "response_format": "pcm", "lfm2audio": {"max_tokens": 2000}}
    )
    before = tts_engine.active_sessions
    with socket.create_connection(("127.0.0.1", tts_srv.port)) as sock:
        head = (
            f"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        sock.sendall(head.encode() + body.encode())
    deadline = time.monotonic() + 10
    seen_busy = False
    while time.monotonic() < deadline:
        seen_busy = seen_busy or tts_engine.active_sessions > before
        if seen_busy and tts_engine.active_sessions == before:
            break
        time.sleep(0.01)
    assert tts_engine.active_sessions == before, "the slot of a vanished client was freed"
