"""The engine in a process of its own, and the stand-in the API worker processes use in its place.

With ``lfm2audio-server --workers N`` one engine process owns the model and steps every session's
batch, and N API worker processes hold the WebSockets, VAD, resampling and Opus (``supervisor.py``
starts them all). Each worker talks to the engine over one Unix socket of its own
(``multiprocessing.connection``: length-prefixed pickled frames, an HMAC handshake with a key only the
server's processes know):

* worker -> engine: ``("open", key, SessionConfig)``, ``("respond", key, response_id, parts, config,
  max_tokens, part_keys, item_key)``, ``("edit", key, edit)``, ``("cancel", key)``, ``("close", key)``,
  ``("force", key, tokens)`` (a test hook), ``("stats", request)``;
* engine -> worker: ``("hello", EngineInfo)`` once, ``("opened", key, slot)`` or ``("open_failed", key,
  message)``, ``("events", [(key, event), ...])`` batched per wake-up, ``("stats", request, dict)``.

A worker's sessions are ordinary ``lfm2audio.engine.Session`` objects whose host is the ``RemoteEngine``:
microphone audio is buffered and resampled in the worker and a user turn crosses once, when its response
is created. The engine process keeps a mirror session (``engine.open_session``) per worker session and
sends its events back in order.

Failure: when the engine process ends, each worker sees its socket close. Every session with a response
in flight gets ``ResponseDone(failed, engine_unavailable)``, every session gets
``SessionEvent(ENGINE_LOST)`` (the server sends an ``error`` event and closes with 1011), and /ready
answers 503. The supervisor then stops the workers and exits non-zero so that the orchestrator
restarts the server (sessions cannot outlive their KV caches anyway). When a worker ends, the engine
closes its sessions (their slots are free at once) and the supervisor starts another worker.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from types import SimpleNamespace
from typing import Any

from lfm2audio.engine import (
    Engine,
    PoolFullError,
    ResponseDone,
    ResponseStats,
    Session,
    SessionConfig,
    SessionEvent,
)
from lfm2audio.engine.session import HistoryEdit, UserPart

log = logging.getLogger("lfm2audio_server.engine_process")

ENGINE_LOST = "engine_lost"  # SessionEvent kind: the engine process ended; the session cannot go on
REPLY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class EngineInfo:
    """What a worker needs to know of the engine it talks to."""

    max_sessions: int
    max_input_seconds: float
    detokenizer: bool  # the checkpoint ships the LFM2.5 detokenizer (named voices)
    pid: int


# Engine process -------------------------------------------------------------------------------------


class _Forward:
    """A mirror session's event queue: what the engine puts goes to the worker that owns the session."""

    def __init__(self, link: _WorkerLink, key: int) -> None:
        self.link, self.key = link, key

    def put(self, event: Any) -> None:
        self.link.post((self.key, event))


