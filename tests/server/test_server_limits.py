"""Limits: message size, buffered input audio, idle timeout, session duration, sessions, backpressure."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
import websockets
from live_server import LiveServer, serve
from rt_client import TIMEOUT, Client, pcm16_b64, run, setup, tone

from lfm2audio_server.app import create_app
from lfm2audio_server.config import ServerConfig


async def _closed(c: Client) -> tuple[int | None, str | None]:
    """Read until the server closes; the close code and reason."""
    try:
        while True:
            await c.recv()
    except websockets.ConnectionClosed as e:
        return (e.rcvd.code, e.rcvd.reason) if e.rcvd else (None, None)


def test_message_size_soft_and_hard_limits(engine):
    with serve(engine, max_message_bytes=64 * 1024) as s:

        async def go():
            async with await Client.connect(s.url, max_size=None) as c:
                await setup(c)
                big = json.dumps({"type": "input_audio_buffer.append", "audio": "A" * 80_000})
                await c.send_raw(big)
                err = await c.wait_for("error")
                assert err["error"]["code"] == "message_too_large"
                await c.send("input_audio_buffer.append", audio=pcm16_b64(tone(0.3)))  # still fine
                await c.send("input_audio_buffer.commit")
                await c.wait_for("input_audio_buffer.committed")
                # Beyond twice the limit the WebSocket layer closes with 1009 (message too big).
                await c.send_raw(b"\x00" * 140_000)
                code, _ = await _closed(c)
                assert code == 1009

        run(go())


def test_max_input_audio(engine):
    with serve(engine, max_input_audio_s=1.0) as s:

        async def go():
            async with await Client.connect(s.url) as c:
                await setup(c, max_output_tokens=4)
                await c.send("input_audio_buffer.append", audio=pcm16_b64(tone(0.8)))
                await c.send("input_audio_buffer.append", audio=pcm16_b64(tone(0.8)))
                err = await c.wait_for("error")
                assert err["error"]["code"] == "input_audio_buffer_full"
                await c.send("input_audio_buffer.commit")  # what fitted is committed
                await c.wait_for("input_audio_buffer.committed")
                await c.send("response.create")
                done = await c.wait_for("response.done")
                assert done["response"]["status"] in ("completed", "incomplete")

        run(go())


def test_idle_timeout(engine):
    with serve(engine, idle_timeout_s=0.6) as s:

        async def go():
            async with await Client.connect(s.url) as c:
                await c.wait_for("session.created")
                t0 = time.monotonic()
                code, reason = await _closed(c)
                assert (code, reason) == (1008, "idle_timeout")
                assert 0.5 <= time.monotonic() - t0 < 5
                assert c.of("error")[-1]["error"]["code"] == "idle_timeout"

        run(go())


def test_max_session_duration(engine):
    with serve(engine, max_session_s=1.0) as s:

        async def go():
            async with await Client.connect(s.url) as c:
                await setup(c)
                # Keep the session busy (not idle) until it expires.
                for _ in range(20):
                    await c.send("input_audio_buffer.clear")
                    await asyncio.sleep(0.1)
                    if c.ws.close_code is not None:
                        break
                code, reason = await _closed(c)
                assert (code, reason) == (1008, "session_expired")
                assert c.of("error")[-1]["error"]["code"] == "session_expired"

        run(go())


def test_max_sessions(engine):
    with serve(engine, max_sessions=2) as s:

        async def go():
            a = await Client.connect(s.url)
            b = await Client.connect(s.url)
            await a.wait_for("session.created")
            await b.wait_for("session.created")
            # Refused at the handshake with 503 + a JSON error (load balancers retry another replica).
            with pytest.raises(websockets.InvalidStatus) as e:
                await Client.connect(s.url)
            assert e.value.response.status_code == 503
            assert e.value.response.headers["Retry-After"] == "1"
            assert json.loads(e.value.response.body)["error"]["code"] == "session_limit_reached"
            await a.close()
            for _ in range(100):  # the slot frees when the server has seen the close
                if len(s.state.connections) < 2:
                    break
                await asyncio.sleep(0.02)
            d = await Client.connect(s.url)
            await d.wait_for("session.created")
            await b.close()
            await d.close()

        run(go())


def test_slow_reader_is_dropped(engine):
    """A client that stops reading: the bounded send queue overflows, or a write stays blocked past the
    send timeout (on a loaded machine the queue may fill slower than that), and the server drops it."""
    config = ServerConfig(
        model="golden-tiny", send_queue_max_messages=32, send_queue_max_bytes=256 * 1024, send_timeout_s=3.0
    )
    with LiveServer(create_app(config, engine=engine), config, sndbuf=4096) as s:

        async def go():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", s.port))
            ws = await websockets.connect(s.url, sock=sock, max_queue=1, open_timeout=TIMEOUT)
            await ws.send(
                json.dumps(
                    {
                        "type": "session.update",
                        "session": {"max_output_tokens": 1500, "audio": {"input": {"turn_detection": None}}},
                    }
                )
            )
            await ws.send(
                json.dumps(
                    {
                        "type": "conversation.item.create",
                        "item": {
                            "type": "message",
                            "role": "user",
                            "content": [{"type": "input_text", "text": "Talk"}],
                        },
                    }
                )
            )
            await ws.send(json.dumps({"type": "response.create"}))
            # Never read. The server must drop us and free the session.
            state = s.state
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                if not state.connections:
                    break
            assert not state.connections, "the slow client was not dropped"
            metrics = state.metrics.render().decode()
            assert (
                'lfm2audio_errors_total{code="send_queue_overflow"} 1.0' in metrics
                or 'lfm2audio_errors_total{code="send_timeout"} 1.0' in metrics
            )
            sock.close()

        run(go())
