"""Server-side turn detection (``server_vad``) with Silero VAD.

One Silero model is shared by every session: it is used through its stateless
inner network (``_model(windows_with_context, states)``), each session keeping its
own 64-sample context and recurrent state, so sessions never disturb each other.
The network takes a batch of streams (one row of input and one slice of state each), so the
server runs one forward per tick for every session's pending window (``VadBatcher``, on one
dedicated thread, never on the event loop) instead of a thread round trip per session per 32 ms.

Semantics follow OpenAI's ``server_vad``: speech starts when a 32 ms window's
speech probability reaches ``threshold``; the ``prefix_padding_ms`` of audio
before it is kept; speech stops after ``silence_duration_ms`` of windows whose
probability is below ``threshold - 0.15`` (hysteresis, as in Silero's own iterator).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16_000
WINDOW = 512  # 32 ms, what Silero takes at 16 kHz
CONTEXT = 64
HYSTERESIS = 0.15


def _single_threaded() -> None:
    """Run this thread's torch ops on one core (Silero is tiny; intra-op parallelism only costs barrier
    waits, badly so on busy machines); threads started later keep torch's default."""
    from lfm2audio.engine.cpu_tuning import use_threads_here

    use_threads_here(1)


# Runs a StreamingVad's synchronous ``feed`` off the event loop (tests, tools); the server uses VAD_BATCHER.
VAD_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lfm2audio-vad", initializer=_single_threaded)

_model = None
_model_lock = threading.Lock()


def load_model():
    """The shared Silero network (loaded once; importing silero_vad must not change torch's thread count)."""
    global _model
    with _model_lock:
        if _model is None:
            import torch

            threads = torch.get_num_threads()
            try:
                from silero_vad import load_silero_vad

                jit = load_silero_vad(onnx=False)
            finally:
                if torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)  # silero_vad sets it to 1 at import
            _model = jit._model
        return _model


@dataclass(frozen=True)
class VadParams:
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500


@dataclass(frozen=True)
class SpeechStarted:
    audio_start_ms: int


@dataclass(frozen=True)
class SpeechStopped:
    audio_end_ms: int


@dataclass(frozen=True)
class SpeechAudio:
    """Audio (16 kHz float32) that belongs to the user's turn: send it to the model."""

    pcm: np.ndarray


VadOutput = SpeechStarted | SpeechStopped | SpeechAudio