class _WorkerLink:
    """One API worker's connection, in the engine process: its mirror sessions and their events."""

    def __init__(self, engine: Engine, conn: Connection, info: EngineInfo) -> None:
        self.engine, self.conn, self.info = engine, conn, info
        self.mirrors: dict[int, Session] = {}
        self._out: deque[tuple[int, Any]] = deque()
        self._wake = threading.Event()
        self._closed = False
        self._send_lock = threading.Lock()

    def start(self) -> None:
        self._send(("hello", self.info))
        threading.Thread(target=self._read, name="lfm2audio-link-read", daemon=True).start()
        threading.Thread(target=self._write, name="lfm2audio-link-write", daemon=True).start()

    def post(self, item: tuple[int, Any]) -> None:
        self._out.append(item)
        self._wake.set()

    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self.conn.send(msg)

    def _write(self) -> None:
        # Events go out in batches: one frame for everything the engine emitted since the last wake-up.
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            batch = []
            while self._out:
                batch.append(self._out.popleft())
            if batch:
                try:
                    self._send(("events", batch))
                except (OSError, ValueError):
                    break

    def _read(self) -> None:
        try:
            while True:
                try:
                    msg = self.conn.recv()
                except (EOFError, OSError):
                    break
                try:
                    self._handle(msg)
                except Exception:
                    log.exception("engine process: a worker's request failed: %r", msg[:2])
        finally:
            self._closed = True
            self._wake.set()
            for mirror in self.mirrors.values():
                mirror.close()  # the worker is gone: its slots are free at once
            self.mirrors.clear()
            self.conn.close()
            log.info("an API worker disconnected")

    def _handle(self, msg: tuple) -> None:
        kind, key = msg[0], msg[1]
        if kind == "open":
            try:
                mirror = self.engine.open_session(msg[2])
            except PoolFullError as e:
                self._send(("open_failed", key, str(e)))
                return
            mirror.events = _Forward(self, key)  # type: ignore[assignment]
            self.mirrors[key] = mirror
            self._send(("opened", key, mirror.slot))
        elif kind == "stats":
            stats = {"active_sessions": self.engine.active_sessions, "steps": self.engine.steps}
            self._send(("stats", key, stats))
        elif kind == "close":
            mirror = self.mirrors.pop(key, None)
            if mirror is not None:
                mirror.close()
        else:
            mirror = self.mirrors.get(key)
            if mirror is None:
                return  # closed meanwhile
            if kind == "respond":
                _, _, response_id, parts, config, max_tokens, part_keys, item_key = msg
                mirror.mark_responding(response_id)
                self.engine.submit_response(
                    mirror, response_id, parts, config, max_tokens, part_keys=part_keys, item_key=item_key
                )
            elif kind == "edit":
                self.engine.submit_edit(mirror, msg[2])
            elif kind == "cancel":
                self.engine.cancel_response(mirror)
            elif kind == "force":
                self.engine.force_text_tokens(mirror, msg[2])


def serve_engine(engine: Engine, listener: Listener, info: EngineInfo) -> None:
    """Accept API workers forever (the engine process's main loop); each gets a link of its own."""
    while True:
        try:
            conn = listener.accept()
        except (OSError, EOFError, AuthenticationError) as e:  # a client that failed the handshake
            log.warning("engine process: refused a connection: %s", e)
            continue
        _WorkerLink(engine, conn, info).start()
        log.info("an API worker connected")


def engine_info(engine: Engine, pid: int) -> EngineInfo:
    return EngineInfo(
        max_sessions=engine.max_sessions,
        max_input_seconds=engine.config.max_input_seconds,
        detokenizer=getattr(engine.processor, "detokenizer_path", None) is not None,
        pid=pid,
    )


# API worker -----------------------------------------------------------------------------------------


