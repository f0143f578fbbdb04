"""Server-side turn detection (``server_vad``) with Silero VAD.

One Silero model is shared by every session: it is used through its stateless
inner network (``_model(window_with_context, state)``), each session keeping its
own 64-sample context and recurrent state, so sessions never disturb each other.
Inference runs on one dedicated thread (see ``VAD_EXECUTOR``), never on the event loop.

Semantics follow OpenAI's ``server_vad``: speech starts when a 32 ms window's
speech probability reaches ``threshold``; the ``prefix_padding_ms`` of audio
before it is kept; speech stops after ``silence_duration_ms`` of windows whose
probability is below ``threshold - 0.15`` (hysteresis, as in Silero's own iterator).
"""

from __future__ import annotations

import threading
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
    waits, badly so on busy machines). torch.set_num_threads also sets the default of threads created
    later (the engine's); a helper thread puts that default back, leaving this thread at 1."""
    import torch

    default = torch.get_num_threads()
    torch.set_num_threads(1)
    helper = threading.Thread(target=torch.set_num_threads, args=(default,))
    helper.start()
    helper.join()


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

    def _prob(self, window: np.ndarray) -> float:
        import torch

        x = torch.from_numpy(window)[None]
        with torch.inference_mode():
            out, self._state = self._model(torch.cat([self._context, x], dim=1), self._state)
        self._context = x[:, -CONTEXT:]
        return float(out.item())

    def feed(self, pcm: np.ndarray) -> list[VadOutput]:
        p = self.params
        buf = np.concatenate([self._pending, np.asarray(pcm, dtype=np.float32)])
        n = len(buf) // WINDOW * WINDOW
        self._pending = buf[n:]
        out: list[VadOutput] = []
        audio: list[np.ndarray] = []
        prefix_max = p.prefix_padding_ms * SAMPLE_RATE // 1000
        silence_max = p.silence_duration_ms * SAMPLE_RATE // 1000
        for i in range(0, n, WINDOW):
            window = buf[i : i + WINDOW]
            prob = self._prob(window)
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
