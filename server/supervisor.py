"""``lfm2audio-server --workers N``: one engine process, N API worker processes, and this supervisor.

The supervisor binds the port, starts the engine process (it loads the model, warms up, then listens
on a private Unix socket) and N API workers that share the listening socket (the kernel spreads
connections over them; each worker connects to the engine when it is ready, and its /ready answers
503 until then). It then watches them:

* a worker that ends is replaced (the engine has closed its sessions and freed their slots);
* when the engine process ends, the workers tell their sessions (an ``engine_unavailable`` error
  event, close 1011) and /ready answers 503; after ``ENGINE_LOSS_GRACE_S`` the supervisor stops the
  workers and exits with status 1, for the orchestrator (Docker, Kubernetes, systemd) to restart the
  whole server: sessions cannot outlive the engine's caches, so restarting it in place would save
  nothing and hide the failure;
* SIGTERM / SIGINT: the workers drain (``shutdown_grace_s``), then the engine stops; status 0.
  A second signal cuts the workers' grace short.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from multiprocessing.connection import Listener
from typing import Any

from lfm2audio_server.config import ServerConfig

log = logging.getLogger("lfm2audio_server.supervisor")

# The engine process's threads (engine, prepare, the workers' links) hand the GIL over this often when
# they contend, not every 5 ms (Python's default): a user's turn prepared beside a busy engine thread got
# its first audio sooner (bench_load, 32 users: p95 time to first audio 1.05-1.11 s against 1.34-1.68 s).
GIL_SWITCH_S = 0.0005
ENGINE_LOSS_GRACE_S = 2.0  # the workers' time to tell their clients before they are stopped
POLL_S = 0.2


def engine_main(config: ServerConfig, address: str, authkey: bytes) -> None:
    """The engine process: load, warm up, then serve the API workers until terminated."""
    from lfm2audio_server.app import default_engine_factory
    from lfm2audio_server.engine_process import engine_info, serve_engine
    from lfm2audio_server.logging import configure_logging

    configure_logging(config.log_level)
    sys.setswitchinterval(GIL_SWITCH_S)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the supervisor decides
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    engine = default_engine_factory(config)
    engine.start()
    if config.warmup:
        engine.warmup()
    listener = Listener(address, family="AF_UNIX", authkey=authkey)
    log.info("engine process ready", extra={"pid": os.getpid(), "max_sessions": config.max_sessions})
    serve_engine(engine, listener, engine_info(engine, os.getpid()))


def worker_main(config: ServerConfig, address: str, authkey: bytes, sock: socket.socket) -> None:
    """An API worker: the realtime and HTTP server on the shared socket, its engine in the engine process."""
    from lfm2audio_server.app import create_app
    from lfm2audio_server.engine_process import RemoteEngine
    from lfm2audio_server.logging import configure_logging
    from lfm2audio_server.uvicorn_server import GracefulServer, uvicorn_config

    configure_logging(config.log_level)
    app = create_app(config, engine_factory=lambda _c: RemoteEngine.connect(address, authkey))
    server = GracefulServer(uvicorn_config(app, config), app.state.server)
    server.run(sockets=[sock])


def bind(config: ServerConfig) -> socket.socket:
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((config.host, config.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class EngineProcess:
    """The engine process (``engine_main``), the private socket it will listen on and its key."""

    def __init__(self, config: ServerConfig, *, daemon: bool = False) -> None:
        self.run_dir = tempfile.mkdtemp(prefix="lfm2audio-")  # mode 0700: only this user reaches the socket
        self.address = os.path.join(self.run_dir, "engine.sock")
        self.authkey = secrets.token_bytes(32)
        self.process = multiprocessing.get_context("spawn").Process(
            target=engine_main, args=(config, self.address, self.authkey), name="lfm2audio-engine", daemon=daemon
        )
        self.process.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate the process (killed if it does not end within ``timeout``) and remove its socket."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
        shutil.rmtree(self.run_dir, ignore_errors=True)


def run(config: ServerConfig) -> int:
    """Serve with ``config.workers`` API workers and an engine process; returns the exit status."""
    ctx = multiprocessing.get_context("spawn")
    sock = bind(config)
    signals: list[int] = []
    previous = {s: signal.signal(s, lambda n, _f: signals.append(n)) for s in (signal.SIGTERM, signal.SIGINT)}

    engine_process = EngineProcess(config)
    engine = engine_process.process

    def start_worker(i: int) -> Any:
        args = (config, engine_process.address, engine_process.authkey, sock)
        w = ctx.Process(target=worker_main, args=args, name=f"lfm2audio-worker-{i}")
        w.start()
        return w

    workers = [start_worker(i) for i in range(config.workers)]
    log.info(
        "supervisor started",
        extra={"engine_pid": engine.pid, "worker_pids": [w.pid for w in workers], "port": config.port},
    )
    status = 0
    try:
        while not signals:
            if not engine.is_alive():
                log.error("the engine process exited (status %s): stopping the server", engine.exitcode)
                time.sleep(ENGINE_LOSS_GRACE_S)
                status = 1
                break
            for i, w in enumerate(workers):
                if not w.is_alive():
                    log.warning("API worker %d exited (status %s): starting another", i, w.exitcode)
                    workers[i] = start_worker(i)
            time.sleep(POLL_S)
        _stop_workers(workers, config, signals)
    finally:
        engine_process.stop()
        sock.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    log.info("supervisor stopped", extra={"status": status})
    return status


def _stop_workers(workers: list[Any], config: ServerConfig, signals: list[int]) -> None:
    """SIGTERM every worker (each drains), a second one when a second signal comes, kill what is left."""
    seen = len(signals)
    for w in workers:
        if w.is_alive():
            os.kill(w.pid, signal.SIGTERM)
    deadline = time.monotonic() + config.shutdown_grace_s + 15.0
    while any(w.is_alive() for w in workers) and time.monotonic() < deadline:
        if len(signals) > seen:  # a second signal: pass it on (no more grace)
            seen = len(signals)
            for w in workers:
                if w.is_alive():
                    os.kill(w.pid, signal.SIGTERM)
        time.sleep(0.05)
    for w in workers:
        if w.is_alive():
            w.kill()
        w.join(5)
