"""A session's microphone buffer: audio at any rate in, 16 kHz float32 out, resampled as it arrives."""

from __future__ import annotations

import numpy as np

from lfm2audio.engine.config import MAX_INPUT_SAMPLE_RATE, MIN_INPUT_SAMPLE_RATE
from lfm2audio.engine.events import InputTooLargeError
from lfm2audio.tokens import INPUT_SAMPLE_RATE


class InputAudioBuffer:
    """Microphone audio at 16 kHz, resampled incrementally as chunks arrive."""

    def __init__(self, max_seconds: float) -> None:
        self.max_samples = int(max_seconds * INPUT_SAMPLE_RATE)
        self._chunks: list[np.ndarray] = []
        self._samples = 0
        self._rate: int | None = None
        self._resampler = None

    @property
    def samples(self) -> int:
        return self._samples

    def append(self, pcm: np.ndarray, sample_rate: int) -> None:
        pcm = as_float_mono(pcm)
        lo, hi = MIN_INPUT_SAMPLE_RATE, MAX_INPUT_SAMPLE_RATE
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or not lo <= sample_rate <= hi:
            raise ValueError(f"sample_rate must be an integer from {lo} to {hi}, got {sample_rate!r}")
        if not np.isfinite(pcm).all():
            raise ValueError("audio samples must be finite numbers (found NaN or infinity)")
        if sample_rate != self._rate:
            self._flush_resampler()
            self._rate = sample_rate
            if sample_rate != INPUT_SAMPLE_RATE:
                import soxr

                self._resampler = soxr.ResampleStream(sample_rate, INPUT_SAMPLE_RATE, 1, dtype="float32")
        out = self._resampler.resample_chunk(pcm) if self._resampler is not None else pcm
        if self._samples + len(out) > self.max_samples:
            raise InputTooLargeError(
                f"input audio buffer would exceed {self.max_samples / INPUT_SAMPLE_RATE:.0f} s; commit or clear it"
            )
        self._chunks.append(np.asarray(out, dtype=np.float32))
        self._samples += len(out)

    def _flush_resampler(self) -> None:
        if self._resampler is not None:
            tail = self._resampler.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
            if len(tail):
                self._chunks.append(np.asarray(tail, dtype=np.float32))
                self._samples += len(tail)
        self._resampler = None

    def take(self) -> np.ndarray:
        """All buffered audio (16 kHz float32), leaving the buffer empty."""
        self._flush_resampler()
        self._rate = None
        wave = np.concatenate(self._chunks) if self._chunks else np.zeros(0, dtype=np.float32)
        self.clear()
        return wave

    def clear(self) -> None:
        self._chunks, self._samples = [], 0
        self._resampler, self._rate = None, None


def as_float_mono(pcm: np.ndarray) -> np.ndarray:
    """Mono float32 in [-1, 1] from float or int16 samples ((samples,) or (channels, samples))."""
    pcm = np.asarray(pcm)
    if pcm.ndim == 2:
        pcm = pcm.astype(np.float32).mean(0) if pcm.dtype != np.int16 else pcm.mean(0).astype(np.int16)
    if pcm.ndim != 1:
        raise ValueError(f"audio must be (samples,) or (channels, samples), got shape {pcm.shape}")
    if pcm.dtype == np.int16:
        return pcm.astype(np.float32) / 32768.0
    if not np.issubdtype(pcm.dtype, np.floating):
        raise ValueError(f"audio must be float or int16, got {pcm.dtype}")
    return pcm.astype(np.float32, copy=False)
