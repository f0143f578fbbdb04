"""SIGTERM with HTTP API responses in flight: a streamed speech keeps its grace period, then ends with a
``server_shutting_down`` error event; new requests get 503 with Retry-After; the process exits 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2 as httpx

REPO = Path(__file__).resolve().parents[2]
AUTH = {"Authorization": "Bearer k1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_http_responses(tts_checkpoint_dir):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "LFM2AUDIO_API_KEY": "k1", "LFM2AUDIO_LOG_LEVEL": "warning"}
    cmd = [sys.executable, "-m", "lfm2audio_server", "--model", str(tts_checkpoint_dir), "--port", str(port)]
    cmd += ["--shutdown-grace", "1.0", "--max-sessions", "2", "--max-context", "2048", "--no-warmup"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)

        # Far longer than the grace period: 2000 steps of speech.
        body = {
            "input": "A long story.",
            "voice": "alloy",
            "response_format": "pcm",
            "stream_format": "sse",
            "lfm2audio": {"max_tokens": 2000, "sampling": {"audio": {"temperature": 0}}},
        }
        events = []
        with httpx.stream("POST", base + "/v1/audio/speech", json=body, headers=AUTH, timeout=60) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    break
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            refused = httpx.post(base + "/v1/audio/speech", json=body, headers=AUTH, timeout=10)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert refused.json()["error"]["code"] == "server_shutting_down"
            for line in lines:
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        assert events[0]["type"] == "speech.audio.delta"
        assert len(events) > 5, "the response went on during the grace period"
        assert events[-1] == {
            "type": "error",
            "error": {
                "message": "the server is shutting down",
                "type": "server_error",
                "param": None,
                "code": "server_shutting_down",
            },
        }
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
