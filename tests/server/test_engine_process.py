"""``lfm2audio-server --workers N``: the engine in a process of its own, API workers beside it.

Real subprocesses on the tiny golden checkpoint: turns through two workers, a worker that dies is
replaced, and killing the engine mid-turn gives each session an error event and a close, turns
/ready to 503 and ends the server with a non-zero status (server/supervisor.py documents why).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client as SocketClient
from pathlib import Path

import pytest
from rt_client import TIMEOUT, Client, run

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from bench_load import ServerProcess  # noqa: E402
from live_server import http_get  # noqa: E402


def _ready(server: ServerProcess) -> tuple[int, dict]:
    status, body = http_get(f"http://127.0.0.1:{server.port}/ready")
    return status, json.loads(body)


def _all_ready(server: ServerProcess) -> dict:
    """/ready of every worker: each connects to the engine on its own, so wait for 200s in a row."""
    deadline, streak = time.monotonic() + TIMEOUT, 0
    while streak < 10:
        status, body = _ready(server)
        streak = streak + 1 if status == 200 else 0
        assert time.monotonic() < deadline, f"/ready answered {status}: {body}"
        time.sleep(0.02)
    return body


def _children(pid: int) -> set[int]:
    """The processes the server started (multiprocessing's resource tracker left out)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmdline:
            out.add(int(stat.parent.name))
    return out


def _engine_socket(engine_pid: int) -> str:
    """The Unix socket the engine process listens on (its fds, matched in /proc/net/unix)."""
    inodes = set()
    for fd in Path(f"/proc/{engine_pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 8 and fields[6] in inodes and fields[7].endswith("engine.sock"):
            return fields[7]
    raise AssertionError("the engine process listens on no engine.sock")


async def _text_turn(url: str, text: str = "Hello there") -> dict:
    async with await Client.connect(url) as c:
        await c.wait_for("session.created")
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}
        await c.send("conversation.item.create", item=item)
        await c.send("response.create", response={"max_output_tokens": 12})
        return await c.wait_for("response.done")


@pytest.fixture
def server(checkpoint_dir: Path, tmp_path: Path):
    extra = ["--workers", "2", "--log-level", "info"]
    with ServerProcess(checkpoint_dir, max_sessions=4, extra=extra, log=tmp_path / "server.log") as s:
        yield s


def test_turns_through_two_workers_and_a_dead_worker_is_replaced(server: ServerProcess):
    body = _all_ready(server)
    assert body["ready"] and body["engine_pid"] in _children(server.pid)
    for _ in range(3):
        done = run(_text_turn(server.url))
        assert done["response"]["status"] in ("completed", "incomplete")
    # A client without the server's key is refused, and the engine goes on accepting its workers.
    with pytest.raises(AuthenticationError):
        SocketClient(_engine_socket(body["engine_pid"]), family="AF_UNIX", authkey=b"not the key")
    workers = _children(server.pid) - {body["engine_pid"]}
    assert len(workers) == 2
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        now = _children(server.pid) - {body["engine_pid"]}
        if victim not in now and len(now) == 2:
            break
        time.sleep(0.2)
    assert victim not in now and len(now) == 2, "the supervisor did not replace the dead worker"
    # The engine freed the dead worker's slots; every worker serves (the new one once connected).
    _all_ready(server)
    for _ in range(4):
        done = run(_text_turn(server.url))
        assert done["response"]["status"] in ("completed", "incomplete")
    assert server.proc is not None and server.proc.poll() is None


def test_killing_the_engine_mid_turn_fails_sessions_turns_ready_503_and_exits_non_zero(server: ServerProcess):
    engine_pid = _all_ready(server)["engine_pid"]

    async def scenario() -> tuple[Client, Client]:
        idle = await Client.connect(server.url)
        await idle.wait_for("session.created")
        busy = await Client.connect(server.url)
        await busy.wait_for("session.created")
        item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Tell me a story"}]}
        await busy.send("conversation.item.create", item=item)
        await busy.send("response.create", response={"max_output_tokens": 2000})
        await busy.wait_for("response.output_audio_transcript.delta")
        os.kill(engine_pid, signal.SIGKILL)
        for c in (busy, idle):
            err = await c.wait_for("error")
            assert err["error"]["code"] == "engine_unavailable"
            assert err["error"]["type"] == "server_error"
            await c.ws.wait_closed()
            assert c.ws.close_code == 1011
        done = busy.of("response.done")
        assert len(done) == 1 and done[0]["response"]["status"] == "failed"
        return busy, idle

    run(scenario())
    status, body = _ready(server)
    assert status == 503 and body["ready"] is False and "engine" in body["error"]
    # The HTTP API says the same (not "still loading").
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/v1/audio/speech",
        data=json.dumps({"model": "lfm2-audio", "input": "Hello", "voice": "alloy"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=TIMEOUT)
    assert refused.value.code == 503
    assert json.loads(refused.value.read())["error"]["code"] == "engine_unavailable"
    assert server.proc is not None
    assert server.proc.wait(30) == 1  # for the orchestrator to restart the server