class RemoteEngine:
    """The engine process, as an API worker sees it: what the server uses of an ``Engine`` (sessions,
    slots, the checkpoint's voice style) and the ``SessionHost`` its sessions talk to."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        msg = conn.recv()
        if msg[0] != "hello":
            raise RuntimeError(f"unexpected first message from the engine process: {msg[0]!r}")
        self.info: EngineInfo = msg[1]
        # voice_style() reads processor.detokenizer_path: the engine's checkpoint decides it.
        self.processor = SimpleNamespace(detokenizer_path="remote" if self.info.detokenizer else None)
        self._keys = itertools.count(1)
        self._sessions: dict[int, Session] = {}
        self._key_of: dict[str, int] = {}
        self._replies: dict[int, tuple[threading.Event, list]] = {}
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._alive = True
        self._reader = threading.Thread(target=self._read, name="lfm2audio-engine-link", daemon=True)
        self._reader.start()

    @classmethod
    def connect(cls, address: str, authkey: bytes, *, timeout: float = 3600.0) -> RemoteEngine:
        """Connect to the engine process at ``address``, waiting for it to listen (it does once warm)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return cls(Client(address, family="AF_UNIX", authkey=authkey))
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    # What the server uses of an engine -----------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def max_sessions(self) -> int:
        return self.info.max_sessions

    @property
    def active_sessions(self) -> int:
        return int(self._stats()["active_sessions"])

    @property
    def steps(self) -> int:
        return int(self._stats()["steps"])

    def start(self) -> RemoteEngine:
        return self

    def warmup(self) -> None:
        """The engine process warms up before it accepts workers."""

    def stop(self) -> None:
        self._alive = False
        try:
            self._conn.close()
        except OSError:
            pass

    def open_session(self, config: SessionConfig | None = None) -> Session:
        config = config or SessionConfig()
        key = next(self._keys)
        reply = self._call(("open", key, config), key)
        if reply[0] == "open_failed":
            raise PoolFullError(reply[2])
        session = Session(self, reply[2], config, self.info.max_input_seconds)
        with self._lock:
            self._sessions[key] = session
            self._key_of[session.id] = key
        if not self._alive:  # the engine ended while the session was being opened
            self._lost(session)
        return session

    def force_text_tokens(self, session: Session, tokens: list[int]) -> None:
        self._post(("force", self._key(session), [int(t) for t in tokens]))

    # SessionHost ----------------------------------------------------------------------------------

    def submit_response(
        self,
        session: Session,
        response_id: str,
        parts: list[UserPart],
        config: SessionConfig,
        max_tokens: int,
        *,
        part_keys: list[str | None] | None = None,
        item_key: str | None = None,
    ) -> None:
        if not self._alive:
            self._lost(session)
            return
        self._post(("respond", self._key(session), response_id, parts, config, max_tokens, part_keys, item_key))

    def submit_edit(self, session: Session, edit: HistoryEdit) -> None:
        self._post(("edit", self._key(session), edit))

    def cancel_response(self, session: Session) -> None:
        self._post(("cancel", self._key(session)))

    def close_session(self, session: Session) -> threading.Event:
        with self._lock:
            key = self._key_of.pop(session.id, None)
            if key is not None:
                self._sessions.pop(key, None)
        if key is not None:
            self._post(("close", key))
        done = threading.Event()
        done.set()  # the engine frees the slot as soon as it reads this (before any later open of ours)
        return done

    # Plumbing -------------------------------------------------------------------------------------

    def _key(self, session: Session) -> int:
        with self._lock:
            return self._key_of.get(session.id, -1)

    def _post(self, msg: tuple) -> None:
        if not self._alive:
            return
        try:
            with self._send_lock:
                self._conn.send(msg)
        except (OSError, ValueError):
            pass  # the reader sees the end and reports it

    def _call(self, msg: tuple, key: int) -> tuple:
        flag: tuple[threading.Event, list] = (threading.Event(), [])
        with self._lock:
            self._replies[key] = flag
        self._post(msg)
        if not flag[0].wait(REPLY_TIMEOUT_S) or not flag[1]:
            with self._lock:
                self._replies.pop(key, None)
            raise PoolFullError("the engine process is not answering")
        return flag[1][0]

    def _stats(self) -> dict:
        key = next(self._keys)
        return self._call(("stats", key), key)[2]

    def _read(self) -> None:
        try:
            while True:
                try:
                    msg = self._conn.recv()
                except (EOFError, OSError):
                    break
                if msg[0] == "events":
                    for key, ev in msg[1]:
                        self._deliver(key, ev)
                    del msg
                else:
                    with self._lock:
                        waiter = self._replies.pop(msg[1], None)
                    if waiter is not None:
                        waiter[1].append(msg)
                        waiter[0].set()
        finally:
            was_alive, self._alive = self._alive, False
            with self._lock:
                sessions = list(self._sessions.values())
                waiters = list(self._replies.values())
                self._replies.clear()
            for flag, _ in waiters:
                flag.set()
            if was_alive:
                log.error("the engine process ended: %d sessions lose their conversation", len(sessions))
                for session in sessions:
                    self._lost(session)

    def _deliver(self, key: int, event: Any) -> None:
        # A method of its own: a loop variable of the reader would keep the last session alive after it closed.
        with self._lock:
            session = self._sessions.get(key)
        if session is None:
            return
        if isinstance(event, ResponseDone):
            session.mark_idle()
        session.events.put(event)

    @staticmethod
    def _lost(session: Session) -> None:
        response_id = session.response_id
        if response_id is not None:
            session.mark_idle()
            session.events.put(ResponseDone(response_id, "failed", "engine_unavailable", "", ResponseStats()))
        session.events.put(SessionEvent(ENGINE_LOST, "the engine process ended"))
