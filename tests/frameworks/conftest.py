"""The voice-agent frameworks' stock OpenAI Realtime integrations against the real server.

These tests run in their own virtual environment (.venv-frameworks, made by .ci/run: openai-agents,
livekit-agents + livekit-plugins-openai, pipecat-ai, and no torch), with ``--confcutdir tests/frameworks``
so that the project's conftest (which needs torch) is not loaded. The server runs in the project's
environment (``LFM2AUDIO_SERVER_PYTHON``, default .venv/bin/python) as a subprocess on the tiny golden
checkpoint. Each test talks to it through a recording relay, so it can assert on exactly what the
framework sent and on every event the server answered (zero ``error`` events).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(os.environ.get("LFM2AUDIO_GOLDEN", ROOT.parent / "shared" / "golden"))
MAX_OUTPUT_TOKENS = 60  # the server's cap: replies of the tiny random model stay short


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server_url():
    python = os.environ.get("LFM2AUDIO_SERVER_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
    port = _free_port()
    cmd = [
        python, "-m", "lfm2audio_server", "--model", str(GOLDEN / "checkpoint"), "--port", str(port),
        "--max-sessions", "6", "--max-context", "2048", "--max-output-tokens", str(MAX_OUTPUT_TOKENS),
        "--log-level", "warning",
    ]  # fmt: skip
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + 180
    while True:
        try:
            with opener.open(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            log.seek(0)
            raise RuntimeError("the server did not start:\n" + log.read().decode(errors="replace")[-4000:])
        time.sleep(0.25)
    yield f"ws://127.0.0.1:{port}/v1/realtime"
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()


class Relay:
    """A WebSocket relay between a framework and the server that keeps every JSON message of both ways."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.sent: list[dict] = []  # by the framework
        self.received: list[dict] = []  # from the server
        self.url = ""
        self._server = None

    async def __aenter__(self) -> Relay:
        import websockets

        async def handle(client):
            path = client.request.path
            query = path.split("?", 1)[1] if "?" in path else ""
            async with websockets.connect(self.upstream + (f"?{query}" if query else ""), max_size=None) as up:

                async def pipe(src, dst, log):
                    async for msg in src:
                        if isinstance(msg, str):
                            log.append(json.loads(msg))
                        await dst.send(msg)

                tasks = [
                    asyncio.create_task(pipe(client, up, self.sent)),
                    asyncio.create_task(pipe(up, client, self.received)),
                ]
                _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for t in pending:
                    t.cancel()

        self._server = await websockets.serve(handle, "127.0.0.1", 0, max_size=None)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}/v1/realtime"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()
        folder = os.environ.get("LFM2AUDIO_FRAMEWORK_LOG")  # for a look at what a framework sends
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            name = os.environ.get("PYTEST_CURRENT_TEST", "relay").split(" ")[0].replace("/", "_").replace(":", "_")
            events = [e for e in self.sent if e.get("type") != "input_audio_buffer.append"]
            (Path(folder) / f"{name}.json").write_text(json.dumps(events, indent=1))

    def sent_types(self) -> list[str]:
        return [e.get("type") for e in self.sent]

    def of(self, type: str) -> list[dict]:
        return [e for e in self.received if e.get("type") == type]

    async def wait_for(self, type: str, count: int = 1, timeout: float = 60.0, after: int = 0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            got = [e for e in self.received[after:] if e.get("type") == type]
            if len(got) >= count:
                return got[count - 1]
            if time.monotonic() > deadline:
                seen = [e.get("type") for e in self.received[-20:]]
                sent = [e.get("type") for e in self.sent if e.get("type") != "input_audio_buffer.append"][-12:]
                raise AssertionError(f"no {type} (#{count}) within {timeout} s; last events: {seen}; last sent: {sent}")
            await asyncio.sleep(0.02)

    def assert_no_errors(self) -> None:
        errors = self.of("error")
        assert errors == [], f"the server answered errors to what the framework sent: {errors}"


def speech(text: str, rate: int = 24_000, lead_s: float = 0.3, tail_s: float = 1.5) -> bytes:
    """``text`` spoken by espeak-ng as PCM16 mono at ``rate``, with silence around it (so the server
    VAD ends the turn)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is required by these tests: apt-get install -y espeak-ng")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "s.wav"
        subprocess.run([exe, "-v", "en-us", "-s", "150", "-w", str(path), text], check=True, capture_output=True)
        with wave.open(str(path)) as w:
            sr = w.getframerate()
            x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768
    n = int(len(x) * rate / sr)
    x = np.interp(np.linspace(0, len(x) - 1, n), np.arange(len(x)), x)
    x = np.concatenate([np.zeros(int(lead_s * rate)), x, np.zeros(int(tail_s * rate))])
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def chunks(pcm: bytes, rate: int = 24_000, ms: int = 100) -> list[bytes]:
    step = rate * 2 * ms // 1000
    return [pcm[i : i + step] for i in range(0, len(pcm), step)]


@pytest.fixture()
def relay_factory(server_url):
    return lambda: Relay(server_url)

