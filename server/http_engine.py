"""One HTTP request on the batched engine: a slot (queued when all are busy), its events, its metrics.

Every request opens its own engine session (stateless: nothing is kept between requests), runs one
response and closes the session, so HTTP requests and realtime sessions share the same slots and
the same batched steps. When every slot is busy a request waits in a FIFO queue for up to
``http_queue_timeout_s``; past that, or when ``http_max_queue`` requests already wait, it is refused
with 503 and ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.responses import StreamingResponse

from lfm2audio.engine import AudioFrame, EngineError, PoolFullError, ResponseDone, SessionConfig, TextDelta
from lfm2audio_server.logging import session_id_var

log = logging.getLogger("lfm2audio_server.http")


class APIError(Exception):
    """An HTTP error in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        type: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, code, message, param=param)


class SlotQueue:
    """FIFO admission to engine slots for HTTP requests (the head of the queue polls for a free slot)."""

    POLL_S = 0.01

    def __init__(self, max_waiting: int, timeout_s: float) -> None:
        self.max_waiting = max_waiting
        self.timeout_s = timeout_s
        self.waiting = 0
        self._turn = asyncio.Lock()  # asyncio locks wake waiters in FIFO order

    async def open(self, engine: Any, config: SessionConfig) -> Any:
        try:
            return engine.open_session(config)
        except PoolFullError:
            pass
        if self.waiting >= self.max_waiting or self.timeout_s <= 0:
            raise _full(engine)
        self.waiting += 1
        deadline = time.monotonic() + self.timeout_s
        try:
            await asyncio.wait_for(self._turn.acquire(), self.timeout_s)
        except TimeoutError:
            self.waiting -= 1
            raise _full(engine) from None
        try:
            while True:
                try:
                    return engine.open_session(config)
                except PoolFullError:
                    if time.monotonic() >= deadline:
                        raise _full(engine) from None
                    await asyncio.sleep(self.POLL_S)
        finally:
            self.waiting -= 1
            self._turn.release()


def _full(engine: Any) -> APIError:
    return APIError(
        503,
        "session_limit_reached",
        f"all {getattr(engine, 'max_sessions', '?')} engine slots are busy and the queue is full; retry later",
        retry_after=1,
    )


@dataclass
class Outcome:
    """What one response produced, gathered while its events are forwarded."""

    mode: str
    text: list[str] = field(default_factory=list)
    frames: int = 0
    audio: list[np.ndarray] = field(default_factory=list)
    done: ResponseDone | None = None
    started: float = field(default_factory=time.monotonic)
    first_audio: float | None = None

    @property
    def transcript(self) -> str:
        return "".join(self.text)

    @property
    def audio_seconds(self) -> float:
        return self.frames * 0.08


