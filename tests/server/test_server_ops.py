"""Operations: /health, /ready, /metrics, JSON logs, static files, 4 concurrent sessions, SIGTERM drain."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import websockets
from live_server import LiveServer, free_port, http_get, serve
from rt_client import TIMEOUT, Client, pcm16_b64, run, setup, tone

from lfm2audio_server.app import create_app
from lfm2audio_server.config import ServerConfig
from lfm2audio_server.logging import JsonFormatter

REPO = Path(__file__).resolve().parents[2]


def test_health_ready_metrics(server):
    assert http_get(server.http + "/health") == (200, b'{"status":"ok"}')
    status, body = http_get(server.http + "/ready")
    assert status == 200 and json.loads(body)["ready"] is True

    async def go():
        async with await Client.connect(server.url) as c:
            await setup(c, max_output_tokens=20)
            status, body = http_get(server.http + "/metrics")
            assert "lfm2audio_active_sessions 1.0" in body.decode()
            await c.send("input_audio_buffer.append", audio=pcm16_b64(tone(0.5)))
            await c.send("input_audio_buffer.commit")
            await c.send("response.create")
            await c.wait_for("response.done")
            await c.send("response.cancel")
            await c.wait_for("error")

    run(go())
    # The server notices the closed socket and releases the session a moment after the client leaves.
    deadline = time.monotonic() + 10
    while "lfm2audio_active_sessions 0.0" not in (text := http_get(server.http + "/metrics")[1].decode()):
        assert time.monotonic() < deadline, "the closed session is still counted as active"
        time.sleep(0.05)
    for needle in (
        "lfm2audio_active_sessions 0.0",
        "lfm2audio_ready 1.0",
        'lfm2audio_responses_total{mode="chat",status=',
        "lfm2audio_time_to_first_audio_seconds_count",
        "lfm2audio_real_time_factor_count",
        "lfm2audio_audio_frames_total",
        'lfm2audio_errors_total{code="response_cancel_not_active"}',
    ):
        assert needle in text, needle
    count = next(line for line in text.splitlines() if line.startswith("lfm2audio_time_to_first_audio_seconds_count"))
    assert float(count.split()[-1]) >= 1


def test_ready_waits_for_the_model(engine):
    """While the engine loads, /ready is 503 and sessions are refused with 1013; then both open."""
    release = threading.Event()

    def factory(config):
        release.wait(TIMEOUT)
        return engine

    config = ServerConfig(model="golden-tiny", warmup=False)
    app = create_app(config, engine_factory=factory)
    with LiveServer(app, config) as s:
        assert http_get(s.http + "/health")[0] == 200
        status, body = http_get(s.http + "/ready")
        assert status == 503 and json.loads(body)["ready"] is False

        async def refused():
            try:
                await Client.connect(s.url)
            except websockets.InvalidStatus as e:
                assert e.response.status_code == 503
                assert json.loads(e.response.body)["error"]["code"] == "model_not_ready"
            else:
                raise AssertionError("a session opened before the model was ready")

        run(refused())
        release.set()
        deadline = time.monotonic() + TIMEOUT
        while http_get(s.http + "/ready")[0] != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        s.state.owns_engine = False  # the shared engine outlives this app

        async def ok():
            async with await Client.connect(s.url) as c:
                await c.wait_for("session.created")

        run(ok())


def test_static_client(engine, tmp_path):
    (tmp_path / "index.html").write_text("<!doctype html><title>lfm2audio</title>")
    (tmp_path / "app.js").write_text("console.log(1)")
    with serve(engine, static_dir=str(tmp_path), api_keys=("k",)) as s:
        status, body = http_get(s.http + "/")
        assert status == 200 and b"<title>lfm2audio</title>" in body
        assert http_get(s.http + "/app.js") == (200, b"console.log(1)")
        assert http_get(s.http + "/metrics")[0] == 401  # the page is public, the endpoints are not


def test_json_logs_carry_session_ids(server):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("lfm2audio_server")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:

        async def go():
            async with await Client.connect(server.url) as c:
                created = await c.wait_for("session.created")
                await c.send_raw("{oops")
                await c.wait_for("error")
                return created["session"]["id"]

        sid = run(go())
        time.sleep(0.3)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    records = [json.loads(line) for line in stream.getvalue().splitlines()]
    mine = [r for r in records if r.get("session_id") == sid]
    msgs = [r["msg"] for r in mine]
    assert "session opened" in msgs and "session closed" in msgs
    err = next(r for r in mine if r.get("error_code") == "invalid_json")
    assert err["level"] == "info" and err["ts"].endswith("+00:00")


def test_four_concurrent_sessions_progress_together(server):
    """Four sessions each stream a long response at the same time: every one has audio out before any
    finishes, and their deltas interleave."""

    async def one(i: int, arrivals: list, start: asyncio.Event) -> dict:
        async with await Client.connect(server.url) as c:
            await setup(c, max_output_tokens=150)
            await c.send("input_audio_buffer.append", audio=pcm16_b64(tone(0.5, freq=200 + 50 * i)))
            await c.send("input_audio_buffer.commit")
            await c.wait_for("input_audio_buffer.committed")
            await start.wait()
            await c.send("response.create")
            while True:
                ev = await c.recv()
                if isinstance(ev, dict) and ev["type"] == "response.output_audio.delta":
                    arrivals.append((time.monotonic(), i, "audio"))
                elif isinstance(ev, dict) and ev["type"] == "response.done":
                    arrivals.append((time.monotonic(), i, "done"))
                    return ev

    async def go():
        arrivals: list = []
        start = asyncio.Event()
        tasks = [asyncio.create_task(one(i, arrivals, start)) for i in range(4)]
        await asyncio.sleep(0.5)
        start.set()
        dones = await asyncio.gather(*tasks)
        return arrivals, dones

    arrivals, dones = run(go())
    assert all(d["response"]["usage"]["output_tokens"] > 50 for d in dones)
    first_done = min(t for t, _, kind in arrivals if kind == "done")
    for i in range(4):
        first_audio = min(t for t, j, kind in arrivals if j == i and kind == "audio")
        assert first_audio < first_done, f"session {i} had no audio before another session finished"
    # Interleaving: the audio arrival sequence switches between sessions many times.
    order = [j for _, j, kind in sorted(arrivals) if kind == "audio"]
    switches = sum(a != b for a, b in zip(order, order[1:], strict=False))
    assert switches >= 12, switches


def test_sigterm_drains_gracefully(checkpoint_dir):
    """SIGTERM: /ready turns 503, the in-flight response finishes (or is cancelled at the grace deadline),
    the socket closes with 1001, and the process exits 0."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "LFM2AUDIO_API_KEY": "k1,k2", "LFM2AUDIO_LOG_LEVEL": "warning"}
    cmd = [
        sys.executable,
        "-m",
        "lfm2audio_server",
        "--model",
        str(checkpoint_dir),
        "--port",
        str(port),
        "--shutdown-grace",
        "1.5",
        "--max-sessions",
        "2",
        "--max-context",
        "2048",
        "--no-warmup",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if http_get(base + "/ready")[0] == 200:  # public: probes carry no key
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)

        async def go():
            url = f"ws://127.0.0.1:{port}/v1/realtime"
            c = await Client.connect(url, additional_headers={"Authorization": "Bearer k1"})
            await setup(c, max_output_tokens=2000)  # far longer than the grace period
            await c.send(
                "conversation.item.create",
                item={"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
            )
            await c.send("response.create")
            await c.wait_for("response.output_audio.delta")
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            status, body = await asyncio.to_thread(http_get, base + "/ready")
            assert status == 503 and json.loads(body)["draining"] is True
            # New sessions are refused while draining: 503 at the handshake, which balancers retry elsewhere.
            try:
                await Client.connect(url, additional_headers={"Authorization": "Bearer k1"})
            except websockets.InvalidStatus as e:
                assert e.response.status_code == 503
                assert json.loads(e.response.body)["error"]["code"] == "server_shutting_down"
            else:
                raise AssertionError("a session opened while draining")
            try:
                while True:
                    await c.recv()
            except websockets.ConnectionClosed as e:
                assert (e.rcvd.code, e.rcvd.reason) == (1001, "server_shutdown")
            done = c.of("response.done")
            assert len(done) == 1 and done[0]["response"]["status"] in ("cancelled", "completed", "incomplete")
            if done[0]["response"]["status"] == "cancelled":
                assert done[0]["response"]["status_details"]["reason"] == "server_shutdown"
                assert time.monotonic() - t0 >= 1.4  # it had its grace period
            assert c.of("error")[-1]["error"]["code"] == "server_shutting_down"

        run(go())
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
