"""The FastAPI app: /v1/realtime (WebSocket), the HTTP audio API (/v1/audio/*, /v1/chat/completions,
/v1/models; http_api.py), /health, /ready, /metrics, and the web client at /."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response

from lfm2audio.engine import Engine, EngineConfig, PoolFullError
from lfm2audio.engine.cpu_tuning import load_without_team
from lfm2audio_server import protocol as P
from lfm2audio_server.auth import Authenticator, find_key, offered_subprotocols, select_subprotocol
from lfm2audio_server.config import ServerConfig
from lfm2audio_server.connection import RealtimeConnection
from lfm2audio_server.logging import install_log_filters, session_id_var
from lfm2audio_server.metrics import Metrics
from lfm2audio_server.protocol import CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_TRY_AGAIN, ProtocolError
from lfm2audio_server.voices import voice_style

log = logging.getLogger("lfm2audio_server")

# /ready is public: load balancers and orchestrators probe it without keys (its body shows details
# only to authenticated callers).
PUBLIC_PATHS = {"/health", "/ready"}


def default_engine_factory(config: ServerConfig) -> Engine:
    import torch

    dtype = None if config.dtype is None else getattr(torch, config.dtype)
    engine_config = EngineConfig(
        max_sessions=config.max_sessions,
        max_context=config.max_context,
        prefill_chunk=config.prefill_chunk,
        audio_decoder=config.audio_decoder,  # type: ignore[arg-type]
        max_input_seconds=config.max_input_audio_s,
        threads=config.threads or None,
    )

    def load() -> Engine:
        if config.quantize is None:
            return Engine.from_pretrained(config.model, device=config.device, dtype=dtype, config=engine_config)
        # Engine.from_pretrained takes no quantize argument: load the quantized model here.
        from lfm2audio import LFM2AudioModel, LFM2AudioProcessor

        model = LFM2AudioModel.from_pretrained(
            config.model, device=config.device, dtype=dtype, quantize=config.quantize
        )
        processor = LFM2AudioProcessor.from_pretrained(config.model, device=model.device, quantize=config.quantize)
        return Engine(model, processor, engine_config)

    # Loaded on a thread that leaves no OpenMP team behind: the engine thread's parallel ops stay fast.
    engine = load_without_team(load)
    # What is alive now (imports, the model's modules, the tokenizer: ~330K objects with the full-size
    # model) lives as long as the process: out of the collector's sight, a full collection no longer
    # rescans it. Such a collection holds the GIL, so it stalled the engine thread and every session's
    # audio ~105 ms each time (2-core Xeon); now it scans only what serving created since. Loading's
    # cyclic garbage is collected first (frozen, it would never be).
    gc.collect()
    gc.freeze()
    return engine


class ServerState:
    """What the app shares between connections."""

    def __init__(self, config: ServerConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.auth = Authenticator(config.api_keys)
        self.engine: Engine | None = None
        self.owns_engine = False
        self.ready = False
        self.load_error: str | None = None
        self.draining = False
        self.connections: set[RealtimeConnection] = set()
        self.http_requests: set[Any] = set()  # HTTP API responses in flight (http_engine.EngineRequest)
        self.model_name = Path(config.model).name if Path(config.model).exists() else config.model
        self._drained: asyncio.Event | None = None
        self._hurry = False

    def hurry(self) -> None:
        """Cut a drain's grace period short (a second signal)."""
        self._hurry = True

    @property
    def serving(self) -> bool:
        """Ready, and the engine is there (an engine in another process may have ended)."""
        return self.ready and self.engine is not None and getattr(self.engine, "alive", True)

    def unavailable(self) -> tuple[str, str] | None:
        """Why new sessions and requests are refused now, as (error code, message); None when they are not."""
        if self.draining:
            return "server_shutting_down", "the server is shutting down"
        if self.ready and not self.serving:
            return "engine_unavailable", "the engine process ended; retry shortly"
        if not self.serving:
            return "model_not_ready", "the model is still loading; retry shortly"
        return None

    def set_ready(self, ready: bool) -> None:
        self.ready = ready
        self.metrics.ready.set(1 if ready else 0)

    async def drain(self, grace: float | None = None) -> None:
        """Graceful shutdown: refuse new sessions, let in-flight responses finish within ``grace``
        seconds, cancel the rest, then close every socket with 1001."""
        if self._drained is not None:
            await self._drained.wait()
            return
        self._drained = asyncio.Event()
        grace = self.config.shutdown_grace_s if grace is None else grace
        self.draining = True
        self.set_ready(False)
        log.info("draining: %d sessions, grace %.1f s", len(self.connections), grace)
        deadline = time.monotonic() + grace

        def busy() -> bool:
            return any(c.responding for c in self.connections) or bool(self.http_requests)

        while busy() and time.monotonic() < deadline:
            if self._hurry:
                break
            await asyncio.sleep(0.05)
        for c in list(self.connections):
            c.cancel_response("server_shutdown")
        for r in list(self.http_requests):
            r.cancel_for_shutdown()
        deadline = time.monotonic() + 2.0
        while busy() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for c in list(self.connections):
            c.shutdown()
        deadline = time.monotonic() + 3.0
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        log.info("drained; %d sessions left", len(self.connections))
        self._drained.set()


