"""A short soak (issue 13): for about a minute, concurrent clients open sessions, stream audio, take
responses, cancel them, drop the TCP connection mid-response, stop reading or just connect and go.
Afterwards the server holds no session (``lfm2audio_active_sessions`` 0, every engine slot free), and
the process's resident memory and open files are back within a bound of where they started.

``LFM2AUDIO_SOAK_SECONDS`` changes the length (default 60).
"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import re
import time
from collections import Counter

import websockets
from hostile import ErrorLog, StrictClient, dead_reader, talk
from live_server import LiveServer, http_get
from rt_client import pcm16_b64, run, setup, tone

from lfm2audio_server.app import create_app
from lfm2audio_server.config import ServerConfig

SECONDS = float(os.environ.get("LFM2AUDIO_SOAK_SECONDS", "60"))
WORKERS = 6
RSS_BOUND_MB = 150  # growth allowed over the whole soak (allocator caches, first-use buffers)
FD_BOUND = 8


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        kb = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))  # type: ignore[union-attr]
    return kb / 1024


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


CHUNK = pcm16_b64(tone(0.1))


async def _stream(c: StrictClient, seconds: float) -> None:
    for _ in range(int(seconds / 0.1)):
        await c.send("input_audio_buffer.append", audio=CHUNK)


async def _episode(url: str, port: int, rng: random.Random, stats: Counter) -> None:
    kind = rng.choice(["turn", "abort_mid_response", "abort_streaming", "cancel", "connect_only", "dead_reader"])
    if kind == "dead_reader":
        ws = await dead_reader(port, url, talk("Go on and on.", 400))
        await asyncio.sleep(rng.uniform(0.5, 5.0))  # past the server's send timeout at times
        ws.transport.abort()
        stats[kind] += 1
        return
    c = await StrictClient.connect(url)
    try:
        await setup(c, max_output_tokens=rng.choice([4, 16, 64]))
        if kind == "connect_only":
            pass
        elif kind == "abort_streaming":
            await _stream(c, rng.uniform(0.1, 1.0))
            c.ws.transport.abort()
        else:
            await _stream(c, rng.uniform(0.2, 1.0))
            await c.send("input_audio_buffer.commit")
            await c.send("response.create")
            if kind == "turn":
                done = await c.wait_for("response.done", timeout=120)
                assert done["response"]["status"] in ("completed", "incomplete")
            elif kind == "cancel":
                await c.wait_for("response.created")
                await c.send("response.cancel")
                done = await c.wait_for("response.done", timeout=120)
                assert done["response"]["status"] in ("cancelled", "completed", "incomplete")
            else:
                await c.wait_for("response.created")
                await asyncio.sleep(rng.uniform(0, 0.3))
                c.ws.transport.abort()
        stats[kind] += 1
    finally:
        await c.close()


async def _worker(url: str, port: int, seed: int, until: float, stats: Counter) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        try:
            await _episode(url, port, rng, stats)
        except websockets.InvalidStatus as e:  # full for a moment: dead readers hold slots until dropped
            assert e.response.status_code == 503
            stats["refused_503"] += 1
            await asyncio.sleep(0.2)


def _active_sessions(http: str) -> float:
    status, body = http_get(http + "/metrics")
    assert status == 200
    m = re.search(rb"^lfm2audio_active_sessions (\S+)$", body, re.M)
    assert m is not None
    return float(m.group(1))


def test_soak(engine):
    config = ServerConfig(model="golden-tiny", idle_timeout_s=3.0, send_timeout_s=3.0, max_session_s=30.0)
    with LiveServer(create_app(config, engine=engine), config, sndbuf=8192) as s, ErrorLog() as log:

        async def warm() -> None:  # first-use allocations are not leaks
            stats: Counter = Counter()
            for seed in range(3):
                await _worker(s.url, s.port, seed, time.monotonic() + 1.0, stats)

        run(warm())
        time.sleep(1.0)
        gc.collect()
        rss0, fd0 = _rss_mb(), _fds()
        stats: Counter = Counter()
        t0 = time.monotonic()

        async def soak() -> None:
            until = time.monotonic() + SECONDS
            await asyncio.gather(*(_worker(s.url, s.port, 100 + i, until, stats) for i in range(WORKERS)))

        run(soak())
        elapsed = time.monotonic() - t0
        deadline = time.monotonic() + 15
        while (s.state.connections or engine.active_sessions) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not s.state.connections
        assert engine.active_sessions == 0
        assert _active_sessions(s.http) == 0
        gc.collect()
        rss1, fd1 = _rss_mb(), _fds()
    sessions = sum(v for k, v in stats.items() if k != "refused_503")
    print(
        f"\nsoak: {elapsed:.0f} s, {WORKERS} workers, {sessions} sessions {dict(stats)}; "
        f"RSS {rss0:.0f} -> {rss1:.0f} MB, fds {fd0} -> {fd1}"
    )
    assert sessions >= 20
    assert rss1 - rss0 < RSS_BOUND_MB, f"RSS grew {rss1 - rss0:.0f} MB"
    assert fd1 - fd0 <= FD_BOUND, f"{fd1 - fd0} file descriptors more than before"
    assert log.lines() == []
