"""Helpers of every test that talks to a server: a real server (uvicorn in a thread) on 127.0.0.1, the
engine it runs (the real one, on the tiny golden checkpoints), and real speech.

Speech comes from espeak-ng (``apt-get install espeak-ng``), which these tests require rather than skip
without. The fixtures built on these (``engine``, ``server``, ``tts_engine``, ...) are in conftest.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

TIMEOUT = 60.0


class LiveServer:
    """``lfm2audio_server``'s app served by uvicorn in a thread, on a socket bound to a free port of
    127.0.0.1; a context manager (started on entry, stopped on exit)."""

    def __init__(self, app: Any, config: Any, *, sndbuf: int | None = None) -> None:
        import uvicorn

        from lfm2audio_server.uvicorn_server import uvicorn_config

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if sndbuf is not None:  # accepted sockets inherit it: lets a test fill the pipe quickly
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.app = app
        self.state = app.state.server
        self.server = uvicorn.Server(uvicorn_config(app, config, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)

    @property
    def url(self) -> str:
        """The realtime WebSocket."""
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(TIMEOUT)
        self.sock.close()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, whatever *_proxy says


def http_get(url: str, headers: dict | None = None, *, timeout: float = 30.0) -> tuple[int, bytes]:
    """GET with the standard library: (status, body), HTTP errors included."""
    try:
        with _NO_PROXY.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def serve(engine: Any, **overrides: Any) -> LiveServer:
    """A server on ``engine`` (already started; left running) with ``ServerConfig`` ``overrides``."""
    from lfm2audio_server.app import create_app
    from lfm2audio_server.config import ServerConfig

    config = ServerConfig(model="golden-tiny", **overrides)
    return LiveServer(create_app(config, engine=engine), config)


# LFM2AUDIO_TEST_ENGINE=process: the engines the server tests use run in a process of their own, as with
# ``lfm2audio-server --workers N`` (server/engine_process.py); the test process is then the API worker.
ENGINE_MODE = os.environ.get("LFM2AUDIO_TEST_ENGINE", "thread")


class EngineProcess:
    """An engine process for tests: the ``RemoteEngine`` an API worker uses (attributes are its), plus
    a local processor (tests decode token ids with it) and ``stop()``, which ends the process."""

    def __init__(self, checkpoint: Path, *, max_sessions: int, warmup: bool) -> None:
        from devices import DEVICE, DTYPE

        from lfm2audio import LFM2AudioProcessor
        from lfm2audio_server.config import ServerConfig
        from lfm2audio_server.engine_process import RemoteEngine
        from lfm2audio_server.supervisor import EngineProcess as ServerEngineProcess

        dtype = None if DTYPE is None else str(DTYPE).removeprefix("torch.")
        config = ServerConfig(
            model=str(checkpoint), device=str(DEVICE), dtype=dtype, max_sessions=max_sessions, max_context=2048,
            warmup=warmup, log_level="warning",
        )  # fmt: skip
        self.engine_process = ServerEngineProcess(config, daemon=True)
        self.remote = RemoteEngine.connect(
            self.engine_process.address, self.engine_process.authkey, timeout=TIMEOUT * 3
        )
        self.processor = LFM2AudioProcessor.from_pretrained(checkpoint, device="cpu")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.remote, name)

    def stop(self) -> None:
        self.remote.stop()
        self.engine_process.stop(TIMEOUT)


def start_engine(checkpoint: Path, *, max_sessions: int, warmup: bool = True) -> Any:
    from devices import DEVICE, DTYPE

    from lfm2audio.engine import Engine, EngineConfig

    if ENGINE_MODE == "process":
        return EngineProcess(checkpoint, max_sessions=max_sessions, warmup=warmup)
    config = EngineConfig(max_sessions=max_sessions, max_context=2048)
    engine = Engine.from_pretrained(checkpoint, device=DEVICE, dtype=DTYPE, config=config)
    engine.start()
    if warmup:
        engine.warmup()
    return engine


def tts_checkpoint(checkpoint_dir: Path, checkpoint_tts_dir: Path, folder: Path) -> Path:
    """checkpoint/ with checkpoint_tts/'s weights: its greedy TTS stream produces audio frames."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in checkpoint_dir.iterdir():
        if p.name not in ("model.safetensors", "config.json"):
            (folder / p.name).symlink_to(p)
    for name in ("model.safetensors", "config.json"):
        (folder / name).symlink_to(checkpoint_tts_dir / name)
    return folder


def espeak(text: str, path: Path, *, lead_s: float = 0.0, tail_s: float = 0.0, rate: int | None = None) -> Path:
    """``text`` spoken by espeak-ng into a 16-bit mono WAV at ``path``, with silence before and after.

    ``rate`` resamples (soxr) to that rate; the default keeps espeak-ng's 22050 Hz.
    """
    from lfm2audio_client.audio import read_wav, resample, to_mono, write_wav

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError("espeak-ng is required by these tests: apt-get install -y espeak-ng")
    raw = path.with_suffix(".espeak.wav")
    subprocess.run([exe, "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True, capture_output=True)
    samples, sr = read_wav(raw)
    raw.unlink()
    x = to_mono(samples)
    if rate is not None and rate != sr:
        x, sr = resample(x, sr, rate), rate
    x = np.concatenate([np.zeros(int(lead_s * sr), np.float32), x, np.zeros(int(tail_s * sr), np.float32)])
    write_wav(path, x, sr)
    return path