def create_app(
    config: ServerConfig | None = None,
    *,
    engine: Engine | None = None,
    engine_factory: Callable[[ServerConfig], Engine] | None = None,
    metrics: Metrics | None = None,
) -> FastAPI:
    """The server app. With ``engine`` (already started) the app uses it and leaves it running at
    shutdown; otherwise it builds one with ``engine_factory`` (default: ``Engine.from_pretrained``)
    in the background, starts and warms it up, and /ready says so."""
    config = config or ServerConfig()
    state = ServerState(config, metrics or Metrics())
    install_log_filters()

    async def load() -> None:
        try:
            eng = await asyncio.to_thread((engine_factory or default_engine_factory), config)
            await asyncio.to_thread(eng.start)
            state.engine, state.owns_engine = eng, True
            if config.warmup:
                await asyncio.to_thread(eng.warmup)
            state.set_ready(True)
            log.info("model ready", extra={"model": config.model})
        except Exception as e:
            state.load_error = f"{type(e).__name__}: {e}"
            log.exception("model failed to load")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = None
        if engine is not None:
            engine.start()
            state.engine = engine
            state.set_ready(True)
        else:
            loader = asyncio.create_task(load())
        try:
            yield
        finally:
            await state.drain()
            if loader is not None and not loader.done():
                loader.cancel()
            if state.owns_engine and state.engine is not None:
                await asyncio.to_thread(state.engine.stop)

    app = FastAPI(title="lfm2audio-server", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    if config.allowed_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "api-key", "Content-Type"],
        )

    static_dir = config.resolved_static_dir()

    @app.middleware("http")
    async def require_key(request: Request, call_next):
        path = request.url.path
        # The web client's files are public; the API (/v1/...) and /metrics never are.
        public = path in PUBLIC_PATHS or (static_dir is not None and path != "/metrics" and not path.startswith("/v1/"))
        if request.method == "OPTIONS" and "access-control-request-method" in request.headers:
            public = True  # a CORS preflight carries no key; the CORS middleware answers it
        if state.auth.enabled and not public:
            key = find_key(request.headers, request.query_params)
            if not state.auth.check(key):
                state.metrics.errors.labels("invalid_api_key").inc()
                body = {"error": P.error_object(_invalid_key())}
                return JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> JSONResponse:
        serving = state.serving
        body: dict[str, Any] = {"ready": serving, "draining": state.draining}
        if state.auth.check(find_key(request.headers, request.query_params)):
            body.update(model=config.model, sessions=len(state.connections), max_sessions=config.max_sessions)
            info = getattr(state.engine, "info", None)  # an engine process (--workers)
            if info is not None:
                body["engine_pid"] = info.pid
            if state.load_error:
                body["error"] = state.load_error
            elif state.ready and not serving:
                body["error"] = "the engine process ended"
        return JSONResponse(body, status_code=200 if serving else 503)

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    from lfm2audio_server import http_api

    http_api.install(app)

    @app.websocket("/v1/realtime")
    async def realtime(ws: WebSocket) -> None:
        await handle_realtime(ws, state)

    if static_dir is not None:
        from starlette.staticfiles import StaticFiles

        app.mount("/", StaticFiles(directory=str(static_dir), html=True), name="web")

    return app


async def _refuse(ws: WebSocket, subprotocol: str | None, state: ServerState, code: int, err: ProtocolError) -> None:
    """A client-side problem (key, origin): accept only to say why, then close with ``code``.
    Browsers see neither the status nor the body of a refused handshake, but they do see a close reason."""
    _count_refusal(state, err)
    await _accept_to_close(ws, subprotocol, code, err)