class EngineRequest:
    """An engine session holding one HTTP request's response; ``async with`` closes it.

    ``start`` submits the turn and waits for its first event, so that a turn the engine refuses
    (context limit, bad input) becomes an HTTP error before any response byte is sent.
    """

    def __init__(self, state: Any, config: SessionConfig) -> None:
        self.state = state
        self.config = config
        self.session: Any = None
        self.outcome = Outcome(config.mode)
        self.shutting_down = False
        self._first: Any = None

    async def __aenter__(self) -> EngineRequest:
        state = self.state
        refusal = state.unavailable()
        if refusal is not None:
            raise APIError(503, *refusal, retry_after=1)
        self.session = await http_slots(state).open(state.engine, self.config)
        # This request's log lines carry its engine session id (each request runs in its own task and context).
        session_id_var.set(self.session.id)
        state.http_requests.add(self)  # a draining server waits for these, then cancels them
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.state.http_requests.discard(self)
        if self.session is not None and not self.session.closed:
            self.session.cancel()
            self.session.close()

    def cancel_for_shutdown(self) -> None:
        """End the response within one engine step (the server is shutting down); its stream says so."""
        self.shutting_down = True
        if self.session is not None:
            self.session.cancel()

    def failure(self) -> APIError | None:
        """Why a finished response did not complete normally, if it failed or the server cut it short."""
        done = self.outcome.done
        if self.shutting_down:
            return APIError(503, "server_shutting_down", "the server is shutting down", retry_after=1)
        if done is not None and done.status == "failed":
            return APIError(500, "generation_failed", f"generation failed: {done.reason}")
        return None

    def add_audio(self, pcm: np.ndarray, rate: int) -> None:
        from lfm2audio.engine import EmptyInputError, InputTooLargeError

        try:
            self.session.append_audio(pcm, rate)
            self.session.commit_audio()
        except InputTooLargeError:
            limit = self.state.config.max_input_audio_s
            raise bad_request(f"the audio is longer than this server's limit of {limit:g} s", "file") from None
        except EmptyInputError:
            raise bad_request("the audio is shorter than 10 ms", "file") from None
        except ValueError as e:
            raise bad_request(f"unusable audio: {e}", "file") from None
        self.state.metrics.input_audio.inc(len(pcm) / rate)

    def add_text(self, text: str) -> None:
        self.session.add_text(text)

    async def start(self, max_tokens: int) -> None:
        try:
            self.session.create_response(max_output_tokens=max_tokens)
        except EngineError as e:
            raise APIError(500, e.code, str(e)) from None
        self.outcome.started = time.monotonic()
        first = await self.session.events.aget()
        if isinstance(first, ResponseDone) and not first.text and _refused(first):
            # The engine refused the turn before producing anything: an HTTP error, not an empty answer.
            self._record(first)
            reason = first.reason or first.status
            if reason.startswith("context_limit"):
                msg = f"the request does not fit the context: {reason}"
                raise bad_request(msg, "messages", "context_length_exceeded")
            if reason.startswith("invalid input"):
                raise bad_request(reason, None, "invalid_input")
            raise APIError(500, "generation_failed", f"generation failed: {reason}")
        self._first = first

    async def events(self) -> AsyncIterator[TextDelta | AudioFrame | ResponseDone]:
        """The response's text deltas, sound frames (end-of-audio markers left out) and its ResponseDone."""
        while True:
            if self._first is not None:
                ev, self._first = self._first, None
            else:
                ev = await self.session.events.aget()
            out = self.outcome
            if isinstance(ev, TextDelta):
                if ev.text:
                    out.text.append(ev.text)
                    yield ev
            elif isinstance(ev, AudioFrame):
                if ev.end_of_audio or len(ev.pcm) == 0:
                    continue
                out.frames += 1
                if out.first_audio is None:
                    out.first_audio = time.monotonic()
                self.state.metrics.frames.inc()
                yield ev
            elif isinstance(ev, ResponseDone):
                self._record(ev)
                yield ev
                return

    def _record(self, done: ResponseDone) -> None:
        self.outcome.done = done
        st = done.stats
        log.info(
            "http response %s: %s",
            done.status,
            done.reason,
            extra={
                "mode": self.config.mode,
                "status": done.status,
                "reason": done.reason,
                "text_tokens": st.text_tokens,
                "audio_frames": st.audio_frames,
                "ttfa_s": st.time_to_first_audio_s,
                "duration_s": round(st.duration_s, 3),
            },
        )
        m = self.state.metrics
        m.responses.labels(self.config.mode, done.status).inc()
        if st.text_tokens:
            m.text_tokens.inc(st.text_tokens)
        if st.time_to_first_token_s is not None:
            m.ttft.observe(st.time_to_first_token_s)
        if st.time_to_first_audio_s is not None:
            m.ttfa.observe(st.time_to_first_audio_s)
        if st.real_time_factor is not None:
            m.rtf.observe(st.real_time_factor)


class EngineStream(StreamingResponse):
    """A streamed response that frees its engine session however it ends: finished, client gone (even
    before the body's generator started, when its ``finally`` never runs), or cancelled."""

    def __init__(self, content: Any, run: EngineRequest, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self._run = run

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._run.close()


def _refused(done: ResponseDone) -> bool:
    return done.status == "failed" or (done.reason or "").startswith("context_limit")


def http_slots(state: Any) -> SlotQueue:
    """The app's admission queue (made on first use, inside the server's event loop)."""
    q = getattr(state, "http_slots", None)
    if q is None:
        cfg = state.config
        q = SlotQueue(cfg.http_max_queue, cfg.http_queue_timeout_s)
        state.http_slots = q
    return q


def finish_reason(done: ResponseDone | None) -> str:
    if done is None or done.status == "completed":
        return "stop" if done is None or done.reason != "max_output_tokens" else "length"
    if done.status == "incomplete":
        return "length"
    return "stop"


def usage_tokens(done: ResponseDone | None) -> tuple[int, int, int, int]:
    """(prompt positions, completion tokens, text tokens, audio frames) of a finished response."""
    if done is None:
        return 0, 0, 0, 0
    st = done.stats
    prompt = st.prompt_positions + st.reused_positions
    return prompt, st.text_tokens + st.audio_frames, st.text_tokens, st.audio_frames