class StreamingVad:
    """Feed 16 kHz mono float32 audio in any chunk sizes; get speech boundaries and turn audio, in order.

    Not thread-safe: one caller at a time (a session awaits each ``feed``).
    """

    def __init__(self, params: VadParams) -> None:
        self.params = params
        self._model = load_model()
        self.reset()

    def reset(self) -> None:
        import torch

        self._state = torch.zeros((2, 1, 128))
        self._context = torch.zeros((1, CONTEXT))
        self._pending = np.zeros(0, dtype=np.float32)
        self._prefix: deque[np.ndarray] = deque()
        self._prefix_samples = 0
        self.speaking = False
        self._silence = 0
        self.samples = 0  # 16 kHz samples seen since the session started (pending excluded)
        self.last_prob = 0.0

    def _windows(self, pcm: np.ndarray) -> list[np.ndarray]:
        """The whole 32 ms windows ``pcm`` completes (the rest waits for the next feed)."""
        buf = np.concatenate([self._pending, np.asarray(pcm, dtype=np.float32)])
        n = len(buf) // WINDOW * WINDOW
        self._pending = buf[n:]
        return [buf[i : i + WINDOW] for i in range(0, n, WINDOW)]

    def feed(self, pcm: np.ndarray) -> list[VadOutput]:
        """Feed audio, running the network here (this stream alone)."""
        windows = self._windows(pcm)
        return self._decide(windows, [forward_batch(self._model, [self], [w])[0] for w in windows])

    async def feed_batched(self, pcm: np.ndarray, batcher: VadBatcher) -> list[VadOutput]:
        """Feed audio, its windows' probabilities computed by ``batcher`` together with other streams'."""
        windows = self._windows(pcm)
        return self._decide(windows, await batcher.probs(self, windows) if windows else [])

    def _decide(self, windows: list[np.ndarray], probs: list[float]) -> list[VadOutput]:
        p = self.params
        out: list[VadOutput] = []
        audio: list[np.ndarray] = []
        prefix_max = p.prefix_padding_ms * SAMPLE_RATE // 1000
        silence_max = p.silence_duration_ms * SAMPLE_RATE // 1000
        for window, prob in zip(windows, probs, strict=True):
            self.last_prob = prob
            start = self.samples
            self.samples += WINDOW
            if not self.speaking:
                if prob >= p.threshold:
                    self.speaking = True
                    self._silence = 0
                    begin = start - self._prefix_samples
                    out.append(SpeechStarted(audio_start_ms=max(0, begin) * 1000 // SAMPLE_RATE))
                    audio.extend(self._prefix)
                    audio.append(window)
                    self._prefix.clear()
                    self._prefix_samples = 0
                else:
                    self._prefix.append(window)
                    self._prefix_samples += WINDOW
                    while self._prefix and self._prefix_samples - len(self._prefix[0]) >= prefix_max:
                        self._prefix_samples -= len(self._prefix.popleft())
                    if prefix_max == 0:
                        self._prefix.clear()
                        self._prefix_samples = 0
                continue
            audio.append(window)
            if prob < max(p.threshold - HYSTERESIS, 0.01):
                self._silence += WINDOW
                if self._silence >= silence_max:
                    self.speaking = False
                    self._silence = 0
                    out.append(SpeechAudio(np.concatenate(audio)))
                    audio = []
                    out.append(SpeechStopped(audio_end_ms=self.samples * 1000 // SAMPLE_RATE))
            else:
                self._silence = 0
        if audio:
            out.append(SpeechAudio(np.concatenate(audio)))
        return out

    def end_turn(self) -> None:
        """Forget the current utterance (after a manual commit or a clear); model state is kept."""
        self.speaking = False
        self._silence = 0
        self._prefix.clear()
        self._prefix_samples = 0


def forward_batch(model, streams: list[StreamingVad], windows: list[np.ndarray]) -> list[float]:
    """One forward of the network for one window of each of ``streams`` (distinct streams): their speech
    probabilities; each stream's context and recurrent state advance as if it had run alone."""
    import torch

    x = torch.from_numpy(np.stack(windows))
    with torch.inference_mode():
        context = torch.cat([s._context for s in streams]) if len(streams) > 1 else streams[0]._context
        state = torch.cat([s._state for s in streams], dim=1) if len(streams) > 1 else streams[0]._state
        out, state = model(torch.cat([context, x], dim=1), state)
    probs = out[:, 0].tolist()
    for i, s in enumerate(streams):
        s._state = state[:, i : i + 1].clone()
        s._context = x[i : i + 1, -CONTEXT:].clone()
    return probs


@dataclass(eq=False)  # compared by identity
class _Request:
    stream: StreamingVad
    windows: list[np.ndarray]
    probs: list[float]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future


class VadBatcher:
    """Speech probabilities for many streams, one network forward per tick.

    Sessions ask for their new windows' probabilities (``await probs(...)``); the batcher's thread takes
    every request waiting, runs one forward on the next window of each, and repeats while windows are
    left (a request of k windows takes k ticks, sharing each with whatever else arrived). Requests
    that arrive during a forward wait for the next tick: under load the batch grows, not the number of
    forwards. When the thread wakes with nothing left over, it waits ``gather_s`` first, so that the
    windows of sessions streaming at the same time (each completes one every 32 ms, at its own phase)
    share a forward instead of arriving one by one. A stream has at most one request in flight (its
    session awaits each feed).
    """

    def __init__(self, gather_s: float = 0.008) -> None:
        self.gather_s = gather_s
        self._cond = threading.Condition()
        self._queue: list[_Request] = []
        self._thread: threading.Thread | None = None
        self.forwards = 0  # ticks run (for benchmarks and tests)
        self.windows = 0  # windows scored

    async def probs(self, stream: StreamingVad, windows: list[np.ndarray]) -> list[float]:
        loop = asyncio.get_running_loop()
        request = _Request(stream, windows, [], loop, loop.create_future())
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lfm2audio-vad-batch", daemon=True)
                self._thread.start()
            self._queue.append(request)
            self._cond.notify()
        return await request.future

    def _run(self) -> None:
        _single_threaded()
        model = load_model()
        active: list[_Request] = []
        while True:
            with self._cond:
                while not self._queue and not active:
                    self._cond.wait()
            if not active and self.gather_s > 0:
                time.sleep(self.gather_s)  # a fresh tick: let the other sessions' windows arrive
            with self._cond:
                active.extend(self._queue)
                self._queue.clear()
            batch: list[_Request] = []
            seen: set[int] = set()
            for r in active:  # one window per stream per forward
                if id(r.stream) not in seen:
                    seen.add(id(r.stream))
                    batch.append(r)
            try:
                probs = forward_batch(model, [r.stream for r in batch], [r.windows[len(r.probs)] for r in batch])
            except Exception as e:  # noqa: BLE001 - a failed forward fails its requests, not the thread
                for r in batch:
                    _deliver(r, error=e)
                active = [r for r in active if r not in batch]
                continue
            self.forwards += 1
            self.windows += len(batch)
            for r, prob in zip(batch, probs, strict=True):
                r.probs.append(prob)
                if len(r.probs) == len(r.windows):
                    _deliver(r)
            active = [r for r in active if len(r.probs) < len(r.windows)]


def _deliver(r: _Request, error: Exception | None = None) -> None:
    def settle() -> None:
        if not r.future.done():  # the session may have gone (its task cancelled)
            if error is not None:
                r.future.set_exception(error)
            else:
                r.future.set_result(r.probs)

    try:
        r.loop.call_soon_threadsafe(settle)
    except RuntimeError:
        pass  # that event loop is closed


# The server's batcher (its thread starts with the first request).
VAD_BATCHER = VadBatcher()