async def _unavailable(
    ws: WebSocket, subprotocol: str | None, state: ServerState, code: int, err: ProtocolError
) -> None:
    """A server-side condition (draining, loading, full): answer the upgrade request with HTTP 503, a JSON
    error body and Retry-After, so that a load balancer retries another replica (nginx/ingress
    ``proxy_next_upstream http_503``). Without the ASGI denial-response extension: accept, send the error
    event, close with ``code``."""
    _count_refusal(state, err)
    body = {"error": P.error_object(err)}
    try:
        await ws.send_denial_response(JSONResponse(body, status_code=503, headers={"Retry-After": "1"}))
        return
    except RuntimeError:
        pass
    await _accept_to_close(ws, subprotocol, code, err)


async def _accept_to_close(ws: WebSocket, subprotocol: str | None, code: int, err: ProtocolError) -> None:
    """Accept the WebSocket only to send ``err`` as an error event and close with ``code``."""
    try:
        await ws.accept(subprotocol=subprotocol)
        await ws.send_json(P.error_event(err))
        await ws.close(code, err.code)
    except Exception:
        pass


def _invalid_key() -> ProtocolError:
    return ProtocolError("invalid_api_key", "missing or invalid API key")


def _count_refusal(state: ServerState, err: ProtocolError) -> None:
    state.metrics.refused.labels(err.code).inc()
    state.metrics.errors.labels(err.code).inc()
    log.info("connection refused: %s", err.code, extra={"error_code": err.code})


# A connection that finds the server full waits this long for a slot that is being freed (a client that
# closed and reconnects at once can otherwise beat its old connection's teardown by a few milliseconds).
FULL_GRACE_S = 0.5


def _live_sessions(state: ServerState) -> int:
    """Realtime sessions that hold a slot (one tearing down has freed its engine slot already)."""
    return sum(not c.ending for c in state.connections)


async def _open_session(state: ServerState):
    """An engine session for a new connection, or None when the server stays full for FULL_GRACE_S."""
    assert state.engine is not None
    deadline = time.monotonic() + FULL_GRACE_S
    while True:
        if _live_sessions(state) < state.config.max_sessions:
            try:
                return state.engine.open_session()
            except PoolFullError:
                pass
        if time.monotonic() >= deadline:
            return None
        await asyncio.sleep(0.01)


async def handle_realtime(ws: WebSocket, state: ServerState) -> None:
    cfg = state.config
    offered = offered_subprotocols(ws.headers)
    subprotocol = select_subprotocol(offered)

    origin = ws.headers.get("origin")
    allowed = cfg.allowed_origins
    if allowed and origin is not None and origin not in allowed and "*" not in allowed:
        err = ProtocolError("origin_not_allowed", f"origin {origin!r} is not allowed")
        await _refuse(ws, subprotocol, state, CLOSE_POLICY, err)
        return
    if not state.auth.check(find_key(ws.headers, ws.query_params, offered)):
        await _refuse(ws, subprotocol, state, CLOSE_POLICY, _invalid_key())
        return
    refusal = state.unavailable()
    if refusal is not None:
        code, message = refusal
        close = CLOSE_GOING_AWAY if code == "server_shutting_down" else CLOSE_TRY_AGAIN
        await _unavailable(ws, subprotocol, state, close, ProtocolError(code, message, type="server_error"))
        return
    full = ProtocolError(
        "session_limit_reached",
        f"the server is at its limit of {cfg.max_sessions} concurrent sessions; retry later",
        type="server_error",
    )
    session = await _open_session(state)
    if session is None:
        await _unavailable(ws, subprotocol, state, CLOSE_TRY_AGAIN, full)
        return

    conn = RealtimeConnection(
        ws, session, cfg, state.metrics, model_name=state.model_name, draining=lambda: state.draining,
        voice_style=voice_style(state.engine), open_session=state.engine.open_session,
    )
    state.connections.add(conn)
    state.metrics.active_sessions.inc()
    state.metrics.sessions.inc()
    token = session_id_var.set(session.id)
    try:
        try:
            await ws.accept(subprotocol=subprotocol)
        except Exception:
            session.close()
            return
        await conn.run()
    finally:
        session_id_var.reset(token)
        state.connections.discard(conn)
        state.metrics.active_sessions.dec()
