"""Log-mel features matching NeMo's ``AudioToMelSpectrogramPreprocessor`` in eval mode.

The pipeline is: pre-emphasis -> centred STFT -> power spectrum -> Slaney mel
filterbank -> log -> per-feature normalisation over the valid frames -> frames
past the valid length set to ``pad_value``. Everything runs in float32, whatever
the dtype of the input or of the module, because the reference does the same and
the features are sensitive to low precision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lfm2audio.config import PreprocessorConfig

# Added before the log so that silent bins stay finite.
LOG_GUARD = 2.0**-24
# Added to the per-feature std so that constant features do not divide by zero.
STD_EPS = 1e-5


def _hz_to_mel(hz: Tensor) -> Tensor:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    linear = hz / f_sp
    log = min_log_mel + torch.log(hz / min_log_hz) / logstep
    return torch.where(hz >= min_log_hz, log, linear)


def _mel_to_hz(mel: Tensor) -> Tensor:
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    linear = f_sp * mel
    log = min_log_hz * torch.exp(logstep * (mel - min_log_mel))
    return torch.where(mel >= min_log_mel, log, linear)


def slaney_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> Tensor:
    """Triangular mel filters (n_mels, n_fft // 2 + 1), as ``librosa.filters.mel(htk=False, norm='slaney')``.

    Computed in float64 and rounded to float32 at the same two points as librosa
    (the triangles are stored into a float32 array, then scaled in place), so the
    result is bit-identical to the reference filterbank.
    """
    f64 = torch.float64
    fft_freqs = torch.arange(n_fft // 2 + 1, dtype=f64) * (1.0 / (n_fft * (1.0 / sample_rate)))
    # numpy.linspace semantics (start + i * step, last point exactly the end).
    lo, hi = _hz_to_mel(torch.tensor(float(fmin), dtype=f64)), _hz_to_mel(torch.tensor(float(fmax), dtype=f64))
    n_points = n_mels + 2
    mels = lo + torch.arange(n_points, dtype=f64) * ((hi - lo) / (n_points - 1))
    mels[-1] = hi
    band_edges = _mel_to_hz(mels)

    widths = band_edges[1:] - band_edges[:-1]
    ramps = band_edges[:, None] - fft_freqs[None, :]
    rising = -ramps[:-2] / widths[:-1, None]
    falling = ramps[2:] / widths[1:, None]
    weights = torch.clamp(torch.minimum(rising, falling), min=0.0).to(torch.float32)
    # Slaney normalisation: each filter has (approximately) unit area.
    area_norm = 2.0 / (band_edges[2:] - band_edges[:-2])
    return (weights.to(f64) * area_norm[:, None]).to(torch.float32)


class LogMelFeatures(nn.Module):
    """Waveforms (B, samples) at ``cfg.sample_rate`` -> normalised log-mel (B, n_mels, 1 + samples // hop).

    Inference only: the reference's dither is applied in training mode alone, so
    it is never applied here.
    """

    def __init__(self, cfg: PreprocessorConfig) -> None:
        super().__init__()
        if cfg.frame_splicing != 1:
            raise ValueError(f"preprocessor.frame_splicing: only 1 is supported, got {cfg.frame_splicing}")
        if cfg.normalize != "per_feature":
            raise ValueError(f"preprocessor.normalize: only 'per_feature' is supported, got {cfg.normalize!r}")
        window_fn = getattr(torch, f"{cfg.window}_window", None)
        if window_fn is None:
            raise ValueError(f"preprocessor.window: unknown window {cfg.window!r}")
        self.sample_rate = cfg.sample_rate
        # int() truncates, as NeMo does (0.025 s * 16 kHz = 400 samples).
        self.win_length = int(cfg.window_size * cfg.sample_rate)
        self.hop_length = int(cfg.window_stride * cfg.sample_rate)
        self.n_fft = cfg.n_fft or 2 ** math.ceil(math.log2(self.win_length))
        self.n_mels = cfg.features
        self.log = cfg.log
        self.preemph = cfg.preemph
        self.pad_to = cfg.pad_to
        self.pad_value = float(cfg.pad_value)
        # Symmetric window; torch.stft centres it inside n_fft.
        self.register_buffer("window", window_fn(self.win_length, periodic=False), persistent=False)
        fb = slaney_mel_filterbank(cfg.sample_rate, self.n_fft, cfg.features, 0.0, cfg.sample_rate / 2)
        self.register_buffer("filterbank", fb, persistent=False)

    def num_frames(self, samples: Tensor) -> Tensor:
        """Valid feature frames for ``samples`` input samples (the STFT itself yields one more)."""
        return torch.div(samples, self.hop_length, rounding_mode="floor").to(torch.int64)

    @torch.no_grad()
    def forward(self, wave: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """wave (B, samples) float, lengths (B,) int -> (features (B, n_mels, frames), valid frames (B,))."""
        if wave.dim() != 2:
            raise ValueError(f"wave must have shape (batch, samples), got {tuple(wave.shape)}")
        if not wave.is_floating_point():
            raise ValueError(f"wave must be a floating point tensor, got {wave.dtype}")
        lengths = torch.as_tensor(lengths, device=wave.device)
        if lengths.dim() != 1 or lengths.shape[0] != wave.shape[0]:
            raise ValueError(f"lengths must have shape ({wave.shape[0]},), got {tuple(lengths.shape)}")
        if lengths.is_floating_point() or lengths.is_complex():
            raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")
        if lengths.numel() and (lengths.min() < 0 or lengths.max() > wave.shape[1]):
            raise ValueError(f"lengths must lie in [0, {wave.shape[1]}], got {lengths.tolist()}")

        x = wave.to(torch.float32)
        lengths = lengths.to(torch.int64)
        frames = self.num_frames(lengths)

        if self.preemph:
            # Samples past each row's length are zeroed so padding never leaks into the last frames.
            x = torch.cat([x[:, :1], x[:, 1:] - self.preemph * x[:, :-1]], dim=1)
            in_range = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
            x = x.masked_fill(~in_range, 0.0)

        spec = torch.stft(
            x,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            win_length=self.win_length,
            window=self.window.to(torch.float32),
            center=True,
            pad_mode="constant",
            return_complex=True,
        )
        # Magnitude first, then squared: the same rounding as the reference's power spectrum.
        power = torch.view_as_real(spec).pow(2).sum(-1).sqrt().pow(2.0)
        x = torch.matmul(self.filterbank.to(torch.float32), power)
        if self.log:
            x = torch.log(x + LOG_GUARD)

        valid = torch.arange(x.shape[-1], device=x.device)[None, :] < frames[:, None]  # (B, T)
        x = self._normalize(x, valid, frames)
        x = x.masked_fill(~valid[:, None, :], self.pad_value)
        if self.pad_to > 0 and x.shape[-1] % self.pad_to:
            x = F.pad(x, (0, self.pad_to - x.shape[-1] % self.pad_to), value=self.pad_value)
        return x, frames

    @staticmethod
    def _normalize(x: Tensor, valid: Tensor, frames: Tensor) -> Tensor:
        """Per mel bin: subtract the mean and divide by the unbiased std of the valid frames."""
        valid = valid[:, None, :]
        count = frames[:, None]
        mean = torch.where(valid, x, 0.0).sum(dim=2) / count
        centred = torch.where(valid, x - mean[:, :, None], 0.0)
        std = torch.sqrt((centred**2).sum(dim=2) / (count - 1.0))
        # A single valid frame gives 0/0: treat its spread as zero.
        std = std.masked_fill(std.isnan(), 0.0) + STD_EPS
        return (x - mean[:, :, None]) / std[:, :, None]
